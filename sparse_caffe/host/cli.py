"""The `./inv` program: invoke's own, except that a value invoke cannot convert (`--batch abc`)
ends in one line naming the option instead of a traceback from invoke's parser."""
from __future__ import annotations

import re
import sys

from invoke import Program, __version__
from invoke.exceptions import ParseError


def _bad_value_message(exc: ValueError, argv: list[str]) -> str:
    """One line for a value invoke could not convert: the option, the value, what it wants."""
    match = (re.search(r"invalid literal for (int)\(\)(?: with base \d+)?: '(.*)'$", str(exc))
             or re.search(r"could not convert string to (float): '(.*)'$", str(exc)))
    if not match:
        return f"error: {exc}; see ./inv --help TASK"
    kind, value = match.groups()
    wanted = {"int": "a whole number", "float": "a number"}[kind]
    option = next((argv[i - 1] for i in range(1, len(argv))
                   if argv[i] == value and argv[i - 1].startswith("-")), None)
    option = option or next((a.split("=", 1)[0] for a in argv if a.endswith(f"={value}")), "an option")
    return f"error: {option} {value}: expected {wanted}; see ./inv --help TASK"


class SparseCaffeProgram(Program):
    def parse_tasks(self) -> None:
        try:
            super().parse_tasks()
        except ValueError as exc:
            raise ParseError(_bad_value_message(exc, list(self.core.unparsed))) from None


program = SparseCaffeProgram(name="sparse-caffe", binary="./inv", binary_names=["inv"],
                             version=__version__)

if __name__ == "__main__":
    sys.exit(program.run())
