"""The `auto` forward path: its cost model, calibration, re-planning, selection and reports.

None of these tests depends on timing: the cost model is checked on its own (and through a net
with calibration switched off), and what calibration must do (run every surviving candidate,
decide, keep outputs right) holds whichever candidate wins. The outputs of auto against dense
over the configuration matrix are in test_forward_paths.py (PATHS_AND_AUTO).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sparse_caffe.patching.config import CONV_TEMPLATE_CONFIG

from .test_conv_reference import conv_spec, random_input, reference_conv
from .test_forward_paths import auto_outputs, paths, sparse_weights  # noqa: F401 - a fixture
from .test_sparse_inner_product import fc_paths, fc_prototxt, load  # noqa: F401 - a fixture

CONFIG = CONV_TEMPLATE_CONFIG
# Paths never pruned for dense weights: those that do every multiply (Caffe's GEMM, oneDNN's
# primitive, gemm_1x1's register tiles) and activation_sparse (dense weights times the input's
# nonzeros, 1x1 layers only).
DENSE_KERNELS = {"dense", "onednn", "activation_sparse", "gemm_1x1"}


@pytest.fixture
def auto(caffe, paths, fc_paths):
    """A clean auto state and the default calibration length, before and after."""
    caffe.reset_auto()
    caffe.set_auto_calibration(CONFIG.auto_rounds)
    try:
        yield caffe
    finally:
        caffe.set_auto_calibration(CONFIG.auto_rounds)
        caffe.reset_auto()


def two_layer_net(caffe, make_net, rng, dense_zeros=0.0, sparse_zeros=0.98):
    """data -> conv_dense (1x1, dense weights, as ResNet-50's) -> conv_sparse (3x3 pad 1, 98% zero
    weights)."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 16, 10, 10]))
    n.conv_dense = L.Convolution(n.data, num_output=32, kernel_size=1)
    n.conv_sparse = L.Convolution(n.conv_dense, num_output=32, kernel_size=3, pad=1)
    net = make_net(n)
    for name, zeros in (("conv_dense", dense_zeros), ("conv_sparse", sparse_zeros)):
        net.params[name][0].data[...] = sparse_weights(rng, net.params[name][0].data.shape, zeros)
        net.params[name][1].data[...] = rng.standard_normal(32)
    net.blobs["data"].data[...] = random_input(rng, (1, 16, 10, 10), 0.5)
    return net


def dense_outputs(caffe, net, layers):
    caffe.set_conv_forward_path("dense")
    net.forward()
    return {name: net.blobs[name].data.copy() for name in layers}


def test_cost_model_alone_keeps_dense_weights_dense_and_sends_98_percent_zeros_sparse(auto):
    dense_weights = auto.auto_cost_model(1.0, 0.5, kernel_area=1)
    assert dense_weights["path"] in DENSE_KERNELS and dense_weights["backend"] == "openmp"
    # Every sparse candidate is pruned on a dense-weight layer, with the reason.
    assert set(dense_weights["pruned"]) == set(dense_weights["predicted"]) - DENSE_KERNELS | \
        {p for p, _ in CONFIG.auto_excluded}
    assert all("dense-weight" in reason for name, reason in dense_weights["pruned"].items()
               if name not in dict(CONFIG.auto_excluded))
    # A dense-weight 3x3 layer: of the sparse paths only direct (no lowering) may still be timed;
    # the model picks a dense kernel.
    dense_3x3 = auto.auto_cost_model(1.0, 0.5, kernel_area=9)
    assert dense_3x3["path"] in DENSE_KERNELS and "direct" not in dense_3x3["pruned"]
    assert "dense-weight" in dense_3x3["pruned"]["spmdm"]
    sparse = auto.auto_cost_model(0.02, 0.5)
    assert sparse["path"] not in DENSE_KERNELS
    assert sparse["path"] in CONFIG.forward_paths
    assert sparse["predicted"][sparse["path"]] < 1 - CONFIG.auto_margin
    assert "dense" not in sparse["pruned"]
    # sparse_output is never a candidate, whatever the layer.
    for path, reason in CONFIG.auto_excluded:
        assert sparse["pruned"][path] == reason
    # Fully connected: the same rule between dense and sparse.
    assert auto.auto_cost_model(1.0, 1.0, 1, True)["path"] == "dense"
    assert auto.auto_cost_model(0.1, 1.0, 1, True)["path"] == "sparse"
    with pytest.raises(ValueError, match="densities must lie in"):
        auto.auto_cost_model(1.5, 0.5)


