"""The measurement core: every forward path of a loaded net, timed layer by layer and whole.

Called inside pycaffe by sparse_caffe.inside.bench_runner (a net) and
sparse_caffe.inside.layer_bench (one layer), both through `rotated_rounds`, natively or in a
container of the Docker image, whose Python is Ubuntu 18.04's 3.6. So: no `from __future__ import
annotations`, no walrus, no f-string `=`, nothing newer than 3.6 from the standard library
(tests/test_docker.py checks the image's files with vermin), and only numpy calls that the image's
numpy (docker/requirements-image.txt) has. Imports only the standard library, numpy, pycaffe (passed in)
and the package modules the image ships (tests/test_docker.py checks which).
"""
import ctypes
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from ..errors import UserError
from ..models.net_layers import layers_of
from ..terminal import say
from . import protocol

# A sparse path "agrees" with dense when every output of the layer is within this fraction of the
# layer's largest dense output: float32 sums of up to ~5000 products, reordered, stay near 1e-6.
AGREEMENT_TOLERANCE = 1e-4


def relative_difference(got, reference):
    """The largest difference from the reference, relative to the reference's largest value: the
    measure of agreement everywhere (a path against dense, a framework against Caffe); arrays or
    lists of same-shaped arrays."""
    got = np.concatenate([np.ravel(a) for a in got]) if isinstance(got, list) else np.asarray(got)
    reference = (np.concatenate([np.ravel(a) for a in reference]) if isinstance(reference, list)
                 else np.asarray(reference))
    return float(np.abs(got - reference).max() / max(float(np.abs(reference).max()), 1e-30))

COUNTER_KEYS = ("calls", "input_elements", "input_nonzeros", "dense_macs", "useful_macs",
                "inputs_handed_over")


def feed_count(spec, image_count):
    """How many batches a run feeds: one per measured forward, and every image at least once."""
    return max(spec.repeats, -(-image_count // spec.batch))


def loaded_libraries():
    """Paths of the shared libraries mapped into this process (Linux: /proc/self/maps)."""
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/"):
                found.add(parts[5])
    return sorted(found)


OPENBLAS_PARALLEL = {0: "sequential", 1: "pthreads", 2: "openmp"}
MKL_THREADING = (("gnu", "libmkl_gnu_thread"), ("intel", "libmkl_intel_thread"),
                 ("tbb", "libmkl_tbb_thread"), ("sequential", "libmkl_sequential"))


def blas_runtime():
    """The BLAS this process actually loaded and how it threads, read from the libraries
    themselves (call it after a dense forward: MKL loads its threading layer on first use)."""
    libraries = loaded_libraries()

    def named(*prefixes):
        return [p for p in libraries if os.path.basename(p).startswith(prefixes)]
    info = {"openmp_runtimes": named("libgomp", "libiomp", "libomp")}
    openblas = named("libopenblas")
    mkl = named("libmkl_")
    if openblas:
        lib = ctypes.CDLL(openblas[0])
        lib.openblas_get_config.restype = ctypes.c_char_p
        info.update(name="openblas", library=os.path.realpath(openblas[0]),
                    threading=OPENBLAS_PARALLEL.get(lib.openblas_get_parallel(), "unknown"),
                    config=lib.openblas_get_config().decode(),
                    threads=lib.openblas_get_num_threads())
    elif mkl:
        layers = [layer for layer, prefix in MKL_THREADING if named(prefix)]
        lib = ctypes.CDLL(named("libmkl_rt")[0]) if named("libmkl_rt") else None
        info.update(name="mkl", library=os.path.realpath((named("libmkl_rt") or mkl)[0]),
                    threading=",".join(layers) or "not loaded yet",
                    threads=lib.MKL_Get_Max_Threads() if lib else None)
    else:
        info.update(name="unknown", library=None, threading="unknown")
    return info


def check_blas_runtime(info, threads):
    """Refuse to time a dense baseline whose BLAS threads with another runtime than Caffe's
    OpenMP: two thread pools on the same cores make dense (and every ratio) wrong."""
    fix = ("rebuild with ./inv build (it links Debian's OpenMP OpenBLAS, libopenblas0-openmp) and "
           "do not override it with LD_LIBRARY_PATH or LD_PRELOAD")
    runtimes = [os.path.basename(p) for p in info["openmp_runtimes"]]
    if len(runtimes) > 1:
        raise UserError("two OpenMP runtimes are loaded ({}): their thread pools would fight for "
                        "the cores; {}".format(", ".join(runtimes), fix))
    if threads <= 1:
        return
    if info["name"] == "openblas" and info["threading"] != "openmp":
        raise UserError("the loaded OpenBLAS ({}) threads with {}, Caffe with OpenMP: two thread "
                        "pools would fight for the cores and slow the dense baseline; {}".format(
                            info["library"], info["threading"], fix))
    if info["name"] == "mkl" and info["threading"] != "gnu":
        raise UserError("MKL's threading layer is {} (not GNU OpenMP, which Caffe uses): set "
                        "MKL_THREADING_LAYER=GNU (./inv bench does)".format(info["threading"]))


PROBE_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: %d dim: %d } } }
layer { name: "gemm" type: "InnerProduct" bottom: "data" top: "gemm"
        inner_product_param { num_output: %d bias_term: false
                              weight_filler { type: "gaussian" std: 0.01 } } }
