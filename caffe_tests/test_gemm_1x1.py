"""The gemm_1x1 path equals dense on every 1x1 stride-1 convolution, and runs dense elsewhere.

Tolerance as in test_forward_paths.py: gemm_1x1 adds the same products as Caffe's GEMM (every
weight times every input) in another order, in chunks of input channels, so each float32 output
may differ from dense by about K * 2**-24 of the sum of |terms|.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from .test_activation_sparse import (assert_deconvolution_runs_dense, assert_refused_with_one_line,
                                     assert_right_on_isa, load)
from .test_conv_reference import CASES, conv_spec, random_input, reference_conv
from .test_forward_paths import assert_close_to, forward_on, paths  # noqa: F401 - paths is a fixture

PATH = "gemm_1x1"
# (id, input shape, outputs, convolution): output channels below, at and past the 6 of a register
# tile; positions below, at and past a tile's 16 floats (7x7 = 49 and 14x14 = 196 leave a tail), one
# position alone; input channels past a chunk (256 floats) and a column range past an L2 chunk.
SHAPES = [
    ("tiny", (1, 1, 1, 1), 1, dict()),
    ("c3-o5", (1, 3, 7, 9), 5, dict()),
    ("c17-o6-batch3", (3, 17, 4, 4), 6, dict()),
    ("c8-o13-7x7", (2, 8, 7, 7), 13, dict()),
    ("c64-o70", (1, 64, 14, 14), 70, dict()),
    ("c300-o12-chunks", (1, 300, 5, 9), 12, dict()),
    ("c600-o7-two-chunks-7x7", (1, 600, 7, 7), 7, dict()),
    ("c256-o8-wide", (1, 256, 20, 40), 8, dict()),
    ("c6-o4-group2", (2, 6, 5, 7), 4, dict(group=2)),
    ("c9-o21-group3", (1, 9, 6, 6), 21, dict(group=3)),
    ("c16-o32-dilation2", (1, 16, 6, 5), 32, dict(dilation=2)),
]


def geometry(conv):
    return dict(group=conv.get("group", 1))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_zeros", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("case", SHAPES, ids=lambda case: case[0])
def test_equals_dense_on_every_1x1_configuration(caffe, make_net, paths, profiling, case, bias,
                                                 fused, input_zeros):
    name, shape, outputs, conv = case
    conv = dict(conv, kernel_size=1, bias_term=bias, fused_relu=fused)
    net = make_net(conv_spec(caffe, "conv", shape, outputs, conv))
    rng = np.random.default_rng(zlib.crc32(f"{name}{bias}{fused}{input_zeros}".encode()))
    x, w, b = load(net, rng, input_zeros, bias)
    dense = forward_on(caffe, net, "dense")
    caffe.reset_conv_profile()
    got = forward_on(caffe, net, PATH)
    assert caffe.conv_profile()["conv"]["path"] == PATH  # it ran, not a dense fallback
    assert_close_to(got, x, w, b, geometry(conv), dense)
    expected = reference_conv(x, w, b, **geometry(conv))
    if fused:
        expected = np.maximum(expected, 0)
        assert (got >= 0).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_every_reference_case_equals_dense_or_runs_dense(caffe, make_net, paths, profiling, case):
    net = make_net(conv_spec(caffe, "conv", case.shape, case.num_output, case.conv))
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    w = rng.standard_normal(net.params["conv"][0].data.shape).astype(np.float32)
    net.params["conv"][0].data[...] = w
    b = None
    if case.bias:
        b = rng.standard_normal(net.params["conv"][1].data.shape).astype(np.float32)
        net.params["conv"][1].data[...] = b
    x = random_input(rng, case.shape, case.zeros)
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    caffe.reset_conv_profile()
    got = forward_on(caffe, net, PATH)
    runs = case.geometry()["stride"] == (1, 1) and case.geometry()["pad"] == (0, 0) and \
        w.shape[2:] == (1, 1)
    assert caffe.conv_profile()["conv"]["path"] == (PATH if runs else "dense"), case.id
    assert_close_to(got, x, w, b, case.geometry(), dense)
    np.testing.assert_allclose(got, reference_conv(x, w, b, **case.geometry()), rtol=1e-4,
                               atol=1e-4)


def test_profile_counts_useful_multiply_adds_and_times_its_phases(caffe, make_net, paths, profiling):
    net = make_net(conv_spec(caffe, "conv", (2, 6, 5, 7), 4, dict(kernel_size=1, bias_term=False)))
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    net.params["conv"][0].data[...] = w
    x = random_input(rng, (2, 6, 5, 7), 0.5)
    net.blobs["data"].data[...] = x
    forward_on(caffe, net, PATH)
    p = caffe.conv_profile()["conv"]
    flat = x.reshape(2, 6, -1)
    expected = int(sum(np.count_nonzero(w.reshape(4, 6)[:, k]) * np.count_nonzero(flat[n, k])
                       for n in range(2) for k in range(6)))
    assert (p["path"], p["calls"], p["useful_macs"], p["dense_macs"]) == \
        (PATH, 2, expected, 2 * 4 * 6 * 5 * 7)
    assert p["seconds"]["multiply"] > 0
    assert p["seconds"]["weight2csr"] > 0  # the first forward packed the weights
    caffe.reset_conv_profile()
    forward_on(caffe, net, PATH)
    assert caffe.conv_profile()["conv"]["seconds"]["weight2csr"] == 0  # and kept them


def test_weights_and_bias_written_from_python_are_used(caffe, make_net, paths):
    net = make_net(conv_spec(caffe, "conv", (1, 12, 6, 7), 9, dict(kernel_size=1)))
    rng = np.random.default_rng(5)
    x, _, b = load(net, rng, 0.5)
    forward_on(caffe, net, PATH)
    for round_ in range(3):
        w = rng.standard_normal((9, 12, 1, 1)).astype(np.float32)
        net.params["conv"][0].data[...] = w
        np.testing.assert_allclose(forward_on(caffe, net, PATH), reference_conv(x, w, b),
                                   rtol=1e-4, atol=1e-4, err_msg=f"stale weights in round {round_}")
        b = rng.standard_normal(9).astype(np.float32)  # the bias alone, weights unchanged
        net.params["conv"][1].data[...] = b
        np.testing.assert_allclose(forward_on(caffe, net, PATH), reference_conv(x, w, b),
                                   rtol=1e-4, atol=1e-4, err_msg=f"stale bias in round {round_}")


def test_a_reshaped_input_runs_right(caffe, make_net, paths):
    net = make_net(conv_spec(caffe, "conv", (1, 5, 8, 8), 7, dict(kernel_size=1)))
    rng = np.random.default_rng(8)
    load(net, rng, 0.5)
    forward_on(caffe, net, PATH)
    for shape in [(3, 5, 11, 6), (1, 5, 1, 9)]:
        net.blobs["data"].reshape(*shape)
        net.reshape()
        net.blobs["data"].data[...] = random_input(rng, shape, 0.5)
        dense = forward_on(caffe, net, "dense")
        got = forward_on(caffe, net, PATH)
        assert got.shape == dense.shape
        np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("where", ["input", "weights"])
def test_keeps_dense_non_finite_semantics(caffe, make_net, paths, where, fused):
    """Every weight meets every input, as in the GEMM (0 x NaN = NaN, 0 x Inf = NaN), and a fused
    ReLU keeps NaN as Caffe's ReLU does."""
    net = make_net(conv_spec(caffe, "conv", (2, 12, 5, 4), 13, dict(kernel_size=1,
                                                                     fused_relu=fused)))
    rng = np.random.default_rng(21)
    x, w, _ = load(net, rng, 0.5)
    w[3, 1, 0, 0] = 0.0
    if where == "input":
        x[0, 1, 3, 2] = np.nan
        x[1, 2, 0, 0] = np.inf
        x[1, 4, 2, 3] = -np.inf
    else:
        w[1, 2, 0, 0] = np.nan
        w[3, 0, 0, 0] = np.inf
    net.params["conv"][0].data[...] = w
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, PATH)
    assert np.isnan(dense).any()
    for check in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(check(got), check(dense))
    finite = np.isfinite(dense)
    np.testing.assert_allclose(got[finite], dense[finite], rtol=1e-5, atol=1e-4)