def test_without_calibration_a_net_takes_the_cost_models_pick(auto, make_net):
    """set_auto_calibration(0): no timing at all; the dense-weight layer stays dense, the
    98%-zero layer runs a sparse path, both decided on the first forward, outputs right."""
    net = two_layer_net(auto, make_net, np.random.default_rng(1))
    layers = ["conv_dense", "conv_sparse"]
    dense = dense_outputs(auto, net, layers)
    auto.set_auto_calibration(0)
    auto.set_conv_forward_path("auto")
    net.forward()
    choices = auto.auto_choices()
    assert choices["conv_dense"]["state"] == choices["conv_sparse"]["state"] == "decided"
    assert choices["conv_dense"]["path"] in DENSE_KERNELS
    assert choices["conv_sparse"]["path"] not in DENSE_KERNELS | {"sparse_output"}
    assert choices["conv_dense"]["forwards"] == choices["conv_sparse"]["forwards"] == 0
    assert abs(choices["conv_sparse"]["weight_density"] - 0.02) < 0.01
    for name in layers:
        np.testing.assert_allclose(net.blobs[name].data, dense[name], rtol=1e-4, atol=1e-4)


def assert_rounds_in_range(choice):
    """auto_rounds timed rounds, more (up to auto_max_rounds_factor times) while the winner has
    not won three rounds of four against every other candidate."""
    assert CONFIG.auto_rounds <= choice["rounds"] <= CONFIG.auto_max_rounds_factor * CONFIG.auto_rounds


def test_calibration_times_every_survivor_then_decides(auto, make_net):
    net = two_layer_net(auto, make_net, np.random.default_rng(2))
    layers = ["conv_dense", "conv_sparse"]
    dense = dense_outputs(auto, net, layers)
    auto.set_conv_forward_path("auto")
    outputs = auto_outputs(auto, net, "conv_sparse")
    for y in outputs:  # every candidate computed the real output
        np.testing.assert_allclose(y, dense["conv_sparse"], rtol=1e-4, atol=1e-4)
    # The layers calibrate side by side but each for as many rounds as its own near ties need
    # (on a loaded machine the dense-weight layer's kernels can tie for longer).
    auto_outputs(auto, net, "conv_dense")
    choices = auto.auto_choices()
    sparse, dense_layer = choices["conv_sparse"], choices["conv_dense"]
    # The dense-weight layer timed only dense kernels: the cost model pruned every sparse one.
    assert dense_layer["state"] == "decided" and dense_layer["path"] in DENSE_KERNELS
    dense_timed = {c for c, ms in dense_layer["candidates"].items() if ms is not None}
    assert dense_timed <= DENSE_KERNELS
    assert dense_layer["forwards"] == ((dense_layer["rounds"] + 1) * len(dense_timed)
                                       if len(dense_timed) > 1 else 0)
    # The 98%-zero layer timed each survivor: a median for each, None for the pruned ones.
    timed = {c for c, ms in sparse["candidates"].items() if ms is not None}
    assert {"dense", "direct"} <= timed
    assert timed.isdisjoint(sparse["pruned"])
    assert set(sparse["candidates"]) == timed | set(sparse["pruned"])
    assert sparse["forwards"] == (sparse["rounds"] + 1) * len(timed)  # a warm-up round first
    assert_rounds_in_range(sparse)
    assert sparse["state"] == "decided" and sparse["replans"] == 0
    assert 0.3 < sparse["input_density"] <= 1.0
    # The choice is the fastest median, dense unless clearly beaten.
    medians = sparse["candidates"]
    chosen = sparse["path"] + ("" if sparse["backend"] == "openmp" else "/" + sparse["backend"])
    fastest = min(timed, key=lambda c: medians[c])
    if fastest != "dense" and medians[fastest] < (1 - CONFIG.auto_margin) * medians["dense"]:
        assert chosen == fastest
    else:
        assert chosen == "dense"


