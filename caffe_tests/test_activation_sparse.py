"""The activation_sparse path equals dense on every 1x1 convolution it accepts, or runs dense.

Tolerance as in test_forward_paths.py: activation_sparse adds the same products as the GEMM (every
nonzero input times every weight), only in another order and without the zero inputs' products,
so each float32 output may differ from dense by about K * 2**-24 of the sum of |terms|.
"""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from .test_conv_memory import run_pycaffe
from .test_conv_reference import conv_spec, random_input, reference_conv
from .test_forward_paths import assert_close_to, forward_on, paths, run_on_isa  # noqa: F401 - paths is a fixture

PATH = "activation_sparse"
# (id, input shape, outputs, convolution): output channel counts below, at and across the
# microkernels' register block (64 floats), in channels from 1 to past a cache line of positions.
SHAPES = [
    ("tiny", (1, 1, 1, 1), 1, dict()),
    ("c3-o5", (1, 3, 7, 9), 5, dict()),
    ("c17-o64-batch3", (3, 17, 6, 5), 64, dict()),
    ("c64-o70", (2, 64, 9, 11), 70, dict()),
    ("c32-o130-stride2", (2, 32, 13, 10), 130, dict(stride=2)),
    ("c8-o16-stride-h2-w3", (1, 8, 11, 14), 16, dict(stride_h=2, stride_w=3)),
    ("c96-o24-wide", (1, 96, 5, 70), 24, dict()),
]
INPUT_ZEROS = [0.0, 0.3, 0.7, 0.95, 1.0]


def load(net, rng, input_zeros, bias=True):
    w = rng.standard_normal(net.params["conv"][0].data.shape).astype(np.float32)
    net.params["conv"][0].data[...] = w
    b = None
    if bias:
        b = rng.standard_normal(net.params["conv"][1].data.shape).astype(np.float32)
        net.params["conv"][1].data[...] = b
    x = random_input(rng, net.blobs["data"].data.shape, input_zeros)
    net.blobs["data"].data[...] = x
    return x, w, b


def geometry(conv):
    stride = (conv.get("stride_h", conv.get("stride", 1)), conv.get("stride_w", conv.get("stride", 1)))
    return dict(stride=stride)


@pytest.mark.parametrize("input_zeros", INPUT_ZEROS)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [True, False])
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
    if input_zeros == 1.0:  # nothing but the bias (ReLU'd)
        only = np.zeros(outputs, np.float32) if b is None else b
        only = np.maximum(only, 0) if fused else only
        np.testing.assert_array_equal(got, np.broadcast_to(only[None, :, None, None], got.shape))


def test_profile_counts_useful_multiply_adds_and_times_its_phases(caffe, make_net, paths, profiling):
    net = make_net(conv_spec(caffe, "conv", (2, 6, 5, 7), 4, dict(kernel_size=1, stride=2,
                                                                     bias_term=False)))
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    net.params["conv"][0].data[...] = w
    x = random_input(rng, (2, 6, 5, 7), 0.5)
    net.blobs["data"].data[...] = x
    forward_on(caffe, net, PATH)
    p = caffe.conv_profile()["conv"]
    lowered = x[:, :, ::2, ::2].reshape(2, 6, -1)  # what a stride-2 1x1 kernel reads
    expected = int(sum(np.count_nonzero(w.reshape(4, 6)[:, k]) * np.count_nonzero(lowered[n, k])
                       for n in range(2) for k in range(6)))
    assert (p["path"], p["calls"], p["useful_macs"], p["dense_macs"]) == \
        (PATH, 2, expected, 2 * 4 * 6 * 3 * 4)
    assert p["seconds"]["input2csr"] > 0 and p["seconds"]["multiply"] > 0
    assert p["seconds"]["weight2csr"] > 0  # the first forward transposed the weights
    caffe.reset_conv_profile()
    forward_on(caffe, net, PATH)
    assert caffe.conv_profile()["conv"]["seconds"]["weight2csr"] == 0  # and kept them


def test_weights_written_from_python_are_transposed_again(caffe, make_net, paths):
    net = make_net(conv_spec(caffe, "conv", (1, 12, 6, 7), 9, dict(kernel_size=1)))
    rng = np.random.default_rng(5)
    x, _, b = load(net, rng, 0.5)
    forward_on(caffe, net, PATH)
    for round_ in range(3):
        w = rng.standard_normal((9, 12, 1, 1)).astype(np.float32)
        net.params["conv"][0].data[...] = w
        np.testing.assert_allclose(forward_on(caffe, net, PATH), reference_conv(x, w, b),
                                   rtol=1e-4, atol=1e-4, err_msg=f"stale weights in round {round_}")


def test_a_reshaped_input_runs_right(caffe, make_net, paths):
    net = make_net(conv_spec(caffe, "conv", (1, 5, 8, 8), 7, dict(kernel_size=1, stride=2)))
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


