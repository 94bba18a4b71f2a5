"""Run stage: run things against a finished build (Caffe's own gtests; pycaffe in a subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..patching.build import Build
from ..patching.config import cache_dir, results_dir, user_path, writable_folder
from ..errors import UserError
from ..files import atomic_path, atomic_write_json
from ..inside.measure import AGREEMENT_TOLERANCE
from ..inside.protocol import RunSpec, WeightsRecord
from ..inside.rss_probe import SMALL_NET  # the memory task's own small synthetic net
from . import measurement
from .measurement import thread_env

# bench-layer's warm-up forwards per candidate (caches, the weights' CSR, thread pools).
LAYER_WARMUP = 5


# More threads than this many per core only measure the operating system's scheduler.
MAX_THREADS_PER_CORE = 4


def check_threads(threads: int, cores: int | None = None) -> int:
    """--threads as given (0: every core), checked: UserError for a negative count or more than
    MAX_THREADS_PER_CORE per core. Returns the count to use."""
    cores = cores or os.cpu_count() or 1
    if threads < 0:
        raise UserError(f"--threads must be at least 1 (or 0 for every core), got {threads}")
    if threads > MAX_THREADS_PER_CORE * cores:
        raise UserError(f"--threads {threads} on {cores} cores: more than {MAX_THREADS_PER_CORE} "
                        f"per core only measures the scheduler; use at most "
                        f"{MAX_THREADS_PER_CORE * cores} (default: {cores}, one per core)")
    return threads or cores


def warn_oversubscribed(threads: int, cores: int | None = None) -> None:
    """One line when threads share cores: timings then include waiting for a core."""
    cores = cores or os.cpu_count() or 1
    if threads > cores:
        print(f"warning: {threads} threads on {cores} cores: threads wait for each other, so the "
              "timings measure oversubscription too", file=sys.stderr)


def raise_for(result: subprocess.CompletedProcess, what: str) -> None:
    """One clear line for a failed pycaffe subprocess that prints its result (the sparsity report,
    the memory estimate): its own `error:` line, else the tail of its output."""
    if result.returncode == 0:
        return
    lines = (result.stderr or "").splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        raise UserError(errors[-1][len("error: "):])
    tail = "\n".join(lines[-8:])
    raise UserError(f"{what} failed (exit {result.returncode})" + (f":\n{tail}" if tail else ""))


def child_result(build: Build, module: str, spec: RunSpec, threads: int, what: str,
                 args: tuple = (), extra_env: dict | None = None) -> dict:
    """Run a pycaffe child that ends the protocol's way (check-baseline's plain loop, the memory
    probe) on `spec` in a scratch run folder; its result, or one line for its failure."""
    executor = measurement.LocalExecutor(build, threads, extra_env=extra_env, capture=True)
    with tempfile.TemporaryDirectory() as tmp:
        return measurement.run_child(executor, Path(tmp), spec, what, module, args)


# How far bench's dense whole forward may be from the plain loop's before the baseline is suspect.
BASELINE_TOLERANCE = 0.15


def check_baseline(build: Build, results: dict, forwards: int = 30) -> tuple[float, float]:
    """Time the dense whole forward of a run's net in a plain pycaffe loop (OMP_WAIT_POLICY=passive,
    same net, weights, images, batch, threads) and compare it with the run's dense median.
    Returns (bench's median, the plain loop's median); UserError beyond BASELINE_TOLERANCE."""
    params = results["params"]
    weights = Path(WeightsRecord.from_json(results["weights"]).path)
    if not weights.is_file():
        raise UserError(f"the run's weights {weights} are gone; re-run ./inv bench")
    images = params["images"]
    threads = int(params["threads"])
    spec = RunSpec(kind="net", net=params["net"], weights=str(weights), paths=["dense"],
                   backend=params["backend"], batch=params["batch"], threads=threads,
                   images=int(images) if isinstance(images, str) and images.isdigit() else images,
                   repeats=params["repeats"], warmup=params["warmup"], layers=params["layers"],
                   transform=params["transform"], cache_dir=str(cache_dir()))
    plain = child_result(build, "inside.plain_forward", spec, threads, "the plain pycaffe loop",
                         ("--forwards", str(forwards)),
                         extra_env={"OMP_WAIT_POLICY": "passive"})["median_ms"]
    bench = results["net"]["dense"]["stats"]["median"]
    if abs(bench - plain) / plain > BASELINE_TOLERANCE:
        raise UserError(f"bench's dense whole forward ({bench:.2f} ms) is {bench / plain:.2f}x the "
                        f"plain loop's ({plain:.2f} ms, OMP_WAIT_POLICY=passive): the baseline is "
                        "suspect (a busy machine, or thread pools fighting); re-run on a quiet machine")
    return bench, plain


def sparsity_report_target(net: str, json_path: str | None) -> Path:
    """Where ./inv inspect writes its JSON, checked writable before anything runs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = (user_path(json_path) if json_path
              else results_dir() / "inspect" / f"{net}-{stamp}.json")
    if target.is_dir():
        raise UserError(f"--json {target} is a folder; give a file name")
    writable_folder(target.parent, "the folder for --json" if json_path
                    else "the results folder (SPARSE_CAFFE_RESULTS)")
    return target


def sparsity_report(build: Build, net: str, weights: str, images: str | None, batch: int,
            target: Path) -> Path:
    """Run sparse_caffe.inside.sparsity against a build; its JSON is written to `target` when complete."""
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    spec = RunSpec(kind="net", net=net, weights=weights, batch=batch,
                   images=int(images) if images and images.isdigit() else images,
                   cache_dir=str(cache_dir()))
    executor = measurement.LocalExecutor(build, os.cpu_count() or 1)
    with atomic_path(target) as partial, tempfile.TemporaryDirectory() as tmp:
        measurement.run_child(executor, Path(tmp), spec, "the sparsity report", "inside.sparsity",
                              ("--json", str(partial)), expect_result=False)
    return target


