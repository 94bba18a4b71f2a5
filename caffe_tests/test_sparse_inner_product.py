"""The sparse InnerProduct (fully connected) forward path equals dense, and is chosen as documented.

Tolerance as in test_forward_paths.py: the sparse path adds the same products as the dense GEMM in
another order, skipping exact zeros, so we allow 1e-5 relative plus 1e-5 of the largest sum of
|terms| (float32). pycaffe nets are float; Caffe's own InnerProduct gtests, forced onto the sparse
path below, cover double.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from .test_caffe_gtests import _build
from sparse_caffe.host.run import run_gtests

SPARSITY = [0.0, 0.5, 0.9, 0.99, 1.0]


@pytest.fixture
def fc_paths(caffe):
    """Forward-path overrides set by a test are always removed afterwards."""
    caffe.clear_fc_forward_paths()
    try:
        yield caffe
    finally:
        caffe.clear_fc_forward_paths()


def fc_prototxt(shape, num_output, bias=True, transpose=False, axis=1, extra=""):
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param {{ num_output: {num_output} bias_term: {str(bias).lower()}
    transpose: {str(transpose).lower()} axis: {axis} {extra} }} }}
"""


def sparse_matrix(rng, shape, zeros):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < zeros] = 0.0
    return w


def load(net, rng, zeros, input_zeros=0.5):
    """Random weights (`zeros` of them zero), bias and input; returns x (M x K), W (N x K), b."""
    weight = net.params["fc"][0].data
    weight[...] = sparse_matrix(rng, weight.shape, zeros)
    b = None
    if len(net.params["fc"]) > 1:
        b = rng.standard_normal(net.params["fc"][1].data.shape).astype(np.float32)
        net.params["fc"][1].data[...] = b
    net.blobs["data"].data[...] = sparse_matrix(rng, net.blobs["data"].data.shape, input_zeros)
    return net.blobs["data"].data.copy(), weight.copy(), b


def forward_on(caffe, net, path):
    caffe.set_fc_forward_path(path, "fc")
    return net.forward()["fc"].copy()


def assert_close(got, dense, x2d, w_nk, b):
    """Within 1e-5 relative + 1e-5 of the largest |terms| sum, and against numpy."""
    magnitude = np.abs(x2d) @ np.abs(w_nk).T + (0 if b is None else np.abs(b))
    atol = 1e-5 * max(float(magnitude.max(initial=0.0)), 1e-30)
    got2d, dense2d = got.reshape(x2d.shape[0], -1), dense.reshape(x2d.shape[0], -1)
    np.testing.assert_allclose(got2d, dense2d, rtol=1e-5, atol=atol)
    reference = x2d.astype(np.float64) @ w_nk.T.astype(np.float64) + (0 if b is None else b)
    np.testing.assert_allclose(got2d, reference, rtol=1e-4, atol=1e-4 * max(magnitude.max(), 1e-30))


def path_ran(caffe, layer="fc"):
    return caffe.conv_profile()[layer]["path"]


@pytest.mark.parametrize("zeros", SPARSITY)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("transpose", [False, True], ids=["W", "WT"])
@pytest.mark.parametrize("batch", [1, 3, 8, 19])
def test_sparse_equals_dense(caffe, make_net, fc_paths, profiling, batch, transpose, bias, zeros):
    net = make_net(fc_prototxt((batch, 5, 6, 7), 37, bias=bias, transpose=transpose))
    rng = np.random.default_rng(zlib.crc32(f"{batch}{transpose}{bias}{zeros}".encode()))
    x, weight, b = load(net, rng, zeros)
    w_nk = weight.T if transpose else weight
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, "sparse")
    assert path_ran(caffe) == "sparse"
    assert_close(got, dense, x.reshape(batch, -1), w_nk, b)


@pytest.mark.parametrize("transpose", [False, True], ids=["W", "WT"])
def test_axis_other_than_one(caffe, make_net, fc_paths, transpose):
    """axis 2: the first two axes are images (M = 2 x 3), the rest is one input vector."""
    net = make_net(fc_prototxt((2, 3, 4, 5), 11, transpose=transpose, axis=2))
    x, weight, b = load(net, np.random.default_rng(7), 0.8)
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, "sparse")
    assert got.shape == (2, 3, 11)
    assert_close(got, dense, x.reshape(6, 20), weight.T if transpose else weight, b)


