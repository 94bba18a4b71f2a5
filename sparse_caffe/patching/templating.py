"""The one module that owns jinja2, and the anchored-edit format for changing upstream files.

Templates use delimiters that keep them valid-looking C++: /*{ expr }*/, /*% stmt %*/, /*# note #*/.
Two kinds of template live under templates/, mirroring Caffe's tree:
  <path>.j2       renders a complete new file of ours;
  <path>.edit.j2  renders anchored edits of Caffe's own <path>, applied to the pristine file to give
                  the complete patched file (so no upstream code is committed here, only anchors).
Edit directives, each on its own line, in C++ (//@) or Python (#@) comment form:
  //@ after: <anchor>     insert the following lines after the one line equal to <anchor>
  //@ before: <anchor>    insert them before it
  //@ replace: <anchor>   replace that line; an immediately following `//@ through: <end>` extends
                          the replaced range to the first line equal to <end> after it
An anchor is the whole line, indentation included (trailing whitespace ignored; one space after the
colon separates it from the directive); the start anchor must match exactly one line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from .config import RENDER_COMMAND, TEMPLATES_DIR


class TemplateError(Exception):
    """A template could not be rendered or applied; the message names template and line."""


def environment(templates_dir: Path = TEMPLATES_DIR) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        variable_start_string="/*{", variable_end_string="}*/",
        block_start_string="/*%", block_end_string="%*/",
        comment_start_string="/*#", comment_end_string="#*/",
        autoescape=False,
    )


def render(template_name: str, context: dict[str, Any], templates_dir: Path = TEMPLATES_DIR) -> str:
    """Render one template; any error becomes a TemplateError naming the template and line."""
    try:
        return environment(templates_dir).get_template(template_name).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"templates/{exc.name or template_name}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"templates/{template_name}:{_template_line(exc, template_name)}: "
                            f"{exc} (rendering with {sorted(context)})") from None


def _template_line(exc: BaseException, template_name: str) -> str:
    tb, line = exc.__traceback__, "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(template_name):
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line


def generated_header(target: str, *template_names: str) -> str:
    comment = "#" if target.endswith((".py", ".txt", ".cmake")) else "//"
    names = " and ".join(f"templates/{name}" for name in template_names)
    plural = "s" if len(template_names) > 1 else ""
    return (f"{comment} @generated from {names} by {RENDER_COMMAND};"
            f" edit the template{plural}, not this file.\n")


_DIRECTIVE = re.compile(r"^\s*(?://|#)@\s*(after|before|replace|through):\s?(.*?)\s*$")


@dataclass(frozen=True)
class Edit:
    kind: str
    anchor: str
    through: str | None
    body: tuple[str, ...]
    line: int  # line of the directive in the rendered template


def parse_edits(rendered: str, template_name: str) -> list[Edit]:
    edits: list[Edit] = []
    current: dict[str, Any] | None = None
    for number, text in enumerate(rendered.splitlines(keepends=True), start=1):
        match = _DIRECTIVE.match(text)
        if match:
            kind, anchor = match.groups()
            if kind == "through":
                if current is None or current["kind"] != "replace" or current["body"] \
                        or current["through"] is not None:
                    raise TemplateError(f"templates/{template_name}:{number}: 'through' must directly "
                                        "follow a 'replace' directive")
                current["through"] = anchor
                continue
            if current is not None:
                edits.append(Edit(**{**current, "body": tuple(current["body"])}))
            current = {"kind": kind, "anchor": anchor, "through": None, "body": [], "line": number}
        elif current is None:
            if text.strip() and not text.lstrip().startswith(("//", "#")):
                raise TemplateError(f"templates/{template_name}:{number}: text before the first "
                                    "edit directive (only comments may stand there)")
        else:
            current["body"].append(text)
    if current is not None:
        edits.append(Edit(**{**current, "body": tuple(current["body"])}))
    if not edits:
        raise TemplateError(f"templates/{template_name}: an .edit.j2 template holds no edit directives")
    return edits


def apply_edits(original: str, edits: list[Edit], template_name: str, upstream_path: str) -> str:
    lines = original.splitlines(keepends=True)
    for edit in edits:
        where = f"templates/{template_name}:{edit.line}"
        start = _find_unique(lines, edit.anchor, 0, where, upstream_path)
        if edit.kind == "after":
            lines[start + 1:start + 1] = edit.body
        elif edit.kind == "before":
            lines[start:start] = edit.body
        else:
            end = start
            if edit.through is not None:
                end = next((i for i in range(start + 1, len(lines))
                            if lines[i].rstrip() == edit.through), None)
                if end is None:
                    raise TemplateError(f"{where}: end anchor {edit.through!r} not found after "
                                        f"{edit.anchor!r} in {upstream_path}")
            lines[start:end + 1] = edit.body
    return "".join(lines)


def _find_unique(lines: list[str], anchor: str, start: int, where: str, upstream_path: str) -> int:
    hits = [i for i in range(start, len(lines)) if lines[i].rstrip() == anchor]
    if len(hits) != 1:
        raise TemplateError(f"{where}: anchor {anchor!r} matches {len(hits)} lines of {upstream_path}, "
                            "needs exactly one")
    return hits[0]
