"""Every sparse forward path equals the dense path, across configurations and sparsity levels.

Tolerance: the sparse paths add the same products as the dense GEMM, only in another order and
skipping exact zeros, so in float32 each output differs from dense by at most about
K * 2**-24 times the sum of |terms| (K = C/group * KH * KW). We allow 1e-5 relative plus 1e-5 of
the largest |terms| sum; a wrong, missing or misplaced term moves an output by ~1/K of its
magnitude, far above that.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from sparse_caffe.patching.config import CONV_TEMPLATE_CONFIG

from .test_conv_reference import CASES, Case, conv_spec, random_input, reference_conv

SPARSE_PATHS = ["spmdm", "sparse_sparse", "sparse_output", "direct"]
# auto runs its candidates in turn while it calibrates: forward_on returns, of every forward until
# it has decided and one after, the output farthest from the first (dense's, its first candidate).
PATHS_AND_AUTO = SPARSE_PATHS + ["auto"]
# More forwards than any calibration takes: (timed rounds, extended at most auto_max_rounds_factor
# times, + 1) x candidates (at most 9: dense, onednn, direct, activation_sparse, gemm_1x1, and spmdm
# and sparse_sparse on each back end).
MAX_AUTO_FORWARDS = (CONV_TEMPLATE_CONFIG.auto_rounds * CONV_TEMPLATE_CONFIG.auto_max_rounds_factor
                     + 1) * 9
BACKENDS = ["openmp", "mkl"]
SPARSITY = [0.0, 0.5, 0.9, 0.99, 1.0]


@pytest.fixture
def paths(caffe):
    """Forward-path overrides set by a test are always removed afterwards."""
    caffe.clear_conv_forward_paths()
    try:
        yield caffe
    finally:
        caffe.clear_conv_forward_paths()


@pytest.fixture(params=BACKENDS)
def backend(request, caffe, paths):
    """Every sparse test runs on each back end this build has (MKL only in MKL builds)."""
    if request.param not in caffe.conv_sparse_backends():
        pytest.skip(f"this build has no {request.param} back end (build with --blas mkl)")
    caffe.set_conv_sparse_backend(request.param)
    return request.param


def sparse_weights(rng, shape, zeros, zero_rows=False, zero_columns=False):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < zeros] = 0.0
    flat = w.reshape(shape[0], -1)
    if zero_rows:
        flat[::3] = 0.0  # whole output channels with no weight
    if zero_columns:
        flat[:, ::2] = 0.0  # whole kernel taps unused
    return w


def forward_on(caffe, net, path, layer="conv"):
    caffe.set_conv_forward_path(path, layer)
    if path != "auto":
        return net.forward()[layer].copy()
    outputs = auto_outputs(caffe, net, layer)
    return max(outputs, key=lambda y: float(np.abs(y - outputs[0]).max()))


def auto_outputs(caffe, net, layer="conv"):
    """Under auto: the outputs of every forward until `layer` has decided, and of one more (each
    forward runs one candidate, computing the real output)."""
    def forward():
        net.forward()
        return net.blobs[net.top_names[layer][0]].data.copy()
    outputs = []
    for _ in range(MAX_AUTO_FORWARDS):
        outputs.append(forward())
        if caffe.auto_choices()[layer]["state"] == "decided":
            outputs.append(forward())
            return outputs
    raise AssertionError(f"auto had not decided after {MAX_AUTO_FORWARDS} forwards")


def assert_close_to(got, x, w, b, geometry, dense):
    magnitude = reference_conv(np.abs(x), np.abs(w), None if b is None else np.abs(b), **geometry)
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5 * max(magnitude.max(), 1e-30))


@pytest.mark.parametrize("path", PATHS_AND_AUTO)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_paths_equal_dense_on_every_configuration(caffe, make_net, backend, case, path):
    net = make_net(conv_spec(caffe, "conv", case.shape, case.num_output, case.conv))
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    w = sparse_weights(rng, net.params["conv"][0].data.shape, zeros=0.7)
    net.params["conv"][0].data[...] = w
    b = None
    if case.bias:
        b = rng.standard_normal(net.params["conv"][1].data.shape).astype(np.float32)
        net.params["conv"][1].data[...] = b
    x = random_input(rng, case.shape, max(case.zeros, 0.5))
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, path)
    assert_close_to(got, x, w, b, case.geometry(), dense)
    # And against the independent reference, so "equal to dense" cannot hide a shared mistake.
    np.testing.assert_allclose(got, reference_conv(x, w, b, **case.geometry()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS_AND_AUTO)
@pytest.mark.parametrize("weight_zeros", SPARSITY)
@pytest.mark.parametrize("input_zeros", SPARSITY)
def test_paths_equal_dense_at_every_sparsity(caffe, make_net, backend, path, weight_zeros, input_zeros):
    shape, conv = (2, 8, 9, 7), dict(kernel_size=3, pad=1, group=2, num_output=6)
    net = make_net(conv_spec(caffe, "conv", shape, conv.pop("num_output"), conv))
    rng = np.random.default_rng(int(weight_zeros * 100) * 1000 + int(input_zeros * 100))
    w = sparse_weights(rng, net.params["conv"][0].data.shape, weight_zeros,
                       zero_rows=weight_zeros == 0.5, zero_columns=weight_zeros == 0.9)
    net.params["conv"][0].data[...] = w
    b = rng.standard_normal(6).astype(np.float32)
    net.params["conv"][1].data[...] = b
    x = random_input(rng, shape, input_zeros)
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, path)
    assert_close_to(got, x, w, b, dict(pad=(1, 1), group=2), dense)
    if weight_zeros == 1.0 or input_zeros == 1.0:
        np.testing.assert_array_equal(got, np.broadcast_to(b[None, :, None, None], got.shape))


@pytest.mark.parametrize("path", PATHS_AND_AUTO)
def test_single_nonzero(caffe, make_net, backend, path):
    net = make_net(conv_spec(caffe, "conv", (1, 3, 5, 6), 2, dict(kernel_size=3, bias_term=False)))
    w = np.zeros(net.params["conv"][0].data.shape, np.float32)
    w[1, 2, 0, 1] = 3.0
    x = np.zeros((1, 3, 5, 6), np.float32)
    x[0, 2, 2, 4] = 2.0
    net.params["conv"][0].data[...] = w
    net.blobs["data"].data[...] = x
    got = forward_on(caffe, net, path)
    expected = reference_conv(x, w)
    np.testing.assert_array_equal(got, expected)
    assert np.count_nonzero(got) == 1


@pytest.mark.parametrize("path", PATHS_AND_AUTO)
def test_weights_changed_from_python_are_honoured(caffe, make_net, backend, path):
    net = make_net(conv_spec(caffe, "conv", (1, 4, 6, 6), 3, dict(kernel_size=3, bias_term=False)))
    rng = np.random.default_rng(7)
    x = random_input(rng, (1, 4, 6, 6), 0.5)
    net.blobs["data"].data[...] = x
    for round_ in range(3):
        w = sparse_weights(rng, net.params["conv"][0].data.shape, 0.8)
        net.params["conv"][0].data[...] = w
        got = forward_on(caffe, net, path)
        np.testing.assert_allclose(got, reference_conv(x, w), rtol=1e-4, atol=1e-4,
                                   err_msg=f"stale weights in round {round_}")


def test_copy_from_refreshes_the_weight_cache(caffe, make_net, paths, tmp_path):
    spec = conv_spec(caffe, "conv", (1, 4, 6, 6), 3, dict(kernel_size=3, bias_term=False))
    net, other = make_net(spec), make_net(spec)
    rng = np.random.default_rng(11)
    x = random_input(rng, (1, 4, 6, 6), 0.5)
    net.blobs["data"].data[...] = x
    net.params["conv"][0].data[...] = sparse_weights(rng, (3, 4, 3, 3), 0.8)
    forward_on(caffe, net, "sparse_sparse")  # builds the CSR cache
    w = sparse_weights(rng, (3, 4, 3, 3), 0.8)
    other.params["conv"][0].data[...] = w
    saved = tmp_path / "w.caffemodel"
    other.save(str(saved))
    net.copy_from(str(saved))
    np.testing.assert_allclose(forward_on(caffe, net, "sparse_sparse"), reference_conv(x, w),
                               rtol=1e-4, atol=1e-4)


def test_unknown_path_is_a_value_error(caffe, paths):
    with pytest.raises(ValueError, match="unknown convolution forward path 'fast'"):
        caffe.set_conv_forward_path("fast")
    assert caffe.conv_forward_paths() == ["dense", "spmdm", "sparse_sparse", "sparse_output", "direct",
                                          "onednn", "activation_sparse", "gemm_1x1"]
    with pytest.raises(ValueError, match="sparse back end 'cuda' is not in this build"):
        caffe.set_conv_sparse_backend("cuda")
    assert caffe.conv_sparse_backends()[0] == "openmp"


def test_prototxt_field_selects_the_path_and_python_overrides_it(caffe, make_net, paths, profiling):
    spec = conv_spec(caffe, "conv_proto_path", (1, 3, 6, 6), 2,
                     dict(kernel_size=3, forward_path=caffe.proto.caffe_pb2.ConvolutionParameter.SPMDM))
    net = make_net(spec)
    net.forward()
    assert caffe.conv_profile()["conv_proto_path"]["path"] == "spmdm"
    caffe.set_conv_forward_path("sparse_sparse", "conv_proto_path")
    net.forward()
    assert caffe.conv_profile()["conv_proto_path"]["path"] == "sparse_sparse"
    caffe.set_conv_forward_path("default", "conv_proto_path")
    net.forward()
    assert caffe.conv_profile()["conv_proto_path"]["path"] == "spmdm"


def test_profile_counts_useful_multiply_adds(caffe, make_net, paths, profiling):
    net = make_net(conv_spec(caffe, "conv_macs", (1, 4, 5, 5), 3, dict(kernel_size=1, bias_term=False)))
    rng = np.random.default_rng(3)
    w = sparse_weights(rng, (3, 4, 1, 1), 0.5)
    x = random_input(rng, (1, 4, 5, 5), 0.5)
    net.params["conv_macs"][0].data[...] = w
    net.blobs["data"].data[...] = x
    # 1x1: W is 3x4, X is 4x25; useful = sum_k nnz(W[:, k]) * nnz(X[k, :]).
    expected = int(sum(np.count_nonzero(w.reshape(3, 4)[:, k]) * np.count_nonzero(x.reshape(4, 25)[k])
                       for k in range(4)))
    for path in ["dense"] + SPARSE_PATHS:
        caffe.reset_conv_profile()
        caffe.set_conv_forward_path(path, "conv_macs")
        net.forward()
        p = caffe.conv_profile()["conv_macs"]
        assert (p["path"], p["useful_macs"], p["dense_macs"]) == (path, expected, 3 * 4 * 25)
        assert p["weight_nonzeros"] == np.count_nonzero(w) and p["weight_elements"] == w.size
        # direct's input preparation (the zero-padded copy) is timed as input2csr too.
        assert (p["seconds"]["input2csr"] > 0) == (path in ("sparse_sparse", "sparse_output", "direct"))
        assert (p["seconds"]["output"] > 0) == (path == "sparse_output")


def test_dense_time_never_includes_the_weights_csr(caffe, make_net, paths, profiling):
    """The profile counts useful multiply-adds on dense too, from the weights' CSR; building that
    CSR (after every weight change) must not land in dense's time, only in a sparse path's."""
    net = make_net(conv_spec(caffe, "conv_w2c", (1, 16, 9, 9), 16, dict(kernel_size=3)))
    rng = np.random.default_rng(5)
    net.blobs["data"].data[...] = random_input(rng, (1, 16, 9, 9), 0.5)
    for path in ("dense", "spmdm"):
        caffe.set_conv_forward_path(path, "conv_w2c")
        net.params["conv_w2c"][0].data[...] = sparse_weights(rng, (16, 16, 3, 3), 0.9)  # new version
        caffe.reset_conv_profile()
        net.forward()
        p = caffe.conv_profile()["conv_w2c"]
        assert p["useful_macs"] > 0
        assert (p["seconds"]["weight2csr"] > 0) == (path == "spmdm"), (path, p["seconds"])


def test_deconvolution_falls_back_to_dense(caffe, make_net, paths):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 5, 5]))
    n.deconv = L.Deconvolution(n.data, convolution_param=dict(num_output=2, kernel_size=3, stride=2))
    net = make_net(n)
    rng = np.random.default_rng(5)
    net.params["deconv"][0].data[...] = rng.standard_normal(net.params["deconv"][0].data.shape)
    net.blobs["data"].data[...] = random_input(rng, (1, 3, 5, 5), 0.5)
    dense = forward_on(caffe, net, "dense", "deconv")
    for path in SPARSE_PATHS:
        np.testing.assert_array_equal(forward_on(caffe, net, path, "deconv"), dense)



# ----------------------------------------------------------------------------- whole nets

def stacked_net(caffe, prefix, fused=False, modify_between=False):
    """A small ResNet-like block: conv -> ReLU -> (1x1 conv, 3x3 conv) -> Eltwise -> ReLU -> conv.

    fused: the ReLUs after convolutions are folded into them (fused_relu), so sparse_output
    producers hand their CSR straight to the next convolution. modify_between: an in-place Power
    layer rewrites the first convolution's output before the next one reads it (stale-CSR case).
    """
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 8, 9, 10]))

    def conv(bottom, name, num_output, relu, **kw):
        n[name] = L.Convolution(bottom, num_output=num_output, fused_relu=fused and relu, **kw)
        if relu and not fused:
            n[name + "_relu"] = L.ReLU(n[name], in_place=True)
        return n[name]

    c1 = conv(n.data, f"{prefix}c1", 12, True, kernel_size=3, pad=1)
    if modify_between:
        n[f"{prefix}shift"] = L.Power(c1, shift=-0.25, in_place=True)
    a = conv(c1, f"{prefix}a", 12, True, kernel_size=1)
    b = conv(a, f"{prefix}b", 12, False, kernel_size=3, pad=1, group=2)
    n[f"{prefix}sum"] = L.Eltwise(b, c1)
    n[f"{prefix}sum_relu"] = L.ReLU(n[f"{prefix}sum"], in_place=True)
    conv(n[f"{prefix}sum"], f"{prefix}out", 6, False, kernel_size=3, stride=2, bias_term=False)
    proto = n.to_proto()
    proto.force_backward = True  # no loss layer: backward must still reach the input
    return str(proto)


def load_sparse_weights(net, seed):
    rng = np.random.default_rng(seed)
    for name, params in net.params.items():
        params[0].data[...] = sparse_weights(rng, params[0].data.shape, 0.8)
        if len(params) > 1:
            params[1].data[...] = rng.standard_normal(params[1].data.shape) * 0.1
    net.blobs["data"].data[...] = random_input(rng, net.blobs["data"].data.shape, 0.3)


def forward_all(caffe, net, path):
    caffe.set_conv_forward_path(path)
    net.forward()
    return {name: blob.data.copy() for name, blob in net.blobs.items()}


def sparse_output_equals_dense(caffe, net, wanted):
    """Every blob of `net` under sparse_output equals dense's; returns, per convolution whose
    name is `wanted`, how many images took their input handed over (profiling on)."""
    dense = forward_all(caffe, net, "dense")
    caffe.reset_conv_profile()
    sparse = forward_all(caffe, net, "sparse_output")
    for name in dense:
        np.testing.assert_allclose(sparse[name], dense[name], rtol=1e-4, atol=1e-4, err_msg=name)
    return {name: p["inputs_handed_over"] for name, p in caffe.conv_profile().items()
            if wanted(name)}


@pytest.mark.parametrize("fused", [False, True])
def test_whole_net_in_sparse_output_mode_equals_dense(caffe, make_net, backend, profiling, fused):
    prefix = f"whole_{backend}_{int(fused)}_"
    net = make_net(stacked_net(caffe, prefix, fused=fused))
    load_sparse_weights(net, 1)
    handed = sparse_output_equals_dense(caffe, net, lambda name: name.startswith(prefix))
    if fused:
        # c1 -> a and a -> b read their producer's CSR directly (2 images each); the Eltwise
        # output feeding `out` comes from no convolution, so it is converted afresh.
        assert handed == {f"{prefix}c1": 0, f"{prefix}a": 2, f"{prefix}b": 2, f"{prefix}out": 0}
    else:
        # In-place ReLUs write every convolution's output after it was published: never reused.
        assert set(handed.values()) == {0}


def test_handed_over_csr_feeds_strided_dilated_and_non_square_consumers(caffe, make_net, backend,
                                                                        profiling):
    """sparse_output's CSR lowered for a consumer's taps (stride 2 with dilation 2, a non-square
    kernel with its own pads, a 1x1): every blob equals dense's, and each consumer took its input
    handed over."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6, 11, 9]))
    n.p = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1, fused_relu=True)
    n.s = L.Convolution(n.p, num_output=8, kernel_size=3, stride=2, dilation=2, pad=2,
                        fused_relu=True)
    n.r = L.Convolution(n.s, num_output=6, kernel_h=3, kernel_w=2, pad_h=1, pad_w=0,
                        fused_relu=True)
    n.o = L.Convolution(n.r, num_output=4, kernel_size=1)
    net = make_net(str(n.to_proto()))
    load_sparse_weights(net, 3)
    handed = sparse_output_equals_dense(caffe, net, lambda name: name in ("p", "s", "r", "o"))
    assert handed == {"p": 0, "s": 2, "r": 2, "o": 2}