@pytest.mark.parametrize("batch", [1, 4])
def test_wide_input_uses_32_bit_column_indices(caffe, make_net, fc_paths, batch):
    """K = 70000 > 65536: column indices no longer fit in 16 bits."""
    net = make_net(fc_prototxt((batch, 70000), 5))
    x, weight, b = load(net, np.random.default_rng(3), 0.9)
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, "sparse")
    assert_close(got, dense, x, weight, b)


@pytest.mark.parametrize("transpose", [False, True], ids=["W", "WT"])
def test_weights_written_from_python_after_a_forward_are_seen(caffe, make_net, fc_paths,
                                                              transpose):
    net = make_net(fc_prototxt((2, 50), 20, transpose=transpose))
    rng = np.random.default_rng(11)
    x, weight, b = load(net, rng, 0.9)
    forward_on(caffe, net, "sparse")
    new = sparse_matrix(rng, weight.shape, 0.5)
    net.params["fc"][0].data[...] = new  # a write through pycaffe's .data bumps the version
    got = forward_on(caffe, net, "sparse")
    dense = forward_on(caffe, net, "dense")
    assert_close(got, dense, x, new.T if transpose else new, b)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("where", ["input", "weights"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_values_propagate_as_in_dense(caffe, make_net, fc_paths, batch, where, value):
    """Dense computes 0 x NaN = NaN; the sparse path skips zero weights, so it runs dense then."""
    net = make_net(fc_prototxt((batch, 40), 16))
    rng = np.random.default_rng(5)
    load(net, rng, 0.9, input_zeros=0.5)
    if where == "input":
        net.blobs["data"].data[0, 3] = value
    else:
        net.params["fc"][0].data[2, 7] = value
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, "sparse")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(dense))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(dense))
    finite = np.isfinite(dense)
    np.testing.assert_allclose(got[finite], dense[finite], rtol=1e-5, atol=1e-5)
    assert not finite.all()


def test_profile_counts_the_layer(caffe, make_net, fc_paths, profiling):
    net = make_net(fc_prototxt((3, 64), 32))
    x, weight, b = load(net, np.random.default_rng(9), 0.75, input_zeros=0.4)
    forward_on(caffe, net, "sparse")
    entry = caffe.conv_profile()["fc"]
    assert entry["path"] == "sparse" and entry["backend"] == "openmp"
    assert entry["calls"] == 3
    assert entry["input_elements"] == x.size
    assert entry["input_nonzeros"] == np.count_nonzero(x)
    assert entry["dense_macs"] == 3 * 32 * 64
    assert entry["weight_nonzeros"] == np.count_nonzero(weight)
    assert entry["weight_elements"] == weight.size
    assert entry["useful_macs"] == int(((x != 0).astype(int) @ (weight != 0).T.astype(int)).sum())
    assert entry["seconds"]["multiply"] > 0 and entry["seconds"]["weight2csr"] > 0
    forward_on(caffe, net, "dense")
    assert caffe.conv_profile()["fc"]["path"] == "dense"


def test_selection_by_prototxt_and_pycaffe(caffe, make_net, fc_paths, profiling):
    assert caffe.fc_forward_paths() == ["dense", "sparse"]
    net = make_net(fc_prototxt((1, 30), 8, extra="forward_path: SPARSE"))
    load(net, np.random.default_rng(1), 0.9)
    net.forward()
    assert path_ran(caffe) == "sparse"
    caffe.set_fc_forward_path("dense")  # every layer: wins over the prototxt
    net.forward()
    assert path_ran(caffe) == "dense"
    caffe.set_fc_forward_path("sparse", "fc")  # this layer: wins over every layer
    net.forward()
    assert path_ran(caffe) == "sparse"
    caffe.set_fc_forward_path("default", "fc")
    net.forward()
    assert path_ran(caffe) == "dense"
    caffe.clear_fc_forward_paths()
    net.forward()
    assert path_ran(caffe) == "sparse"
    with pytest.raises(ValueError, match="unknown InnerProduct forward path 'spmdm'"):
        caffe.set_fc_forward_path("spmdm")


