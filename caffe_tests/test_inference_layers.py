"""The layers patch 0008 speeds up (max/average pooling, Eltwise SUM with its optional fused ReLU,
ReLU), against numpy references written from Caffe's definitions, on blobs large enough for the
parallel loops and small enough for the serial ones. Caffe's own pooling, eltwise and neuron gtests
run too (test_caffe_gtests.py); these add what they do not cover: ties and NaN in max pooling's
argmax, rows wide enough for max pooling's vector kernel (on every ISA this CPU runs), blobs above
the parallel thresholds, and the fused ReLU forward and backward."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from .test_forward_paths import run_on_isa

FLT_MAX = float(np.finfo(np.float32).max)


def pooled_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's pooled extent: rounded up, minus the last window if it starts in the padding."""
    pooled = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def max_pool_reference(x, kernel, stride, pad):
    """Caffe's max pooling: per window, the first value strictly above the running maximum
    (starting at -FLT_MAX) in row-major order wins; its index within the plane is the mask."""
    n, c, h, w = x.shape
    ph_n, pw_n = pooled_size(h, kernel, stride, pad), pooled_size(w, kernel, stride, pad)
    top = np.full((n, c, ph_n, pw_n), -FLT_MAX, np.float32)
    mask = np.full((n, c, ph_n, pw_n), -1.0, np.float32)
    for ph in range(ph_n):
        for pw in range(pw_n):
            h0, w0 = ph * stride - pad, pw * stride - pad
            rows = range(max(h0, 0), min(h0 + kernel, h))
            cols = range(max(w0, 0), min(w0 + kernel, w))
            for r in rows:
                for q in cols:
                    v = x[:, :, r, q]
                    larger = v > top[:, :, ph, pw]  # NaN never is
                    top[:, :, ph, pw] = np.where(larger, v, top[:, :, ph, pw])
                    mask[:, :, ph, pw] = np.where(larger, r * w + q, mask[:, :, ph, pw])
    return top, mask


def ave_pool_reference(x, kernel, stride, pad):
    """Caffe's average pooling: the sum over the window inside the image, divided by the window's
    size clipped to the padded image (padding taps count)."""
    n, c, h, w = x.shape
    ph_n, pw_n = pooled_size(h, kernel, stride, pad), pooled_size(w, kernel, stride, pad)
    top = np.zeros((n, c, ph_n, pw_n), np.float64)
    for ph in range(ph_n):
        for pw in range(pw_n):
            h0, w0 = ph * stride - pad, pw * stride - pad
            h1, w1 = min(h0 + kernel, h + pad), min(w0 + kernel, w + pad)
            size = (h1 - h0) * (w1 - w0)
            window = x[:, :, max(h0, 0):min(h1, h), max(w0, 0):min(w1, w)].astype(np.float64)
            top[:, :, ph, pw] = window.sum(axis=(2, 3)) / size
    return top


def post_relu(rng, shape, zeros=0.6, levels=None):
    """Feature-map-like values: a fraction exactly zero; with `levels`, few distinct values
    (many ties among the nonzeros too)."""
    x = np.abs(rng.standard_normal(shape)).astype(np.float32)
    if levels:
        x = np.round(x * levels) / levels
    x[rng.random(shape) < zeros] = 0
    return x


# (shape, kernel, stride, pad): ResNet-50's pool1 shape (parallel), CaffeNet's pool kind
# (overlapping, rounded up), a padded one, a non-overlapping one, and a small serial one.
POOL_CASES = [
    ((1, 16, 112, 112), 3, 2, 0),
    ((2, 8, 27, 27), 3, 2, 0),
    ((2, 4, 13, 11), 3, 2, 1),
    ((1, 6, 16, 16), 2, 2, 0),
    ((1, 2, 7, 7), 3, 1, 1),
]


def pooling_net(make_net, caffe, shape, pool, kernel, stride, pad, with_mask):
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    method = P.Pooling.MAX if pool == "max" else P.Pooling.AVE
    if with_mask:
        n.pool, n.mask = L.Pooling(n.data, pool=method, kernel_size=kernel, stride=stride, pad=pad,
                                   ntop=2)
    else:
        n.pool = L.Pooling(n.data, pool=method, kernel_size=kernel, stride=stride, pad=pad)
    return make_net(n)