"""


def lower_bound(useful_macs: float, weight_nonzeros: int, input_elements: float,
                output_elements: float, probe: dict) -> dict:
    """A layer's physical lower bound per forward: t_min = max(useful multiply-adds at the
    measured multiply-add rate, bytes moved at the measured bandwidth). Bytes: the nonzero weights
    (value and index, 4 bytes each), the input and the output (float32, a fused residual counted
    in the output's elements), read or written once."""
    moved = 8 * weight_nonzeros + 4 * input_elements + 4 * output_elements
    compute_ms = useful_macs / probe["macs_per_second"] * 1e3
    memory_ms = moved / probe["bytes_per_second"] * 1e3
    return {"t_min_ms": max(compute_ms, memory_ms), "compute_ms": compute_ms,
            "memory_ms": memory_ms, "bytes": moved, "useful_macs": useful_macs,
            "bound": "compute" if compute_ms >= memory_ms else "memory"}


def probe_machine(caffe, size=1024, repeats=5):
    """What the cores can reach, for each layer's lower bound t_min = max(useful multiply-adds /
    the multiply-add rate, bytes / bandwidth): the multiply-add rate of Caffe's own dense GEMM (an
    InnerProduct of size x size x size, through the BLAS and threads this process uses; a
    measured lower bound of the vector FMA peak), and the memory bandwidth of a 256 MiB copy
    (read + write, one thread)."""
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(PROBE_NET % (size, size, size))
    try:
        net = caffe.Net(f.name, caffe.TEST)
    finally:
        os.unlink(f.name)
    net.blobs["data"].data[...] = np.random.RandomState(0).standard_normal((size, size))
    net.forward()
    gemm = []
    for _ in range(repeats):
        start = time.perf_counter()
        net.forward()
        gemm.append(time.perf_counter() - start)
    a = np.ones(64 << 20, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    copy = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(b, a)
        copy.append(time.perf_counter() - start)
    return {"macs_per_second": size ** 3 / min(gemm),
            "bytes_per_second": 2 * a.nbytes / min(copy),
            "method": "fastest of {} forwards of a {}^3 InnerProduct (Caffe's BLAS, this "
                      "process's threads); fastest of {} copies of 256 MiB (numpy, read + "
                      "write)".format(repeats, size, repeats)}


def layer_shapes(net, names):
    shapes = {}
    bottoms = {name: net.bottom_names[name][0] for name in names}
    for name in names:
        w = net.params[name][0].data.shape
        shapes[name] = {"num_output": int(w[0]), "channels_per_group": int(w[1]),
                        "kernel": [int(w[2]), int(w[3])],
                        "input": list(net.blobs[bottoms[name]].data.shape[1:]),
                        "output": list(net.blobs[net.top_names[name][0]].data.shape[1:]),
                        # fused_residual: a last bottom, shaped as the output, read and added
                        "residual": len(net.bottom_names[name]) > 1}
    return shapes


def rotated_rounds(candidates, repeats):
    """The order every measurement times its candidates in (the paths of a net, the paths and
    back ends of one layer): `repeats` rounds, each running every candidate once, in an order
    rotated by one candidate per round, so drift on a shared machine hits all alike. Yields
    (round, position in the round, candidate)."""
    for i in range(repeats):
        for position in range(len(candidates)):
            yield i, position, candidates[(i + position) % len(candidates)]


def timed_ms(call):
    """The wall-clock milliseconds of one call."""
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def solo_regions(caffe):
    """Parallel regions of our kernels run on one thread so far because a thread of the OpenMP
    team was late (another process busy on a core): caffe.team_solo_regions()."""
    return caffe.team_solo_regions()


def profiled_forward(caffe, forward):
    """One forward with the convolutions' phase timers and counters on: caffe.conv_profile()."""
    caffe.reset_conv_profile()
    caffe.set_conv_profiling(True)
    forward()
    caffe.set_conv_profiling(False)
    return caffe.conv_profile()


def measure_paths(caffe, net, layers, feeds, image_count, spec):
    """Run spec.paths (dense first) over the convolution `layers` of `net`, fed `feeds`.

    First spec.warmup unmeasured forwards per path. Then spec.repeats rounds; each round
    runs every path once, in an order rotated by one path per round (so drift on a shared machine
    hits every path alike), and per path: one profiled forward (per-layer phase times and
    counters), one unprofiled forward (whole-net wall clock) and the same forward one layer at a
    time (every layer's wall clock). Last, per path, each layer's output on the first batch
    against dense's and top-1 over the first ceil(image_count / batch) batches. Returns
    {"paths": {path: results}, "reference": dense outputs, "dense_inputs": dense inputs} (the
    last two per layer, for a side-by-side baseline)."""
    batch, paths, repeats = spec.batch, spec.paths, spec.repeats
    output_blob = net.outputs[-1]

    auto_path = spec.auto_path

    def use(path):
        caffe.clear_conv_forward_paths()
        caffe.set_conv_sparse_backend(spec.backend)
        for name in layers:
            caffe.set_conv_forward_path(path, name)
        if hasattr(caffe, "set_fc_forward_path"):  # InnerProduct: dense under dense, auto under
            # auto, else fc_path
            fc = "dense" if path == paths[0] else path if path == auto_path else \
                spec.fc_path
            caffe.set_fc_forward_path(fc)

    def forward(feed):
        net.blobs["data"].data[...] = feed
        net.forward()

    results = {path: {"net_times_ms": [], "layer_times_ms": {name: [] for name in net._layer_names},
                      "phases_ms": {name: {} for name in layers},
                      "counters": {name: None for name in layers}, "round_order": [],
                      "solo_regions": 0}
               for path in paths}
    total_steps = len(paths) * (spec.warmup + repeats)
    state = {"step": 0}
    started = time.monotonic()

    def progress(what, path, i):
        state["step"] += 1
        step = state["step"]
        if i == 0 or step % 10 == 0:
            elapsed = time.monotonic() - started
            say("[{}] {} {}; elapsed {:.0f} s, ETA {:.0f} s".format(
                path, what, i + 1, elapsed, elapsed / step * (total_steps - step)))

    for path in paths:  # warm-up: weight CSRs, caches, thread pools
        use(path)
        if path == auto_path:
            results[path]["auto"] = calibrate_auto(caffe, net, forward, feeds, spec.warmup)
            continue
        for i in range(spec.warmup):
            forward(feeds[i % len(feeds)])
            progress("warm-up", path, i)
    for i, position, path in rotated_rounds(paths, repeats):
        feed = feeds[i % len(feeds)]
        use(path)
        measured = results[path]
        measured["round_order"].append(position)
        solo_before = solo_regions(caffe)
        profile = profiled_forward(caffe, lambda: forward(feed))  # per-layer phases
        for name in layers:
            p = profile[name]
            for phase, seconds in p["seconds"].items():
                measured["phases_ms"][name].setdefault(phase, []).append(seconds * 1e3)
            totals = measured["counters"][name] or dict.fromkeys(COUNTER_KEYS, 0)
            for key in totals:
                totals[key] += p[key]
            totals.update(weight_nonzeros=p["weight_nonzeros"],
                          weight_elements=p["weight_elements"], path=p["path"],
                          backend=p["backend"])
            measured["counters"][name] = totals
        net.blobs["data"].data[...] = feed  # unprofiled: the whole net
        measured["net_times_ms"].append(timed_ms(net.forward))
        # The same forward one layer at a time: the layers' times must add up to the whole
        # (a gap means time spent outside the layers, e.g. thread pools fighting).
        for index, name in enumerate(net._layer_names):
            measured["layer_times_ms"][name].append(timed_ms(lambda: net._forward(index, index)))
        measured["solo_regions"] += solo_regions(caffe) - solo_before
        progress("round", path, i)
    if auto_path in results:  # a re-plan that calibrated during the rounds was timed with them
        after = caffe.auto_choices()
        results[auto_path]["auto"]["replanned_during_rounds"] = sorted(
            name for name, choice in after.items()
            if choice["state"] != "decided" or (choice["forwards"] > 0 and choice["replans"] !=
                                                results[auto_path]["auto"]["choices"][name]["replans"]))
    plan = measure_plan(caffe, net, layers, feeds, spec, results) if len(paths) > 1 else None
    reference, dense_inputs, predictions, alone_reference = {}, {}, {}, {}
    for path in paths:  # correctness against dense on the first batch, top-1 over every image
        use(path)
        forward(feeds[0])
        outputs = {name: net.blobs[net.top_names[name][0]].data.copy() for name in layers}
        last = net.blobs[output_blob].data.copy()
        if path == paths[0]:
            reference = outputs
            # Every bottom: the input, and with fused_residual the residual added to the output.
            dense_inputs = {name: [net.blobs[b].data.copy() for b in net.bottom_names[name]]
                            for name in layers}
            dense_last = last
        # Each layer alone on dense's input: its own difference from dense. Through the whole
        # net the differences of the layers before it add up (a float rounding difference per
        # layer reaches ~1e-4 of the largest value by ResNet-50's last convolutions on every
        # path), so the chain's numbers are kept apart, for the record.
        alone = layers_alone(net, layers, dense_inputs)
        if path == paths[0]:
            alone_reference = alone
        results[path]["max_rel_diff"] = {
            name: relative_difference(alone[name], alone_reference[name]) for name in layers}
        results[path]["chain_max_rel_diff"] = {
            name: relative_difference(outputs[name], reference[name]) for name in layers}
        results[path]["output_max_rel_diff"] = relative_difference(last, dense_last)
        predictions[path] = top1_of(net, feeds, image_count, batch, output_blob)
    caffe.clear_conv_forward_paths()
    if hasattr(caffe, "set_fc_forward_path"):
        caffe.clear_fc_forward_paths()
    baseline = predictions[paths[0]]
    for path in paths:
        same = sum(a == b for a, b in zip(predictions[path], baseline))
        results[path]["top1_agreement"] = same / len(baseline)
    if plan is not None:  # top-1 of the planned net, as a fraction agreeing with dense
        use_plan(caffe, plan, spec)
        top1 = top1_of(net, feeds, image_count, batch, output_blob)
        plan["top1_agreement"] = sum(a == b for a, b in zip(top1, baseline)) / len(baseline)
        caffe.clear_conv_forward_paths()
        if hasattr(caffe, "set_fc_forward_path"):
            caffe.clear_fc_forward_paths()
    return {"paths": results, "plan": plan, "reference": reference, "dense_inputs": dense_inputs}


def layers_alone(net, layers, inputs):
    """Each of `layers` run alone (net._forward of that layer only) on inputs[layer] (one array
    per bottom) copied into its bottoms: {layer: its top, copied}."""
    index = {name: i for i, name in enumerate(net._layer_names)}
    outputs = {}
    for name in layers:
        for blob, array in zip(net.bottom_names[name], inputs[name]):
            net.blobs[blob].data[...] = array
        net._forward(index[name], index[name])
        outputs[name] = net.blobs[net.top_names[name][0]].data.copy()
    return outputs


# auto's calibration must end within this many warm-up forwards (it takes (timed rounds + 1) x
# surviving candidates: 6 x 4 with five rounds and four candidates, up to 16 x 4 when a near tie
# extends it to three times the rounds).
MAX_CALIBRATION_FORWARDS = 200


def calibrate_auto(caffe, net, forward, feeds, warmup):
    """The warm-up of the auto path: every auto state forgotten, then forwards until every layer
    under auto has decided (at least `warmup` of them), so that no timed forward calibrates.
    Returns {"calibration_forwards": forwards until all had decided, "warmup_forwards",
    "choices": caffe.auto_choices() then}."""
    caffe.reset_auto()
    count, calibrated = 0, None
    while True:
        choices = caffe.auto_choices()
        if calibrated is None and choices and all(c["state"] == "decided" for c in choices.values()):
            calibrated = count
        if calibrated is not None and count >= warmup:
            break
        if count >= MAX_CALIBRATION_FORWARDS:
            raise UserError("auto had not decided after {} forwards (still calibrating: {}); "
                            "re-run with fewer paths in the build or report this".format(
                                count, ", ".join(sorted(n for n, c in choices.items()
                                                        if c["state"] != "decided"))))
        forward(feeds[count % len(feeds)])
        count += 1
    say("[auto] calibrated in {} forwards: {}".format(calibrated, ", ".join(
        "{} {}".format(n, p) for p, n in sorted(
            _count(c["path"] for c in choices.values()).items(), key=lambda x: -x[1]))))
    return {"calibration_forwards": calibrated, "warmup_forwards": count, "choices": choices}


def _count(values):
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def top1_of(net, feeds, image_count, batch, output_blob):
    """The net's top-1 class for every image: the first ceil(image_count / batch) feeds."""
    top1 = []
    for feed in feeds[:-(-image_count // batch)]:
        net.blobs["data"].data[...] = feed
        net.forward()
        top1.extend(int(k) for k in net.blobs[output_blob].data.reshape(batch, -1).argmax(1))
    return top1


def use_plan(caffe, plan, spec):
    """Every convolution on its planned path (and back end, when the plan has "backends");
    fully connected layers as under sparse columns, or each on its own path when the plan has
    "fc_layers"."""
    caffe.clear_conv_forward_paths()
    caffe.set_conv_sparse_backend(spec.backend)
    for name, path in plan["layers"].items():
        caffe.set_conv_forward_path(path, name)
    for name, backend in plan.get("backends", {}).items():  # a layer's own back end (tune's)
        caffe.set_conv_sparse_backend(backend, name)
    if hasattr(caffe, "set_fc_forward_path"):
        caffe.clear_fc_forward_paths()
        caffe.set_fc_forward_path(spec.fc_path)
        for name, path in plan.get("fc_layers", {}).items():
            caffe.set_fc_forward_path(path, name)


# A path replaces dense in a plan only when its median time is below this fraction of dense's.
CLEAR_WIN = 0.95


def layer_median_ms(results, path, name):
    """A convolution's median time on `path` in measure_paths()'s rounds: per profiled forward, the
    sum of its phase timers."""
    return statistics.median([sum(v) for v in zip(*results[path]["phases_ms"][name].values())])


def measure_plan(caffe, net, layers, feeds, spec, results, given=None):
    """The per-layer wins collected: each convolution on the path whose median layer time was
    lowest in the rounds just measured (ties and near-ties, within 5%, go to dense), or as
    `given` ({"layers": {convolution: path}, "fc_layers": {InnerProduct layer: path}, "rule"}),
    then spec.repeats rounds of {dense whole forward, planned whole forward} in alternating
    order."""
    paths = spec.paths
    baseline = paths[0]
    if given is None:
        choice = {}
        for name in layers:
            times = {path: layer_median_ms(results, path, name) for path in paths}
            best = min(paths, key=lambda path: times[path])
            choice[name] = best if times[best] < CLEAR_WIN * times[baseline] else baseline
        given = {"layers": choice, "rule": "fastest median layer time in this run's rounds; "
                                           "dense unless a path is more than 5% faster"}
    plan = dict(given, net_times_ms=[], dense_net_times_ms=[])
    choice = plan["layers"]
    for i in range(spec.warmup):
        use_plan(caffe, plan, spec)
        net.blobs["data"].data[...] = feeds[i % len(feeds)]
        net.forward()
    for i, _, planned in rotated_rounds((False, True), spec.repeats):  # dense first, then not
        if planned:
            use_plan(caffe, plan, spec)
        else:
            caffe.clear_conv_forward_paths()
            if hasattr(caffe, "set_fc_forward_path"):
                caffe.clear_fc_forward_paths()
                caffe.set_fc_forward_path("dense")
        net.blobs["data"].data[...] = feeds[i % len(feeds)]
        plan["net_times_ms" if planned else "dense_net_times_ms"].append(timed_ms(net.forward))
    say("[plan] {} of {} convolutions off dense; timed against dense in {} rounds".format(
        sum(p != baseline for p in choice.values()), len(choice), spec.repeats))
    return plan


def checked_blas_runtime(net, threads):
    """One dense forward (so MKL loads its threading layer), then the BLAS runtime, refused when
    it threads with another runtime than Caffe's OpenMP."""
    net.forward()
    info = blas_runtime()
    check_blas_runtime(info, threads)
    return info


def raw_result(caffe, net, layers, measured, weights, images, pytorch, blas):
    """The raw measurements of a net as the host reads them: the same from both routes."""
    return protocol.RawResult(
        kind="net", weights=weights, images=images, layers=layers, pytorch=pytorch,
        machine_probe=probe_machine(caffe),
        net_layers=[[name, layer.type] for name, layer in layers_of(net)],
        blas_runtime=blas, shapes=layer_shapes(net, layers), paths=measured["paths"],
        plan=measured.get("plan"), agreement_tolerance=AGREEMENT_TOLERANCE,
        backends_in_build=list(caffe.conv_sparse_backends()),
        # "" when the build has no oneDNN (the Docker image): the onednn path then ran dense.
        onednn=caffe.onednn_version() if hasattr(caffe, "onednn_version") else "")


def environment():
    """The software this process measures with: Python, numpy, protobuf, the C++ compiler."""
    import google.protobuf
    try:
        compiler = subprocess.check_output(["g++", "-dumpfullversion"],
                                           universal_newlines=True).strip()
    except (OSError, subprocess.CalledProcessError):
        compiler = "unknown"
    return {"executable": sys.executable, "version": sys.version.split()[0],
            "numpy": np.__version__, "protobuf": google.protobuf.__version__,
            "compiler": compiler}
