"""Benchmark stage: `./inv bench`. Validate, build, run the measurement in pycaffe, write the run.

Each run writes a new folder results/<net>-<weights>-<timestamp>/ (results.json, results.csv,
plots). It is assembled under a hidden temporary name and renamed into place only when complete,
so a failed or interrupted run leaves nothing behind.

The raw result comes from the one measurement entry point, sparse_caffe.host.measurement.measure,
with a local pycaffe executor, or with the container executor of the Docker route (the whole
run, preparation included, in a container of the image: no native build needed); the rest is the
same.
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

from .. import machine
from . import docker_route, measurement, report
from ..inside.protocol import WEIGHT_KEYWORDS, RunSpec
from ..models import memory, nets
from ..patching import series
from . import run as run_stage
from ..patching.build import Build
from ..patching.requirements import requirement
from ..patching.config import (CAFFE, CONV_TEMPLATE_CONFIG, PATCHES_DIR, PROJECT_ROOT, BuildOptions,
                               cache_dir, results_dir, user_path, writable_folder)
from ..errors import UserError

# The paths the build has, dense first, then auto (each layer on the path its calibration chose).
PATHS = CONV_TEMPLATE_CONFIG.selectable_paths
AUTO_PATH = CONV_TEMPLATE_CONFIG.auto_path
BACKENDS = CONV_TEMPLATE_CONFIG.sparse_backends
TRANSFORMS = ("fold", "none")
FC_PATHS = CONV_TEMPLATE_CONFIG.fc_forward_paths


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
    fc_path: str = "sparse"  # InnerProduct layers under every path but dense
    # The baselines users would pick instead (torch installed on demand): each layer in PyTorch's
    # CPU convolution, the whole net in PyTorch and in ONNX Runtime (sparse_caffe.inside.baselines).
    pytorch: bool = False

    def __post_init__(self) -> None:
        nets.net_info(self.net)  # UserError for an unknown net
        check_paths(self.paths)
        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r}: choose {' or '.join(BACKENDS)}")
        if self.fc_path not in FC_PATHS:
            raise UserError(f"unknown --fc-path {self.fc_path!r}: choose {' or '.join(FC_PATHS)}")
        if self.transform not in TRANSFORMS:
            raise UserError(f"unknown transform {self.transform!r}: choose fold or none")
        for name in ("batch", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise UserError(f"--warmup cannot be negative, got {self.warmup}")
        run_stage.check_threads(self.threads)
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

    def run_spec(self, threads: int, kind: str = "net", **more) -> RunSpec:
        """These options as the child reads them: a RunSpec of `kind` for `threads` threads."""
        return RunSpec(kind=kind, net=self.net, weights=self.weights, paths=self.paths,
                       backend=self.backend, batch=self.batch, threads=threads,
                       images=self.image_source, repeats=self.repeats, warmup=self.warmup,
                       layers=self.layers, transform=self.transform, fc_path=self.fc_path,
                       pytorch=self.pytorch, cache_dir=str(cache_dir()), auto_path=AUTO_PATH,
                       **more)


def user_weights(text: str) -> str:
    """--weights as the runner takes it: a keyword, or a file's absolute path (a relative one is
    taken from where the user ran ./inv)."""
    return text if text in WEIGHT_KEYWORDS else str(user_path(text))


def user_images(text: str | int | None) -> str | None:
    """--images as the runner takes it: None, a count, or a folder's absolute path."""
    if text is None or isinstance(text, int) or str(text).isdigit():
        return None if text is None else str(text)
    return str(user_path(text))


def check_paths(paths: tuple[str, ...]) -> None:
    """UserError unless `paths` names known paths, each once, dense first."""
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise UserError(f"unknown path {', '.join(unknown) or '(none)'}: choose from {', '.join(PATHS)}")
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise UserError(f"--paths names {', '.join(twice)} more than once (dense is always "
                        "measured, first): give each path once")
    if paths[0] != "dense":
        raise UserError("--paths must start with dense: every ratio is measured against it")


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
            "patch_series_sha256": series.series_sha256(PATCHES_DIR), "blas": inputs["blas"],
            "mkl": inputs.get("mkl"), "compiler": f"g++ {inputs['compiler']}",
            "python": inputs["python"], "build": str(build.root)}


TORCH_REQUIREMENT = requirement("pytorch", "torch")  # CPU build; the side-by-side baseline only


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


def check_backend_blas(backend: str, blas: str, built: str = "build") -> None:
    """The mkl sparse back end exists only in a Caffe built against MKL (a build or an image)."""
    if backend == "mkl" and blas != "mkl":
        raise UserError(f"--backend mkl needs an MKL {built}: add --blas mkl")


def check_docker(options: BenchOptions, blas: str) -> None:
    """What a containerised run cannot do, refused before anything runs."""
    if options.pytorch:
        raise UserError("--pytorch does not work with --docker (the image's Python 3.6 has no "
                        "PyTorch): run the baseline natively, without --docker")
    if options.net == "resnet50-1by2":
        raise UserError("--net resnet50-1by2 does not work with --docker: its net and weights are "
                        "converted from Yahoo's open_nsfw ONNX package, which needs Python >= 3.9 "
                        "(the image has 3.6); run it natively, without --docker")
    check_backend_blas(options.backend, blas, "image")


def executor(build: Build | None, threads: int, image: docker_route.Image | None = None):
    """Who runs the measurement child: the build's pycaffe, or a container of `image`."""
    if image is not None:
        return docker_route.ContainerExecutor(image, threads)
    return measurement.LocalExecutor(build, threads)