def test_plain_prototxt_runs_dense_and_skimcaffe_gemm_mode_picks_sparse(caffe, make_net, fc_paths,
                                                                        profiling):
    plain = make_net(fc_prototxt((1, 30), 8))
    load(plain, np.random.default_rng(2), 0.9)
    plain.forward()
    assert path_ran(caffe) == "dense"
    skim = make_net(fc_prototxt((1, 30), 8, extra="gemm_mode: SPMDM spmdm_transpose_in: false"))
    load(skim, np.random.default_rng(2), 0.9)
    skim.forward()
    assert path_ran(caffe) == "sparse"
    both = make_net(fc_prototxt((1, 30), 8, extra="gemm_mode: SPMDM forward_path: DENSE"))
    load(both, np.random.default_rng(2), 0.9)
    both.forward()
    assert path_ran(caffe) == "dense"


ENV_SCRIPT = """
import sys, numpy as np, caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TEST)
net.params["fc"][0].data[...] = 1.0
caffe.set_conv_profiling(True)
caffe.set_fc_forward_path("dense")  # the environment wins over pycaffe
net.forward()
print(caffe.conv_profile()["fc"]["path"])
"""


def run_with_env(caffe_python_path, tmp_path, value):
    prototxt = tmp_path / "fc.prototxt"
    prototxt.write_text(fc_prototxt((2, 10), 4))
    env = dict(os.environ, SPARSE_CAFFE_FC_PATH=value, GLOG_minloglevel="2",
               PYTHONPATH=str(caffe_python_path))
    return subprocess.run([sys.executable, "-c", ENV_SCRIPT, str(prototxt)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_selection_by_environment(caffe_python_path, tmp_path):
    for value in ("sparse", "dense"):
        result = run_with_env(caffe_python_path, tmp_path, value)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == value
    bad = run_with_env(caffe_python_path, tmp_path, "bogus")
    assert bad.returncode != 0
    assert "SPARSE_CAFFE_FC_PATH=bogus is not one of: dense, sparse" in bad.stderr


@pytest.mark.parametrize("path", ["sparse", "auto"])
def test_caffe_inner_product_gtests_on_the_sparse_path(monkeypatch, path):
    """Caffe's own InnerProduct suite (float and double, transpose, axis) with every layer forced
    onto the sparse path (or auto) through the environment. Under auto, TestForwardTranspose is
    left out: auto sends its dense-weight layers to dense, and that test wants the GEMM of the
    weights and of their transpose to agree to the last bit, which OpenBLAS's do not always do
    (dense forced: 1-4 failures in 80 runs on an AVX-512 Xeon, one thread or two; the sparse path
    runs both layers through one kernel and always agrees)."""
    monkeypatch.setenv("SPARSE_CAFFE_FC_PATH", path)
    skip = ":*TestForwardTranspose" if path == "auto" else ""
    cases, output = run_gtests(_build(), f"InnerProductLayerTest*-*GPU*{skip}")
    assert len(cases) >= (16 if skip else 18), output[-2000:]  # 9 cases (8) x float, double
    failed = [f"{c.suite}.{c.name}: {c.message}" for c in cases if not c.passed]
    assert not failed, "\n".join(failed)


def test_the_fc_environment_override_reaches_the_gtest_binary(monkeypatch):
    """The forced run above would be meaningless if the variable were ignored."""
    build = _build()
    monkeypatch.setenv("SPARSE_CAFFE_FC_PATH", "bogus")
    result = subprocess.run([str(build.gtest_binary), "--gtest_filter=InnerProductLayerTest/0.*"],
                            cwd=build.source, capture_output=True, text=True)
    assert result.returncode != 0
    assert "SPARSE_CAFFE_FC_PATH=bogus is not one of: dense, sparse" in result.stderr
