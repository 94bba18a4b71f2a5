"""direct hands its output over in its consumer's own layout (patch 13), and a onednn producer its
output in a direct consumer's padded input layout (patch 14).

A onednn layer whose primitive reads a layout with a pixel's channels side by side (channels last
or blocked, as oneDNN picks), or a direct layer (its zero-padded input), asks its producer for that
layout, for the next forward; a direct producer then writes its output so, leaving the copy into
NCHW pending with the top blob, and the consumer takes it without a reorder or a padding copy.
Every blob must equal the dense chain's, whoever reads it and when; a reader of the NCHW copy, or
a change of the paths in force, ends the hand-over.
"""
from __future__ import annotations

import numpy as np
import pytest

from sparse_caffe.patching.config import CONV_TEMPLATE_CONFIG

from .test_forward_paths import MAX_AUTO_FORWARDS, paths  # noqa: F401 - paths is a fixture
from .test_onednn_hand_over import assert_same, handed_over, run_in_fresh_process

SHAPE = (2, 32, 10, 9)
CONVS = ("a", "c", "f")
HANDED = dict(a="onednn", c="direct", f="onednn")


def chain(caffe):
    """a (1x1, ReLU) -> c (3x3 pad 1, 80% zero weights, ReLU) -> f (1x1) -> pool: ResNet's
    branch2a -> branch2b -> branch2c, whose middle layer runs direct under auto."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(SHAPE)))
    n.a = L.Convolution(n.data, num_output=64, kernel_size=1, fused_relu=True)
    n.c = L.Convolution(n.a, num_output=64, kernel_size=3, pad=1, fused_relu=True)
    n.f = L.Convolution(n.c, num_output=32, kernel_size=1)
    n.pool = L.Pooling(n.f, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2)
    return n


def load(net, seed=0):
    rng = np.random.default_rng(seed)
    for name in CONVS:
        for blob in net.params[name]:
            blob.data[...] = rng.standard_normal(blob.data.shape) / np.sqrt(blob.data[0].size)
    weights = net.params["c"][0].data
    weights[rng.random(weights.shape) < 0.8] = 0
    net.blobs["data"].data[...] = rng.standard_normal(SHAPE)


def use(caffe, plan):
    caffe.clear_conv_forward_paths()
    for name in CONVS:
        caffe.set_conv_forward_path(plan.get(name, "dense"), name)


def blobs(net, order=("pool", "f", "c", "a")):
    return {name: net.blobs[name].data.copy() for name in order}


def onednn_or_skip(caffe):
    if not caffe.onednn_version():
        pytest.skip("this build has no oneDNN")


@pytest.mark.parametrize("order", [("pool", "f", "c", "a"), ("a", "c", "f", "pool")],
                         ids=["last-first", "first-first"])
def test_every_blob_equals_dense_when_direct_hands_over(caffe, make_net, paths,  # noqa: F811
                                                        order):
    onednn_or_skip(caffe)
    net = make_net(chain(caffe))
    load(net)
    use(caffe, {})
    net.forward()
    dense = blobs(net, order)
    use(caffe, HANDED)
    for _ in range(3):  # the first forward asks, the next ones hand over, nobody reads between
        net.forward()
    assert_same(blobs(net, order), dense)  # reading c makes its pending copy into NCHW
    load(net, seed=1)  # new weights and input: c drops what it left pending
    use(caffe, {})
    net.forward()
    dense = blobs(net, order)
    use(caffe, HANDED)
    for _ in range(3):
        net.forward()
    assert_same(blobs(net, order), dense)


def test_the_onednn_consumer_takes_directs_output_without_a_reorder(caffe, make_net,
                                                                    paths, profiling):  # noqa: F811
    onednn_or_skip(caffe)
    net = make_net(chain(caffe))
    load(net)
    use(caffe, HANDED)
    batch = SHAPE[0]
    assert handed_over(caffe, net)["f"] == 0  # f asks for its layout
    for forward in range(3):
        assert handed_over(caffe, net)["f"] == batch, forward
    # Someone reads c's NCHW copy: the request is forgotten, c writes NCHW once, f asks again.
    net.blobs["c"].data.copy()
    assert handed_over(caffe, net)["f"] == 0
    assert handed_over(caffe, net)["f"] == batch
    # f on another path: c writes NCHW (f's request belongs to the paths it was made under).
    # With those paths back, the request made under them holds again: f gets its layout at once,
    # as in a benchmark's rounds (ForwardPathSelector::paths_in_force).
    caffe.set_conv_forward_path("dense", "f")
    net.forward()
    caffe.set_conv_forward_path("onednn", "f")
    assert handed_over(caffe, net)["f"] == batch
    # Under paths never seen before (f on onednn with another back end set), f asks first.
    caffe.set_conv_sparse_backend("openmp", "f")
    assert handed_over(caffe, net)["f"] == 0
    assert handed_over(caffe, net)["f"] == batch


def test_direct_takes_a_onednn_producers_output_in_its_padded_layout(caffe, make_net,
                                                                     paths, profiling):  # noqa: F811
    """a (onednn) writes c's padded input (patch 14): c asks in its first forward and takes it
    from the second on, with no padding copy; every blob stays dense's; reading a's NCHW copy
    ends the hand-over for a while (a writes NCHW, c copies), a change of paths at once."""
    onednn_or_skip(caffe)
    net = make_net(chain(caffe))
    load(net)
    use(caffe, {})
    net.forward()
    dense = blobs(net, ("pool", "f", "c", "a"))
    use(caffe, HANDED)
    batch = SHAPE[0]
    assert [handed_over(caffe, net)["c"] for _ in range(3)] == [0, batch, batch]
    assert_same(blobs(net, ("pool", "f", "c")), {k: dense[k] for k in ("pool", "f", "c")})
    # A reader makes a's pending copy into NCHW: a writes NCHW for the next 8 forwards (c copies
    # it), then tries again.
    net.blobs["a"].data.copy()
    assert [handed_over(caffe, net)["c"] for _ in range(9)] == [0] * 8 + [batch]
    assert_same(blobs(net), dense)
    # c on another path reads a's NCHW copy (made from a's blocked hand-over), which forgets
    # c's request: back on direct, c asks again first.
    caffe.set_conv_forward_path("dense", "c")
    assert handed_over(caffe, net)["c"] == 0
    caffe.set_conv_forward_path("direct", "c")
    assert [handed_over(caffe, net)["c"] for _ in range(2)] == [0, batch]
    assert_same(blobs(net, ("pool", "f", "c")), {k: dense[k] for k in ("pool", "f", "c")})


def test_each_path_setting_keeps_its_request_while_others_run(caffe, make_net, paths,  # noqa: F811
                                                              profiling):
    """A benchmark's rounds switch the paths forward by forward (the first, profiled forward
    of each round is the one its per-layer times come from). c runs direct under HANDED and
    under `other` (f dense), so it asks a for its padded layout under both, each request kept
    under its own setting; with all-onednn and all-dense in between, each setting's first
    forward when it comes back still hands over."""
    onednn_or_skip(caffe)
    net = make_net(chain(caffe))
    load(net)
    use(caffe, {})
    net.forward()
    dense = blobs(net)
    batch = SHAPE[0]
    other = dict(HANDED, f="dense")
    for plan in (HANDED, other):
        use(caffe, plan)
        assert [handed_over(caffe, net)["c"] for _ in range(2)] == [0, batch]
    for _ in range(3):
        for plan in (HANDED, dict.fromkeys(CONVS, "onednn"), other, {}):
            use(caffe, plan)
            assert handed_over(caffe, net)["c"] == (batch if plan else 0)  # (onednn: its own)
            # (not a: reading its NCHW copy makes its pending write, which forgets every request)
            assert_same(blobs(net, ("pool", "f", "c")), {k: dense[k] for k in ("pool", "f", "c")})
    # Reading a's NCHW copy makes the pending write a left under HANDED: HANDED's request is
    # forgotten (c asks again), `other`'s is not.
    use(caffe, HANDED)
    assert handed_over(caffe, net)["c"] == batch
    assert_same(blobs(net), dense)
    use(caffe, other)
    assert handed_over(caffe, net)["c"] == batch
    use(caffe, HANDED)
    assert [handed_over(caffe, net)["c"] for _ in range(2)] == [0, batch]
    assert_same(blobs(net, ("pool", "f", "c")), {k: dense[k] for k in ("pool", "f", "c")})


@pytest.mark.parametrize("batches", [(2, 1, 3)], ids=["shrink-grow"])
def test_reshapes_between_forwards_keep_every_blob_right(caffe, make_net, paths,  # noqa: F811
                                                         batches):
    # A request made for the old batch does not fit the new shape: c writes NCHW once.
    onednn_or_skip(caffe)
    net = make_net(chain(caffe))
    load(net)
    rng = np.random.default_rng(5)
    for batch in batches:
        net.blobs["data"].reshape(batch, *SHAPE[1:])
        net.reshape()
        net.blobs["data"].data[...] = rng.standard_normal((batch, *SHAPE[1:]))
        use(caffe, {})
        net.forward()
        dense = blobs(net)
        use(caffe, HANDED)
        for _ in range(2):
            net.forward()
        assert_same(blobs(net), dense)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_input_still_gives_denses_output(caffe, make_net, paths, bad):  # noqa: F811
    # c sees the NaN and runs dense into NCHW, after a forward in which f asked for its layout.
    onednn_or_skip(caffe)
    net = make_net(chain(caffe))
    load(net)
    use(caffe, HANDED)
    net.forward()
    net.blobs["data"].data[0, 3, 4, 5] = bad
    use(caffe, {})
    net.forward()
    dense = blobs(net)
    use(caffe, HANDED)
    net.forward()
    net.blobs["data"].data[0, 3, 4, 5] = bad
    net.forward()
    got = blobs(net)
    for name in dense:
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(dense[name]), err_msg=name)
        np.testing.assert_array_equal(np.isinf(got[name]), np.isinf(dense[name]), err_msg=name)
        finite = np.isfinite(dense[name])
        assert_same({name: got[name][finite]}, {name: dense[name][finite]})


DIRECT_CONVS = ("p", "q", "r", "t")


def direct_chain(caffe):
    """p -> q (groups 2) -> r (dilation 2) -> t (stride 2), 3x3 convolutions with ReLU: q and r
    read their producer's padded output; t's input (two phases) is not one buffer, so r writes
    NCHW for it."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(SHAPE)))
    n.p = L.Convolution(n.data, num_output=32, kernel_size=3, pad=1, fused_relu=True)
    n.q = L.Convolution(n.p, num_output=32, kernel_size=3, pad=1, group=2, fused_relu=True)
    n.r = L.Convolution(n.q, num_output=24, kernel_size=3, pad=2, dilation=2, fused_relu=True)
    n.t = L.Convolution(n.r, num_output=16, kernel_size=3, pad=1, stride=2, fused_relu=True)
    return n


