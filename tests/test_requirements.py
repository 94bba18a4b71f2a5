"""The pinned Python packages: split by use, every one pinned once, what ./inv installs and what
pyproject.toml declares read from the same files, and every package the code imports pinned."""
from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib

import pytest

from sparse_caffe.errors import UserError
from sparse_caffe.patching.config import PROJECT_ROOT
from sparse_caffe.patching.requirements import REQUIREMENTS_DIR, pins, requirement

USES = sorted(p.stem for p in REQUIREMENTS_DIR.glob("*.txt"))
ON_DEMAND = {"pytorch", "mkl"}  # installed by bench --pytorch and build --blas mkl when asked for
NOT_FROM_PYPI = {"caffe", "sparse_caffe", "tests", "caffe_tests"}


def test_the_uses_are_split():
    assert USES == ["docker", "lint", "mkl", "onnx", "pytorch", "runtime", "test"]


def test_every_package_is_pinned_once():
    seen = {}
    for use in USES:
        for name, line in pins(use).items():
            assert "==" in line
            assert name not in seen, f"{name} is pinned in {seen.get(name)}.txt and {use}.txt"
            seen[name] = use


def test_an_unpinned_line_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("sparse_caffe.patching.requirements.REQUIREMENTS_DIR", tmp_path)
    (tmp_path / "x.txt").write_text("# comment\nnumpy>=2\n")
    with pytest.raises(UserError, match="not pinned"):
        pins("x")


def test_inv_installs_every_use_but_the_on_demand_ones():
    lines = [ln.split("#", 1)[0].strip()
             for ln in (PROJECT_ROOT / "requirements.txt").read_text().splitlines()]
    included = {ln.split()[1] for ln in lines if ln.startswith("-r")}
    assert {ln for ln in lines if ln and not ln.startswith("-r")} == set()
    assert included == {f"requirements/{use}.txt" for use in USES if use not in ON_DEMAND}


def test_pyproject_reads_the_same_files():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    dynamic = project["tool"]["setuptools"]["dynamic"]
    assert set(project["project"]["dynamic"]) == {"dependencies", "optional-dependencies"}
    assert dynamic["dependencies"]["file"] == ["requirements/runtime.txt"]
    extras = {name: spec["file"] for name, spec in dynamic["optional-dependencies"].items()}
    assert extras == {use: [f"requirements/{use}.txt"] for use in USES if use != "runtime"}
    assert project["project"]["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)


def test_the_on_demand_installs_use_the_pinned_lines():
    from sparse_caffe.host import bench
    from sparse_caffe.patching import build
    assert build.MKL_REQUIREMENT == requirement("mkl", "mkl-devel")
    assert bench.TORCH_REQUIREMENT == requirement("pytorch", "torch")


def imported_top_level_modules() -> set[str]:
    found = set()
    files = [PROJECT_ROOT / "tasks.py", *(path for folder in ("sparse_caffe", "tests", "caffe_tests")
                                          for path in (PROJECT_ROOT / folder).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - NOT_FROM_PYPI


def test_every_imported_package_is_pinned():
    pinned = {name for use in USES for name in pins(use)}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(imported_top_level_modules()):
        # Not installed (torch before the first bench --pytorch): its distribution's own name.
        dists = {d.lower() for d in providers.get(module, [module.replace("_", "-")])}
        if not dists & pinned:
            missing[module] = sorted(dists) or "not installed"
    assert not missing, missing
