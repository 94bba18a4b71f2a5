"""One convolution layer, timed on every forward path and back end, side by side in one process:
the runner of a "layer" RunSpec.

Run through `./inv bench-layer` (which picks the build and the threads): the one measurement child
(sparse_caffe.inside.child) runs it inside pycaffe. The layer's weights are synthetic: seeded
Gaussian, magnitude-pruned to the requested sparsity; its input is a seeded Gaussian through a
ReLU-like threshold to the requested fraction of zeros. Labelled synthetic in every output. The
candidates are timed in measure's rotated rounds, as a net's paths are; the host prints the table
(sparse_caffe.host.measurement.layer_table).
"""
from __future__ import annotations

import os
import statistics
import tempfile

import numpy as np

from ..machine import machine_info
from ..models.pruning import prune_blob
from ..patching.config import CONV_TEMPLATE_CONFIG
from . import protocol
from .measure import (checked_blas_runtime, lower_bound, probe_machine, profiled_forward,
                      relative_difference, rotated_rounds, timed_ms)

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


def synthetic_layer(caffe, shape: dict, weight_zeros: float, input_zeros: float, seed: int, tmp,
                    fed: bool = False):
    """The layer `conv` on a seeded synthetic input; with `fed`, the input reaches it through
    `feed`, a 1x1 convolution whose weights are the identity (so conv's input is the same), for
    a producer that can hand its output over (see handed_over_chain)."""
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[shape["batch"], shape["channels"], shape["size"], shape["size"]]))
    below = n.data
    if fed:
        n.feed = L.Convolution(n.data, num_output=shape["channels"], kernel_size=1,
                               bias_term=False)
        below = n.feed
    n.conv = L.Convolution(below, num_output=shape["num_output"], kernel_size=shape["kernel"],
                           pad=shape["pad"], stride=shape["stride"], bias_term=False)
    path = f"{tmp}/layer{'-fed' if fed else ''}.prototxt"
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
    if fed:
        identity = np.eye(shape["channels"], dtype=np.float32)
        net.params["feed"][0].data[...] = identity.reshape(net.params["feed"][0].data.shape)
    return net, w, net.blobs["data"].data.copy()


# A candidate timed with its input handed over by its producer (the identity `feed` on direct,
# which writes conv's padded input itself): only conv's own time and phases count.
HANDED_OVER = "handed over"


def measure_all(caffe, net, candidates, warmup: int, repeats: int, dense_out, fed_net=None):
    """Time every (path, backend[, HANDED_OVER]) of `candidates` side by side: warm-up forwards
    each, then `repeats` of measure's rotated rounds (measure.rotated_rounds, as a net's paths),
    in which every candidate runs one settling forward, one profiled forward (the phase
    breakdown) and then one unprofiled forward (the time). The settling forward brings what the
    candidate reads back into the caches after the other candidates' forwards, so the profiled
    forward runs as the timed one does (and as a layer runs in a net, on an input its producer
    has just written), and its phase shares are shares of that time; for a HANDED_OVER
    candidate, which runs in `fed_net` with `feed` on direct, it is also the forward in which
    conv asks feed for its layout, so that its profiled forward is the whole net's (feed hands
    conv its input) and its timed one conv's alone (on the input feed left it). Returns one
    record per candidate, in order, and the first candidate's profile (the layer's counters)."""
    conv_index = list(fed_net._layer_names).index("conv") if fed_net is not None else None

    def use(path, backend, *how):
        caffe.set_conv_forward_path(path, "conv")
        caffe.set_conv_sparse_backend(backend, "conv")
        if how:
            caffe.set_conv_forward_path("direct", "feed")
        return fed_net if how else net

    def timed(candidate, chain):
        if chain is net:
            return timed_ms(net.forward)
        return timed_ms(lambda: chain._forward(conv_index, conv_index))

    times = {c: [] for c in candidates}
    phases = {c: {} for c in candidates}
    for candidate in candidates:  # warm-up forwards: caches, CSR of the weights, thread pools
        chain = use(*candidate)
        for _ in range(warmup):
            chain.forward()
    counters = {}
    for _, _, candidate in rotated_rounds(candidates, repeats):
        chain = use(*candidate)
        chain.forward()  # settling (see above)
        profile = profiled_forward(caffe, chain.forward)["conv"]
        counters[candidate] = profile
        for phase, seconds in profile["seconds"].items():
            phases[candidate].setdefault(phase, []).append(seconds * 1e3)
        times[candidate].append(timed(candidate, chain))
    results = []
    for candidate in candidates:
        chain = use(*candidate)
        chain.forward()
        forward_ms = times[candidate]
        record = {"path": candidate[0], "backend": candidate[1], "forward_ms": forward_ms,
                  "phase_ms": {k: statistics.median(v) for k, v in phases[candidate].items()},
                  "max_rel_diff": relative_difference(chain.blobs["conv"].data, dense_out),
                  "median_ms": statistics.median(forward_ms)}
        if len(candidate) > 2:
            record.update(input=candidate[2],
                          inputs_handed_over=counters[candidate]["inputs_handed_over"])
        results.append(record)
    return results, counters[candidates[0]]


