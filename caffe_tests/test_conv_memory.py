"""What the forward paths keep in memory, and what they tell the user: hand-over slots shared by
every layer, scratch shared by every layer (Caffe's per-layer col_buffer_ unallocated off dense),
per-layer settings that name no layer refused, and fallbacks logged where glog's default level
for our runs (GLOG_minloglevel=2) shows them."""
from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .test_conv_reference import random_input
from .test_forward_paths import SPARSE_PATHS, forward_all, paths, sparse_weights  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent


def chain_net(caffe, prefix):
    """a -> b -> c, and d reading a's output after b and c published theirs (fused ReLUs)."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6, 9, 9]))
    n[f"{prefix}a"] = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1, fused_relu=True)
    n[f"{prefix}b"] = L.Convolution(n[f"{prefix}a"], num_output=8, kernel_size=3, pad=1,
                                    fused_relu=True)
    n[f"{prefix}c"] = L.Convolution(n[f"{prefix}b"], num_output=8, kernel_size=1, fused_relu=True)
    n[f"{prefix}d"] = L.Convolution(n[f"{prefix}a"], num_output=4, kernel_size=3, stride=2)
    return str(n.to_proto())


def test_a_consumer_too_late_for_the_hand_over_slots_converts_afresh(caffe, make_net, paths,
                                                                      profiling):
    net = make_net(chain_net(caffe, "slots_"))
    rng = np.random.default_rng(11)
    for params in net.params.values():
        params[0].data[...] = sparse_weights(rng, params[0].data.shape, 0.7)
        params[1].data[...] = rng.standard_normal(params[1].data.shape) * 0.1
    net.blobs["data"].data[...] = random_input(rng, (2, 6, 9, 9), 0.4)
    dense = forward_all(caffe, net, "dense")
    caffe.reset_conv_profile()
    for _ in range(2):  # the second forward reuses the slots' storage
        sparse = forward_all(caffe, net, "sparse_output")
        for name in dense:
            np.testing.assert_allclose(sparse[name], dense[name], rtol=1e-4, atol=1e-4,
                                       err_msg=name)
    handed = {name: p["inputs_handed_over"] for name, p in caffe.conv_profile().items()
              if name.startswith("slots_")}
    # b and c read the CSR published just before them (2 images, 2 forwards); by d's turn, b's
    # and c's publications have taken both slots, so d converts a's dense output itself.
    assert handed == {"slots_a": 0, "slots_b": 4, "slots_c": 4, "slots_d": 0}


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc's mallinfo2)."""
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.parametrize("path", SPARSE_PATHS)
def test_layers_share_their_scratch_and_leave_col_buffer_unallocated(caffe, make_net, paths,
                                                                     path):
    # Two 3x3 layers whose lowered input (im2col) is 64 x 9 x 96 x 96 floats = 21 MiB each:
    # dense allocates one per layer (Caffe's col_buffer_); the other paths one per thread.
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 64, 96, 96]))
    n.m1 = L.Convolution(n.data, num_output=64, kernel_size=3, pad=1, fused_relu=True)
    n.m2 = L.Convolution(n.m1, num_output=64, kernel_size=3, pad=1)
    col = 64 * 9 * 96 * 96 * 4
    tops = 2 * 64 * 96 * 96 * 4

    def first_forward_heap(on):
        net = make_net(str(n.to_proto()))
        rng = np.random.default_rng(3)
        for params in net.params.values():
            params[0].data[...] = sparse_weights(rng, params[0].data.shape, 0.9)
        net.blobs["data"].data[...] = random_input(rng, (1, 64, 96, 96), 0.5)
        caffe.set_conv_forward_path(on)
        gc.collect()
        before = heap_in_use()
        net.forward()
        return heap_in_use() - before

    dense = first_forward_heap("dense")
    assert dense >= tops + 2 * col  # what the measure sees: both col buffers
    first_forward_heap(path)  # sizes this thread's scratch, whatever ran before
    # The layers' own state (weights' CSR or offsets: 37k weights at 10%) is small; the tops
    # and at most one lowered input's worth of per-layer growth are allowed, never two.
    assert first_forward_heap(path) < tops + col // 2


