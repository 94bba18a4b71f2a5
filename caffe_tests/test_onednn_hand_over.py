"""onednn layers hand their outputs to each other in oneDNN's blocked layout (patch 12).

A onednn layer leaves its output in its primitive's layout with the reorder to NCHW pending on the
top blob; a onednn consumer whose primitive reads that layout takes the buffer as it is (input and
fused_residual's residual), and anything else that reads the blob (another path, pooling, pycaffe's
.data) gets the NCHW copy, made then; a producer whose pending output was made so writes NCHW
itself for a while. Every blob must equal the dense chain's, whoever reads it
and in whatever order; the profile counts the inputs taken in oneDNN's layout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .test_forward_paths import paths  # noqa: F401 - paths is a fixture

SHAPE = (2, 16, 10, 9)
CONVS = ("a", "b", "c", "d", "e")


def resnet_like(caffe, a_relu=True):
    """a (1x1, ReLU) -> b (1x1 + a, ReLU: fused_residual) -> c (3x3 pad 1, ReLU) -> pool, and
    d (1x1 of b, no ReLU) and e (1x1 of b, stride 2: the primitive reads every other row and
    column) beside c, as ResNet's blocks read a block's output two or three times."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(SHAPE)))
    n.a = L.Convolution(n.data, num_output=32, kernel_size=1, fused_relu=a_relu)
    n.b = L.Convolution(n.a, n.a, num_output=32, kernel_size=1, fused_relu=True,
                        fused_residual=True)
    n.c = L.Convolution(n.b, num_output=8, kernel_size=3, pad=1, fused_relu=True)
    n.d = L.Convolution(n.b, num_output=16, kernel_size=1)
    n.e = L.Convolution(n.b, num_output=8, kernel_size=1, stride=2)
    n.pool = L.Pooling(n.c, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2)
    return n


def load(net, seed=0):
    rng = np.random.default_rng(seed)
    for name in CONVS:
        for blob in net.params[name]:
            blob.data[...] = rng.standard_normal(blob.data.shape) / np.sqrt(blob.data[0].size)
    net.blobs["data"].data[...] = rng.standard_normal(SHAPE)


def every_blob(net, order):
    return {name: net.blobs[name].data.copy() for name in order}


def run(caffe, net, plan, order=("pool", "e", "d", "c", "b", "a")):
    caffe.clear_conv_forward_paths()
    for name in CONVS:
        caffe.set_conv_forward_path(plan.get(name, "dense"), name)
    net.forward()
    return every_blob(net, order)


def assert_same(got, want):
    for name in want:
        scale = max(1.0, float(np.abs(want[name]).max()))
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=name)


ALL_ONEDNN = dict.fromkeys(CONVS, "onednn")


def onednn_net(caffe, make_net):
    """The net, loaded, every convolution on onednn (overrides set, nothing run yet)."""
    net = make_net(resnet_like(caffe))
    load(net)
    caffe.clear_conv_forward_paths()
    for name in CONVS:
        caffe.set_conv_forward_path("onednn", name)
    return net


def handed_over(caffe, net):
    """One forward's inputs taken in oneDNN's layout, per convolution (profiling on)."""
    caffe.reset_conv_profile()
    net.forward()
    return {name: entry["inputs_handed_over"] for name, entry in caffe.conv_profile().items()}


@pytest.mark.parametrize("plan", [
    ALL_ONEDNN,
    dict(a="onednn", b="dense", c="onednn", d="onednn", e="onednn"),
    dict(a="dense", b="onednn", c="direct", d="onednn", e="onednn"),
    dict(a="onednn", b="onednn", c="gemm_1x1", d="direct", e="onednn")],
                         ids=["all-onednn", "dense-in-between", "dense-first", "others-after"])
@pytest.mark.parametrize("order", [("pool", "e", "d", "c", "b", "a"),
                                   ("a", "b", "c", "d", "e", "pool")],
                         ids=["last-first", "first-first"])
def test_every_blob_equals_dense_whoever_reads_it(caffe, make_net, paths,  # noqa: F811
                                                 plan, order):
    net = make_net(resnet_like(caffe))
    load(net)
    dense = run(caffe, net, {}, order)
    assert_same(run(caffe, net, plan, order), dense)
    load(net, seed=1)  # a second forward: every producer drops what it left pending last time
    dense = run(caffe, net, {}, order)
    assert_same(run(caffe, net, plan, order), dense)