def max_pool_equals_reference(make_net, caffe, x, kernel, stride, pad, with_mask):
    """Max pooling of x in Caffe equals the numpy definition bit for bit (and its top mask, when
    asked for); returns the definition's (top, mask)."""
    net = pooling_net(make_net, caffe, x.shape, "max", kernel, stride, pad, with_mask)
    net.blobs["data"].data[...] = x
    net.forward()
    top, mask = max_pool_reference(x, kernel, stride, pad)
    np.testing.assert_array_equal(net.blobs["pool"].data, top)
    if with_mask:
        np.testing.assert_array_equal(net.blobs["mask"].data, mask)
    return top, mask


@pytest.mark.parametrize("shape, kernel, stride, pad", POOL_CASES)
@pytest.mark.parametrize("with_mask", [False, True], ids=["internal-mask", "top-mask"])
def test_max_pooling_equals_caffes_definition_bit_for_bit(make_net, caffe, shape, kernel, stride,
                                                         pad, with_mask):
    rng = np.random.default_rng(sum(shape) + kernel + 7 * pad)
    x = post_relu(rng, shape, levels=4)
    x.reshape(-1)[::97] = np.nan   # never wins a window
    x.reshape(-1)[5::101] = -np.inf
    top, _ = max_pool_equals_reference(make_net, caffe, x, kernel, stride, pad, with_mask)
    # Not vacuous: ties were there to break, and zeros won some windows.
    assert (top == 0).any() and len(np.unique(x[np.isfinite(x)])) < 64


def test_an_all_nan_window_gives_minus_flt_max_and_no_index(make_net, caffe):
    net = pooling_net(make_net, caffe, (1, 1, 4, 4), "max", 2, 2, 0, True)
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, :2, :2] = np.nan
    net.blobs["data"].data[...] = x
    net.forward()
    assert net.blobs["pool"].data[0, 0, 0, 0] == -FLT_MAX
    assert net.blobs["mask"].data[0, 0, 0, 0] == -1
    assert net.blobs["pool"].data[0, 0, 1, 1] == 15 and net.blobs["mask"].data[0, 0, 1, 1] == 15


def test_max_pooling_backward_routes_each_gradient_to_its_argmax(make_net, caffe):
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 8, 64, 64]))
    n.pool = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    net = make_net("force_backward: true\n" + str(n.to_proto()))
    rng = np.random.default_rng(3)
    x = post_relu(rng, (1, 8, 64, 64), levels=3)
    net.blobs["data"].data[...] = x
    net.forward()
    top_diff = rng.standard_normal(net.blobs["pool"].data.shape).astype(np.float32)
    net.blobs["pool"].diff[...] = top_diff
    net.backward()
    _, mask = max_pool_reference(x, 3, 2, 0)
    want = np.zeros(x.shape, np.float64)
    planes = want.reshape(8, -1)
    for c in range(8):
        np.add.at(planes[c], mask[0, c].astype(int).ravel(), top_diff[0, c].ravel())
    np.testing.assert_allclose(net.blobs["data"].diff, want, rtol=1e-6, atol=1e-6)


# Max pooling's vector kernel takes the outputs whose windows lie inside the row, 8 (AVX2) or 16
# (AVX-512) floats at a time, the last vector overlapping the one before; the clipped columns at
# either end stay scalar. Rows of 37 x stride + 5 columns hold several vectors on both ISAs and
# a remainder, in each of the kernel's stride kinds (1: plain loads; 2: two loads and a permute;
# 3: a gather), kernels 2 and 3, pad 0 and 1.
VECTOR_POOL_CASES = [((1, 3, 4 * stride + 3, 37 * stride + 5), kernel, stride, pad)
                     for kernel in (2, 3) for stride in (1, 2, 3) for pad in (0, 1)]
# (plane, output row, output column) of windows set all NaN, all -FLT_MAX, and all one value
# (a tie the first tap wins): inside the first and second vectors.
ALL_NAN_WINDOW, ALL_LOWEST_WINDOW, TIED_WINDOW = (0, 1, 5), (1, 2, 12), (2, 3, 17)


