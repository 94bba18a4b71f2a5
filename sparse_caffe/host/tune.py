"""Tune stage: `./inv tune`. Measure a net on every forward path (bench's interleaved rounds),
keep each convolution's and InnerProduct layer's choice in a JSON plan keyed by everything the
choice depends on, and write the deploy prototxt (forward_path set per layer) with its weights,
so plain pycaffe, Caffe's C++ API or Caffe's `caffe` tool run the tuned net.

A plan whose key no longer matches (another machine, build, weights, threads, batch or layer
shape) is refused with one line naming the first key that differs; --retune measures again.
The plan, the prototxt and the weights are written under partial names and renamed into place
only when all three are complete.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import machine
from . import bench, measurement
from . import run as run_stage
from ..inside.protocol import RunSpec, WeightsRecord
from ..patching.build import Build
from ..patching.config import cache_dir, results_dir, user_path, writable_folder
from ..errors import UserError
from ..files import atomic_write_text
from ..models.weights import license_beside

SCHEMA = 2  # 2: choices are the auto path's, each with its "candidate" name
KIND = "sparse-caffe tune plan"
# The plan's key, in the order a mismatch is looked for (and named): the machine, the build,
# the weights, the run's shape, then each tuned layer.
KEY_ORDER = ("net", "transform", "cpu", "simd_flags", "direct_isa", "blas", "mkl", "blas_runtime",
             "caffe_source", "patch_series_sha256", "compiler", "weights_sha256", "threads",
             "batch", "layers")
OVERRIDES = ("SPARSE_CAFFE_FORWARD_PATH", "SPARSE_CAFFE_SPARSE_BACKEND", "SPARSE_CAFFE_FC_PATH")


@dataclass(frozen=True)
class TuneOptions:
    net: str
    weights: str = "auto"
    threads: int = 0
    batch: int = 1
    repeats: int = 20
    warmup: int = 3
    images: str | None = None  # as for bench: None (the shipped photographs), a count, a folder

    def bench_options(self) -> bench.BenchOptions:
        """The same run as ./inv bench would make (validates every option), all paths."""
        return bench.BenchOptions(net=self.net, weights=self.weights, batch=self.batch,
                                  threads=self.threads, repeats=self.repeats, warmup=self.warmup,
                                  images=self.images)


def whole_number(option: str, text: str | int | None, default: int) -> int:
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{option} {text}: expected a whole number; see ./inv --help tune") from None


def options_from(net: str | None, weights: str | None, threads: str | None, batch: str | None,
                 repeats: int, warmup: int, images: str | None = None,
                 plan: dict | None = None) -> TuneOptions:
    """The run's options as given; with `plan` (--check), what is not given is the plan's."""
    check_environment()
    recorded = plan["key"] if plan else {}
    net = net or recorded.get("net")
    if not net:
        raise UserError("--net is required: caffenet, resnet50 or resnet50-1by2")
    given = weights or (plan["params"]["weights"] if plan else "auto")
    return TuneOptions(net=net, weights=bench.user_weights(given),
                       threads=whole_number("--threads", threads, recorded.get("threads", 0)),
                       batch=whole_number("--batch", batch, recorded.get("batch", 1)),
                       repeats=repeats, warmup=warmup, images=bench.user_images(images))


def default_plan(options: TuneOptions, threads: int) -> Path:
    """results/plans/<net>-<weights>-<threads>t-b<batch>.json (weights: the keyword or the
    file's name)."""
    label = options.weights if options.weights in bench.WEIGHT_KEYWORDS else Path(options.weights).stem
    return results_dir() / "plans" / f"{options.net}-{label}-{threads}t-b{options.batch}.json"


def deploy_paths(plan: Path, prototxt: str | None) -> tuple[Path, Path]:
    """The deploy prototxt (--prototxt, else next to the plan) and its weights beside it."""
    target = user_path(prototxt) if prototxt else plan.with_suffix(".prototxt")
    if target.is_dir():
        raise UserError(f"--prototxt {target} is a folder; give a file name")
    return target, target.with_suffix(".caffemodel")


def check_environment() -> None:
    """Process-wide overrides beat a layer's own choice: with one set, tune measures nothing."""
    found = [name for name in OVERRIDES if os.environ.get(name)]
    if found:
        raise UserError(f"{found[0]} is set: it overrides every layer's path, so neither tune nor "
                        f"the tuned prototxt could choose per layer; unset it (unset {found[0]})")


def spec_for(options: TuneOptions, threads: int, **outputs) -> RunSpec:
    """The tune runner's RunSpec: bench's run of these options (all paths, tune_runner keeps
    what the auto path chooses); with `outputs` (prototxt_out, caffemodel_out, prototxt_header)
    a "tune" spec that writes the deploy files, without them a "net" spec for the key only."""
    return options.bench_options().run_spec(threads, kind="tune" if outputs else "net",
                                             **outputs)


def pycaffe_run(build: Build, spec: RunSpec, threads: int, key_only: bool, folder: Path) -> dict:
    """Run sparse_caffe.inside.tune_runner on `spec` in the run folder `folder`; its result, or
    one line for its failure."""
    executor = measurement.LocalExecutor(build, threads, capture=key_only)
    return measurement.run_child(executor, folder, spec, "the tune process", "inside.tune_runner",
                                 ("--key-only",) if key_only else ())


def plan_key(build: Build, facts: dict, options: TuneOptions, threads: int) -> dict:
    """The plan's key from the runner's facts (weights, BLAS runtime, direct ISA, layer shapes)
    and the records results.json keeps (machine_info, software_info): one home per fact."""
    machine_facts = machine.machine_info(threads, os.getloadavg())
    software = bench.software_info(build)
    runtime = facts["blas_runtime"]
    weights = WeightsRecord.from_json(facts["weights"])
    key = {"net": options.net, "transform": "fold", "cpu": machine_facts["cpu"],
           "simd_flags": machine_facts["simd_flags"], "direct_isa": facts["direct_isa"],
           "blas": software["blas"], "mkl": software["mkl"],
           "blas_runtime": {k: runtime.get(k) for k in ("name", "library", "threading", "config",
                                                         "openmp_runtimes")},
           "caffe_source": software["caffe_source"],
           "patch_series_sha256": software["patch_series_sha256"],
           "compiler": software["compiler"], "weights_sha256": weights.sha256,
           "threads": threads, "batch": options.batch, "layers": facts["layers"]}
    return json.loads(json.dumps(key))  # as it reads back from the file


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 70 else text[:67] + "..."


def first_mismatch(planned: dict, current: dict) -> tuple[str, object, object] | None:
    """The first key (in KEY_ORDER; for layers, the first layer) whose value differs."""
    for name in KEY_ORDER:
        old, new = planned.get(name), current.get(name)
        if name == "layers" and isinstance(old, dict) and isinstance(new, dict):
            for layer in list(new) + [n for n in old if n not in new]:
                if old.get(layer) != new.get(layer):
                    return f"layer {layer}", old.get(layer, "absent"), new.get(layer, "absent")
        elif old != new:
            return name, old, new
    return None


def load_plan(path: Path) -> dict:
    """A plan written by ./inv tune, or one line saying what is wrong with the file."""
    if not path.is_file():
        raise UserError(f"{path}: no such plan file; write one with ./inv tune --net NET")
    try:
        plan = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a tune plan (not JSON); write one with ./inv tune") from None
    if not isinstance(plan, dict) or plan.get("kind") != KIND or not isinstance(plan.get("key"), dict):
        raise UserError(f"{path} is not a tune plan; write one with ./inv tune")
    if plan.get("schema") != SCHEMA:
        raise UserError(f"{path} is a plan of schema {plan.get('schema')}, this version reads "
                        f"schema {SCHEMA}: re-run ./inv tune --retune to write it again")
    return plan


def retune_command(options: TuneOptions, plan: Path) -> str:
    parts = ["./inv tune", f"--net {options.net}"]
    if options.weights != "auto":
        parts.append(f"--weights {options.weights}")
    parts += [f"--threads {options.threads}" if options.threads else "",
              f"--batch {options.batch}" if options.batch != 1 else "", f"--out {plan}", "--retune"]
    return " ".join(p for p in parts if p)


def check_plan(build: Build, plan_path: Path, options: TuneOptions, threads: int,
               folder: Path) -> dict:
    """The plan at plan_path if its key matches this machine, build, weights, threads, batch and
    net; else UserError naming the first key that differs."""
    plan = load_plan(plan_path)
    facts = pycaffe_run(build, spec_for(options, threads), threads, True, folder)
    mismatch = first_mismatch(plan["key"], plan_key(build, facts, options, threads))
    if mismatch:
        name, old, new = mismatch
        raise UserError(f"{plan_path} is stale: {name} differs (plan: {_short(old)}, now: "
                        f"{_short(new)}); re-tune with {retune_command(options, plan_path)}")
    gone = [path for path in plan["deploy"].values() if isinstance(path, str)
            and not Path(path).is_file()]
    if gone:
        raise UserError(f"{plan_path}: its deploy file {gone[0]} is gone; write it again with "
                        f"{retune_command(options, plan_path)}")
    return plan


def caffe_time_command(build: Build, plan: dict) -> str:
    """Caffe's own tool on the tuned net, with the plan's threads."""
    deploy = plan["deploy"]
    return (f"OMP_NUM_THREADS={plan['key']['threads']} {build.caffe_tool} time -model "
            f"{deploy['prototxt']} -weights {deploy['weights']} -iterations 10")


def summary(plan: dict) -> str:
    """The choices, one line per layer off dense, and the whole net against dense."""
    lines = []
    off = {n: c for n, c in plan["layers"].items() if c["path"] != "dense"}
    for name, choice in off.items():
        dense, chosen = choice["candidates"]["dense"], choice["candidates"][choice["candidate"]]
        lines.append(f"  {name:<22}{choice['candidate']:<15}{chosen:8.3f} ms  dense {dense:8.3f} ms  "
                     f"{dense / chosen:5.2f}x")
    whole = plan["whole_net"]
    plan_ms, dense_ms = statistics.median(whole["plan_ms"]), statistics.median(whole["dense_ms"])
    lines.append(f"{len(off)} of {len(plan['layers'])} layers off dense; the whole net as "
                 f"planned {plan_ms:.1f} ms against dense {dense_ms:.1f} ms in alternating rounds "
                 f"({dense_ms / plan_ms:.2f}x), top-1 agreement with dense "
                 f"{whole['top1_agreement']:.0%}")
    load = plan["load_average"]["before"][0]
    if load > 0.5:
        lines.append(f"measured at load average {load:.2f}: other processes used the CPU, so "
                     "these times and choices are noisy; re-tune on a quiet machine (--retune)")
    return "\n".join(lines)


def tune(build: Build, options: TuneOptions, out: str | None = None, prototxt: str | None = None,
         retune: bool = False) -> Path:
    """Measure and write the plan (and deploy files), or, when the plan exists and --retune is
    not given, check it: a current plan is kept, a stale one refused."""
    check_environment()
    options.bench_options()
    threads = run_stage.check_threads(options.threads)
    plan_path = user_path(out) if out else default_plan(options, threads)
    if plan_path.is_dir():
        raise UserError(f"--out {plan_path} is a folder; give a file name")
    writable_folder(plan_path.parent, "the plan's folder" if out else
                    "the results folder (SPARSE_CAFFE_RESULTS)")
    prototxt_path, weights_path = deploy_paths(plan_path, prototxt)
    writable_folder(prototxt_path.parent, "the folder for --prototxt")
    with scratch_folder() as folder:
        plan = measure_or_check(build, options, threads, (weights_path, prototxt_path, plan_path),
                                retune, folder)
    if plan is None:
        return plan_path
    print(summary(plan))
    print(f"deploy prototxt: {prototxt_path}\nits weights: {weights_path}")
    print(caffe_time_command(build, plan))
    return plan_path


@contextmanager
def scratch_folder():
    """A private folder in the cache for the runner's spec and answer, removed afterwards."""
    folder = writable_folder(cache_dir() / "tmp", "the cache folder") / \
        f"tune-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    try:
        yield folder
    finally:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


def measure_or_check(build: Build, options: TuneOptions, threads: int,
                     targets: tuple[Path, Path, Path], retune: bool, folder: Path) -> dict | None:
    """With a plan at targets[2] and no --retune: check it (None if current). Else measure and
    write the deploy weights, the deploy prototxt and the plan (`targets`), under partial names
    renamed into place at the end, and return the plan."""
    weights_path, prototxt_path, plan_path = targets
    partials = [p.with_name(f".{p.name}.partial-{os.getpid()}") for p in targets]
    try:
        if plan_path.exists() and not retune:
            plan = check_plan(build, plan_path, options, threads, folder)
            print(f"{plan_path} is current (tuned {plan['created']}); --retune measures again",
                  file=sys.stderr)
            print(summary(plan))
            print(caffe_time_command(build, plan))
            return None
        bench.check_memory(build, options.bench_options(), threads)
        run_stage.warn_oversubscribed(threads)
        load_before = bench.warn_if_busy(threads)
        spec = spec_for(options, threads, caffemodel_out=str(partials[0]),
                        prototxt_out=str(partials[1]),
                        prototxt_header=f"Tuned by ./inv tune ({time.strftime('%Y-%m-%d %H:%M')}): "
                                        f"plan {plan_path}\nforward_path per layer as in the plan; "
                                        f"weights: {weights_path.name} (BatchNorm folded, ReLU "
                                        "fused)")
        raw = pycaffe_run(build, spec, threads, False, folder)
        key = plan_key(build, raw, options, threads)
        plan = {
            "kind": KIND, "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "key": key,
            "layers": {name: {"type": key["layers"][name]["type"], **choice}
                       for name, choice in raw["choices"].items()},
            "rule": "per layer the auto path's choice: its cost model prunes hopeless "
                    "candidates, the rest are timed in interleaved calibration rounds; dense "
                    "unless a candidate's median is clearly faster (see caffe.auto_choices)",
            "deploy": {"prototxt": str(prototxt_path), "weights": str(weights_path),
                       "max_rel_diff_from_dense": raw["deploy_max_rel_diff"]},
            "weights": raw["weights"], "images": raw["images"],
            "whole_net": raw["whole_net"], "top1_agreement": raw["top1_agreement"],
            "params": {"repeats": options.repeats, "warmup": options.warmup,
                       "weights": options.weights, "images": options.images},
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
            "software": bench.software_info(build),
        }
        partials[2].write_text(json.dumps(plan, indent=1) + "\n")
        licence = WeightsRecord.from_json(plan["weights"]).license
        if licence:  # the weights' licence travels with weights made from them
            atomic_write_text(license_beside(weights_path), Path(licence).read_text())
        for partial, final in zip(partials, targets):
            partial.rename(final)
    except BaseException:
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise
    return plan


def check(build: Build, plan_file: str, options: TuneOptions) -> str:
    """./inv tune --check PLAN: one line saying the plan matches, or UserError naming the first
    key that differs."""
    check_environment()
    threads = run_stage.check_threads(options.threads)
    plan_path = user_path(plan_file)
    with scratch_folder() as folder:
        plan = check_plan(build, plan_path, options, threads, folder)
    return (f"{plan_path} matches this machine, build and weights ({options.net}, {threads} "
            f"threads, batch {options.batch}); deploy prototxt: {plan['deploy']['prototxt']}")