# What gemm_1x1 refuses: the layer runs dense, saying why once (at our log level).
REFUSED = [
    ("3x3", (1, 4, 6, 7), dict(kernel_size=3),
     "forward path gemm_1x1: gemm_1x1 runs 1x1 convolutions only, this kernel has 9 taps; using "
     "dense"),
    ("1x1-pad1", (1, 4, 6, 7), dict(kernel_size=1, pad=1),
     "forward path gemm_1x1: gemm_1x1 runs unpadded convolutions only; using dense"),
    ("1x1-stride2", (1, 4, 6, 7), dict(kernel_size=1, stride=2),
     "forward path gemm_1x1: gemm_1x1 runs stride 1 only; using dense"),
    ("1x1-3d", (1, 4, 3, 6, 7), dict(kernel_size=1),
     "forward path gemm_1x1: gemm_1x1 runs 2-D convolutions only, this one has 3 spatial axes; "
     "using dense"),
]

@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case[0])
def test_what_it_refuses_runs_dense_with_one_log_line(caffe_python_path, tmp_path, case):
    """One line per layer and reason, however often the path is asked for again."""
    _, shape, conv, line = case
    assert_refused_with_one_line(caffe_python_path, tmp_path, PATH, shape, conv, line)


def test_deconvolution_runs_dense(caffe, make_net, paths):
    assert_deconvolution_runs_dense(caffe, make_net, PATH)


