"""Inside pycaffe: the dense whole forward of a benchmark's net in the plainest loop there is.

A cross-check of `./inv bench`'s dense baseline (`./inv check-baseline RUN_DIR`): the same net,
weights, images, batch and threads as the run recorded, built the same way, but no profiling, no
layer-by-layer pass and no other path, in a process started with OMP_WAIT_POLICY=passive (idle
OpenMP threads sleep instead of spinning, so nothing else could steal cores from the BLAS).
Prints one JSON object: the median and every time (ms).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from . import prepare
from ..models import images as images_stage
from . import measure
from ..errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="JSON: the benchmark spec (as ./inv bench writes it)")
    parser.add_argument("--forwards", type=int, default=30)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    try:
        caffe, net, _, _, _, images = prepare.prepare_from_file(args.spec)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    caffe.clear_conv_forward_paths()
    feeds = list(images_stage.batches(images, spec["batch"],
                                      measure.feed_count({**spec, "repeats": args.forwards},
                                                         images.count)))
    for feed in feeds[:max(spec["warmup"], 3)]:
        net.blobs["data"].data[...] = feed
        net.forward()
    times = []
    for i in range(args.forwards):
        net.blobs["data"].data[...] = feeds[i % len(feeds)]
        start = time.perf_counter()
        net.forward()
        times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"median_ms": statistics.median(times), "times_ms": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
