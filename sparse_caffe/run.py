"""Run stage: run things against a finished build (Caffe's own gtests; pycaffe in a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .build import Build
from .config import PROJECT_ROOT, cache_dir, results_dir
from .errors import UserError


def thread_env(threads: int) -> dict:
    """One thread count for OpenMP, OpenBLAS and MKL, so every path gets the same cores."""
    value = str(threads)
    return {"OMP_NUM_THREADS": value, "OPENBLAS_NUM_THREADS": value, "MKL_NUM_THREADS": value}


def pycaffe(build: Build, module: str, args: list[str], threads: int,
            capture_stderr: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m sparse_caffe.<module> args` with the build's pycaffe and `threads` threads."""
    env = build.env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(PROJECT_ROOT)])
    env.update(thread_env(threads))
    return subprocess.run([sys.executable, "-m", f"sparse_caffe.{module}", *args], env=env,
                          stderr=subprocess.PIPE if capture_stderr else None, text=True)


def raise_for(result: subprocess.CompletedProcess, what: str, error_file: Path | None = None) -> None:
    """One clear line for a failed pycaffe subprocess: its own error message (from error_file or
    an `error:` line), else the tail of its output."""
    if result.returncode == 0:
        return
    if error_file is not None and error_file.is_file():
        raise UserError(error_file.read_text().strip())
    lines = (result.stderr or "").splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        raise UserError(errors[-1][len("error: "):])
    tail = "\n".join(lines[-8:])
    raise UserError(f"{what} failed (exit {result.returncode})" + (f":\n{tail}" if tail else ""))


# How far bench's dense whole forward may be from the plain loop's before the baseline is suspect.
BASELINE_TOLERANCE = 0.15


def check_baseline(build: Build, results: dict, forwards: int = 30) -> tuple[float, float]:
    """Time the dense whole forward of a run's net in a plain pycaffe loop (OMP_WAIT_POLICY=passive,
    same net, weights, images, batch, threads) and compare it with the run's dense median.
    Returns (bench's median, the plain loop's median); UserError beyond BASELINE_TOLERANCE."""
    params = results["params"]
    weights = Path(results["weights"]["path"])
    if not weights.is_file():
        raise UserError(f"the run's weights {weights} are gone; re-run ./inv bench")
    images = params["images"]
    spec = {**params, "paths": ["dense"], "weights": str(weights),
            "images": int(images) if isinstance(images, str) and images.isdigit() else images,
            "cache_dir": str(cache_dir())}
    threads = int(params["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        env = {**build.env(), **thread_env(threads), "OMP_WAIT_POLICY": "passive"}
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(PROJECT_ROOT)])
        result = subprocess.run([sys.executable, "-m", "sparse_caffe.plain_forward", str(spec_file),
                                 "--forwards", str(forwards)], env=env, capture_output=True,
                                text=True)
    raise_for(result, "the plain pycaffe loop")
    plain = json.loads(result.stdout.strip().splitlines()[-1])["median_ms"]
    bench = results["net"]["dense"]["stats"]["median"]
    if abs(bench - plain) / plain > BASELINE_TOLERANCE:
        raise UserError(f"bench's dense whole forward ({bench:.2f} ms) is {bench / plain:.2f}x the "
                        f"plain loop's ({plain:.2f} ms, OMP_WAIT_POLICY=passive): the baseline is "
                        "suspect (a busy machine, or thread pools fighting); re-run on a quiet machine")
    return bench, plain


def inspect(build: Build, net: str, weights: str, images: str | None, batch: int,
            json_path: str | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = Path(json_path) if json_path else results_dir() / "inspect" / f"{net}-{stamp}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    args = ["--net", net, "--weights", weights, "--batch", str(batch), "--json", str(partial)]
    if images:
        args += ["--images", images]
    try:
        result = pycaffe(build, "inspect", args, os.cpu_count() or 1, capture_stderr=True)
        if result.stderr:
            sys.stderr.write("".join(ln + "\n" for ln in result.stderr.splitlines()
                                     if not ln.startswith("error:")))
        raise_for(result, "the sparsity report")
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def bench_layer(build: Build, shape: str, threads: int, weight_zeros: float, input_zeros: float,
                repeats: int) -> Path:
    """Run sparse_caffe.layer_bench against a build; its JSON lands in results/layer-bench/."""
    if repeats < 1:
        raise UserError("--repeats must be at least 1")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = results_dir() / "layer-bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{shape}-{build.inputs['blas']}-t{threads}-{stamp}.json"
    partial = target.with_suffix(".partial")
    result = pycaffe(build, "layer_bench", ["--shape", shape, "--weight-zeros", str(weight_zeros),
                                            "--input-zeros", str(input_zeros), "--repeats",
                                            str(repeats), "--json", str(partial)], threads)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise UserError("the layer benchmark failed or a path disagreed with dense (see above)")
    partial.rename(target)
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