def test_onednn_consumers_take_their_inputs_in_onednns_layout(caffe, make_net,
                                                              paths, profiling):  # noqa: F811
    net = make_net(resnet_like(caffe))
    load(net)
    run(caffe, net, ALL_ONEDNN)
    profile = caffe.conv_profile()
    batch = SHAPE[0]
    assert profile["a"]["inputs_handed_over"] == 0  # the net's input: NCHW from pycaffe
    for name in ("b", "c", "d", "e"):  # each read a onednn producer's output (e: every other pixel)
        assert profile[name]["inputs_handed_over"] == batch, name
    caffe.reset_conv_profile()
    run(caffe, net, dict(ALL_ONEDNN, b="dense"))
    profile = caffe.conv_profile()
    # b ran dense, so nothing after it was handed over
    assert [profile[name]["inputs_handed_over"] for name in ("c", "d", "e")] == [0, 0, 0]


def test_a_python_write_into_a_handed_over_blob_is_what_the_next_layer_reads(caffe, make_net,
                                                                             paths):  # noqa: F811
    net = onednn_net(caffe, make_net)
    net.forward(end="a")
    net.blobs["a"].data[...] = 0.5  # the pending reorder is made, then overwritten
    net.forward(start="b")
    got = every_blob(net, ("e", "d", "b", "a"))
    assert (got["a"] == 0.5).all()
    caffe.clear_conv_forward_paths()
    net.forward(end="a")
    net.blobs["a"].data[...] = 0.5
    net.forward(start="b")
    assert_same(got, every_blob(net, ("e", "d", "b", "a")))


def test_a_producer_whose_hand_over_was_made_into_nchw_writes_nchw_itself(caffe, make_net, paths,
                                                                          profiling):  # noqa: F811
    # Reading a's output from Python makes its pending reorder; a then writes NCHW itself on its
    # next forwards (so its own time, not its reader's, carries the reorder), and b reads NCHW.
    net = onednn_net(caffe, make_net)
    batch = SHAPE[0]
    for forward in range(3):  # nobody reads a's host copy: handed over every time
        assert handed_over(caffe, net)["b"] == batch, forward
    net.blobs["a"].data.copy()
    for forward in range(3):
        assert handed_over(caffe, net)["b"] == 0, forward
    # Any change of the paths in force (a bench's next column, say) ends the pause at once.
    caffe.set_conv_forward_path("onednn", "d")
    assert handed_over(caffe, net)["b"] == batch


def test_a_paused_producer_still_takes_its_residual_in_onednns_layout(caffe, make_net, paths,
                                                                      profiling):  # noqa: F811
    # b's own output is made into NCHW (read from Python), so b writes NCHW for a while; it must
    # still add its residual (a's output) in oneDNN's layout, not from a's host copy, which would
    # stop a handing over too (and so on back along a ResNet's chain of shortcuts).
    net = onednn_net(caffe, make_net)
    net.forward()
    net.blobs["b"].data.copy()
    batch = SHAPE[0]
    for forward in range(3):
        counts = handed_over(caffe, net)
        assert counts["b"] == batch, forward
        assert [counts[name] for name in ("c", "d", "e")] == [0, 0, 0], forward