def load_direct(net, seed=0):
    rng = np.random.default_rng(seed)
    for name in DIRECT_CONVS:
        for blob in net.params[name]:
            blob.data[...] = rng.standard_normal(blob.data.shape) / np.sqrt(blob.data[0].size)
        weights = net.params[name][0].data
        weights[rng.random(weights.shape) < 0.7] = 0
    net.blobs["data"].data[...] = rng.standard_normal(SHAPE)


def use_direct(caffe, on):
    caffe.clear_conv_forward_paths()
    for name in DIRECT_CONVS:
        caffe.set_conv_forward_path("direct" if on else "dense", name)


@pytest.mark.parametrize("order", [("t", "r", "q", "p"), ("p", "q", "r", "t")],
                         ids=["last-first", "first-first"])
def test_a_direct_chain_hands_over_its_padded_inputs(caffe, make_net, paths, profiling,  # noqa: F811
                                                     order):
    net = make_net(direct_chain(caffe))
    batch = SHAPE[0]
    for seed in (0, 1):  # the second time, every producer drops what it left pending
        load_direct(net, seed)
        use_direct(caffe, False)
        net.forward()
        dense = blobs(net, order)
        use_direct(caffe, True)
        counts = [handed_over(caffe, net) for _ in range(3)]
        assert [c["q"] for c in counts] == [0, batch, batch]  # asked, then taken
        assert [c["r"] for c in counts] == [0, batch, batch]
        assert [c["t"] for c in counts] == [0, 0, 0]  # stride 2: never asks
        assert_same(blobs(net, order), dense)


