"""NaN and Inf propagate on every sparse path exactly as in dense.

Dense computes every product, and 0 x NaN = 0 x Inf = NaN; the sparse paths skip zero weights and
zero inputs. So an image whose weights or input hold a NaN or Inf must run dense: the outputs must
be NaN, +Inf and -Inf where dense's are, and equal to dense elsewhere.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from .test_conv_reference import conv_spec, random_input
from .test_forward_paths import SPARSE_PATHS, backend, forward_on, paths, sparse_weights  # noqa: F401

SHAPE = (2, 6, 7, 8)
CONVS = {
    "3x3": dict(kernel_size=3, pad=1),
    "1x1": dict(kernel_size=1),
    "strided_groups": dict(kernel_size=3, stride=2, group=2),
}


def assert_same_as_dense(got, dense, what):
    for name, test in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        np.testing.assert_array_equal(test(got), test(dense), err_msg=f"{what}: {name} pattern")
    finite = np.isfinite(dense)
    np.testing.assert_allclose(got[finite], dense[finite], rtol=1e-4, atol=1e-4, err_msg=what)


# Input positions every configuration reads (the strided one skips the last column), in both
# images and both groups.
INPUT_POISON = ((0, 1, 3, 4), (1, 4, 2, 2))


@pytest.mark.parametrize("path", SPARSE_PATHS)
@pytest.mark.parametrize("conv", sorted(CONVS))
@pytest.mark.parametrize("where", ["input", "weights"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_values_propagate_as_in_dense(caffe, make_net, backend, path, conv, where, value):
    net = make_net(conv_spec(caffe, "conv", SHAPE, 4, dict(CONVS[conv])))
    rng = np.random.default_rng(zlib.crc32(f"{conv} {where} {value}".encode()))
    w = sparse_weights(rng, net.params["conv"][0].data.shape, 0.7)
    x = random_input(rng, SHAPE, 0.5)
    if where == "input":
        for at in INPUT_POISON:
            x[at] = value
    else:
        w.reshape(-1)[rng.choice(w.size, 2, replace=False)] = value
    net.params["conv"][0].data[...] = w
    net.params["conv"][1].data[...] = rng.standard_normal(4)
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    assert not np.isfinite(dense).all()  # the poison reaches the output
    assert_same_as_dense(forward_on(caffe, net, path), dense, f"{path} {conv} {where} {value}")
    # And the next forward with finite values is sparse and right again.
    net.params["conv"][0].data[...] = np.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
    net.blobs["data"].data[...] = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    dense = forward_on(caffe, net, "dense")
    np.testing.assert_allclose(forward_on(caffe, net, path), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", SPARSE_PATHS)
def test_the_issues_example(caffe, make_net, backend, path):
    """A 1x1 convolution with weights [1, 0] on an all-NaN input: dense gives [nan nan]."""
    net = make_net(conv_spec(caffe, "conv", (1, 2, 1, 1), 1, dict(kernel_size=1, bias_term=False)))
    net.params["conv"][0].data[...] = np.array([1.0, 0.0]).reshape(1, 2, 1, 1)
    net.blobs["data"].data[...] = np.nan
    assert np.isnan(forward_on(caffe, net, "dense")).all()
    assert np.isnan(forward_on(caffe, net, path)).all()


def chain(caffe, prefix):
    """data -> {prefix}p (3x3, fused ReLU) -> {prefix}c (1x1) -> {prefix}d (3x3): a hand-over chain."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(SHAPE)))
    n[f"{prefix}p"] = L.Convolution(n.data, num_output=6, kernel_size=3, pad=1, fused_relu=True)
    n[f"{prefix}c"] = L.Convolution(n[f"{prefix}p"], num_output=6, kernel_size=1, fused_relu=True)
    n[f"{prefix}d"] = L.Convolution(n[f"{prefix}c"], num_output=3, kernel_size=3, pad=1)
    return n


@pytest.mark.parametrize("where", ["input", "weights"])
def test_non_finite_values_are_handed_over_as_in_dense(caffe, make_net, backend, profiling, where):
    """A sparse_output producer's CSR records that it holds a NaN: its consumers run dense."""
    prefix = f"nonfinite_{backend}_{where}_"
    net = make_net(chain(caffe, prefix))
    rng = np.random.default_rng(17)
    for layer in ("p", "c", "d"):
        params = net.params[prefix + layer]
        params[0].data[...] = sparse_weights(rng, params[0].data.shape, 0.7)
        params[1].data[...] = rng.standard_normal(params[1].data.shape)
    x = random_input(rng, SHAPE, 0.5)
    if where == "input":
        x[0, 2, 3, 4] = np.nan  # only the first image: the second must stay sparse and finite
    else:
        net.params[prefix + "p"][0].data[1, 2, 1, 1] = np.nan
    net.blobs["data"].data[...] = x
    caffe.set_conv_forward_path("dense")
    net.forward()
    dense = {name: blob.data.copy() for name, blob in net.blobs.items()}
    assert np.isnan(dense[prefix + "d"]).any()
    caffe.reset_conv_profile()
    caffe.set_conv_forward_path("sparse_output")
    net.forward()
    for name in dense:
        assert_same_as_dense(net.blobs[name].data, dense[name], name)
    # The CSRs are still handed over (the consumer decides from them), 2 images per consumer.
    handed = caffe.conv_profile()
    assert handed[prefix + "c"]["inputs_handed_over"] == 2
    assert handed[prefix + "d"]["inputs_handed_over"] == 2


@pytest.mark.parametrize("path", SPARSE_PATHS + ["onednn"])
@pytest.mark.parametrize("at", [0, -1], ids=["first", "last"])
def test_one_non_finite_value_in_a_large_input_is_found(caffe, make_net, path, at):
    """The finiteness scan is split over threads in chunks when the input is large: a NaN in the
    first or the last chunk of a 2 x 32 x 48 x 48 input (147k values) still sends it to dense."""
    shape = (2, 32, 48, 48)
    net = make_net(conv_spec(caffe, "conv", shape, 8, dict(kernel_size=3, pad=1)))
    rng = np.random.default_rng(23)
    net.params["conv"][0].data[...] = sparse_weights(rng, net.params["conv"][0].data.shape, 0.7)
    x = random_input(rng, shape, 0.5)
    x.reshape(-1)[at] = np.nan
    net.blobs["data"].data[...] = x
    dense = forward_on(caffe, net, "dense")
    assert 0 < np.isnan(dense).sum() <= 8 * 9  # only the outputs that read it
    assert_same_as_dense(forward_on(caffe, net, path), dense, f"{path} NaN at {at}")