def run(spec: protocol.RunSpec, folder: str, caffe) -> protocol.RawResult:
    """What sparse_caffe.inside.child runs for a "layer" RunSpec: the layer bench's record."""
    load_before = os.getloadavg()
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    shape = SHAPES[spec.shape]
    with tempfile.TemporaryDirectory() as tmp:
        net, w, x = synthetic_layer(caffe, shape, spec.weight_zeros, spec.input_zeros, spec.seed,
                                    tmp)
        caffe.set_conv_forward_path("dense", "conv")
        blas = checked_blas_runtime(net, threads)  # one dense forward, then the BLAS check
        dense_out = net.blobs["conv"].data.copy()
        candidates = [("dense", "openmp")]
        for backend in caffe.conv_sparse_backends():
            for path in [p for p in caffe.conv_forward_paths() if p != "dense"]:
                if path in CONV_TEMPLATE_CONFIG.backend_independent and backend != "openmp":
                    continue  # these ignore the sparse back end: timed once
                candidates.append((path, backend))
        # direct once more, its input handed over by its producer (written into its padded
        # layout: the input preparation a net's direct layer after another one has)
        fed_net = None
        if ("direct", "openmp") in candidates:
            fed_net = synthetic_layer(caffe, shape, spec.weight_zeros, spec.input_zeros,
                                      spec.seed, tmp, fed=True)[0]
            fed_net.params["conv"][0].data[...] = w
            candidates.append(("direct", "openmp", HANDED_OVER))
        results, profile = measure_all(caffe, net, candidates, spec.warmup, spec.repeats,
                                       dense_out, fed_net)
        caffe.clear_conv_forward_paths()
        probe = probe_machine(caffe)
        limit = lower_bound(profile["useful_macs"], profile["weight_nonzeros"],
                            profile["input_elements"], int(dense_out.size), probe)
    dense_ms = results[0]["median_ms"]
    for r in results:
        r.update(speedup_vs_dense=dense_ms / r["median_ms"],
                 limit_fraction=limit["t_min_ms"] / r["median_ms"])
    record = {"synthetic": True, "shape": spec.shape, **shape,
              "args": {"shape": spec.shape, "weight_zeros": spec.weight_zeros,
                       "input_zeros": spec.input_zeros, "warmup": spec.warmup,
                       "repeats": spec.repeats, "seed": spec.seed},
              "weight_zeros_measured": float(np.mean(w == 0)),
              "input_zeros_measured": float(np.mean(x == 0)),
              "direct_isa": caffe.conv_direct_isa(), "machine": machine_info(threads, load_before),
              "blas_runtime": blas, "probe": probe, "limit": limit, "results": results}
    return protocol.RawResult(kind="layer", blas_runtime=blas, machine_probe=probe, layer=record)