def vector_pool_input(shape, kernel, stride, pad):
    """Few distinct values (ties in most windows), zeros, NaN, -inf and -FLT_MAX scattered, and
    the three special windows."""
    rng = np.random.default_rng(shape[-1] + 10 * kernel + 100 * pad)
    x = post_relu(rng, shape, zeros=0.3, levels=2)
    x.reshape(-1)[3::7] = np.nan
    x.reshape(-1)[5::11] = -np.inf
    x.reshape(-1)[6::13] = -FLT_MAX
    for (plane, ph, pw), value in ((ALL_NAN_WINDOW, np.nan), (ALL_LOWEST_WINDOW, -FLT_MAX),
                                   (TIED_WINDOW, 2.5)):
        h0, w0 = ph * stride - pad, pw * stride - pad
        x[0, plane, h0:h0 + kernel, w0:w0 + kernel] = value
    return x


def check_vector_pool_case(make_net, caffe, shape, kernel, stride, pad, with_mask):
    x = vector_pool_input(shape, kernel, stride, pad)
    top, mask = max_pool_equals_reference(make_net, caffe, x, kernel, stride, pad, with_mask)
    # Not vacuous: the special windows came out as the definition says.
    width = shape[-1]
    for plane, ph, pw in (ALL_NAN_WINDOW, ALL_LOWEST_WINDOW):
        assert top[0, plane, ph, pw] == -FLT_MAX and mask[0, plane, ph, pw] == -1
    plane, ph, pw = TIED_WINDOW
    assert top[0, plane, ph, pw] == 2.5
    assert mask[0, plane, ph, pw] == (ph * stride - pad) * width + pw * stride - pad


@pytest.mark.parametrize("shape, kernel, stride, pad", VECTOR_POOL_CASES)
@pytest.mark.parametrize("with_mask", [False, True], ids=["internal-mask", "top-mask"])
def test_max_pooling_vector_rows_equal_caffes_definition_bit_for_bit(make_net, caffe, shape, kernel,
                                                                    stride, pad, with_mask):
    check_vector_pool_case(make_net, caffe, shape, kernel, stride, pad, with_mask)


POOLING_ISA_SCRIPT = """
import sys
from pathlib import Path
import caffe
from caffe_tests.conftest import write_net
from caffe_tests.test_inference_layers import VECTOR_POOL_CASES, check_vector_pool_case
caffe.set_mode_cpu()
assert caffe.conv_direct_isa() == sys.argv[1], caffe.conv_direct_isa()
make_net = lambda spec: write_net(caffe, spec, Path(sys.argv[2]) / "net.prototxt")
for case in VECTOR_POOL_CASES:
    for with_mask in (False, True):
        check_vector_pool_case(make_net, caffe, *case, with_mask)
print("ok")
"""


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_max_pooling_on_each_vector_isa(caffe_python_path, isa, tmp_path):
    """Every vector kernel set this CPU runs, and the scalar loop alone (SPARSE_CAFFE_DIRECT_ISA
    picks pooling's set as it picks direct's), in a fresh process."""
    result = run_on_isa(POOLING_ISA_SCRIPT, isa, caffe_python_path, tmp_path, timeout=300)
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("shape, kernel, stride, pad", POOL_CASES + [((1, 64, 7, 7), 7, 1, 0)])
def test_average_pooling_equals_caffes_definition(make_net, caffe, shape, kernel, stride, pad):
    rng = np.random.default_rng(sum(shape) + kernel)
    x = rng.standard_normal(shape).astype(np.float32)
    net = pooling_net(make_net, caffe, shape, "ave", kernel, stride, pad, False)
    net.blobs["data"].data[...] = x
    net.forward()
    np.testing.assert_allclose(net.blobs["pool"].data, ave_pool_reference(x, kernel, stride, pad),
                               rtol=1e-5, atol=1e-6)