@pytest.mark.parametrize("batches", [(2, 1, 3), (1, 3, 2)], ids=["shrink-grow", "grow-shrink"])
def test_reshapes_between_forwards_keep_every_blob_right(caffe, make_net, paths,  # noqa: F811
                                                         profiling, batches):
    # A shrinking reshape keeps the top's memory (and what its producer left pending there, now
    # for the old batch: reading it then must neither overflow nor crash); a growing one
    # replaces it. Every forward after either equals dense's.
    net = make_net(resnet_like(caffe))
    load(net)
    rng = np.random.default_rng(7)
    for batch in batches:
        net.blobs["data"].reshape(batch, *SHAPE[1:])
        net.reshape()
        net.blobs["b"].data.copy()  # whatever is pending from the last forward, made now
        net.blobs["data"].data[...] = rng.standard_normal((batch, *SHAPE[1:]))
        dense = run(caffe, net, {})
        assert_same(run(caffe, net, ALL_ONEDNN), dense)
        # Then one forward whose outputs nobody reads: b's stays pending into the reshape (a
        # change of the paths in force first, so b is not pausing after the reads above).
        caffe.set_conv_forward_path("onednn", "b")
        assert handed_over(caffe, net)["c"] == batch


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_nan_reaching_a_handed_over_sum_still_sends_a_relu_consumer_to_dense(caffe, make_net,
                                                                              paths, bad):  # noqa: F811
    """b's residual pass tells its consumers whether the sum it handed over is all finite, so
    that c (fused ReLU: oneDNN's would turn NaN into 0) can skip reading it again. A NaN that
    reached that sum (a without ReLU runs onednn on a NaN input and hands its NaNs over as b's
    input and residual) must still make c check, find it and run dense: NaN where dense has it."""
    net = make_net(resnet_like(caffe, a_relu=False))
    load(net)
    net.blobs["data"].data[0, 3, 4, 5] = bad
    order = ("pool", "e", "d", "c", "b", "a")
    dense = run(caffe, net, {}, order)
    assert np.isnan(dense["c"]).any() or np.isinf(dense["c"]).any()
    for _ in range(2):  # the second forward: the hand-overs of the first one in place
        net.blobs["data"].data[0, 3, 4, 5] = bad
        got = run(caffe, net, ALL_ONEDNN, order)
        for name in order:
            np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(dense[name]), err_msg=name)
            np.testing.assert_array_equal(np.isinf(got[name]), np.isinf(dense[name]), err_msg=name)
            finite = np.isfinite(dense[name])
            assert_same({name: got[name][finite]}, {name: dense[name][finite]})


# Run in a fresh process, since oneDNN reads DNNL_MAX_CPU_ISA once: the resnet_like net all on
# onednn against dense, and how many images e (the strided 1x1) took handed over.
STRIDED_CONSUMER = """
import json, sys, tempfile
from pathlib import Path
import numpy as np
import caffe
from caffe_tests.test_onednn_hand_over import ALL_ONEDNN, load, resnet_like, run
caffe.set_mode_cpu()
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "net.prototxt"
    path.write_text(str(resnet_like(caffe).to_proto()))
    net = caffe.Net(str(path), caffe.TEST)
    load(net)
    dense = run(caffe, net, {})
    caffe.reset_conv_profile()
    caffe.set_conv_profiling(True)
    got = run(caffe, net, ALL_ONEDNN)
    caffe.set_conv_profiling(False)
    handed = caffe.conv_profile()["e"]["inputs_handed_over"]
    worst = max(float(np.abs(got[k] - dense[k]).max()) / max(1.0, float(np.abs(dense[k]).max()))
                for k in dense)
print(json.dumps({"handed_over": handed, "worst": worst}))
"""


def run_in_fresh_process(script, caffe_python_path, isa):
    """The JSON `script` prints last, run in a fresh Python with this build's pycaffe (oneDNN
    reads DNNL_MAX_CPU_ISA once per process: `isa` caps it, None leaves oneDNN's pick)."""
    env = dict(os.environ, GLOG_minloglevel="2", PYTHONPATH=os.pathsep.join(
        [str(caffe_python_path), str(Path(__file__).resolve().parents[1])]))
    env.pop("DNNL_MAX_CPU_ISA", None)
    if isa:
        env["DNNL_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa", [None, "AVX2"], ids=["onednn-pick", "avx2-blocked"])
def test_a_strided_consumer_takes_its_input_in_either_layout_onednn_picks(caffe, caffe_python_path,
                                                                          isa):
    """oneDNN 2.6 runs these 1x1 convolutions channels last (acdb) on AVX-512 and blocked
    (nChw8c) on AVX2; the strided consumer e reads every other row and column of either. Capped
    at AVX2 (DNNL_MAX_CPU_ISA), an AVX-512 machine takes the blocked layout, so both layouts are
    checked there; on an AVX2 machine both runs check the blocked one."""
    if not caffe.onednn_version():
        pytest.skip("this build has no oneDNN")
    result = run_in_fresh_process(STRIDED_CONSUMER, caffe_python_path, isa)
    assert result["worst"] < 1e-4
    assert result["handed_over"] == SHAPE[0]