def test_more_positions_than_one_chunk(caffe, make_net, paths):
    """2^21 entries per chunk at most: 1024 channels x 2 x 36 x 36 positions take two chunks,
    the second starting inside the second image."""
    shape = (2, 1024, 36, 36)
    net = make_net(conv_spec(caffe, "conv", shape, 3, dict(kernel_size=1)))
    rng = np.random.default_rng(13)
    x, w, b = load(net, rng, 0.6)
    dense = forward_on(caffe, net, "dense")
    assert_close_to(forward_on(caffe, net, PATH), x, w, b, {}, dense)


@pytest.mark.parametrize("where", ["input", "weights"])
def test_keeps_dense_non_finite_semantics(caffe, make_net, paths, where):
    """A NaN or infinity in the input meets every weight, as in the GEMM; one in the weights would
    meet the skipped zero inputs in the GEMM (0 x NaN), so those forwards run dense."""
    net = make_net(conv_spec(caffe, "conv", (2, 12, 5, 4), 70, dict(kernel_size=1)))
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
    # Finite again: the path runs again and is right.
    net.params["conv"][0].data[...] = np.nan_to_num(w, nan=0.0, posinf=0.0)
    net.blobs["data"].data[...] = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    dense = forward_on(caffe, net, "dense")
    np.testing.assert_allclose(forward_on(caffe, net, PATH), dense, rtol=1e-5, atol=1e-5)


# What activation_sparse refuses: the layer runs dense, saying why once (at our log level).
REFUSED = [
    ("3x3", (1, 4, 6, 7), dict(kernel_size=3),
     "forward path activation_sparse: activation_sparse runs 1x1 convolutions only, this kernel "
     "has 9 taps; using dense"),
    ("1x1-pad1", (1, 4, 6, 7), dict(kernel_size=1, pad=1),
     "forward path activation_sparse: activation_sparse runs unpadded convolutions only; using "
     "dense"),
    ("1x1-group2", (1, 4, 6, 7), dict(kernel_size=1, group=2),
     "forward path activation_sparse: activation_sparse runs one group only, this convolution has "
     "2; using dense"),
    ("1x1-3d", (1, 4, 3, 6, 7), dict(kernel_size=1),
     "forward path activation_sparse: activation_sparse runs 2-D convolutions only, this one has 3 "
     "spatial axes; using dense"),
]

# A layer that `path` refuses, in a fresh process: it must run dense and say why in one line,
# however often the path is asked for again (bench asks every round).
REFUSED_SCRIPT = """
import json
import sys
from pathlib import Path
import numpy as np
import caffe
from caffe_tests.conftest import write_net
from caffe_tests.test_conv_reference import conv_spec
caffe.set_mode_cpu()
path, shape, conv = sys.argv[2], tuple(json.loads(sys.argv[3])), json.loads(sys.argv[4])
net = write_net(caffe, conv_spec(caffe, "conv", shape, 4, conv), Path(sys.argv[1]) / "net.prototxt")
net.blobs["data"].data[...] = np.random.default_rng(1).standard_normal(shape)
caffe.set_conv_profiling(True)
caffe.set_conv_forward_path("dense", "conv")
dense = net.forward()["conv"].copy()
for _ in range(3):
    caffe.set_conv_forward_path(path, "conv")
    got = net.forward()["conv"].copy()
    assert np.array_equal(got, dense), "the refused layer did not run dense"
    caffe.set_conv_forward_path("dense", "conv")
    net.forward()
caffe.set_conv_forward_path(path, "conv")
net.forward()
print("ran", caffe.conv_profile()["conv"]["path"])
"""


def assert_refused_with_one_line(caffe_python_path, tmp_path, path, shape, conv, line):
    result = run_pycaffe(caffe_python_path, REFUSED_SCRIPT, tmp_path, path, json.dumps(shape),
                         json.dumps(conv), env={"GLOG_minloglevel": "2"})
    assert "ran dense" in result.stdout
    assert result.stderr.count(f"layer conv: {line}") == 1, result.stderr[-2000:]


@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case[0])
def test_what_it_refuses_runs_dense_with_one_log_line(caffe_python_path, tmp_path, case):
    _, shape, conv, line = case
    assert_refused_with_one_line(caffe_python_path, tmp_path, PATH, shape, conv, line)


def assert_deconvolution_runs_dense(caffe, make_net, path):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 5, 5]))
    n.deconv = L.Deconvolution(n.data, convolution_param=dict(num_output=2, kernel_size=1))
    net = make_net(n)
    rng = np.random.default_rng(5)
    net.params["deconv"][0].data[...] = rng.standard_normal(net.params["deconv"][0].data.shape)
    net.blobs["data"].data[...] = random_input(rng, (1, 3, 5, 5), 0.5)
    dense = forward_on(caffe, net, "dense", "deconv")
    np.testing.assert_array_equal(forward_on(caffe, net, path, "deconv"), dense)