def test_an_infinity_in_a_handed_over_padded_input_gives_denses_output(caffe, make_net,
                                                                       paths):  # noqa: F811
    # p (no ReLU here) overflows to infinity from finite inputs and weights, and hands its
    # output to q as q's padded input: q must find the infinity there and run dense, whatever
    # dense's GEMM makes of it, and r and t after it see what they see after dense.
    L = caffe.layers
    n = direct_chain(caffe)
    n.p = L.Convolution(n.data, num_output=32, kernel_size=3, pad=1)
    net = make_net(n)
    load_direct(net)
    net.params["p"][0].data[0, 0, 1, 1] = 3e38
    net.blobs["data"].data[0, 0, 4, 5] = 10.0
    order = ("t", "r", "q", "p")
    use_direct(caffe, False)
    net.forward()
    dense = blobs(net, order)
    assert np.isinf(dense["p"]).any()
    use_direct(caffe, True)
    for _ in range(3):
        net.forward()
    got = blobs(net, order)
    for name in dense:
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(dense[name]), err_msg=name)
        np.testing.assert_array_equal(np.isinf(got[name]), np.isinf(dense[name]), err_msg=name)
        finite = np.isfinite(dense[name])
        assert_same({name: got[name][finite]}, {name: dense[name][finite]})


