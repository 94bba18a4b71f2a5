"""The package's shape: every module imports alone, imports point down the layers, no cycles.

The layers, lowest first (sparse_caffe/__init__.py): the foundation modules in sparse_caffe/
itself, patching/, models/, inside/, host/. A module may import its own layer and the layers
below it. The modules that are a child process's main program (started by name, `python -m`, by
the executors) are imported by no other module but an executor.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_caffe.patching.config import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "sparse_caffe"
LAYERS = ("", "patching", "models", "inside", "host")
# A child process's main program, and nothing else: started by name, imported by no library.
CHILD_MAINS = {"sparse_caffe.inside.child", "sparse_caffe.inside.tune_runner",
               "sparse_caffe.inside.plain_forward", "sparse_caffe.inside.rss_probe",
               "sparse_caffe.inside.sparsity"}
# The runners the one measurement child (sparse_caffe.inside.child) imports by name, per kind of
# RunSpec: child-process code too.
RUNNERS = {"sparse_caffe.inside.bench_runner", "sparse_caffe.inside.layer_bench"}
# The code that starts those children (a local subprocess, a container).
EXECUTORS = {"sparse_caffe.host.run", "sparse_caffe.host.bench", "sparse_caffe.host.tune",
             "sparse_caffe.host.docker_route", "sparse_caffe.host.measurement"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else 0


def imports_of(module: str) -> set[str]:
    """The package's modules that `module` imports anywhere, functions included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_alone_in_a_fresh_interpreter(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_import_walk_sees_imports_inside_functions():
    """The graph below is not vacuous: it has edges, relative ones, and ones hidden in functions."""
    assert "sparse_caffe.errors" in GRAPH["sparse_caffe.patching.config"]
    assert "sparse_caffe.models.nets" in GRAPH["sparse_caffe.models.onnx_import"]
    assert "sparse_caffe.inside.layer_bench" in GRAPH["sparse_caffe.host.run"]  # in a function


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_down_the_layers():
    upward = [f"{module} imports {target}" for module, targets in GRAPH.items()
              for target in targets if layer_of(target) > layer_of(module)]
    assert not upward, upward


def test_only_the_executors_import_a_child_process_main():
    child_code = CHILD_MAINS | RUNNERS
    wrong = [f"{module} imports {target}" for module, targets in GRAPH.items()
             for target in targets & child_code if module not in EXECUTORS]
    assert not wrong, wrong


def test_the_one_childs_runners_exist_and_have_a_run():
    from sparse_caffe.inside import child, protocol
    assert set(child.RUNNERS) <= set(protocol.KINDS) and set(child.RUNNERS.values()) == RUNNERS
    for module in RUNNERS:
        assert "\ndef run(spec" in MODULES[module].read_text(), module


def test_the_modules_started_by_name_exist_and_have_a_main():
    """Every `python -m sparse_caffe.X` the executors and the Docker image start is a module of
    the package with a main program; and every child-process main is started by one of them."""
    started = set()
    for path in [*(MODULES[m] for m in EXECUTORS), PROJECT_ROOT / "docker" / "Dockerfile",
                 PROJECT_ROOT / "inv"]:
        text = path.read_text()
        started.update(f"sparse_caffe.{name}" for name in re.findall(r'"(inside\.\w+)"', text))
        started.update(f"sparse_caffe.{name}" for name in
                       re.findall(r'pycaffe\(\s*build,\s*"([\w.]+)"', text))
        started.update(re.findall(r"-m\"?,? \"?(sparse_caffe\.[\w.]+)", text))
    assert CHILD_MAINS <= started, CHILD_MAINS - started
    for module in started:
        assert module in MODULES, module
        assert "if __name__ == \"__main__\":" in MODULES[module].read_text(), module


def test_tasks_imports_without_changing_directory(tmp_path):
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); before = os.getcwd(); import tasks; "
            "assert os.getcwd() == before, os.getcwd()")
    result = subprocess.run([sys.executable, "-c", code, str(PROJECT_ROOT)], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