def test_auto_cost_model_keeps_it_on_dense_1x1_layers_and_prunes_it_elsewhere(caffe):
    dense_1x1 = caffe.auto_cost_model(1.0, 1.0, kernel_area=1)
    assert PATH not in dense_1x1["pruned"]  # dense weights and inputs do not prune it
    assert dense_1x1["predicted"][PATH] < 1.0
    three = caffe.auto_cost_model(1.0, 0.3, kernel_area=9)
    assert three["pruned"][PATH] == "gemm_1x1 runs 1x1 convolutions only, this kernel has 9 taps"


def test_auto_times_it_on_a_1x1_layer_and_stays_right(caffe, make_net, paths):
    net = make_net(conv_spec(caffe, "conv", (1, 64, 10, 10), 64, dict(kernel_size=1)))
    rng = np.random.default_rng(17)
    load(net, rng, 0.3)
    dense = forward_on(caffe, net, "dense")
    caffe.reset_auto()
    try:
        got = forward_on(caffe, net, "auto")  # the output farthest from dense's over calibration
        np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-4)
        choice = caffe.auto_choices()["conv"]
        assert choice["candidates"][PATH] is not None, choice  # timed
    finally:
        caffe.reset_auto()


# Few output channels and many positions: two threads split the columns, not the channels.
ISA_SHAPES = SHAPES + [("few-outputs", (1, 40, 30, 30), 10, dict()),
                       ("many-outputs-7x7", (2, 96, 7, 7), 300, dict())]
ISA_INPUT_ZEROS = 0.3


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_on_each_vector_isa_and_thread_count(caffe_python_path, isa, threads, tmp_path,
                                             monkeypatch):
    """Every kernel set this CPU runs (SPARSE_CAFFE_DIRECT_ISA picks it for every path), in a
    fresh process, on one thread and on two."""
    assert_right_on_isa("test_gemm_1x1", isa, threads, caffe_python_path, tmp_path, monkeypatch)


def test_host_blobs_are_64_byte_aligned(caffe, make_net):
    """Rows of whole cache lines start on one, so gemm_1x1 reads them in place (patch 0010)."""
    net = make_net(conv_spec(caffe, "conv", (1, 3, 5, 7), 4, dict(kernel_size=1)))
    arrays = [blob.data for blob in net.blobs.values()] + \
        [p.data for params in net.params.values() for p in params]
    assert all(a.ctypes.data % 64 == 0 for a in arrays), [a.ctypes.data % 64 for a in arrays]