def test_fused_relu_equals_conv_then_relu(caffe, make_net, backend):
    separate = make_net(stacked_net(caffe, "sep_", fused=False))
    fused = make_net(stacked_net(caffe, "sep_", fused=True))
    load_sparse_weights(separate, 2)
    load_sparse_weights(fused, 2)
    for path in ["dense"] + SPARSE_PATHS:
        a, b = forward_all(caffe, separate, path), forward_all(caffe, fused, path)
        np.testing.assert_allclose(b["sep_out"], a["sep_out"], rtol=1e-4, atol=1e-4, err_msg=path)
    # The backward pass masks the gradient where the fused ReLU clamped.
    for net in (separate, fused):
        net.blobs["sep_out"].diff[...] = 1.0
        net.backward()
    np.testing.assert_allclose(fused.blobs["data"].diff, separate.blobs["data"].diff, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(fused.params["sep_c1"][0].diff, separate.params["sep_c1"][0].diff,
                               rtol=1e-4, atol=1e-5)


def test_stale_csr_is_never_used(caffe, make_net, backend, profiling):
    net = make_net(stacked_net(caffe, "stale_", fused=True, modify_between=True))
    load_sparse_weights(net, 3)
    dense = forward_all(caffe, net, "dense")
    caffe.reset_conv_profile()
    sparse = forward_all(caffe, net, "sparse_output")
    np.testing.assert_allclose(sparse["stale_out"], dense["stale_out"], rtol=1e-4, atol=1e-4)
    # The Power layer rewrote c1's output after c1 published its CSR: `a` must not take it.
    assert caffe.conv_profile()["stale_a"]["inputs_handed_over"] == 0
    assert caffe.conv_profile()["stale_b"]["inputs_handed_over"] == 2


SOLVER = """net: "{net}"
base_lr: 0.05
momentum: 0.9
weight_decay: 0.001
lr_policy: "fixed"
max_iter: 10
solver_mode: CPU
random_seed: 1
"""


def test_solver_steps_give_the_same_weights_on_every_path(caffe, paths, tmp_path):
    """Training uses the sparse forward and dense backward; every path must train alike."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[4, 3, 8, 8]), dict(dim=[4, 5, 2, 2])], ntop=2)
    n.c1 = L.Convolution(n.data, num_output=6, kernel_size=3, pad=1, stride=2,
                         weight_filler=dict(type="gaussian", std=0.3))
    n.r1 = L.ReLU(n.c1, in_place=True)
    n.c2 = L.Convolution(n.r1, num_output=5, kernel_size=3, pad=1, stride=2,
                         weight_filler=dict(type="gaussian", std=0.3))
    n.loss = L.EuclideanLoss(n.c2, n.label)
    (tmp_path / "net.prototxt").write_text(str(n.to_proto()))
    (tmp_path / "solver.prototxt").write_text(SOLVER.format(net=tmp_path / "net.prototxt"))
    rng = np.random.default_rng(4)
    data = random_input(rng, (4, 3, 8, 8), 0.5)
    label = rng.standard_normal((4, 5, 2, 2)).astype(np.float32)
    start = None
    results = {}
    for path in ["dense"] + SPARSE_PATHS:
        caffe.set_conv_forward_path(path)
        solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
        if start is None:
            start = {k: [p.data.copy() for p in v] for k, v in solver.net.params.items()}
            for name in start:  # prune: the sparse paths must see zeros in the weights
                start[name][0][np.abs(start[name][0]) < 0.15] = 0.0
        for name, blobs in start.items():
            for param, value in zip(solver.net.params[name], blobs):
                param.data[...] = value
        for _ in range(3):
            solver.net.blobs["data"].data[...] = data
            solver.net.blobs["label"].data[...] = label
            solver.step(1)
        results[path] = {k: [p.data.copy() for p in v] for k, v in solver.net.params.items()}
    for path in SPARSE_PATHS:
        for name in results["dense"]:
            for got, want in zip(results[path][name], results["dense"][name]):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{path} {name}")
    assert not np.allclose(results["dense"]["c1"][0], start["c1"][0])  # it did train


@pytest.mark.parametrize("path", SPARSE_PATHS)
def test_three_dimensional_convolution_equals_dense(caffe, make_net, backend, path):
    """N-D convolutions lower through im2col before their CSR is built; still equal to dense."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 5, 6, 7]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1, stride=[1, 2, 1])
    net = make_net(n)
    rng = np.random.default_rng(9)
    net.params["conv"][0].data[...] = sparse_weights(rng, net.params["conv"][0].data.shape, 0.7)
    net.params["conv"][1].data[...] = rng.standard_normal(4)
    net.blobs["data"].data[...] = random_input(rng, (2, 3, 5, 6, 7), 0.5)
    dense = forward_on(caffe, net, "dense")
    np.testing.assert_allclose(forward_on(caffe, net, path), dense, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- direct

# Shapes the direct kernel treats specially: outputs wider than one strip of registers, strides
# that split the input into phases, padding wider than the kernel (no shared padding), a
# CaffeNet-conv1-like 11x11 stride 4, dilation with stride, and inputs of so many channels that
# the product runs in blocks of them (BLOCKED_CASES, on every kernel set).
DIRECT_CASES = [
    Case("wide-3x3-pad1", (1, 3, 9, 60), 5, dict(kernel_size=3, pad=1)),
    Case("wide-1x1", (2, 6, 3, 113), 4, dict(kernel_size=1)),
    Case("stride2-wide", (1, 3, 12, 57), 4, dict(kernel_size=3, stride=2, pad=1)),
    Case("pad-wider-than-kernel", (1, 3, 5, 6), 2, dict(kernel_size=1, pad=2)),
    Case("11x11-stride4", (1, 3, 39, 43), 4, dict(kernel_size=11, stride=4, pad=2)),
    Case("stride3-dilation2", (2, 4, 17, 15), 3, dict(kernel_size=3, stride=3, dilation=2, pad=1)),
    Case("stride-h1-w3-group2", (1, 4, 8, 20), 6, dict(kernel_h=2, kernel_w=4, stride_h=1, stride_w=3,
                                                      pad_h=1, pad_w=0, group=2)),
]
BLOCKED_CASES = [
    Case("blocked-3x3", (1, 96, 12, 12), 24, dict(kernel_size=3, pad=1)),
    Case("blocked-stride2-dilation2-group2", (2, 128, 15, 13), 8,
         dict(kernel_size=3, stride=2, dilation=2, pad=2, group=2)),
]
DIRECT_CASES += BLOCKED_CASES


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda case: case.id)
def test_direct_equals_dense_on_its_special_shapes(caffe, make_net, paths, case, fused):
    conv = dict(case.conv, fused_relu=fused)
    net = make_net(conv_spec(caffe, "conv", case.shape, case.num_output, conv))
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    w = sparse_weights(rng, net.params["conv"][0].data.shape, zeros=0.6)
    net.params["conv"][0].data[...] = w
    b = None
    if case.bias:
        b = rng.standard_normal(net.params["conv"][1].data.shape).astype(np.float32)
        net.params["conv"][1].data[...] = b
    x = random_input(rng, case.shape, 0.5)
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, "direct")
    assert_close_to(got, x, w, b, case.geometry(), dense)
    expected = reference_conv(x, w, b, **case.geometry())
    if fused:
        expected = np.maximum(expected, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["input", "one-image", "weights"])
