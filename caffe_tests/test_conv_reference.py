"""The patched convolution layer against a numpy reference, and its forward-profile API.

The reference is written from the definition of convolution (no im2col), so it checks Caffe's
lowering and GEMM dispatch rather than restating them.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest

PHASES = {"im2col", "input2csr", "multiply", "output", "bias", "weight2csr"}
# Phases the dense path runs on a 3x3 convolution with bias (input2csr belongs to sparse_sparse).
DENSE_PHASES = {"im2col", "multiply", "bias"}


# ----------------------------------------------------------------------------- reference

def reference_conv(x, w, b=None, stride=(1, 1), pad=(0, 0), dilation=(1, 1), group=1):
    """2-D cross-correlation as Caffe defines it, in float64.

    x: (N, C, H, W); w: (O, C // group, KH, KW); b: (O,) or None. Output channel o of group g
    sees only input channels g*C/group .. (g+1)*C/group - 1; padding is zeros.
    """
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    assert c == cg * group and o % group == 0, "channels do not split into groups"
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    wg = w.astype(np.float64).reshape(group, o // group, cg, kh, kw)
    out = np.zeros((n, group, o // group, oh, ow))
    for i in range(kh):
        for j in range(kw):
            # The input value kernel tap (i, j) meets at each output position (y, x):
            # padded row y*sh + i*dh, column x*sw + j*dw.
            tap = xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            tap = tap.reshape(n, group, cg, oh, ow)
            out += np.einsum("ngcyx,gkc->ngkyx", tap, wg[:, :, :, i, j])
    out = out.reshape(n, o, oh, ow)
    if b is not None:
        out += np.asarray(b, np.float64)[None, :, None, None]
    return out


@pytest.mark.parametrize("x, w, kwargs, expected", [
    # 2x2 box sum over non-overlapping windows of 0..15.
    (np.arange(16.).reshape(1, 1, 4, 4), np.ones((1, 1, 2, 2)), dict(stride=(2, 2)),
     [[[[10, 18], [42, 50]]]]),
    # Two groups of 1x1 kernels: each output channel scales only its own input channel.
    (np.array([[[[1.]], [[10.]]]]), np.array([[[[2.]]], [[[3.]]]]), dict(group=2),
     [[[[2.]], [[30.]]]]),
    # Zero padding plus dilation 2: a 2x2 kernel of ones spans 3x3 with holes, so a single 1 at the
    # centre of a 3x3 input is reached only from the four corner outputs.
    (np.pad(np.ones((1, 1, 1, 1)), ((0, 0), (0, 0), (1, 1), (1, 1))), np.ones((1, 1, 2, 2)),
     dict(pad=(1, 1), dilation=(2, 2)), [[[[1, 0, 1], [0, 0, 0], [1, 0, 1]]]]),
])
def test_reference_on_hand_computed_cases(x, w, kwargs, expected):
    np.testing.assert_array_equal(reference_conv(x, w, **kwargs), expected)


# ----------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """One convolution: input shape, num_output, and ConvolutionParameter fields as Caffe spells them."""

    id: str
    shape: tuple  # (N, C, H, W)
    num_output: int
    conv: dict = field(default_factory=dict)
    zeros: float = 0.0  # fraction of input values set to zero (ReLU-like activations)

    def pair(self, name, default):
        """(h, w) of a spatial field given as `name` (1 or 2 values) or as `name_h`/`name_w`."""
        if f"{name}_h" in self.conv:
            return self.conv[f"{name}_h"], self.conv[f"{name}_w"]
        value = self.conv.get(name, default)
        values = value if isinstance(value, list) else [value]
        return (values[0], values[-1])

    def geometry(self):
        return dict(stride=self.pair("stride", 1), pad=self.pair("pad", 0),
                    dilation=self.pair("dilation", 1), group=self.conv.get("group", 1))

    @property
    def kernel(self):
        return self.pair("kernel_size", None) if "kernel_size" in self.conv else self.pair("kernel", None)

    @property
    def bias(self):
        return self.conv.get("bias_term", True)


# Input sizes are non-square throughout so that a swapped height/width cannot pass.
CASES = [
    Case("3x3", (1, 3, 7, 9), 4, dict(kernel_size=3)),
    Case("3x3-pad1-batch2", (2, 3, 6, 5), 5, dict(kernel_size=3, pad=1)),
    Case("3x3-stride2-pad1", (2, 4, 9, 8), 3, dict(kernel_size=3, stride=2, pad=1)),
    # (8 - 3) / 2 is not whole: Caffe drops the last input row and column.
    Case("3x3-stride2-ragged", (1, 2, 8, 10), 3, dict(kernel_size=3, stride=2)),
    Case("stride-h2-w1", (1, 3, 9, 7), 4, dict(kernel_size=3, stride_h=2, stride_w=1, pad=1)),
    Case("pad-h2-w0", (2, 2, 5, 8), 3, dict(kernel_size=3, pad_h=2, pad_w=0)),
    Case("dilation2-pad2", (1, 3, 10, 11), 4, dict(kernel_size=3, dilation=2, pad=2)),
    Case("dilation-h2-w1", (1, 3, 10, 9), 2, dict(kernel_size=3, dilation=[2, 1], pad=1)),
    Case("group2", (2, 4, 7, 6), 6, dict(kernel_size=3, group=2, pad=1)),
    Case("group4-stride2", (1, 8, 9, 10), 8, dict(kernel_size=3, group=4, stride=2)),
    Case("depthwise", (2, 6, 8, 7), 6, dict(kernel_size=3, group=6, pad=1)),
    Case("depthwise-multiplier2", (1, 4, 6, 9), 8, dict(kernel_size=3, group=4)),
    # 1x1, stride 1, pad 0: Caffe multiplies the input directly, without im2col.
    Case("1x1-batch3", (3, 16, 5, 6), 8, dict(kernel_size=1)),
    Case("1x1-stride2", (2, 6, 7, 8), 4, dict(kernel_size=1, stride=2)),
    # onednn runs a strided 1x1 without padding as a stride-1 one on a strided view of the input.
    Case("1x1-stride-h2-w3-group2", (2, 4, 9, 11), 6, dict(kernel_size=1, stride_h=2, stride_w=3,
                                                          group=2)),
    Case("1x1-stride2-pad1", (1, 3, 6, 7), 4, dict(kernel_size=1, stride=2, pad=1)),
    Case("kernel-1x3", (1, 3, 6, 8), 4, dict(kernel_h=1, kernel_w=3, pad_h=0, pad_w=1)),
    Case("kernel-3x5-group2", (2, 4, 9, 11), 6,
         dict(kernel_h=3, kernel_w=5, stride_h=1, stride_w=2, pad_h=1, pad_w=2, group=2)),
    Case("no-bias", (2, 5, 6, 7), 3, dict(kernel_size=3, bias_term=False)),
    Case("sparse-60pct", (2, 8, 8, 9), 6, dict(kernel_size=3, pad=1, group=2), zeros=0.6),
    Case("sparse-60pct-1x1-no-bias", (2, 12, 6, 5), 5, dict(kernel_size=1, bias_term=False), zeros=0.6),
]


def random_input(rng, shape, zeros=0.0):
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < zeros] = 0.0
    return x


def conv_spec(caffe, name, shape, num_output, conv, bottom_relu=False):
    """A NetSpec: Input `data` of `shape` -> Convolution layer `name` (optionally through a ReLU)."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    bottom = n.data
    if bottom_relu:
        n.relu = L.ReLU(n.data)
        bottom = n.relu
    n[name] = L.Convolution(bottom, num_output=num_output, **conv)
    return n


def fill_conv(net, name, rng, bias=True):
    """Random weights (and bias) for layer `name`; returns them as float32 arrays."""
    params = net.params[name]
    params[0].data[...] = rng.standard_normal(params[0].data.shape)
    if bias:
        params[1].data[...] = rng.standard_normal(params[1].data.shape)
    return params[0].data.copy(), (params[1].data.copy() if bias else None)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_forward_matches_reference(caffe, make_net, case):
    net = make_net(conv_spec(caffe, "conv", case.shape, case.num_output, case.conv))
    kh, kw = case.kernel
    group = case.conv.get("group", 1)
    assert net.params["conv"][0].data.shape == (case.num_output, case.shape[1] // group, kh, kw)
    assert len(net.params["conv"]) == (2 if case.bias else 1)

    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    x = random_input(rng, case.shape, case.zeros)
    w, b = fill_conv(net, "conv", rng, case.bias)
    net.blobs["data"].data[...] = x
    got = net.forward()["conv"]

    geometry = case.geometry()
    expected = reference_conv(x, w, b, **geometry)
    assert got.shape == expected.shape
    # float32 accumulation of K = C/group * KH * KW products: the rounding error of each output is
    # at most about K * 2**-24 times the sum of the absolute values of its terms (for K <= 200,
    # under 1.2e-5 of it). 1e-4 of the largest such sum leaves room for BLAS's summation order,
    # while a systematic error (a wrong, missing or misplaced term) moves outputs by about 1/K
    # of their magnitude (> 5e-3).
    magnitude = reference_conv(np.abs(x), np.abs(w), None if b is None else np.abs(b), **geometry)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * magnitude.max())


# ----------------------------------------------------------------------------- profile API

@pytest.fixture
def layer_name(request):
    """A layer name unique to the test: the profile registry is process-wide and keyed by name."""
    return re.sub(r"\W", "_", request.node.name)


def profiled_conv(caffe, make_net, name, shape=(2, 3, 8, 8), num_output=4, zeros=0.0, seed=0, **conv):
    """A net with one convolution `name`, random weights, and a random input loaded."""
    conv = dict(dict(kernel_size=3, pad=1), **conv)
    net = make_net(conv_spec(caffe, name, shape, num_output, conv))
    rng = np.random.default_rng(seed)
    fill_conv(net, name, rng, conv.get("bias_term", True))
    net.blobs["data"].data[...] = random_input(rng, shape, zeros)
    return net


# A layer's profile before any profiled forward (or after a reset).
ZERO_ENTRY = {"calls": 0, "input_elements": 0, "input_nonzeros": 0, "dense_macs": 0, "useful_macs": 0,
              "weight_nonzeros": 0, "weight_elements": 0, "inputs_handed_over": 0, "path": "default",
              "backend": "default", "direct_blocks": 0, "seconds": dict.fromkeys(PHASES, 0.0)}


def entry(caffe, name):
    """This layer's profile, or an all-zero one if the layer has no entry."""
    return caffe.conv_profile().get(name, ZERO_ENTRY)


def test_profiling_is_off_in_a_fresh_process(caffe_python_path):
    # In a child process, so that no earlier test's switching can leak into the answer.
    env = dict(os.environ, PYTHONPATH=str(caffe_python_path), GLOG_minloglevel="2")
    result = subprocess.run([sys.executable, "-c", "import caffe; print(caffe.conv_profiling())"],
                            env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_set_conv_profiling_round_trips(caffe):
    try:
        caffe.set_conv_profiling(True)
        assert caffe.conv_profiling() is True
        caffe.set_conv_profiling(False)
        assert caffe.conv_profiling() is False
    finally:
        caffe.set_conv_profiling(False)


def test_forward_counts_images_elements_and_nonzeros(caffe, make_net, profiling, layer_name):
    shape = (3, 4, 8, 7)
    net = profiled_conv(caffe, make_net, layer_name, shape=shape, zeros=0.6)
    first = net.blobs["data"].data.copy()
    net.forward()

    p = caffe.conv_profile()[layer_name]
    assert p["calls"] == 3  # one multiply per image of the batch
    assert p["input_elements"] == first.size
    assert p["input_nonzeros"] == np.count_nonzero(first)
    assert 0 < p["input_nonzeros"] < p["input_elements"]
    assert set(p["seconds"]) == PHASES
    # A 3x3 kernel with bias runs all dense phases; steady_clock resolves far below their cost.
    assert all(p["seconds"][phase] > 0 for phase in DENSE_PHASES)
    assert p["seconds"]["input2csr"] == 0.0
    assert p["path"] == "dense"

    # A second forward adds to the counters, with its own input's nonzeros.
    second = random_input(np.random.default_rng(1), shape, zeros=0.2)
    net.blobs["data"].data[...] = second
    net.forward()
    q = caffe.conv_profile()[layer_name]
    assert q["calls"] == 6
    assert q["input_elements"] == 2 * first.size
    assert q["input_nonzeros"] == np.count_nonzero(first) + np.count_nonzero(second)
    assert all(q["seconds"][phase] >= p["seconds"][phase] for phase in PHASES)
    assert q["seconds"]["multiply"] > p["seconds"]["multiply"]


def test_forward_without_profiling_changes_nothing(caffe, make_net, profiling, layer_name):
    net = profiled_conv(caffe, make_net, layer_name)
    caffe.set_conv_profiling(False)
    net.forward()
    assert entry(caffe, layer_name)["calls"] == 0

    caffe.set_conv_profiling(True)
    net.forward()
    counted = caffe.conv_profile()[layer_name]
    assert counted["calls"] == 2

    caffe.set_conv_profiling(False)
    net.forward()
    assert caffe.conv_profile()[layer_name] == counted


def test_profiling_does_not_change_the_output(caffe, make_net, profiling, layer_name):
    net = profiled_conv(caffe, make_net, layer_name, zeros=0.5)
    profiled = net.forward()[layer_name].copy()
    caffe.set_conv_profiling(False)
    np.testing.assert_array_equal(net.forward()[layer_name], profiled)


def test_reset_zeroes_counters_and_keeps_names(caffe, make_net, profiling, layer_name):
    nets = {name: profiled_conv(caffe, make_net, name) for name in (layer_name + "_a", layer_name + "_b")}
    for net in nets.values():
        net.forward()
    assert all(caffe.conv_profile()[name]["calls"] == 2 for name in nets)

    caffe.reset_conv_profile()
    profile = caffe.conv_profile()
    for name in nets:
        assert profile[name] == ZERO_ENTRY
    # Counting starts again from zero.
    nets[layer_name + "_a"].forward()
    assert caffe.conv_profile()[layer_name + "_a"]["calls"] == 2


def test_counters_are_kept_per_layer(caffe, make_net, profiling, layer_name):
    # data -> conv1 -> ReLU -> conv2: conv2's input is conv1's rectified output, about half zeros.
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 9, 8]))
    first, second = layer_name + "_1", layer_name + "_2"
    n[first] = L.Convolution(n.data, num_output=5, kernel_size=3)
    n[second] = L.Convolution(L.ReLU(n[first], in_place=True), num_output=4, kernel_size=1)
    net = make_net(n)
    rng = np.random.default_rng(2)
    fill_conv(net, first, rng)
    fill_conv(net, second, rng)
    net.blobs["data"].data[...] = random_input(rng, (2, 3, 9, 8))
    net.forward()

    profile = caffe.conv_profile()
    hidden = net.blobs[first].data  # rectified in place
    assert profile[first]["input_elements"] == 2 * 3 * 9 * 8
    assert profile[second]["input_elements"] == hidden.size
    assert profile[second]["input_nonzeros"] == np.count_nonzero(hidden)
    assert profile[second]["input_nonzeros"] < hidden.size
    assert profile[first]["calls"] == profile[second]["calls"] == 2


