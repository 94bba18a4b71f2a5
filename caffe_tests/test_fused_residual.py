"""convolution_param.fused_residual: the convolution adds its last bottom (ResNet's shortcut) to its
output, then applies the fused ReLU, equal to convolution + Eltwise SUM (+ ReLU) on every path.

gemm_1x1 adds the residual inside its register tiles; every other path adds it in one pass after its
own, so each path is checked on a shape it runs (1x1 for gemm_1x1 and activation_sparse, padded 3x3
for direct, stride 2 for branch1's shape) and against dense and an independent reference. Tolerance
as in test_forward_paths.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from .test_conv_reference import random_input, reference_conv
from .test_forward_paths import (PATHS_AND_AUTO, assert_close_to, backend, forward_on,  # noqa: F401
                                 paths, sparse_weights)

# (id, input shape, outputs, convolution settings)
SHAPES = [
    ("1x1-c32-o40-14x14", (1, 32, 14, 14), 40, dict(kernel_size=1)),
    ("1x1-c300-o13-7x7-batch2", (2, 300, 7, 7), 13, dict(kernel_size=1)),
    ("1x1-stride2", (1, 16, 9, 9), 24, dict(kernel_size=1, stride=2)),
    ("3x3-pad1-group2", (2, 8, 7, 6), 10, dict(kernel_size=3, pad=1, group=2)),
]
PATHS = ["dense", "onednn", "gemm_1x1", "activation_sparse"] + PATHS_AND_AUTO


def residual_net(caffe, make_net, shape, outputs, conv, relu):
    """Input `data` and `res` (shaped as the output) -> Convolution `conv` with fused_residual."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    probe = make_net(_plain(caffe, shape, outputs, conv))
    n.res = L.Input(shape=dict(dim=list(probe.blobs["conv"].data.shape)))
    n.conv = L.Convolution(n.data, n.res, num_output=outputs, fused_residual=True, fused_relu=relu,
                           **conv)
    return make_net(n)


def _plain(caffe, shape, outputs, conv):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    n.conv = L.Convolution(n.data, num_output=outputs, **conv)
    return n


def geometry(conv):
    stride = conv.get("stride", 1)
    pad = conv.get("pad", 0)
    return dict(stride=(stride, stride), pad=(pad, pad), group=conv.get("group", 1))


@pytest.mark.parametrize("relu", [False, True], ids=["sum", "sum+relu"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", SHAPES, ids=lambda case: case[0])
def test_every_path_adds_the_residual(caffe, make_net, backend, case, path, relu):
    if path not in caffe.conv_forward_paths() + ["auto"]:
        pytest.skip(f"this build has no {path} path")
    name, shape, outputs, conv = case
    net = residual_net(caffe, make_net, shape, outputs, conv, relu)
    rng = np.random.default_rng(zlib.crc32(f"{name}{path}{relu}".encode()))
    w = sparse_weights(rng, net.params["conv"][0].data.shape, zeros=0.7)
    b = rng.standard_normal(net.params["conv"][1].data.shape).astype(np.float32)
    x = random_input(rng, shape, 0.5)
    r = rng.standard_normal(net.blobs["res"].data.shape).astype(np.float32)
    net.params["conv"][0].data[...] = w
    net.params["conv"][1].data[...] = b
    net.blobs["data"].data[...] = x
    net.blobs["res"].data[...] = r
    expected = reference_conv(x, w, b, **geometry(conv)) + r
    if relu:
        expected = np.maximum(expected, 0)
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, path)
    assert_close_to(got, x, w, b, geometry(conv), dense)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.array_equal(net.blobs["res"].data, r)  # the residual is read, never written
    if relu:
        assert (got >= 0).all() and (got == 0).any() and (got > 0).any()


def test_gemm_1x1_adds_it_in_its_own_pass(caffe, make_net, paths, profiling):
    """gemm_1x1 on a fused_residual layer really runs (no dense fallback) and the sum's separate
    pass is not timed for it (the bias phase stays empty), while dense pays that pass."""
    net = residual_net(caffe, make_net, (1, 64, 28, 28), 64, dict(kernel_size=1), True)
    rng = np.random.default_rng(3)
    net.params["conv"][0].data[...] = rng.standard_normal(net.params["conv"][0].data.shape)
    net.blobs["data"].data[...] = random_input(rng, (1, 64, 28, 28), 0.5)
    net.blobs["res"].data[...] = rng.standard_normal(net.blobs["res"].data.shape)
    for path in ("gemm_1x1", "dense"):
        caffe.reset_conv_profile()
        forward_on(caffe, net, path)
        profile = caffe.conv_profile()["conv"]
        assert profile["path"] == path
        bias_seconds = profile["seconds"].get("bias", 0.0)
        assert (bias_seconds == 0.0) == (path == "gemm_1x1"), (path, profile["seconds"])


def test_sparse_output_handover_is_not_taken_before_the_sum(caffe, make_net, paths):
    """A fused_residual layer on sparse_output writes its top again after the sum: the consumer's
    sparse_sparse must read the summed output, not the CSR handed over before it."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 8, 6, 6]))
    n.res = L.Input(shape=dict(dim=[1, 8, 6, 6]))
    n.conv = L.Convolution(n.data, n.res, num_output=8, kernel_size=3, pad=1, fused_residual=True,
                           fused_relu=True)
    n.next = L.Convolution(n.conv, num_output=4, kernel_size=3, pad=1)
    net = make_net(n)
    rng = np.random.default_rng(11)
    for layer in ("conv", "next"):
        net.params[layer][0].data[...] = sparse_weights(rng, net.params[layer][0].data.shape, 0.7)
    net.blobs["data"].data[...] = random_input(rng, (1, 8, 6, 6), 0.5)
    net.blobs["res"].data[...] = rng.standard_normal((1, 8, 6, 6)) * 3
    dense = forward_on(caffe, net, "dense", "next")
    caffe.set_conv_forward_path("sparse_output", "conv")
    got = forward_on(caffe, net, "sparse_sparse", "next")
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-4)


REFUSALS = {
    # Caffe's own net builder refuses a top that names another bottom than the same-index one.
    "in-place": ('top: "res"', "Top blob 'res' produced by multiple sources"),
    "shape": ("top: \"conv\"", "fused_residual's last bottom is 1 8 5 5 (200), the output 1 4 6 6"),
    "bottoms": ("top: \"conv\"", "fused_residual needs one bottom more than tops"),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_misconfigured_layer_is_refused_with_one_line(caffe_python_path, tmp_path, kind):
    top, message = REFUSALS[kind]
    res_dims = {"shape": "dim: 1 dim: 8 dim: 5 dim: 5"}.get(kind, "dim: 1 dim: 4 dim: 6 dim: 6")
    bottoms = 'bottom: "data"' + ('' if kind == "bottoms" else ' bottom: "res"')
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: 6 dim: 6 }} }} }}
layer {{ name: "res" type: "Input" top: "res" input_param {{ shape {{ {res_dims} }} }} }}
layer {{ name: "conv" type: "Convolution" {bottoms} {top}
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 fused_residual: true }} }}
""")
    env = dict(os.environ, GLOG_minloglevel="2", PYTHONPATH=str(caffe_python_path))
    script = "import sys, caffe; caffe.Net(sys.argv[1], caffe.TEST)"
    result = subprocess.run([sys.executable, "-c", script, str(prototxt)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
