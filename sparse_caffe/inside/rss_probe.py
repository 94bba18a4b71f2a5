"""Inside pycaffe: the resident memory of a benchmark's net on one forward path.

Run once per path, each in a fresh process (`./inv memory`), because a process's peak resident
set (VmHWM) only grows: the same net, weights and images as `./inv bench` builds them, every
convolution (or those --layers names) on the path (fully connected layers sparse under every path
but dense), a few warm-up
forwards, then many more. Its result (RUN_DIR/raw.json): peak and current RSS after the warm-up, and
after the rest (growth after warm-up would be a leak). The peak is restarted once the net is
built, so it measures the forwards, not the preparation.

The net `small` (SMALL_NET) is this probe's own: a few synthetic layers (seeded pruned
weights, inputs with ReLU-like zeros) that exercise what a leak could hide in (hand-overs between
sparse_output layers, fused ReLU, stride, groups, 1x1, the sparse InnerProduct), small enough
for 10,000 forwards per path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import prepare, protocol
from ..models import images as images_stage
from ..models.pruning import prune_blob

# The memory task's own net: small and synthetic, so that 10,000 forwards per path take minutes.
SMALL_NET = "small"
WARMUP = 3


def status_mib() -> dict:
    """VmHWM (peak resident) and VmRSS (resident now) of this process, MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) / 1024
    return {"peak_mib": values["VmHWM"], "rss_mib": values["VmRSS"]}


def settle() -> None:
    """Free what preparing the net left behind (Python garbage, glibc's free lists) and restart
    the peak (VmHWM) from the resident size now, so the peak measures the forwards alone."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to VmRSS


def small_net(batch: int, seed: int = 0):
    """(caffe, net, feeds): the small synthetic net, its weights set, and 4 inputs."""
    import tempfile
    import caffe
    import numpy as np
    caffe.set_mode_cpu()
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 16, 32, 32]))
    n.c1 = L.Convolution(n.data, num_output=32, kernel_size=3, pad=1, fused_relu=True)
    n.c2 = L.Convolution(n.c1, num_output=32, kernel_size=3, pad=1, stride=2, fused_relu=True)
    n.c3 = L.Convolution(n.c2, num_output=64, kernel_size=1, fused_relu=True)
    n.c4 = L.Convolution(n.c3, num_output=64, kernel_size=3, pad=1, group=2)
    n.relu4 = L.ReLU(n.c4, in_place=True)
    n.pool = L.Pooling(n.c4, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2)
    n.fc1 = L.InnerProduct(n.pool, num_output=128)
    n.relu5 = L.ReLU(n.fc1, in_place=True)
    n.fc2 = L.InnerProduct(n.fc1, num_output=10)
    n.prob = L.Softmax(n.fc2)
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt") as prototxt:
        prototxt.write(str(n.to_proto()))
        prototxt.flush()
        net = caffe.Net(prototxt.name, caffe.TEST)
    rng = np.random.default_rng(seed)
    for name, params in net.params.items():
        w = prune_blob(rng.standard_normal(params[0].data.shape).astype(np.float32), 0.8)
        params[0].data[...] = w * 0.1
        params[1].data[...] = rng.standard_normal(params[1].data.shape) * 0.01
    feeds = []
    for _ in range(4):
        x = rng.standard_normal(net.blobs["data"].data.shape).astype(np.float32)
        x[x < 0] = 0.0  # ReLU-like: half the inputs are zeros
        feeds.append(x)
    return caffe, net, feeds


def run(folder: str, path: str, forwards: int) -> dict:
    spec = protocol.RunSpec.read(f"{folder}/{protocol.SPEC_FILE}")
    if spec.net == SMALL_NET:
        caffe, net, feeds = small_net(spec.batch)
        layers = prepare.conv_layers(net, spec.layers)
    else:
        caffe, net, _, layers, _, images = prepare.prepare_from_file(
            f"{folder}/{protocol.SPEC_FILE}")
        feeds = list(images_stage.batches(images, spec.batch, max(1, images.count)))
    # The convolutions --layers names (default: all) run on the path, the others dense.
    for name in layers:
        caffe.set_conv_forward_path(path, name)
    caffe.set_fc_forward_path("dense" if path == "dense" else "sparse")
    settle()
    before = status_mib()
    for i in range(WARMUP):
        net.blobs["data"].data[...] = feeds[i % len(feeds)]
        net.forward()
    warm = status_mib()
    for i in range(forwards):
        net.blobs["data"].data[...] = feeds[i % len(feeds)]
        net.forward()
    return {"path": path, "before_forward": before, "after_warmup": warm,
            "after_forwards": status_mib(), "forwards": forwards}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run folder holding spec.json (a RunSpec of kind net)")
    parser.add_argument("--path", required=True)
    parser.add_argument("--forwards", type=int, default=200)
    args = parser.parse_args(argv)
    return protocol.end_child(args.folder, lambda: run(args.folder, args.path, args.forwards))


if __name__ == "__main__":
    sys.exit(main())