def test_deconvolution_runs_dense(caffe, make_net, paths):
    assert_deconvolution_runs_dense(caffe, make_net, PATH)


def test_auto_cost_model_keeps_it_for_sparse_1x1_inputs_and_prunes_it_elsewhere(caffe):
    sparse_1x1 = caffe.auto_cost_model(1.0, 0.3, kernel_area=1)
    assert PATH not in sparse_1x1["pruned"]
    assert sparse_1x1["predicted"][PATH] < 1.0
    # Dense weights do not prune it (it multiplies dense weights by design); a dense input does.
    dense_input = caffe.auto_cost_model(1.0, 1.0, kernel_area=1)
    assert "cost model predicts" in dense_input["pruned"][PATH]
    three = caffe.auto_cost_model(1.0, 0.3, kernel_area=9)
    assert three["pruned"][PATH] == ("activation_sparse runs 1x1 convolutions only, this kernel "
                                     "has 9 taps")


def test_auto_times_it_on_a_sparse_input_1x1_layer_and_stays_right(caffe, make_net, paths):
    net = make_net(conv_spec(caffe, "conv", (1, 64, 10, 10), 64, dict(kernel_size=1)))
    rng = np.random.default_rng(17)
    x, w, b = load(net, rng, 0.8)
    dense = forward_on(caffe, net, "dense")
    caffe.reset_auto()
    try:
        got = forward_on(caffe, net, "auto")  # the output farthest from dense's over calibration
        np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-4)
        choice = caffe.auto_choices()["conv"]
        assert choice["candidates"][PATH] is not None, choice  # timed
        assert PATH not in choice["pruned"]
    finally:
        caffe.reset_auto()


# Every shape of a 1x1 path's test module (its ISA_SHAPES, ISA_INPUT_ZEROS, geometry() and PATH),
# fused ReLU off and on, on one kernel set in a fresh process (MODULE is prepended to the script).
ISA_SCRIPT = """
import importlib
import sys
from pathlib import Path
import numpy as np
import caffe
from caffe_tests.conftest import write_net
from caffe_tests.test_conv_reference import conv_spec, random_input, reference_conv
module = importlib.import_module("caffe_tests." + MODULE)
caffe.set_mode_cpu()
rng = np.random.default_rng(2)
for name, shape, outputs, conv in module.ISA_SHAPES:
    for fused in (False, True):
        conv = dict(conv, kernel_size=1, fused_relu=fused)
        net = write_net(caffe, conv_spec(caffe, "conv", shape, outputs, conv),
                        Path(sys.argv[2]) / (name + ".prototxt"))
        w = rng.standard_normal(net.params["conv"][0].data.shape).astype(np.float32)
        b = rng.standard_normal(outputs).astype(np.float32)
        net.params["conv"][0].data[...] = w
        net.params["conv"][1].data[...] = b
        x = random_input(rng, shape, module.ISA_INPUT_ZEROS)
        net.blobs["data"].data[...] = x
        caffe.set_conv_forward_path(module.PATH)
        got = net.forward()["conv"]
        expected = reference_conv(x, w, b, **module.geometry(conv))
        if fused:
            expected = np.maximum(expected, 0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=name)
assert caffe.conv_direct_isa() == sys.argv[1], caffe.conv_direct_isa()
print("ok")
"""


def assert_right_on_isa(module, isa, threads, caffe_python_path, tmp_path, monkeypatch):
    """ISA_SCRIPT for the path of caffe_tests.<module>, with SPARSE_CAFFE_DIRECT_ISA=isa."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    result = run_on_isa(f"MODULE = {module!r}\n" + ISA_SCRIPT, isa, caffe_python_path, tmp_path,
                        timeout=300)
    assert result.stdout.strip().endswith("ok")


# Few positions and many output channels: two threads split the panels, not the positions.
# Many positions and channels: two threads gather and multiply.
ISA_SHAPES = SHAPES + [("few-positions", (1, 40, 3, 3), 300, dict()),
                       ("many-positions", (2, 256, 20, 20), 96, dict(stride=1))]
ISA_INPUT_ZEROS = 0.6


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_on_each_vector_isa_and_thread_count(caffe_python_path, isa, threads, tmp_path,
                                             monkeypatch):
    """Every kernel set this CPU runs (SPARSE_CAFFE_DIRECT_ISA picks it for direct and
    activation_sparse alike, in a fresh process), on one thread and on two."""
    assert_right_on_isa("test_activation_sparse", isa, threads, caffe_python_path, tmp_path,
                        monkeypatch)
