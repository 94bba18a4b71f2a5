"""Inside pycaffe: the resident memory of a benchmark's net on one forward path.

Run once per path, each in a fresh process (`./inv memory`), because a process's peak resident
set (VmHWM) only grows: the same net, weights and images as `./inv bench` builds them, every
convolution on the path (fully connected layers sparse under every path but dense), a few warm-up
forwards, then many more. Prints one JSON object: peak and current RSS after the warm-up, and
after the rest (growth after warm-up would be a leak). The peak is restarted once the net is
built, so it measures the forwards, not the preparation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import bench_runner
from . import images as images_stage
from .errors import UserError

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="JSON: the benchmark spec (as ./inv bench writes it)")
    parser.add_argument("--path", required=True)
    parser.add_argument("--forwards", type=int, default=200)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    try:
        caffe, net, _, layers, _, images = bench_runner.prepare_from_file(args.spec)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in layers:
        caffe.set_conv_forward_path(args.path, name)
    caffe.set_fc_forward_path("dense" if args.path == "dense" else "sparse")
    feeds = list(images_stage.batches(images, spec["batch"], max(1, images.count)))
    settle()
    before = status_mib()
    for i in range(WARMUP):
        net.blobs["data"].data[...] = feeds[i % len(feeds)]
        net.forward()
    warm = status_mib()
    for i in range(args.forwards):
        net.blobs["data"].data[...] = feeds[i % len(feeds)]
        net.forward()
    print(json.dumps({"path": args.path, "before_forward": before, "after_warmup": warm,
                      "after_forwards": status_mib(), "forwards": args.forwards}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