# Peak resident memory of a sparse path may exceed dense's by this much (issue 14's bound).
MEMORY_TOLERANCE = 1.2


def memory(build: Build, net: str, weights: str, batch: int, paths: list[str], forwards: int,
           threads: int, layers: str | None = None) -> tuple[dict, Path]:
    """Peak and steady resident memory of the whole net on each path, each in a fresh pycaffe
    process (see sparse_caffe.inside.rss_probe); written to results/memory/<net>-b<batch>-<time>.json.
    net may be rss_probe.SMALL_NET, the probe's own small synthetic net (for long leak checks)."""
    if forwards < 1 or batch < 1:
        raise UserError("--forwards and --batch must be at least 1")
    out_dir = writable_folder(results_dir() / "memory", "the results folder (SPARSE_CAFFE_RESULTS)")
    if net == SMALL_NET:
        weights = "synthetic"  # its weights are always the probe's seeded synthetic ones
    spec = RunSpec(kind="net", net=net, weights=weights, batch=batch, threads=threads,
                   layers=layers, transform="fold", cache_dir=str(cache_dir()))
    measured = {path: child_result(build, "inside.rss_probe", spec, threads,
                                   f"the memory probe on {path}",
                                   ("--path", path, "--forwards", str(forwards)))
                for path in paths}
    dense = measured[paths[0]]["after_forwards"]["peak_mib"]
    for entry in measured.values():
        entry["peak_vs_dense"] = entry["after_forwards"]["peak_mib"] / dense
        entry["forward_peak_mib"] = (entry["after_forwards"]["peak_mib"]
                                     - entry["before_forward"]["rss_mib"])
        entry["growth_after_warmup_mib"] = (entry["after_forwards"]["rss_mib"]
                                            - entry["after_warmup"]["rss_mib"])
    record = {"net": net, "weights": weights, "batch": batch, "threads": threads,
              "forwards": forwards, "layers": layers, "tolerance": MEMORY_TOLERANCE,
              "paths": measured}
    target = out_dir / f"{net}-b{batch}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(target, record, indent=1)
    return record, target


def bench_layer_check(shape: str, threads: int, weight_zeros: float, input_zeros: float,
                      repeats: int) -> int:
    """./inv bench-layer's options, checked before anything is built; returns the threads."""
    from ..inside.layer_bench import SHAPES
    if shape not in SHAPES:
        raise UserError(f"unknown --shape {shape!r}: choose from {', '.join(sorted(SHAPES))}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    for option, value in (("--weight-zeros", weight_zeros), ("--input-zeros", input_zeros)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{option} is a fraction of zeros, from 0 up to (not including) 1; "
                            f"got {value}")
    threads = check_threads(threads)
    writable_folder(results_dir() / "layer-bench", "the results folder (SPARSE_CAFFE_RESULTS)")
    return threads


def bench_layer(build: Build, shape: str, threads: int, weight_zeros: float, input_zeros: float,
                repeats: int) -> Path:
    """./inv bench-layer: one synthetic layer measured through the one measurement entry point
    (a "layer" RunSpec in the build's pycaffe); prints its table and writes its JSON to
    results/layer-bench/, unless a path disagreed with dense (then one line, and no file)."""
    threads = bench_layer_check(shape, threads, weight_zeros, input_zeros, repeats)
    warn_oversubscribed(threads)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = writable_folder(results_dir() / "layer-bench",
                              "the results folder (SPARSE_CAFFE_RESULTS)")
    target = out_dir / f"{shape}-{build.inputs['blas']}-t{threads}-{stamp}.json"
    spec = RunSpec(kind="layer", shape=shape, threads=threads, weight_zeros=weight_zeros,
                   input_zeros=input_zeros, repeats=repeats, warmup=LAYER_WARMUP)
    with tempfile.TemporaryDirectory() as tmp:
        raw = measurement.measure(spec, measurement.LocalExecutor(build, threads), Path(tmp),
                                  "the layer benchmark")
    record = raw.layer
    print(measurement.layer_table(record))
    differ = [f"{r['path']}/{r['backend']}" for r in record["results"]
              if r["max_rel_diff"] > AGREEMENT_TOLERANCE]
    if differ:
        raise UserError(f"{', '.join(differ)} differed from dense on {shape} (see the table); "
                        "no result written")
    atomic_write_json(target, record, indent=2)
    return target


@dataclass(frozen=True)
class GtestCase:
    suite: str
    name: str
    passed: bool
    seconds: float
    message: str


def run_gtests(build: Build, gtest_filter: str = "-*GPU*", threads: int = 1,
               timeout: float = 900) -> tuple[list[GtestCase], str]:
    """Run Caffe's test binary from the source root (its tests read files relative to it).

    Returns every case from gtest's XML report, and the console output for diagnosis.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "gtest.xml"
        env = {**os.environ, **thread_env(threads), "GLOG_minloglevel": "2"}
        result = subprocess.run(
            [str(build.gtest_binary), f"--gtest_filter={gtest_filter}", f"--gtest_output=xml:{report}"],
            cwd=build.source, env=env, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
        if not report.is_file():
            raise RuntimeError(f"gtest wrote no report (exit {result.returncode}):\n{output[-3000:]}")
        cases = []
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.get("status") == "notrun":  # filtered out: gtest still lists it
                continue
            failures = [f.get("message", "") for f in case.findall("failure")]
            cases.append(GtestCase(suite=case.get("classname", ""), name=case.get("name", ""),
                                   passed=not failures,
                                   seconds=float(case.get("time", "0") or 0),
                                   message="\n".join(failures)))
    return cases, output