def test_a_setting_naming_no_layer_is_a_value_error(caffe, make_net, paths):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.named_conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.named_fc = L.InnerProduct(n.named_conv, num_output=5)
    net = make_net(n)
    caffe.set_conv_forward_path("direct", "named_conv")
    caffe.set_conv_sparse_backend("openmp", "named_conv")
    caffe.set_fc_forward_path("sparse", "named_fc")
    try:
        for call in (lambda: caffe.set_conv_forward_path("direct", "named_cnov"),
                     lambda: caffe.set_conv_sparse_backend("openmp", "named_cnov"),
                     lambda: caffe.set_conv_forward_path("spmdm", "named_fc")):
            with pytest.raises(ValueError, match="no Convolution layer named '.*' in the nets "
                                                 "built so far .*named_conv"):
                call()
        with pytest.raises(ValueError, match="no InnerProduct layer named 'named_conv'"):
            caffe.set_fc_forward_path("sparse", "named_conv")
        # Removing a setting is always allowed, named or not.
        caffe.set_conv_forward_path("default", "named_cnov")
        caffe.set_fc_forward_path("default", "named_cnov")
        assert net.forward()["named_fc"].shape == (1, 5)
    finally:
        caffe.clear_fc_forward_paths()


SET_BEFORE_BUILDING = """
import sys
import caffe
from caffe_tests.conftest import write_net
from pathlib import Path
caffe.set_mode_cpu()
# No net yet: a name is taken for the net built next.
caffe.set_conv_forward_path("direct", "later")
L = caffe.layers
n = caffe.NetSpec()
n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
n.later = L.Convolution(n.data, num_output=4, kernel_size=3)
net = write_net(caffe, n, Path(sys.argv[1]) / "net.prototxt")
caffe.set_conv_profiling(True)
net.forward()
assert caffe.conv_profile()["later"]["path"] == "direct", caffe.conv_profile()["later"]
# Now a net exists: a name that none of its layers has is refused.
try:
    caffe.set_conv_forward_path("direct", "latre")
except ValueError as error:
    print("refused:", error)
"""


def run_pycaffe(caffe_python_path, script, *args, env=None):
    env = dict(os.environ, **(env or {}),
               PYTHONPATH=os.pathsep.join([str(caffe_python_path), str(ROOT)]))
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_a_name_set_before_any_net_exists_is_taken_for_the_next(caffe_python_path, tmp_path):
    out = run_pycaffe(caffe_python_path, SET_BEFORE_BUILDING, tmp_path).stdout
    assert "refused: no Convolution layer named 'latre' in the nets built so far (they have: " \
           "later)" in out


DECONVOLUTION_ON_A_SPARSE_PATH = """
import sys
import numpy as np
import caffe
from caffe_tests.conftest import write_net
from pathlib import Path
caffe.set_mode_cpu()
L = caffe.layers
n = caffe.NetSpec()
n.data = L.Input(shape=dict(dim=[1, 3, 5, 5]))
n.up = L.Deconvolution(n.data, convolution_param=dict(num_output=2, kernel_size=3, stride=2))
net = write_net(caffe, n, Path(sys.argv[1]) / "net.prototxt")
net.blobs["data"].data[...] = 1.0
caffe.set_conv_forward_path(sys.argv[2], "up")
for _ in range(3):
    net.forward()
"""


@pytest.mark.parametrize("path", SPARSE_PATHS)
def test_deconvolution_fallback_reaches_the_user_at_our_log_level(caffe_python_path, tmp_path,
                                                                  path):
    # GLOG_minloglevel=2 (our runs' default: INFO and WARNING hidden) must still show it, once.
    err = run_pycaffe(caffe_python_path, DECONVOLUTION_ON_A_SPARSE_PATH, tmp_path, path,
                      env={"GLOG_minloglevel": "2"}).stderr
    line = f"layer up: forward path {path} does not support Deconvolution; using dense"
    assert err.count(line) == 1, err[-2000:]
