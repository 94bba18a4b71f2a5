from __future__ import annotations

import pytest

from sparse_caffe.patching.templating import TemplateError, apply_edits, parse_edits, render

ORIGINAL = "#include <a>\n\nint f() {\n  if (x) {\n    y();\n  }\n  return 1;\n}\n"


def edit(text: str) -> str:
    return apply_edits(ORIGINAL, parse_edits(text, "t.edit.j2"), "t.edit.j2", "f.cpp")


def test_after_before_replace():
    out = edit("// why\n//@ after: #include <a>\n#include <b>\n//@ before:   return 1;\n  z();\n"
               "//@ replace:     y();\n    w();\n")
    assert out == ("#include <a>\n#include <b>\n\nint f() {\n  if (x) {\n    w();\n  }\n  z();\n"
                   "  return 1;\n}\n")


def test_replace_through_uses_exact_indentation_for_the_end():
    # "  }" closes the if; the function's "}" at column 0 ends the range.
    out = edit("//@ replace: int f() {\n//@ through: }\nint f() { return 2; }\n")
    assert out == "#include <a>\n\nint f() { return 2; }\n"


@pytest.mark.parametrize("text, message", [
    ("//@ after: int g() {\nx\n", "matches 0 lines"),
    ("//@ replace: int f() {\n//@ through: nothing\n", "end anchor"),
    ("int stray;\n//@ after: #include <a>\n", "text before the first edit directive"),
    ("// only a comment\n", "holds no edit directives"),
    ("//@ through: }\n", "'through' must directly follow"),
])
def test_bad_edits_name_template_and_line(text, message):
    with pytest.raises(TemplateError, match=message) as err:
        edit(text)
    assert "t.edit.j2" in str(err.value)


def test_strict_undefined_names_template_and_line(tmp_path):
    (tmp_path / "x.cpp.j2").write_text("int a;\nint b = /*{ config.missing }*/;\n")
    with pytest.raises(TemplateError, match=r"templates/x\.cpp\.j2:2: .*missing"):
        render("x.cpp.j2", {"config": object()}, tmp_path)


def test_syntax_error_names_template_and_line(tmp_path):
    (tmp_path / "x.cpp.j2").write_text("int a;\n/*% for x in %*/\n")
    with pytest.raises(TemplateError, match=r"templates/x\.cpp\.j2:2"):
        render("x.cpp.j2", {}, tmp_path)


def test_cpp_friendly_delimiters_render(tmp_path):
    (tmp_path / "x.j2").write_text("/*% for p in phases %*/\nint /*{ p }*/;\n/*% endfor %*/\n")
    assert render("x.j2", {"phases": ["a", "b"]}, tmp_path) == "int a;\nint b;\n"
