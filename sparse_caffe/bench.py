"""Benchmark stage: `./inv bench`. Validate, build, run the measurement in pycaffe, write the run.

Each run writes a new folder results/<net>-<weights>-<timestamp>/ (results.json, results.csv,
plots). It is assembled under a hidden temporary name and renamed into place only when complete,
so a failed or interrupted run leaves nothing behind.

With an image of the Docker route, the run is prepared here (the native pycaffe builds the net,
its weights and the images) and timed in a container of the image (sparse_caffe.docker_route);
the rest is the same.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import docker_route, machine, measure, nets, render, report
from . import run as run_stage
from .build import Build
from .config import CAFFE, CONV_TEMPLATE_CONFIG, PROJECT_ROOT, BuildOptions, cache_dir, results_dir
from .errors import UserError

PATHS = CONV_TEMPLATE_CONFIG.forward_paths  # the paths the build has, dense first
BACKENDS = ("openmp", "mkl")
TRANSFORMS = ("fold", "none")


@dataclass(frozen=True)
class BenchOptions:
    net: str
    weights: str = "auto"  # auto (SkimCaffe if cached, else synthetic) | skimcaffe | synthetic | PATH
    paths: tuple[str, ...] = PATHS
    backend: str = "openmp"
    batch: int = 1
    threads: int = 0  # 0: every core
    images: str | int | None = None  # None: shipped photographs; N: the first N; a folder
    repeats: int = 20
    warmup: int = 3
    layers: str | None = None
    transform: str = "fold"
    pytorch: bool = False  # also time each layer in PyTorch's CPU convolution (installed on demand)

    def __post_init__(self) -> None:
        nets.net_info(self.net)  # UserError for an unknown net
        unknown = [p for p in self.paths if p not in PATHS]
        if unknown or not self.paths:
            raise UserError(f"unknown path {', '.join(unknown) or '(none)'}: choose from {', '.join(PATHS)}")
        if self.paths[0] != "dense":
            raise UserError("--paths must start with dense: every ratio is measured against it")
        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r}: choose openmp or mkl")
        if self.transform not in TRANSFORMS:
            raise UserError(f"unknown transform {self.transform!r}: choose fold or none")
        for name in ("batch", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise UserError("--warmup and --threads cannot be negative")
        if self.layers:
            try:
                re.compile(self.layers)
            except re.error as exc:
                raise UserError(f"--layers {self.layers!r} is not a regular expression: {exc}") from None
        if isinstance(self.images, str) and not self.images.isdigit() and not Path(self.images).is_dir():
            raise UserError(f"--images {self.images}: no such folder (give a folder of images or a count)")

    @property
    def image_source(self):
        if isinstance(self.images, str) and self.images.isdigit():
            return int(self.images)
        return self.images


def parse_paths(text: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    return paths if paths and paths[0] == "dense" else ("dense", *paths)


def warn_if_busy(threads: int) -> tuple[float, float, float]:
    """Other work on the cores makes multi-threaded timings erratic (a thread that loses its core
    stalls every barrier): say so before measuring, and record the load in the results."""
    load = os.getloadavg()
    if load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f} before measuring: other processes are using "
              f"the CPU; with {threads} threads the timings will be noisy", file=sys.stderr)
    return load


def project_info() -> dict:
    def git(*args):
        result = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None
    return {"project_commit": git("rev-parse", "HEAD"),
            "project_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def software_info(build: Build) -> dict:
    inputs = build.inputs
    return {**project_info(),
            "caffe_commit": CAFFE.commit, "caffe_source": inputs["source"],
            "patch_series_sha256": render.series_sha256(), "blas": inputs["blas"],
            "mkl": inputs.get("mkl"), "compiler": f"g++ {inputs['compiler']}",
            "python": inputs["python"], "build": str(build.root)}


TORCH_REQUIREMENT = "torch==2.13.0"  # CPU build; the side-by-side baseline only


def ensure_torch() -> None:
    """Install PyTorch into the project's environment the first time the baseline is asked for."""
    if subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0:
        return
    print(f"installing {TORCH_REQUIREMENT} (CPU) for the PyTorch baseline ...", file=sys.stderr)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", TORCH_REQUIREMENT],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"could not install {TORCH_REQUIREMENT} for --pytorch: "
                        f"{(result.stderr.strip().splitlines() or ['pip failed'])[-1]}")