def test_while_auto_calibrates_its_onednn_candidate_gets_its_layout(caffe, make_net,
                                                                     paths, profiling):  # noqa: F811
    # f calibrates under auto, its candidates taking turns forward by forward: the request of
    # its onednn candidate must stay with c between its turns, so that onednn is timed taking
    # c's output as it would in the chain (not reordering it), and every candidate's output is
    # still right.
    onednn_or_skip(caffe)
    caffe.reset_auto()
    caffe.set_auto_calibration(CONV_TEMPLATE_CONFIG.auto_rounds)
    try:
        net = make_net(chain(caffe))
        load(net)
        use(caffe, {})
        net.forward()
        dense = net.blobs["f"].data.copy()
        use(caffe, dict(HANDED, f="auto"))
        onednn_turns = handed = 0
        for _ in range(200):
            caffe.reset_conv_profile()
            net.forward()
            profile = caffe.conv_profile()["f"]
            assert_same({"f": net.blobs["f"].data}, {"f": dense})
            if profile["path"] == "onednn":
                onednn_turns += 1
                handed += profile["inputs_handed_over"]
            if caffe.auto_choices()["f"]["state"] == "decided":
                break
        assert caffe.auto_choices()["f"]["state"] == "decided"
        # every onednn turn but the first (which asks) took c's output as it was
        assert onednn_turns >= 2 and handed == (onednn_turns - 1) * SHAPE[0]
    finally:
        caffe.set_auto_calibration(CONV_TEMPLATE_CONFIG.auto_rounds)
        caffe.reset_auto()


# In a fresh process, since oneDNN reads DNNL_MAX_CPU_ISA once: the chain handed over against
# dense, and how many images f took without a reorder in its third forward.
UNDER_ISA = """
import json, tempfile
from pathlib import Path
import numpy as np
import caffe
from caffe_tests.test_direct_hand_over import HANDED, blobs, chain, load, use
caffe.set_mode_cpu()
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "net.prototxt"
    path.write_text(str(chain(caffe).to_proto()))
    net = caffe.Net(str(path), caffe.TEST)
    load(net)
    use(caffe, {})
    net.forward()
    dense = blobs(net)
    use(caffe, HANDED)
    caffe.set_conv_profiling(True)
    for _ in range(3):
        caffe.reset_conv_profile()
        net.forward()
    caffe.set_conv_profiling(False)
    handed = caffe.conv_profile()["f"]["inputs_handed_over"]
    got = blobs(net)
    worst = max(float(np.abs(got[k] - dense[k]).max()) / max(1.0, float(np.abs(dense[k]).max()))
                for k in dense)
print(json.dumps({"handed_over": handed, "worst": worst}))
"""


@pytest.mark.parametrize("isa", [None, "AVX2"], ids=["onednn-pick", "avx2-blocked"])
def test_direct_writes_either_layout_onednn_picks(caffe, caffe_python_path, isa):
    """On AVX-512 oneDNN 2.6 reads these 1x1 convolutions' inputs channels last; capped at AVX2
    (DNNL_MAX_CPU_ISA), blocked by 8 channels: direct writes each."""
    onednn_or_skip(caffe)
    result = run_in_fresh_process(UNDER_ISA, caffe_python_path, isa)
    assert result["worst"] < 1e-4
    assert result["handed_over"] == SHAPE[0]


@pytest.mark.parametrize("producer", ["onednn", "direct"])
def test_auto_counts_a_handed_over_input_where_it_lies(caffe, make_net, paths,  # noqa: F811
                                                       producer):
    """auto's density check on an input still pending in its producer's layout counts it in
    that layout (oneDNN's blocked buffer; direct's laid-out one, whose padding is zero) without
    making a copy: the fraction it calibrated on must be the input's true nonzero fraction."""
    onednn_or_skip(caffe)
    net = make_net(chain(caffe))
    load(net)
    use(caffe, dict(a=producer, c="auto", f="onednn"))
    for _ in range(MAX_AUTO_FORWARDS):
        net.forward()
        if caffe.auto_choices()["c"]["state"] == "decided":
            break
    choice = caffe.auto_choices()["c"]
    assert choice["state"] == "decided"
    a = net.blobs["a"].data
    assert 0.2 < np.count_nonzero(a) / a.size < 0.8  # the ReLU left zeros to count
    assert choice["input_density"] == pytest.approx(np.count_nonzero(a) / a.size, abs=1e-9)
