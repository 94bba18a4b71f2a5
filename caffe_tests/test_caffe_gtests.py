"""Caffe's own gtest suites (convolution, deconvolution, im2col, inner product, pooling, eltwise,
neuron) on our patched build.

Each gtest case becomes one pytest item; the binary runs once per session (CPU cases only).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sparse_caffe.patching.build import GTEST_SUITES, Build
from sparse_caffe.host.run import run_gtests

GTEST_FILTER = "-*GPU*"


def _build() -> Build:
    root = os.environ.get("SPARSE_CAFFE_BUILD")
    if not root:
        pytest.fail("SPARSE_CAFFE_BUILD is not set: run the tests through ./inv test")
    return Build.load(Path(root))


def listed_cases(build: Build) -> list[str]:
    """'Suite/N.Test' names, as the binary lists them for our filter."""
    out = subprocess.run([str(build.gtest_binary), "--gtest_list_tests", f"--gtest_filter={GTEST_FILTER}"],
                         capture_output=True, text=True, check=True, cwd=build.source).stdout
    cases, suite = [], None
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            suite = line.split()[0].rstrip(".")
        else:
            cases.append(f"{suite}.{line.split()[0]}")
    return cases


def pytest_generate_tests(metafunc):
    if "gtest_case" in metafunc.fixturenames:
        root = os.environ.get("SPARSE_CAFFE_BUILD")
        cases = listed_cases(Build.load(Path(root))) if root else ["SPARSE_CAFFE_BUILD-unset"]
        metafunc.parametrize("gtest_case", cases)


@pytest.fixture(scope="session")
def gtest_results():
    cases, output = run_gtests(_build(), GTEST_FILTER)
    return {f"{c.suite}.{c.name}": c for c in cases}, output


def test_every_requested_suite_is_built():
    """Every suite is in the binary, in float and double (typed tests /0 and /1 on CPU)."""
    cases = listed_cases(_build())
    for suite in GTEST_SUITES:
        camel = "".join(part.capitalize() for part in suite.split("_"))
        typed = {c.split(".")[0] for c in cases if c.startswith(camel + "Test/")}
        assert typed, f"no {camel}Test cases in {sorted({c.split('.')[0] for c in cases})}"
        assert len(typed) == 2, f"{camel}Test should run for float and double, got {typed}"


def test_caffe_gtest(gtest_case, gtest_results):
    results, output = gtest_results
    assert gtest_case in results, f"{gtest_case} did not run; gtest output tail:\n{output[-2000:]}"
    case = results[gtest_case]
    assert case.passed, f"{gtest_case} failed:\n{case.message}"


CONV_SUITES = "ConvolutionLayerTest*:DeconvolutionLayerTest*:Im2colLayerTest*"


@pytest.mark.parametrize("path", ["spmdm", "sparse_sparse", "sparse_output", "direct", "onednn",
                                  "activation_sparse", "gemm_1x1", "auto"])
@pytest.mark.parametrize("backend", ["openmp", "mkl"])
def test_caffe_gtests_with_every_layer_forced_onto_a_path(path, backend, monkeypatch):
    """Caffe's own convolution, deconvolution and im2col suites (float and double), with every
    layer forced onto one path through the environment override (onednn runs the float cases and
    sends double to dense; activation_sparse and gemm_1x1 run the 1x1 cases and send the rest to
    dense; the sparse back end does not matter to those three, so each runs once; auto: each
    forward of a calibrating layer runs another candidate, and a gradient check's weight writes
    re-plan)."""
    if path in ("onednn", "activation_sparse", "gemm_1x1") and backend != "openmp":
        pytest.skip(f"{path} does not use the sparse back end: its openmp case covers it")
    build = _build()
    if backend == "mkl" and build.inputs.get("blas") != "mkl":
        pytest.skip("MKL back end needs a --blas mkl build")
    monkeypatch.setenv("SPARSE_CAFFE_FORWARD_PATH", path)
    monkeypatch.setenv("SPARSE_CAFFE_SPARSE_BACKEND", backend)
    cases, output = run_gtests(build, f"{CONV_SUITES}-*GPU*")
    assert len(cases) >= 40, output[-2000:]
    failed = [f"{c.suite}.{c.name}: {c.message}" for c in cases if not c.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_caffe_gtests_on_direct_with_a_lesser_kernel(isa, monkeypatch):
    """The direct path's portable and AVX2 kernels, float and double (a machine with AVX-512 runs
    that one in the test above)."""
    build = _build()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if isa == "avx2" and not (" avx2" in flags and " fma" in flags):
        pytest.skip("this CPU has no AVX2+FMA")
    monkeypatch.setenv("SPARSE_CAFFE_FORWARD_PATH", "direct")
    monkeypatch.setenv("SPARSE_CAFFE_DIRECT_ISA", isa)
    cases, output = run_gtests(build, "ConvolutionLayerTest*-*GPU*")
    assert len(cases) >= 20, output[-2000:]
    failed = [f"{c.suite}.{c.name}: {c.message}" for c in cases if not c.passed]
    assert not failed, "\n".join(failed)


def test_the_environment_override_reaches_the_gtest_binary(monkeypatch):
    """The forced-path runs above would be meaningless if the variable were ignored: a bad value
    must stop the binary with a message naming the variable."""
    build = _build()
    monkeypatch.setenv("SPARSE_CAFFE_FORWARD_PATH", "bogus")
    result = subprocess.run([str(build.gtest_binary), "--gtest_filter=ConvolutionLayerTest/0.*"],
                            cwd=build.source, capture_output=True, text=True)
    assert result.returncode != 0
    assert "SPARSE_CAFFE_FORWARD_PATH=bogus is not one of: dense, spmdm" in result.stderr