def test_a_weight_write_replans_and_the_output_stays_right(auto, make_net):
    rng = np.random.default_rng(3)
    net = two_layer_net(auto, make_net, rng)
    auto.set_conv_forward_path("auto", "conv_sparse")
    auto_outputs(auto, net, "conv_sparse")
    assert auto.auto_choices()["conv_sparse"]["replans"] == 0
    w = sparse_weights(rng, net.params["conv_sparse"][0].data.shape, 0.98)
    net.params["conv_sparse"][0].data[...] = w
    net.forward()
    choice = auto.auto_choices()["conv_sparse"]
    assert choice["state"] == "calibrating"
    assert choice["replans"] == 1
    x = net.blobs["conv_dense"].data.copy()
    b = net.params["conv_sparse"][1].data.copy()
    expected = reference_conv(x, w, b, pad=(1, 1))
    for y in auto_outputs(auto, net, "conv_sparse"):
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert auto.auto_choices()["conv_sparse"]["replans"] == 1
    # Dense weights now: re-planned, and the cost model prunes the lowering sparse paths.
    net.params["conv_sparse"][0].data[...] = sparse_weights(rng, w.shape, 0.0)
    net.forward()
    choice = auto.auto_choices()["conv_sparse"]
    assert choice["replans"] == 2 and choice["weight_density"] == 1.0
    assert "dense-weight" in choice["pruned"]["spmdm"]


def test_a_new_input_shape_replans(auto, make_net):
    net = two_layer_net(auto, make_net, np.random.default_rng(4))
    auto.set_conv_forward_path("auto", "conv_sparse")
    auto_outputs(auto, net, "conv_sparse")
    net.blobs["data"].reshape(2, 16, 10, 10)
    net.blobs["data"].data[...] = random_input(np.random.default_rng(5), (2, 16, 10, 10), 0.5)
    net.reshape()
    net.forward()
    choice = auto.auto_choices()["conv_sparse"]
    assert (choice["state"], choice["replans"]) == ("calibrating", 1)


def test_an_input_whose_sparsity_moves_far_replans(auto, make_net):
    """Once decided, the input's nonzero fraction is sampled every few forwards into a moving
    average; a move of more than auto_density_shift re-plans, a small one does not."""
    L = auto.layers
    n = auto.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 16, 10, 10]))
    n.conv = L.Convolution(n.data, num_output=16, kernel_size=3, pad=1)
    net = make_net(n)
    rng = np.random.default_rng(6)
    net.params["conv"][0].data[...] = sparse_weights(rng, net.params["conv"][0].data.shape, 0.98)
    net.blobs["data"].data[...] = random_input(rng, (1, 16, 10, 10), 0.5)
    auto.set_conv_forward_path("auto", "conv")
    auto_outputs(auto, net, "conv")
    assert abs(auto.auto_choices()["conv"]["input_density"] - 0.5) < 0.05
    net.blobs["data"].data[...] = random_input(rng, (1, 16, 10, 10), 0.4)  # 0.1 denser
    for _ in range(8 * CONFIG.auto_density_check_every):
        net.forward()
    assert auto.auto_choices()["conv"]["replans"] == 0
    net.blobs["data"].data[...] = random_input(rng, (1, 16, 10, 10), 0.0)  # all nonzero
    for _ in range(4 * CONFIG.auto_density_check_every):
        net.forward()
    choice = auto.auto_choices()["conv"]
    assert choice["replans"] == 1
    assert choice["input_density"] > 0.95


def test_reset_forgets_every_choice(auto, make_net):
    net = two_layer_net(auto, make_net, np.random.default_rng(7))
    auto.set_conv_forward_path("auto")
    auto_outputs(auto, net, "conv_sparse")
    assert set(auto.auto_choices()) == {"conv_dense", "conv_sparse"}
    auto.reset_auto()
    assert auto.auto_choices() == {}
    net.forward()
    choice = auto.auto_choices()["conv_sparse"]
    assert (choice["state"], choice["replans"], choice["forwards"]) == ("calibrating", 0, 1)


def test_switching_paths_keeps_the_decision(auto, make_net):
    """bench switches every layer between paths each round: back on auto, a decided layer runs
    its choice again without calibrating."""
    net = two_layer_net(auto, make_net, np.random.default_rng(8))
    auto.set_conv_forward_path("auto")
    auto_outputs(auto, net, "conv_sparse")
    before = auto.auto_choices()["conv_sparse"]
    auto.set_conv_forward_path("dense")
    net.forward()
    auto.set_conv_forward_path("auto")
    net.forward()
    assert auto.auto_choices()["conv_sparse"] == before


