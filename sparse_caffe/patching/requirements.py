"""The pinned Python packages, split by use in requirements/ (runtime, onnx, docker, test, lint,
and the two installed on demand: pytorch, mkl). pyproject.toml reads the same files."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .config import PROJECT_ROOT

REQUIREMENTS_DIR = PROJECT_ROOT / "requirements"


def pins(use: str) -> dict[str, str]:
    """{distribution name (lower case): its pinned `name==version` line} of requirements/<use>.txt."""
    path = REQUIREMENTS_DIR / f"{use}.txt"
    found = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            if not version:
                raise UserError(f"{path}: {line!r} is not pinned (name==version)")
            found[name.strip().lower()] = line
    return found


def requirement(use: str, name: str) -> str:
    """The pinned line of one package, e.g. requirement("mkl", "mkl-devel") == "mkl-devel==2026.2.0"."""
    return pins(use)[name.lower()]
