"""Inside pycaffe: the whole net in what users would run instead of Caffe, timed beside Caffe.

The same network (sparse_caffe.models.torch_net builds it from the Caffe net's own layers and weights),
the same inputs, batch and threads, each framework run the way its users run it fastest on a CPU:

- PyTorch: eval mode under torch.inference_mode(), contiguous (NCHW) and channels_last, each
  eager and through torch.compile (Inductor, freezing on: weights folded in as constants, as
  PyTorch recommends for CPU inference); a variant that cannot be built here is recorded as
  skipped with the reason, not a failure;
- ONNX Runtime: the contiguous module exported with torch.onnx.export (TorchScript exporter,
  opset ONNX_OPSET), all graph optimisations on (ORT_ENABLE_ALL), intra_op_num_threads = the
  threads, one inter-op thread, sequential execution.

Every variant's output is checked against Caffe's dense output on the same images (the last
blob's largest difference relative to its largest value, and top-1 on every image) before it is
timed. Then, after warm-up (and auto's calibration again: see recalibrate_auto), `repeats`
rounds: each round runs Caffe's whole-net configurations
(dense, the per-layer plan, ...) and every variant once, in an order rotated by one per round;
before each row the process sleeps SETTLE_S, so that the spinning threads of the last framework's
pool (each framework has its own) have gone to sleep and do not steal the cores. Each row then
runs two forwards, both timed: the first after that pause ("after idle": times_ms; the row's
weights are out of the caches and its threads asleep, as for a request after a quiet spell), the
second right after it ("back to back": back_to_back_ms; as in a loop over a stream of inputs).
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings

import numpy as np

from . import measure, protocol
from ..models import torch_net

ONNX_OPSET = 17
# A pause before each timed forward: the previous framework's idle threads stop spinning and
# sleep (libgomp after GOMP_SPINCOUNT spins, ONNX Runtime after its spin loop), so they do not
# take cores from the next one. Measured here (/proc task CPU times, a loaded machine): an
# ONNX Runtime session's idle threads used up to ~50 ms of CPU in the 100 ms after a run, so
# 20 ms was not enough.
SETTLE_S = 0.1


def recalibrate_auto(caffe, net, caffe_rows, feeds) -> dict:
    """Forwards of each Caffe row until every layer under auto has decided again; {row: forwards}.

    Building the PyTorch model reads every weight blob through pycaffe's writable `.data`,
    which counts as a write (patch 0002's version), so each auto layer re-plans and calibrates
    on its next forwards: without this, the first rounds would time auto's calibration."""
    if not hasattr(caffe, "auto_choices"):
        return {}
    def calibrating():  # {layer: calibration forwards so far} of the layers not decided
        return {n: c["forwards"] for n, c in caffe.auto_choices().items()
                if c["state"] != "decided"}
    taken = {}
    for name, switch in caffe_rows.items():
        switch()
        count = 0
        while True:
            before = calibrating()
            net.blobs["data"].data[...] = feeds[count % len(feeds)]
            net.forward()
            count += 1
            after = calibrating()
            # Done when nothing calibrates, or nothing calibrating moved on (a row without auto).
            if not after or all(after.get(n) == f for n, f in before.items()) and \
                    set(after) <= set(before):
                break
            if count >= measure.MAX_CALIBRATION_FORWARDS:
                raise RuntimeError("auto had not decided again after {} forwards".format(count))
        taken[name] = count
    return taken


def _outputs(run, feeds) -> list[np.ndarray]:
    # asarray first: numpy 2 warns when copy= reaches a torch tensor's __array__
    return [np.array(np.asarray(run(feed)), dtype=np.float32) for feed in feeds]


def agreement(outputs: list[np.ndarray], reference: list[np.ndarray], batch: int,
              image_count: int) -> dict:
    """The last blob's largest difference from Caffe's relative to Caffe's largest value, over
    the check feeds, and how many images (of image_count) get a different top-1."""
    diff = measure.relative_difference(list(outputs), list(reference))
    top1 = [int(k) for o in outputs for k in o.reshape(batch, -1).argmax(1)][:image_count]
    want = [int(k) for r in reference for k in r.reshape(batch, -1).argmax(1)][:image_count]
    differ = sum(a != b for a, b in zip(top1, want))
    return {"max_rel_diff": diff, "top1_differs": differ, "images": len(want),
            "agrees": diff <= measure.AGREEMENT_TOLERANCE and differ == 0}


def _torch_variants(torch, model, compile_too: bool) -> list[tuple[str, dict]]:
    """(name, {"prepare": () -> (run(x), facts), the memory format, compiled or not}) for each
    PyTorch variant."""
    def eager(channels_last: bool):
        def prepare():
            m = model
            if channels_last:
                m = copy.deepcopy(model).to(memory_format=torch.channels_last)

            def run(x):
                with torch.inference_mode():
                    return m(x)
            return run, {}
        return prepare

    def compiled(channels_last: bool):
        def prepare():
            import torch._inductor.config as inductor
            inductor.freezing = True  # weights as constants: constant folding, prepacked weights
            m = copy.deepcopy(model)
            if channels_last:
                m = m.to(memory_format=torch.channels_last)
            fn = torch.compile(m)

            def run(x):
                with torch.inference_mode():
                    return fn(x)
            return run, {"torch_compile": "default mode, inductor freezing on"}
        return prepare

    variants = [("pytorch", {"prepare": eager(False), "memory_format": "contiguous",
                             "compiled": False}),
                ("pytorch channels_last", {"prepare": eager(True),
                                           "memory_format": "channels_last", "compiled": False})]
    if compile_too:
        variants += [("pytorch compile", {"prepare": compiled(False),
                                          "memory_format": "contiguous", "compiled": True}),
                     ("pytorch compile channels_last", {"prepare": compiled(True),
                                                        "memory_format": "channels_last",
                                                        "compiled": True})]
    return variants


def onnxruntime_session(torch, model, example, threads: int, folder: str):
    """The module exported to ONNX (file in `folder`) and loaded in ONNX Runtime as its users run
    it fastest on a CPU. Returns (run(feed), facts)."""
    import onnxruntime as ort
    path = os.path.join(folder, "net.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and constant-folding notes
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["data"], output_names=["output"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(feed):
        return session.run(None, {"data": feed})[0]
    return run, {"onnxruntime": ort.__version__, "opset": ONNX_OPSET,
                 "graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": threads,
                 "inter_op_num_threads": 1, "execution_mode": "sequential",
                 "providers": session.get_providers(),
                 "exporter": "torch.onnx.export (TorchScript exporter, dynamo=False)"}


def measure_whole_net(caffe, net, net_text: str, feeds: list[np.ndarray], image_count: int,
                      spec: protocol.RunSpec, caffe_rows: dict, compile_too: bool = True,
                      say=measure.say) -> dict:
    """Raw measurements of the whole-net baselines (see the module doc). caffe_rows: {name:
    () -> None that switches `net` to that configuration}, timed in the same rounds (dense
    first). Returns {"variants": {name: {...}}, "caffe": {name: {"times_ms": [...]}}, ...}."""
    import torch
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    batch = spec.batch
    check_feeds = feeds[:-(-image_count // batch)]
    caffe_rows["dense"]()
    reference = []
    for feed in check_feeds:
        net.blobs["data"].data[...] = feed
        net.forward()
        reference.append(net.blobs[net.outputs[-1]].data.copy())
    model = torch_net.build(net_text, net, caffe.proto.caffe_pb2)
    result = {"torch_version": torch.__version__, "threads": threads, "batch": batch,
              "settle_s": SETTLE_S, "output_blob": net.outputs[-1], "variants": {},
              "caffe": {name: {"times_ms": [], "back_to_back_ms": []} for name in caffe_rows},
              "round_order": [], "check_images": image_count}
    runs = {}
    tensors = {}

    def as_tensor(feed, channels_last):
        key = (id(feed), channels_last)
        if key not in tensors:
            x = torch.from_numpy(feed)
            tensors[key] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        return tensors[key]

    with tempfile.TemporaryDirectory(prefix="sparse-caffe-onnx-") as folder:
        candidates = _torch_variants(torch, model, compile_too)
        candidates.append(("onnxruntime", {"prepare": lambda: onnxruntime_session(
            torch, model, torch.from_numpy(feeds[0]), threads, folder),
            "memory_format": "contiguous", "compiled": False}))
        for name, variant in candidates:
            framework = "onnxruntime" if name == "onnxruntime" else "pytorch"
            record = {"framework": framework, "memory_format": variant["memory_format"],
                      "compiled": variant["compiled"]}
            channels_last = variant["memory_format"] == "channels_last"
            # The framework's input, made before the timer starts (as Caffe's copy into its
            # input blob is): a tensor in the variant's layout, or the numpy array for ORT.
            take = ((lambda cl: lambda feed: as_tensor(feed, cl))(channels_last)
                    if framework == "pytorch" else (lambda feed: feed))
            start = time.perf_counter()
            try:
                run, facts = variant["prepare"]()
                outputs = _outputs(lambda feed: run(take(feed)), check_feeds)  # compiles
            except Exception as exc:  # noqa: BLE001 - any failure to build a variant is recorded
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
                say(f"[baselines] {name}: skipped ({reason})")
                record["skipped"] = reason
                result["variants"][name] = record
                continue
            record.update(facts, setup_s=time.perf_counter() - start,
                          **agreement(outputs, reference, batch, image_count))
            record["times_ms"], record["back_to_back_ms"] = [], []
            result["variants"][name] = record
            runs[name] = (run, take)
            say(f"[baselines] {name}: ready in {record['setup_s']:.1f} s; largest difference "
                f"from Caffe's dense {record['max_rel_diff']:.1e}, top-1 differs on "
                f"{record['top1_differs']} of {record['images']} images")
        rows = [("caffe", name) for name in caffe_rows] + [("baseline", name) for name in runs]

        def forward(kind, name, feed):
            """(after idle, back to back) ms: the row's two timed forwards after the pause."""
            if kind == "caffe":
                caffe_rows[name]()
                net.blobs["data"].data[...] = feed
                run, x = (lambda _: net.forward()), None
            else:
                run, take = runs[name]
                x = take(feed)
            time.sleep(SETTLE_S)
            times = []
            for _ in range(2):
                start = time.perf_counter()
                run(x)
                times.append((time.perf_counter() - start) * 1e3)
            return times

        for i in range(spec.warmup):
            for kind, name in rows:
                forward(kind, name, feeds[i % len(feeds)])
        result["recalibration_forwards"] = recalibrate_auto(caffe, net, caffe_rows, feeds)
        for i, position, (kind, name) in measure.rotated_rounds(rows, spec.repeats):
            if position == 0:
                result["round_order"].append([])
            result["round_order"][-1].append(name)
            after_idle, back_to_back = forward(kind, name, feeds[i % len(feeds)])
            target = result["caffe"][name] if kind == "caffe" else result["variants"][name]
            target["times_ms"].append(after_idle)
            target["back_to_back_ms"].append(back_to_back)
            if position == len(rows) - 1 and (i == 0 or (i + 1) % 5 == 0):
                say(f"[baselines] round {i + 1} of {spec.repeats}")
    caffe_rows["dense"]()
    # Caffe and PyTorch share one OpenMP runtime when only one is mapped (torch's wheel names
    # libgomp.so.1, which the loader finds already loaded); ONNX Runtime has its own pool.
    result["openmp_runtimes"] = [p for p in measure.loaded_libraries()
                                 if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))]
    return result