def test_layers_with_the_same_name_share_an_entry(caffe, make_net, profiling, layer_name):
    for seed in (0, 1):
        profiled_conv(caffe, make_net, layer_name, shape=(3, 2, 5, 5), seed=seed).forward()
    assert caffe.conv_profile()[layer_name]["calls"] == 6


@pytest.mark.parametrize("conv, runs_im2col", [
    (dict(kernel_size=1, pad=0), False),  # Caffe's 1x1 shortcut: the input is the GEMM operand
    (dict(kernel_size=1, pad=0, stride=2), True),
    (dict(kernel_size=1, pad=1), True),
    (dict(kernel_size=3, pad=1), True),
], ids=["1x1", "1x1-stride2", "1x1-pad1", "3x3"])
def test_im2col_time_only_when_im2col_runs(caffe, make_net, profiling, layer_name, conv, runs_im2col):
    profiled_conv(caffe, make_net, layer_name, **conv).forward()
    seconds = caffe.conv_profile()[layer_name]["seconds"]
    assert seconds["multiply"] > 0
    assert (seconds["im2col"] > 0) == runs_im2col
    if not runs_im2col:
        assert seconds["im2col"] == 0.0


@pytest.mark.parametrize("bias_term", [True, False])
def test_bias_time_only_with_a_bias(caffe, make_net, profiling, layer_name, bias_term):
    profiled_conv(caffe, make_net, layer_name, bias_term=bias_term).forward()
    seconds = caffe.conv_profile()[layer_name]["seconds"]
    assert seconds["multiply"] > 0
    assert (seconds["bias"] > 0) == bias_term


def test_deconvolution_forward_is_not_profiled(caffe, make_net, profiling, layer_name):
    # Deconvolution's forward runs the convolution's backward code; only its (excluded) backward
    # runs forward_cpu_gemm. A convolution in the same net shows profiling was on.
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 6, 5]))
    deconv, conv = layer_name + "_deconv", layer_name + "_conv"
    n[deconv] = L.Deconvolution(n.data, convolution_param=dict(num_output=4, kernel_size=3, stride=2))
    n[conv] = L.Convolution(n[deconv], num_output=2, kernel_size=3)
    net = make_net(n)
    rng = np.random.default_rng(3)
    fill_conv(net, deconv, rng)
    fill_conv(net, conv, rng)
    net.blobs["data"].data[...] = random_input(rng, (2, 3, 6, 5))
    net.forward()

    assert caffe.conv_profile()[conv]["calls"] == 2
    assert entry(caffe, deconv) == ZERO_ENTRY