def test_prototxt_auto_and_deconvolution(auto, make_net):
    P = auto.proto.caffe_pb2.ConvolutionParameter
    assert P.AUTO == len(CONFIG.forward_paths) + 1
    assert auto.proto.caffe_pb2.InnerProductParameter.AUTO == len(CONFIG.fc_forward_paths) + 1
    L = auto.layers
    n = auto.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 6, 6]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, forward_path=P.AUTO)
    n.deconv = L.Deconvolution(n.conv, convolution_param=dict(num_output=3, kernel_size=3,
                                                              forward_path=P.AUTO))
    net = make_net(n)
    rng = np.random.default_rng(9)
    net.params["conv"][0].data[...] = sparse_weights(rng, (4, 4, 3, 3), 0.9)
    net.params["deconv"][0].data[...] = sparse_weights(rng, (4, 3, 3, 3), 0.9)
    net.blobs["data"].data[...] = random_input(rng, (1, 4, 6, 6), 0.5)
    auto_outputs(auto, net, "conv")
    got = net.blobs["deconv"].data.copy()
    choices = auto.auto_choices()
    assert choices["conv"]["state"] == "decided"
    assert "deconv" not in choices  # Deconvolution runs dense, as on every other path
    auto.set_conv_forward_path("dense")
    net.forward()
    np.testing.assert_allclose(got, net.blobs["deconv"].data, rtol=1e-4, atol=1e-4)


def test_nd_convolution_excludes_direct(auto, make_net):
    """A 3-D convolution: direct (2-D only) is no candidate, the others are, outputs as dense."""
    L = auto.layers
    n = auto.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 3, 5, 6]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1)
    net = make_net(n)
    rng = np.random.default_rng(10)
    net.params["conv"][0].data[...] = sparse_weights(rng, (4, 4, 3, 3, 3), 0.98)
    net.blobs["data"].data[...] = random_input(rng, (1, 4, 3, 5, 6), 0.0)
    auto.set_conv_forward_path("dense")
    dense = net.forward()["conv"].copy()
    auto.set_conv_forward_path("auto")
    for y in auto_outputs(auto, net, "conv"):
        np.testing.assert_allclose(y, dense, rtol=1e-4, atol=1e-4)
    choice = auto.auto_choices()["conv"]
    assert "2-D" in choice["pruned"]["direct"]
    assert choice["candidates"]["direct"] is None
    assert choice["candidates"]["spmdm"] is not None


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("zeros", [0.0, 0.9])
def test_inner_product_auto_equals_dense(auto, make_net, batch, zeros):
    net = make_net(fc_prototxt((batch, 64), 48))
    rng = np.random.default_rng(batch * 10 + int(zeros * 10))
    x, w, b = load(net, rng, zeros)
    auto.set_fc_forward_path("dense", "fc")
    dense = net.forward()["fc"].copy()
    auto.set_fc_forward_path("auto", "fc")
    outputs = auto_outputs(auto, net, "fc")
    for y in outputs:
        np.testing.assert_allclose(y, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())
    choice = auto.auto_choices()["fc"]
    assert choice["kind"] == "inner_product" and choice["state"] == "decided"
    if zeros == 0.0:
        assert choice["path"] == "dense" and choice["forwards"] == 0
        assert "dense-weight" in choice["pruned"]["sparse"]
    else:
        assert set(c for c, ms in choice["candidates"].items() if ms is not None) == \
            {"dense", "sparse"}
        assert choice["forwards"] == (choice["rounds"] + 1) * 2
        assert_rounds_in_range(choice)


ENV_SCRIPT = """
import sys
import numpy as np
import caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TEST)
net.params["conv"][0].data[...] = 0
net.params["conv"][0].data[0, 0, 0, 0] = 1
for _ in range(3):
    net.forward()
print(sorted(caffe.auto_choices()))
"""


def test_selection_by_environment(caffe_python_path, tmp_path):
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 3 } }
""")
    env = dict(os.environ, SPARSE_CAFFE_FORWARD_PATH="auto", SPARSE_CAFFE_FC_PATH="auto",
               GLOG_minloglevel="2", PYTHONPATH=str(caffe_python_path))
    result = subprocess.run([sys.executable, "-c", ENV_SCRIPT, str(prototxt)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['conv', 'fc']"


def test_bad_calibration_length_is_a_value_error(auto):
    with pytest.raises(ValueError, match="rounds must be 0 or more"):
        auto.set_auto_calibration(-1)
    auto.set_auto_calibration(5)
    assert auto.auto_calibration() == 5