def docker_image(options: BenchOptions, build_options: BuildOptions) -> docker_route.Image:
    """The image a --docker run is timed in (--blas picks it), checked before anything runs."""
    check_docker(options, build_options.blas)
    return docker_route.find_image(build_options.blas)


def check_docker(options: BenchOptions, blas: str) -> None:
    """What a containerised run cannot do, refused before anything runs."""
    if options.pytorch:
        raise UserError("--pytorch does not work with --docker (the image's Python 3.6 has no "
                        "PyTorch): run the baseline natively, without --docker")
    if options.backend == "mkl" and blas != "mkl":
        raise UserError("--backend mkl needs an MKL image: add --blas mkl")


def measure_in_docker(build: Build, image: docker_route.Image, partial: Path,
                      threads: int) -> dict:
    """Prepare the run with the native pycaffe, time it in a container of `image`; leaves
    partial/raw.json as a native run does and returns the software record."""
    folder = partial / "docker-run"
    folder.mkdir()
    result = run_stage.pycaffe(build, "bench_runner", ["--export", str(partial / "spec.json"),
                                                       str(folder)], threads)
    run_stage.raise_for(result, "preparing the run for the container",
                        folder.with_suffix(".error"))
    docker_route.run_measurement(image, folder, threads)
    if not (folder / measure.RAW_FILE).is_file():
        raise UserError(f"the benchmark container exited without writing {measure.RAW_FILE}")
    (folder / measure.RAW_FILE).rename(partial / "raw.json")
    shutil.rmtree(folder)
    environment = json.loads((partial / "raw.json").read_text())["environment"]
    return {**project_info(), **docker_route.software_info(image, environment)}


def run_benchmark(build: Build, options: BenchOptions,
                  image: docker_route.Image | None = None) -> Path:
    """Run the benchmark (natively, or timed in a container of `image`) into a new folder."""
    if image is not None:
        check_docker(options, image.blas)
    elif options.backend == "mkl" and build.inputs["blas"] != "mkl":
        raise UserError("--backend mkl needs an MKL build: add --blas mkl")
    if options.pytorch:
        ensure_torch()
    threads = options.threads or os.cpu_count() or 1
    load_before = warn_if_busy(threads)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir().mkdir(parents=True, exist_ok=True)
    partial = results_dir() / f".partial-{options.net}-{stamp}-{os.getpid()}"
    partial.mkdir()
    try:
        spec = {**asdict(options), "images": options.image_source, "cache_dir": str(cache_dir())}
        (partial / "spec.json").write_text(json.dumps(spec))
        # Progress goes straight to the terminal; errors come back as one line.
        if image is None:
            result = run_stage.pycaffe(build, "bench_runner", [str(partial / "spec.json"),
                                                               str(partial / "raw.json")], threads)
            run_stage.raise_for(result, "the benchmark process", partial / "raw.error")
            software = software_info(build)
        else:
            software = measure_in_docker(build, image, partial, threads)
        raw = json.loads((partial / "raw.json").read_text())
        layers, net, problems = report.derive(raw, options.batch)
        weights = raw["weights"]
        results = {
            "schema": report.SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine_info": machine.machine_info(threads, load_before),
            "software": {**software, "sparse_backends": raw["backends_in_build"]},
            "weights": weights,
            "images": raw["images"],
            "params": {**asdict(options), "paths": list(options.paths), "threads": threads,
                       "warmup_note": "warm-up forwards are run first and not measured",
                       "timing_note": "per-layer times: sum of the layer's phase timers over "
                                      "profiled forwards; whole-net times: separate unprofiled "
                                      "forwards (wall clock)"},
            "agreement_tolerance": raw["agreement_tolerance"],
            "layers": layers,
            "net": net,
            "problems": problems,
        }
        (partial / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        report.write_csv(results, partial / "results.csv")
        report.plot(results, partial)
        (partial / "spec.json").unlink()
        (partial / "raw.json").unlink()
        kind = weights["kind"]
        final = results_dir() / f"{options.net}-{kind}-{stamp}"
        suffix = 1
        while final.exists():  # never overwrite an earlier run
            suffix += 1
            final = results_dir() / f"{options.net}-{kind}-{stamp}-{suffix}"
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    print(report.table(results))
    return final
