"""Fixtures for tests against a patched Caffe build: pycaffe itself, and nets built from NetSpecs.

The build is named by SPARSE_CAFFE_BUILD (a build root, as `./inv test` sets it), never found by
searching, so a test run always says which build it checked.
"""
from __future__ import annotations

import importlib
import itertools
import os
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def caffe_python_path() -> Path:
    """The build's pycaffe folder (what goes on PYTHONPATH to import it)."""
    root = os.environ.get("SPARSE_CAFFE_BUILD")
    if not root:
        pytest.fail("SPARSE_CAFFE_BUILD is not set: run the tests through ./inv test")
    return (Path(root) / "src" / "python").resolve()


@pytest.fixture(scope="session")
def caffe(caffe_python_path):
    """pycaffe from the build under test, in CPU mode."""
    python_path = caffe_python_path
    if not (python_path / "caffe" / "__init__.py").is_file():
        pytest.fail(f"no pycaffe under {python_path}: is SPARSE_CAFFE_BUILD a finished build?")
    # glog reads this when the library loads; 2 keeps Caffe's INFO/WARNING chatter out of the output.
    os.environ.setdefault("GLOG_minloglevel", "2")
    sys.path.insert(0, str(python_path))
    module = importlib.import_module("caffe")
    # A caffe imported earlier from elsewhere (PYTHONPATH, site-packages) would test the wrong build.
    if not Path(module.__file__).resolve().is_relative_to(python_path):
        pytest.fail(f"imported caffe from {module.__file__}, not from {python_path}")
    module.set_mode_cpu()
    return module


def write_net(caffe, spec, path: Path):
    """A TEST-phase net from a NetSpec (or prototxt text), through a prototxt file at `path`."""
    text = spec if isinstance(spec, str) else str(spec.to_proto())
    path.write_text(text)
    return caffe.Net(str(path), caffe.TEST)


@pytest.fixture
def make_net(caffe, tmp_path):
    """make_net(spec) -> caffe.Net; each call gets its own prototxt file in the test's tmp_path."""
    counter = itertools.count()

    def make(spec):
        return write_net(caffe, spec, tmp_path / f"net{next(counter)}.prototxt")

    return make


@pytest.fixture
def profiling(caffe):
    """Profiling switched on with zeroed counters; always switched off and zeroed afterwards."""
    caffe.reset_conv_profile()
    caffe.set_conv_profiling(True)
    try:
        yield caffe
    finally:
        caffe.set_conv_profiling(False)
        caffe.reset_conv_profile()