def check_memory(build: Build, options: BenchOptions, threads: int) -> None:
    """Refuse, in one line and before anything is prepared, a batch whose blobs cannot fit in the
    memory available (the estimate: sparse_caffe.models.memory)."""
    available = memory.available_bytes()
    if available is None:
        return
    result = measurement.pycaffe(build, "models.memory", [options.net], 1, capture_stderr=True,
                                 capture_stdout=True)
    run_stage.raise_for(result, "estimating the memory the run needs")
    facts = json.loads(result.stdout)
    images = options.image_source if isinstance(options.image_source, int) else 6
    needed = memory.needed_bytes(facts, options.batch, images)
    if needed > available:
        step = memory.needed_bytes(facts, 2, images) - memory.needed_bytes(facts, 1, images)
        base = memory.needed_bytes(facts, 1, images) - step  # needed_bytes is linear in batch
        fits = max(1, (available - base) // step)
        raise UserError(f"--batch {options.batch} needs about {needed / 2**30:.1f} GiB for "
                        f"{options.net} ({facts['blob_bytes_per_image'] / 2**20:.0f} MiB of blobs "
                        f"per image, twice over for the sparse paths' copies), but only "
                        f"{available / 2**30:.1f} GiB is available: use --batch {fits} or less")


def results_folder() -> Path:
    """The results folder, created if needed; one line if it cannot be written."""
    return writable_folder(results_dir(), "the results folder (SPARSE_CAFFE_RESULTS)")


PARTIAL_PREFIX = ".partial-"
OWNER_FILE = "owner.json"  # in a partial folder: the process assembling it


def _process_start(pid: int) -> str | None:
    """The start time of a live process (clock ticks since boot), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def claim_partial(folder: Path) -> None:
    """Record in a new partial folder which process assembles it (host, pid, start time)."""
    pid = os.getpid()
    (folder / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": pid,
                                                 "start": _process_start(pid)}) + "\n")


def remove_stale_partials(results: Path) -> list[Path]:
    """Remove partial run folders whose owner (on this host) is gone: a run killed with -9, or
    the machine's power. Folders without an owner record, or another host's, are left alone."""
    removed = []
    for folder in results.glob(f"{PARTIAL_PREFIX}*"):
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
            mine = owner["host"] == os.uname().nodename
            alive = _process_start(int(owner["pid"])) == owner["start"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if mine and not alive and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def run_benchmark(build: Build | None, options: BenchOptions,
                  image: docker_route.Image | None = None) -> Path:
    """Run the benchmark into a new folder: natively with `build`, or, given `image`, in a
    container of it (then `build` is not used: None)."""
    if image is not None:
        check_docker(options, image.blas)
    else:
        check_backend_blas(options.backend, build.inputs["blas"])
    threads = run_stage.check_threads(options.threads)
    runs = results_folder()
    for folder in remove_stale_partials(runs):
        print(f"removed {folder}, left by an interrupted run", file=sys.stderr)
    if image is None:  # the estimate needs a pycaffe; a container's own failure says it instead
        check_memory(build, options, threads)
    if options.pytorch:
        ensure_torch()
    run_stage.warn_oversubscribed(threads)
    if options.warmup == 0:
        print("warning: --warmup 0: the first measured forward of each path includes one-time "
              "work (the weights' CSR, buffers, thread start-up) and can be many times slower",
              file=sys.stderr)
    load_before = warn_if_busy(threads)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    partial = runs / f"{PARTIAL_PREFIX}{options.net}-{stamp}-{os.getpid()}"
    partial.mkdir()
    try:
        claim_partial(partial)
        # Progress goes straight to the terminal; errors come back as one line.
        raw = measurement.measure(options.run_spec(threads), executor(build, threads, image),
                                  partial / "run")
        software = (software_info(build) if image is None else
                    {**project_info(), **docker_route.software_info(image, raw.environment)})
        shutil.rmtree(partial / "run")
        layers, net, problems = report.derive(raw, options.batch)
        baselines, baseline_problems = report.derive_baselines(raw.baselines,
                                                               raw.agreement_tolerance)
        problems += baseline_problems
        plan = net.pop("plan", None)  # not a path: the per-layer choice, timed whole
        weights = raw.weights
        results = {
            "schema": report.SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine_info": {**machine.machine_info(threads, load_before),
                             "probe": raw.machine_probe},
            "software": {**software, "sparse_backends": list(raw.backends_in_build),
                         "blas_runtime": raw.blas_runtime, "onednn": raw.onednn},
            "weights": weights.to_json(),
            "images": raw.images,
            "params": {**asdict(options), "paths": list(options.paths), "threads": threads,
                       "warmup_note": "warm-up forwards are run first and not measured",
                       "timing_note": "per-layer times: sum of the layer's phase timers over "
                                      "profiled forwards; whole-net times: separate unprofiled "
                                      "forwards (wall clock), each followed by the same forward "
                                      "one layer at a time (net.layers_ms, stages_ms, "
                                      "layer_sum_ms; consistency_gap = 1 - sum / whole)"},
            "agreement_tolerance": raw.agreement_tolerance,
            "layers": layers,
            "net": net,
            "plan": plan,
            "baselines": baselines,
            "problems": problems,
        }
        (partial / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        report.write_csv(results, partial / "results.csv")
        report.plot(results, partial)
        (partial / OWNER_FILE).unlink()
        kind = weights.kind
        final = runs / f"{options.net}-{kind}-{stamp}"
        suffix = 1
        while final.exists():  # never overwrite an earlier run
            suffix += 1
            final = runs / f"{options.net}-{kind}-{stamp}-{suffix}"
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    print(report.table(results))
    return final