def test_direct_keeps_dense_non_finite_semantics(caffe, make_net, paths, where):
    """0 x NaN is NaN in the dense GEMM; direct must not hide it by skipping zero weights."""
    net = make_net(conv_spec(caffe, "conv", (2, 4, 7, 8), 5, dict(kernel_size=3, pad=1)))
    rng = np.random.default_rng(21)
    w = sparse_weights(rng, net.params["conv"][0].data.shape, 0.8)
    x = random_input(rng, (2, 4, 7, 8), 0.5)
    if where == "one-image":  # image 0 goes dense, image 1 direct
        x[0, 3, 6, 0] = np.nan
    elif where == "input":
        x[0, 1, 3, 4] = np.nan
        x[1, 2, 0, 0] = np.inf
        x[1, 0, 6, 7] = -np.inf
    else:
        w[1, 2, 0, 0] = np.nan
        w[3, 0, 1, 1] = np.inf
    net.params["conv"][0].data[...] = w
    net.params["conv"][1].data[...] = rng.standard_normal(5)
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    got = forward_on(caffe, net, "direct")
    assert np.isnan(dense).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(dense))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(dense))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(dense))
    finite = np.isfinite(dense)
    np.testing.assert_allclose(got[finite], dense[finite], rtol=1e-5, atol=1e-5)
    # Finite again: the direct kernel runs again and is right (no NaN left in its buffers).
    net.params["conv"][0].data[...] = np.nan_to_num(w, nan=0.0, posinf=0.0)
    net.blobs["data"].data[...] = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    dense = forward_on(caffe, net, "dense")
    np.testing.assert_allclose(forward_on(caffe, net, "direct"), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", BLOCKED_CASES, ids=lambda case: case.id)
def test_direct_runs_many_channels_in_blocks(caffe, make_net, paths, profiling, case):
    """BLOCKED_CASES do engage the blocks (so the shape tests above check them); a few channels
    run in one."""
    for shape, blocked in [(case.shape, True), ((1, 4) + case.shape[2:], False)]:
        net = make_net(conv_spec(caffe, "conv", shape, case.num_output, case.conv))
        rng = np.random.default_rng(3)
        net.params["conv"][0].data[...] = sparse_weights(rng, net.params["conv"][0].data.shape, 0.6)
        net.blobs["data"].data[...] = random_input(rng, shape, 0.5)
        caffe.reset_conv_profile()
        forward_on(caffe, net, "direct")
        blocks = caffe.conv_profile()["conv"]["direct_blocks"]
        assert (blocks > 1) == blocked, (shape, blocks)


def test_direct_profiles_a_batch_image_by_image(caffe, make_net, paths, profiling):
    """direct runs a batch in one call, but counts it as the other paths do: per image."""
    net = make_net(conv_spec(caffe, "conv_batch", (3, 4, 6, 5), 5, dict(kernel_size=3, pad=1)))
    rng = np.random.default_rng(12)
    net.params["conv_batch"][0].data[...] = sparse_weights(rng, (5, 4, 3, 3), 0.6)
    net.blobs["data"].data[...] = random_input(rng, (3, 4, 6, 5), 0.5)
    counts = {}
    for path in ["spmdm", "direct"]:
        caffe.reset_conv_profile()
        caffe.set_conv_forward_path(path, "conv_batch")
        net.forward()
        p = caffe.conv_profile()["conv_batch"]
        counts[path] = {k: p[k] for k in ("calls", "input_elements", "input_nonzeros", "dense_macs",
                                          "useful_macs", "weight_nonzeros")}
        assert p["seconds"]["bias"] == 0 or path != "direct"  # the bias is fused
    assert counts["direct"] == counts["spmdm"]
    assert counts["direct"]["calls"] == 3


def test_direct_input_reshape_rebuilds_its_layout(caffe, make_net, paths):
    net = make_net(conv_spec(caffe, "conv", (1, 3, 6, 7), 4, dict(kernel_size=3, pad=1)))
    rng = np.random.default_rng(8)
    w = sparse_weights(rng, net.params["conv"][0].data.shape, 0.5)
    net.params["conv"][0].data[...] = w
    b = net.params["conv"][1].data.copy()
    for shape in [(1, 3, 6, 7), (2, 3, 11, 5), (1, 3, 4, 4)]:
        net.blobs["data"].reshape(*shape)
        x = random_input(rng, shape, 0.3)
        net.blobs["data"].data[...] = x
        net.reshape()
        got = forward_on(caffe, net, "direct")
        np.testing.assert_allclose(got, reference_conv(x, w, b, pad=(1, 1)), rtol=1e-4, atol=1e-4)


def test_direct_padding_survives_layers_that_share_its_buffer(caffe, make_net, paths):
    """direct keeps a scratch buffer per padded layout and, after the first forward into it, copies
    only the input's elements (the padding's zeros stay): layers of one shape share a buffer, a
    strided layer (no padded layout) writes its own whole. Inputs without zeros, a NaN forward and
    a batch reshape between: every output must still equal the reference."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 8, 7, 7]))
    n.b = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1)
    n.s = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1, stride=2)
    n.d = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1, bias_term=False)
    net = make_net(n)
    rng = np.random.default_rng(12)
    for name in ("b", "s", "d"):
        net.params[name][0].data[...] = sparse_weights(rng, net.params[name][0].data.shape, 0.6)
        caffe.set_conv_forward_path("direct", name)
    for shape, poison in [((1, 8, 7, 7), False), ((1, 8, 7, 7), True), ((1, 8, 7, 7), False),
                          ((2, 8, 7, 7), False), ((1, 8, 7, 7), False)]:
        net.blobs["data"].reshape(*shape)
        net.reshape()
        x = rng.standard_normal(shape).astype(np.float32)  # no zeros: a stale element would show
        if poison:
            x[0, 3, 2, 5] = np.nan
        net.blobs["data"].data[...] = x
        net.forward()
        for name, stride in (("b", 1), ("s", 2), ("d", 1)):
            blobs = net.params[name]
            want = reference_conv(x, blobs[0].data, blobs[1].data if len(blobs) > 1 else None,
                                  pad=(1, 1), stride=(stride, stride))
            np.testing.assert_allclose(net.blobs[name].data, want, rtol=1e-4, atol=1e-4,
                                       err_msg=f"{name} {shape} nan={poison}")

DIRECT_ISA_SCRIPT = """
import sys, zlib
import numpy as np
import caffe
from caffe_tests.test_conv_reference import CASES, conv_spec, random_input, reference_conv
from caffe_tests.test_forward_paths import DIRECT_CASES, sparse_weights
from caffe_tests.conftest import write_net
from pathlib import Path
caffe.set_mode_cpu()
assert caffe.conv_direct_isa() == sys.argv[1], caffe.conv_direct_isa()
for case in CASES + DIRECT_CASES:
    net = write_net(caffe, conv_spec(caffe, "conv", case.shape, case.num_output, case.conv),
                    Path(sys.argv[2]) / "net.prototxt")
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    w = sparse_weights(rng, net.params["conv"][0].data.shape, zeros=0.7)
    net.params["conv"][0].data[...] = w
    b = None
    if case.bias:
        b = rng.standard_normal(net.params["conv"][1].data.shape).astype(np.float32)
        net.params["conv"][1].data[...] = b
    x = random_input(rng, case.shape, 0.5)
    net.blobs["data"].data[...] = x
    caffe.set_conv_forward_path("direct")
    got = net.forward()["conv"]
    np.testing.assert_allclose(got, reference_conv(x, w, b, **case.geometry()), rtol=1e-4,
                               atol=1e-4, err_msg=case.id)
print("ok", len(CASES + DIRECT_CASES))
"""


def run_on_isa(script: str, isa: str, caffe_python_path, tmp_path, timeout=None):
    """Run `script` (argv: isa, tmp_path) in a fresh Python with SPARSE_CAFFE_DIRECT_ISA=isa, which
    picks the kernel set of direct and of max pooling; skip when this CPU lacks that ISA. Returns
    the finished process (it must have exited 0)."""
    import os
    import subprocess
    import sys

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    needs = {"avx2": ("avx2", "fma"), "avx512": ("avx512f",)}.get(isa, ())
    if any(f" {flag}" not in flags for flag in needs):
        pytest.skip(f"this CPU has no {isa}")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, SPARSE_CAFFE_DIRECT_ISA=isa, GLOG_minloglevel="2",
               PYTHONPATH=os.pathsep.join([str(caffe_python_path), str(root)]))
    result = subprocess.run([sys.executable, "-c", script, isa, str(tmp_path)], env=env,
                            capture_output=True, text=True, cwd=root, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_direct_on_each_vector_isa(caffe_python_path, isa, tmp_path):
    """Every kernel set this CPU runs (SPARSE_CAFFE_DIRECT_ISA picks one, in a fresh process)."""
    run_on_isa(DIRECT_ISA_SCRIPT, isa, caffe_python_path, tmp_path)