def sum_net(make_net, caffe, shape, inputs, coeffs, fused, separate_relu=False, backward=False):
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    bottoms = []
    for i in range(inputs):
        setattr(n, f"x{i}", L.Input(shape=dict(dim=list(shape))))
        bottoms.append(getattr(n, f"x{i}"))
    extra = {"coeff": coeffs} if coeffs else {}
    if fused:
        extra["fused_relu"] = True
    n.sum = L.Eltwise(*bottoms, operation=P.Eltwise.SUM, **extra)
    if separate_relu:
        n.relu = L.ReLU(n.sum, in_place=True)
    return make_net(("force_backward: true\n" if backward else "") + str(n.to_proto()))


# (shape, inputs, coefficients): a res2-sized sum (parallel), three weighted inputs, a small one.
SUM_CASES = [((1, 64, 56, 56), 2, None), ((2, 16, 30, 31), 3, [0.5, -2.0, 1.25]),
             ((1, 3, 5, 5), 2, [1.0, -1.0])]


@pytest.mark.parametrize("shape, inputs, coeffs", SUM_CASES)
def test_a_fused_relu_sum_equals_the_sum_then_caffes_relu(make_net, caffe, shape, inputs, coeffs):
    rng = np.random.default_rng(inputs)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(inputs)]
    xs[0].reshape(-1)[::89] = np.nan
    fused = sum_net(make_net, caffe, shape, inputs, coeffs, fused=True)
    separate = sum_net(make_net, caffe, shape, inputs, coeffs, fused=False, separate_relu=True)
    plain = sum_net(make_net, caffe, shape, inputs, coeffs, fused=False)
    for net in (fused, separate, plain):
        for i, x in enumerate(xs):
            net.blobs[f"x{i}"].data[...] = x
        net.forward()
    want = sum(c * x.astype(np.float64) for c, x in zip(coeffs or [1.0] * inputs, xs))
    np.testing.assert_allclose(plain.blobs["sum"].data, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fused.blobs["sum"].data, separate.blobs["sum"].data)
    got = fused.blobs["sum"].data
    assert np.isnan(got).sum() == np.isnan(want).sum() > 0
    assert (got[np.isfinite(got)] >= 0).all() and (got == 0).mean() > 0.3


@pytest.mark.parametrize("shape, inputs, coeffs", SUM_CASES[:2])
def test_a_fused_relu_sums_gradient_equals_the_separate_layers(make_net, caffe, shape, inputs,
                                                               coeffs):
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(inputs)]
    top_diff = rng.standard_normal(shape).astype(np.float32)
    diffs = {}
    for fused in (True, False):
        net = sum_net(make_net, caffe, shape, inputs, coeffs, fused=fused, separate_relu=not fused,
                      backward=True)
        for i, x in enumerate(xs):
            net.blobs[f"x{i}"].data[...] = x
        net.forward()
        net.blobs["sum"].diff[...] = top_diff
        net.backward()
        diffs[fused] = [net.blobs[f"x{i}"].diff.copy() for i in range(inputs)]
    for got, want in zip(diffs[True], diffs[False]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        assert (got == 0).mean() > 0.3  # the ReLU cut off the negative sums


PRODUCT_WITH_RELU = """
import sys
sys.path.insert(0, sys.argv[1])
import caffe
open(sys.argv[2], "w").write('''
layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "p" type: "Eltwise" bottom: "a" bottom: "b" top: "p"
        eltwise_param { operation: PROD fused_relu: true } }
''')
caffe.Net(sys.argv[2], caffe.TEST)
"""


def test_fused_relu_on_a_product_is_refused_with_a_clear_line(caffe_python_path, tmp_path):
    done = subprocess.run([sys.executable, "-c", PRODUCT_WITH_RELU, str(caffe_python_path),
                           str(tmp_path / "net.prototxt")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "fused_relu is supported with operation SUM only" in done.stderr


@pytest.mark.parametrize("slope", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(1, 64, 56, 56), (2, 3, 4, 5)])
def test_relu_equals_caffes_definition(make_net, caffe, slope, shape):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    n.relu = L.ReLU(n.data, negative_slope=slope)
    net = make_net(n)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    want = np.maximum(x, 0) + np.float32(slope) * np.minimum(x, 0)
    np.testing.assert_array_equal(net.blobs["relu"].data, want)
