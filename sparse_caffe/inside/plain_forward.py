"""Inside pycaffe: the dense whole forward of a benchmark's net in the plainest loop there is.

A cross-check of `./inv bench`'s dense baseline (`./inv check-baseline RUN_DIR`): the same net,
weights, images, batch and threads as the run recorded, built the same way, but no profiling, no
layer-by-layer pass and no other path, in a process started with OMP_WAIT_POLICY=passive (idle
OpenMP threads sleep instead of spinning, so nothing else could steal cores from the BLAS).
Its result (the median and every time, ms) goes to RUN_DIR/raw.json, a failure to
RUN_DIR/error.json (sparse_caffe.inside.protocol.end_child).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from . import measure, prepare, protocol
from ..models import images as images_stage


def run(folder: str, forwards: int) -> dict:
    caffe, net, _, _, _, images = prepare.prepare_from_file(f"{folder}/{protocol.SPEC_FILE}")
    spec = protocol.RunSpec.read(f"{folder}/{protocol.SPEC_FILE}")
    caffe.clear_conv_forward_paths()
    feeds = list(images_stage.batches(images, spec.batch,
                                      measure.feed_count(spec.replace(repeats=forwards),
                                                         images.count)))
    for feed in feeds[:max(spec.warmup, 3)]:
        net.blobs["data"].data[...] = feed
        net.forward()
    times = []
    for i in range(forwards):
        net.blobs["data"].data[...] = feeds[i % len(feeds)]
        start = time.perf_counter()
        net.forward()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "times_ms": times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run folder holding spec.json (a RunSpec of kind net)")
    parser.add_argument("--forwards", type=int, default=30)
    args = parser.parse_args(argv)
    return protocol.end_child(args.folder, lambda: run(args.folder, args.forwards))


if __name__ == "__main__":
    sys.exit(main())
