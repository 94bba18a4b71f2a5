"""The onednn path equals dense wherever Caffe's convolution is defined, or runs dense.

Tolerance as in test_forward_paths.py: oneDNN adds the same products as the GEMM in another order,
so each float32 output may differ from dense by about K * 2**-24 of the sum of |terms|.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from .test_conv_reference import CASES, conv_spec, random_input, reference_conv
from .test_forward_paths import assert_close_to, forward_on, paths  # noqa: F401 - paths is a fixture


def test_the_native_build_has_onednn(caffe):
    # The native build always links Debian's libdnnl: a silent dense fallback would make every
    # onednn column of a benchmark a copy of dense.
    assert "onednn" in caffe.conv_forward_paths()
    major = caffe.onednn_version().split(".")[0]
    assert major.isdigit() and int(major) >= 2, caffe.onednn_version()


def load(net, rng, case_zeros=0.0, bias=True):
    w = rng.standard_normal(net.params["conv"][0].data.shape).astype(np.float32)
    net.params["conv"][0].data[...] = w
    b = None
    if bias:
        b = rng.standard_normal(net.params["conv"][1].data.shape).astype(np.float32)
        net.params["conv"][1].data[...] = b
    x = random_input(rng, net.blobs["data"].data.shape, case_zeros)
    net.blobs["data"].data[...] = x
    return x, w, b


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_onednn_equals_dense_on_every_configuration(caffe, make_net, paths, case, fused):
    conv = dict(case.conv, fused_relu=True) if fused else case.conv
    net = make_net(conv_spec(caffe, "conv", case.shape, case.num_output, conv))
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    x, w, b = load(net, rng, case.zeros, case.bias)
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, "onednn")
    assert_close_to(got, x, w, b, case.geometry(), dense)
    if fused:
        assert (got >= 0).all()


def test_onednn_profile_names_it_and_times_its_phases(caffe, make_net, paths, profiling):
    net = make_net(conv_spec(caffe, "conv", (2, 8, 9, 9), 16, dict(kernel_size=3, pad=1)))
    load(net, np.random.default_rng(3))
    forward_on(caffe, net, "onednn")
    entry = caffe.conv_profile()["conv"]
    assert entry["path"] == "onednn"
    assert entry["calls"] == 2  # per image, as every path counts
    assert entry["dense_macs"] == 2 * 16 * 8 * 9 * 9 * 9
    assert entry["seconds"]["multiply"] > 0


def test_weights_written_from_python_are_reordered_again(caffe, make_net, paths):
    net = make_net(conv_spec(caffe, "conv", (1, 4, 6, 7), 5, dict(kernel_size=3, pad=1)))
    rng = np.random.default_rng(5)
    load(net, rng)
    forward_on(caffe, net, "onednn")
    net.params["conv"][0].data[...] *= -2.0
    dense = forward_on(caffe, net, "dense")
    np.testing.assert_allclose(forward_on(caffe, net, "onednn"), dense, rtol=1e-5, atol=1e-5)


def test_a_reshaped_input_remakes_the_primitive(caffe, make_net, paths):
    net = make_net(conv_spec(caffe, "conv", (1, 3, 8, 8), 4, dict(kernel_size=3, stride=2)))
    rng = np.random.default_rng(8)
    load(net, rng)
    forward_on(caffe, net, "onednn")
    for shape in [(3, 3, 11, 6), (1, 3, 5, 9)]:
        net.blobs["data"].reshape(*shape)
        net.reshape()
        net.blobs["data"].data[...] = random_input(rng, shape, 0.3)
        dense = forward_on(caffe, net, "dense")
        got = forward_on(caffe, net, "onednn")
        assert got.shape == dense.shape
        np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["input", "weights"])
@pytest.mark.parametrize("relu", [False, True], ids=["no-relu", "fused-relu"])
@pytest.mark.parametrize("conv", [dict(kernel_size=3, pad=1), dict(kernel_size=1),
                                  dict(kernel_size=1, stride=2)], ids=["3x3", "1x1", "1x1-stride2"])
@pytest.mark.parametrize("outputs", [5, 2], ids=["more-outputs", "fewer-outputs"])
def test_onednn_keeps_dense_non_finite_semantics(caffe, make_net, paths, where, relu, conv,
                                                 outputs):
    """A NaN weight meets the padding's zeros in the GEMM (NaN there too); oneDNN skips padding,
    so non-finite weights run dense. A non-finite input goes through oneDNN's products as through
    the GEMM's (zero weights included), but its ReLU post-op turns NaN into 0: with fused ReLU it
    runs dense (with more and with fewer output values than input values alike). Either way: the
    same NaN and Inf pattern as dense."""
    net = make_net(conv_spec(caffe, "conv", (2, 4, 7, 8), outputs, dict(conv, fused_relu=relu)))
    rng = np.random.default_rng(21)
    x, w, _ = load(net, rng)
    if where == "input":
        w.reshape(-1)[::3] = 0.0  # 0 x NaN and 0 x Inf are NaN in the GEMM: oneDNN must agree
        x[0, 1, 2, 4] = np.nan
        x[1, 2, 0, 0] = np.inf
        x[1, 3, 4, 6] = -np.inf
    else:
        w[1, 2, 0, 0] = np.nan
        w[outputs - 1, 0, -1, -1] = np.inf
    net.params["conv"][0].data[...] = w
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, "onednn")
    assert np.isnan(dense).any()
    for check in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(check(got), check(dense))
    # Finite again: oneDNN runs again and is right.
    net.params["conv"][0].data[...] = np.nan_to_num(w, nan=0.0, posinf=0.0)
    net.blobs["data"].data[...] = np.nan_to_num(x, nan=0.0, posinf=0.0)
    dense = forward_on(caffe, net, "dense")
    np.testing.assert_allclose(forward_on(caffe, net, "onednn"), dense, rtol=1e-5, atol=1e-5)


def test_three_dimensional_convolution_runs_dense(caffe, make_net, paths):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 4, 5, 6]))
    n.conv = L.Convolution(n.data, num_output=3, kernel_size=3, pad=1,
                           weight_filler=dict(type="gaussian", std=1.0))
    net = make_net(n)
    net.blobs["data"].data[...] = np.random.default_rng(2).standard_normal((1, 2, 4, 5, 6))
    dense = forward_on(caffe, net, "dense")
    np.testing.assert_allclose(forward_on(caffe, net, "onednn"), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [24, 20, 16], ids=["three-blocks", "partial-block", "two-blocks"])
@pytest.mark.parametrize("at", [(0, 0, 0, 0), (1, -1, -1, -1), (0, 9, 4, 2), (1, 17, 2, 3)],
                         ids=["first", "last", "in-a-vector", "in-the-tail"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_the_input_reorder_finds_every_non_finite_value(caffe, make_net, paths, channels, at, value):
    """With the ReLU fused, onednn checks its whole input for finiteness (oneDNN's ReLU turns NaN
    into 0): a NaN or an infinity anywhere (the first and last value, mid-plane, in the tail of a
    5 x 7 plane; whole, partial and several channel blocks of oneDNN's blocked layout) sends the
    forward to dense with dense's pattern, and a finite input gives dense's values."""
    shape = (2, channels, 5, 7)
    net = make_net(conv_spec(caffe, "conv", shape, 12, dict(kernel_size=1, fused_relu=True)))
    x, w, _ = load(net, np.random.default_rng(channels))
    np.testing.assert_allclose(forward_on(caffe, net, "onednn"), forward_on(caffe, net, "dense"),
                               rtol=1e-5, atol=1e-5)
    x[tuple(min(i, s - 1) if i >= 0 else i for i, s in zip(at, shape))] = value
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, "onednn")
    assert np.isnan(dense).any() or np.isinf(dense).any()
    for check in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(check(got), check(dense))
    finite = np.isfinite(dense)
    np.testing.assert_allclose(got[finite], dense[finite], rtol=1e-5, atol=1e-5)
