"""One convolution layer, timed on every forward path and back end, side by side in one process.

Run through `./inv bench-layer` (which picks the build and the threads); it imports pycaffe, so it
runs in a subprocess whose PYTHONPATH names the build. The layer's weights are synthetic: seeded
Gaussian, magnitude-pruned to the requested sparsity; its input is a seeded Gaussian through a
ReLU-like threshold to the requested fraction of zeros. Labelled synthetic in every output.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..models.pruning import prune_blob
from ..patching.config import CONV_TEMPLATE_CONFIG
from .measure import (AGREEMENT_TOLERANCE, checked_blas_runtime, lower_bound, probe_machine,
                      relative_difference)

# Layer shapes worth timing alone; res5 branch2b is ResNet-50's last 3x3 (SkimCaffe: 97.8-98.0%
# zero weights).
SHAPES = {
    "res5_branch2b": dict(batch=1, channels=512, size=7, num_output=512, kernel=3, pad=1, stride=1),
    "res4_branch2b": dict(batch=1, channels=256, size=14, num_output=256, kernel=3, pad=1, stride=1),
    "res3_branch2b": dict(batch=1, channels=128, size=28, num_output=128, kernel=3, pad=1, stride=1),
    # ResNet-50's 1x1 convolutions (dense weights in SkimCaffe's pruning: use --weight-zeros 0):
    # branch2a reduces the channels, branch2c expands them; res5a's branch2a has stride 2.
    "res5_branch2a": dict(batch=1, channels=2048, size=7, num_output=512, kernel=1, pad=0, stride=1),
    "res5_branch2c": dict(batch=1, channels=512, size=7, num_output=2048, kernel=1, pad=0, stride=1),
    "res5a_branch2a": dict(batch=1, channels=1024, size=14, num_output=512, kernel=1, pad=0,
                           stride=2),
    "res4_branch2a": dict(batch=1, channels=1024, size=14, num_output=256, kernel=1, pad=0, stride=1),
    "res4_branch2c": dict(batch=1, channels=256, size=14, num_output=1024, kernel=1, pad=0, stride=1),
    "res3_branch2a": dict(batch=1, channels=512, size=28, num_output=128, kernel=1, pad=0, stride=1),
    "res3_branch2c": dict(batch=1, channels=128, size=28, num_output=512, kernel=1, pad=0, stride=1),
    "caffenet_conv3": dict(batch=1, channels=256, size=13, num_output=384, kernel=3, pad=1, stride=1),
}


@dataclass
class Measurement:
    path: str
    backend: str
    forward_ms: list
    phase_ms: dict
    max_rel_diff: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.forward_ms)


def synthetic_layer(caffe, shape: dict, weight_zeros: float, input_zeros: float, seed: int, tmp):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[shape["batch"], shape["channels"], shape["size"], shape["size"]]))
    n.conv = L.Convolution(n.data, num_output=shape["num_output"], kernel_size=shape["kernel"],
                           pad=shape["pad"], stride=shape["stride"], bias_term=False)
    path = f"{tmp}/layer.prototxt"
    with open(path, "w") as f:
        f.write(str(n.to_proto()))
    net = caffe.Net(path, caffe.TEST)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(net.params["conv"][0].data.shape).astype(np.float32)
    w = prune_blob(w, weight_zeros)
    net.params["conv"][0].data[...] = w
    x = rng.standard_normal(net.blobs["data"].data.shape).astype(np.float32)
    x[x < np.quantile(x, input_zeros)] = 0.0  # ReLU-like: the smallest values become zeros
    net.blobs["data"].data[...] = x
    return net, w, net.blobs["data"].data.copy()


def measure_all(caffe, net, candidates, warmup: int, repeats: int, dense_out):
    """Time every (path, backend) of `candidates` side by side: warm-up forwards each, then
    `repeats` rounds in which every candidate runs once, in an order rotated each round (drift on
    a shared machine hits all alike), unprofiled (its counting costs time); then the same rounds
    profiled, for the phase breakdown. Returns one Measurement per candidate, in order."""
    def use(path, backend):
        caffe.set_conv_forward_path(path, "conv")
        caffe.set_conv_sparse_backend(backend, "conv")

    times = {c: [] for c in candidates}
    phases = {c: {} for c in candidates}
    for candidate in candidates:  # warm-up forwards: caches, CSR of the weights, thread pools
        use(*candidate)
        for _ in range(warmup):
            net.forward()
    caffe.set_conv_profiling(False)
    for i in range(repeats):
        for k in range(len(candidates)):
            candidate = candidates[(i + k) % len(candidates)]
            use(*candidate)
            start = time.perf_counter()
            net.forward()
            times[candidate].append((time.perf_counter() - start) * 1e3)
    counters = {}
    for i in range(repeats):
        for k in range(len(candidates)):
            candidate = candidates[(i + k) % len(candidates)]
            use(*candidate)
            caffe.reset_conv_profile()
            caffe.set_conv_profiling(True)
            net.forward()
            caffe.set_conv_profiling(False)
            profile = caffe.conv_profile()["conv"]
            counters[candidate] = profile
            for phase, seconds in profile["seconds"].items():
                phases[candidate].setdefault(phase, []).append(seconds * 1e3)
    results = []
    for candidate in candidates:
        use(*candidate)
        net.forward()
        diff = relative_difference(net.blobs["conv"].data, dense_out)
        results.append(Measurement(candidate[0], candidate[1], times[candidate],
                                   {k: statistics.median(v) for k, v in phases[candidate].items()},
                                   diff))
    return results, counters[candidates[0]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="res5_branch2b")
    parser.add_argument("--weight-zeros", type=float, default=0.98)
    parser.add_argument("--input-zeros", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args(argv)

    import os
    import tempfile

    import caffe

    from ..errors import UserError
    from ..machine import machine_info
    load_before = os.getloadavg()
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    caffe.set_mode_cpu()
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        net, w, x = synthetic_layer(caffe, shape, args.weight_zeros, args.input_zeros, args.seed, tmp)
        caffe.set_conv_forward_path("dense", "conv")
        try:
            blas = checked_blas_runtime(net, threads)  # one dense forward, then the BLAS check
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        dense_out = net.blobs["conv"].data.copy()
        candidates = [("dense", "openmp")]
        for backend in caffe.conv_sparse_backends():
            for path in [p for p in caffe.conv_forward_paths() if p != "dense"]:
                if path in CONV_TEMPLATE_CONFIG.backend_independent and backend != "openmp":
                    continue  # these ignore the sparse back end: timed once
                candidates.append((path, backend))
        results, profile = measure_all(caffe, net, candidates, args.warmup, args.repeats,
                                       dense_out)
        caffe.clear_conv_forward_paths()
        probe = probe_machine(caffe)
        limit = lower_bound(profile["useful_macs"], profile["weight_nonzeros"],
                            profile["input_elements"], int(dense_out.size), probe)
    dense_ms = results[0].median_ms
    print(f"layer {args.shape} (synthetic weights and input): {shape}; "
          f"{np.mean(w == 0):.1%} zero weights, {np.mean(x == 0):.1%} zero inputs; "
          f"{args.repeats} measured forwards after {args.warmup} warm-up; "
          f"direct kernel: {caffe.conv_direct_isa()}")
    print(f"limit t_min {limit['t_min_ms']:.4f} ms = max({limit['useful_macs'] / 1e6:.2f} M useful "
          f"multiply-adds at {probe['macs_per_second'] / 1e9:.1f} G/s (measured GEMM rate), "
          f"{limit['bytes'] / 1e6:.2f} MB at {probe['bytes_per_second'] / 1e9:.1f} GB/s "
          "(measured copy bandwidth))")
    width = max(len(r.path) for r in results) + 2
    print(f"{'path':<{width}}{'backend':<9}{'median ms':>10}{'min ms':>9}{'vs dense':>10}"
          f"{'input prep':>11}{'prep %':>8}{'multiply':>10}{'t_min/t':>9}{'max rel diff':>14}")
    for r in results:
        flag = "  <-- DIFFERS FROM DENSE" if r.max_rel_diff > AGREEMENT_TOLERANCE else ""
        prep = r.phase_ms.get("input2csr", 0) + r.phase_ms.get("im2col", 0)
        print(f"{r.path:<{width}}{r.backend:<9}{r.median_ms:>10.3f}{min(r.forward_ms):>9.3f}"
              f"{dense_ms / r.median_ms:>9.2f}x{prep:>11.3f}{prep / r.median_ms:>8.0%}"
              f"{r.phase_ms.get('multiply', 0):>10.3f}{limit['t_min_ms'] / r.median_ms:>9.2f}"
              f"{r.max_rel_diff:>14.1e}{flag}")
    print("input prep: im2col + input2csr (direct: the padded copy); t_min/t: share of the limit "
          "reached; paths timed in interleaved rounds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"synthetic": True, "shape": args.shape, **shape, "args": vars(args),
                       "direct_isa": caffe.conv_direct_isa(),
                       "machine": machine_info(threads, load_before), "blas_runtime": blas,
                       "probe": probe, "limit": limit,
                       "results": [dict(asdict(r), median_ms=r.median_ms,
                                        speedup_vs_dense=dense_ms / r.median_ms,
                                        limit_fraction=limit["t_min_ms"] / r.median_ms)
                                   for r in results]},
                      f, indent=2)
    return 1 if any(r.max_rel_diff > AGREEMENT_TOLERANCE for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
