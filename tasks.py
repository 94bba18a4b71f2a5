"""Tasks: a table of contents over the sparse_caffe package. Run them through ./inv (see README.md)."""
from __future__ import annotations

import shlex
import signal
import sys
import time
from functools import wraps
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit

from sparse_caffe.host import bench as bench_stage
from sparse_caffe.patching import build as build_stage
from sparse_caffe.patching import cache as cache_stage
from sparse_caffe.host import docker_route
from sparse_caffe.patching import render as render_stage
from sparse_caffe.host import report as report_stage
from sparse_caffe.host import measurement
from sparse_caffe.host import run as run_stage
from sparse_caffe.patching import source as source_stage
from sparse_caffe.host import tune as tune_stage
from sparse_caffe.models import weights as weights_stage
from sparse_caffe.patching.config import BuildOptions, PROJECT_ROOT, cache_dir, user_path
from sparse_caffe.errors import UserError

SOURCE_HELP = "local Caffe source: Debian's .dsc or orig tarball, GitHub's tarball, or a folder"
BLAS_HELP = "BLAS to build against: openblas (default) or mkl (mkl-devel from PyPI)"
DOCKER_BUILD_HELP = ("build the Docker image instead (Ubuntu 18.04; needs a Docker engine whose "
                     "builds reach the internet)")


class Terminated(BaseException):
    """SIGTERM (`timeout`, `kill`), raised like Ctrl-C's KeyboardInterrupt so that children are
    killed and half-written folders removed on the way out."""


def _terminate(signum, frame):
    raise Terminated()


def user_errors(fn):
    """Turn a UserError (or a file system error) into one line on stderr and exit status 1,
    never a traceback; SIGTERM stops the task as Ctrl-C does (exit 143)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise Exit(f"error: {exc}", code=1) from None
        except Terminated:
            raise Exit("error: stopped by SIGTERM; nothing half-made was left behind",
                       code=143) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise Exit(f"error: {where}{exc.strerror or exc}; check that this path exists and can "
                       "be written", code=1) from None
    return wrapper


@task(help={"caffe_source": SOURCE_HELP,
            "pristine": "the bare commit tree, without Debian's patches (what render diffs against)"})
@user_errors
def fetch(c, caffe_source=None, pristine=False):
    """Fetch, verify and unpack the pinned Caffe source into the cache."""
    tree = source_stage.ensure_source(caffe_source, debian_patches=not pristine)
    print(tree.path)


@task(help={"check": "re-render into a temporary folder and fail on any difference from patches/",
            "caffe_source": SOURCE_HELP})
@user_errors
def render(c, check=False, caffe_source=None):
    """Render templates/ into the ordered patch series in patches/."""
    pristine = source_stage.ensure_source(caffe_source, debian_patches=False).path
    if check:
        render_stage.check(pristine)
        print("patches/ matches templates/")
        return
    changed = render_stage.render_series(pristine)
    print("changed: " + ", ".join(changed) if changed else "patches/ already up to date")


@task(help={"blas": BLAS_HELP, "caffe_source": SOURCE_HELP, "jobs": "parallel compile jobs",
            "docker": DOCKER_BUILD_HELP})
@user_errors
def build(c, blas="openblas", caffe_source=None, jobs=0, docker=False):
    """Build the patched Caffe, pycaffe and Caffe's own gtests (skipped when already built)."""
    options = BuildOptions(blas=blas, **({"jobs": jobs} if jobs else {}))
    if docker:
        print(docker_route.build_image(options, caffe_source).tag)
        return
    result = build_stage.build(options, caffe_source)
    print(result.root)


@task(help={"blas": BLAS_HELP, "caffe_source": SOURCE_HELP,
            "k": "only tests matching this pytest -k expression",
            "unit": "only the pure-Python unit tests in tests/ (no Caffe build)"})
@user_errors
def test(c, blas="openblas", caffe_source=None, k=None, unit=False):
    """Run the tests: unit tests, then pycaffe and Caffe's own gtests against the patched build."""
    env = {**measurement.thread_env(1), **build_stage.runtime_env(blas)}
    paths = ["tests"]
    if not unit:
        result = build_stage.build(BuildOptions(blas=blas), caffe_source)
        env["SPARSE_CAFFE_BUILD"] = str(result.root)
        paths.append("caffe_tests")
    args = [sys.executable, "-m", "pytest", *paths] + (["-k", k] if k else [])
    with c.cd(str(PROJECT_ROOT)):  # the repository's pytest configuration, wherever invoke ran
        c.run(shlex.join(args), env=env, pty=False, echo=True)  # -k "a or b" reaches pytest whole


@task(help={"net": "caffenet or resnet50 (resnet50-dense is the unpruned starting model)",
            "weights": "a .caffemodel.bz2 downloaded by hand: checked the same way, then cached",
            "allow_dense": "accept the dense ResNet-50 starting model (it has no zeros)"})
@user_errors
def fetch_weights(c, net, weights=None, allow_dense=False):
    """Download SkimCaffe's pruned weights (needs the internet), verify them by git blob id, cache them."""
    if weights:
        path = weights_stage.place(net, user_path(weights), cache_stage.prepare(),
                                   allow_dense=allow_dense)
    else:
        path = weights_stage.fetch(net, cache_stage.prepare(), allow_dense=allow_dense,
                                   progress=weights_progress())
    print(path)


def weights_progress():
    last = [0.0]

    def report(done, total):
        if time.monotonic() - last[0] > 2 or (total and done == total):
            last[0] = time.monotonic()
            share = f" of {total / 1e6:.0f} MB" if total else ""
            print(f"  {done / 1e6:.0f} MB{share}", file=sys.stderr, flush=True)
    return report


@task(help={"net": "caffenet or resnet50",
            "weights": "skimcaffe, synthetic, or a .caffemodel (default: SkimCaffe's if fetched, "
                       "else the synthetic default)",
            "images": "a folder of images, or how many shipped photographs (default: all)",
            "batch": "images per forward", "blas": BLAS_HELP,
            "json": "where to write the JSON (default results/inspect/<net>-<time>.json)"})
@user_errors
def inspect(c, net, weights="auto", images=None, batch=1, blas="openblas", json=None):
    """Per-layer sparsity report: shapes, weight and measured input sparsity, dense/useful MACs."""
    from sparse_caffe.models import nets
    nets.net_info(net)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    target = run_stage.sparsity_report_target(net, json)
    result = build_stage.build(BuildOptions(blas=blas))
    print(run_stage.sparsity_report(result, net, bench_stage.user_weights(weights),
                            bench_stage.user_images(images), batch, target))


@task(help={"blas": BLAS_HELP, "shape": "layer shape (default res5_branch2b)",
            "threads": "OpenMP/BLAS/MKL threads (default: every core; at most 4 per core)",
            "weight_zeros": "fraction of zero weights (default 0.98)",
            "input_zeros": "fraction of zero inputs (default 0.5)", "repeats": "measured forwards"})
@user_errors
def bench_layer(c, blas="openblas", shape="res5_branch2b", threads=0, weight_zeros=0.98,
                input_zeros=0.5, repeats=30):
    """Time one synthetic convolution layer on every forward path, side by side (not a test)."""
    run_stage.bench_layer_check(shape, threads, weight_zeros, input_zeros, repeats)
    result = build_stage.build(BuildOptions(blas=blas))
    print(run_stage.bench_layer(result, shape=shape, threads=threads,
                                weight_zeros=weight_zeros, input_zeros=input_zeros,
                                repeats=repeats))


@task(help={"net": "caffenet, resnet50, or resnet50-1by2 (Yahoo's open_nsfw, real weights)",
            "weights": "skimcaffe, synthetic, or a .caffemodel path (default: SkimCaffe's if "
                       "fetched, else the synthetic default model); for resnet50-1by2: pruned "
                       "(default) or unpruned",
            "paths": "comma list of forward paths (default: all; dense is always measured)",
            "backend": "sparse back end: openmp (default) or mkl (needs --blas mkl)",
            "blas": BLAS_HELP, "batch": "images per forward (default 1)",
            "threads": "OpenMP/BLAS/MKL threads (default: every core; at most 4 per core)",
            "images": "a folder of images, or how many shipped photographs (default: all)",
            "repeats": "measured forwards per path (default 20)",
            "warmup": "unmeasured forwards first (default 3)",
            "layers": "only convolutions whose name matches this regular expression",
            "transform": "fold (BatchNorm folded, ReLU fused; default) or none",
            "fc_path": "fully connected layers under every path but dense: sparse (default) or "
                       "dense (under dense they are always dense)",
            "pytorch": "also run the baselines users would pick instead: each layer in "
                       "PyTorch's CPU convolution, and the whole net in PyTorch (eager and "
                       "torch.compile, contiguous and channels_last) and in ONNX Runtime, timed "
                       "beside dense and the plan (installs torch 2.13.0 the first time)",
            "docker": "run it in a container of the image ./inv build --docker made (weights, "
                      "images and net prepared there too: no native build needed)"})
@user_errors
def bench(c, net, weights="auto", paths=",".join(bench_stage.PATHS), backend="openmp",
          blas="openblas", batch=1, threads=0, images=None, repeats=20, warmup=3, layers=None,
          transform="fold", fc_path="sparse", pytorch=False, docker=False):
    """Benchmark every convolution of a net on every forward path; write results/<run>/."""
    options = bench_stage.BenchOptions(
        net=net, weights=bench_stage.user_weights(weights), paths=bench_stage.parse_paths(paths),
        backend=backend, batch=batch, threads=threads, images=bench_stage.user_images(images),
        repeats=repeats, warmup=warmup, layers=layers, transform=transform, fc_path=fc_path,
        pytorch=pytorch)
    bench_stage.results_folder()  # writable, before anything is built
    if not docker:
        bench_stage.check_backend_blas(backend, blas)
    if docker:  # the image (no engine, no image: one line); the container does the rest
        image = bench_stage.docker_image(options, BuildOptions(blas=blas))
        print(bench_stage.run_benchmark(None, options, image=image))
        return
    print(bench_stage.run_benchmark(build_stage.build(BuildOptions(blas=blas)), options))


@task(help={"net": "caffenet, resnet50 or resnet50-1by2 (with --check: the plan's)",
            "weights": "as for bench (default: SkimCaffe's if fetched, else the synthetic "
                       "default; with --check: the plan's)",
            "threads": "OpenMP/BLAS/MKL threads (default: every core; with --check: the plan's)",
            "batch": "images per forward (default 1; with --check: the plan's)",
            "out": "the plan's JSON (default results/plans/<net>-<weights>-<threads>t-b<batch>.json)",
            "prototxt": "the deploy prototxt (default: next to the plan, .prototxt; its weights "
                        "beside it, .caffemodel)",
            "retune": "measure again even if the plan exists (a stale plan is refused without it)",
            "check": "only check PLAN.json against this machine, build, weights, threads, batch",
            "repeats": "interleaved rounds (default 20)", "warmup": "unmeasured forwards first "
            "(default 3)", "images": "a folder of images, or how many shipped photographs "
            "(default: all)", "blas": BLAS_HELP})
@user_errors
def tune(c, net=None, weights=None, threads=None, batch=None, out=None, prototxt=None,
         retune=False, check=None, repeats=20, warmup=3, images=None, blas="openblas"):
    """Choose each layer's forward path by measuring; write a keyed plan and a deploy prototxt."""
    plan = tune_stage.load_plan(user_path(check)) if check else None
    options = tune_stage.options_from(net, weights, threads, batch, repeats, warmup, images, plan)
    result = build_stage.build(BuildOptions(blas=blas))
    if check:
        print(tune_stage.check(result, check, options))
    else:
        print(tune_stage.tune(result, options, out=out, prototxt=prototxt, retune=retune))


@task(help={"blas": BLAS_HELP})
@user_errors
def caffe_tool(c, blas="openblas"):
    """Print the path of Caffe's own command-line tool (caffe time/test/train) of the build."""
    print(build_stage.build(BuildOptions(blas=blas)).caffe_tool)


@task(help={"run_dir": "a folder written by ./inv bench"})
@user_errors
def report(c, run_dir):
    """Re-draw a run's plots from its results.json and print its table."""
    folder = user_path(run_dir)
    results = report_stage.load(folder)
    for path in report_stage.plot_into(results, folder):
        print(path)
    print(report_stage.table(results))


@task(help={"net": "caffenet, resnet50, resnet50-1by2, or small (a small synthetic net, for long "
                   "leak checks: --forwards 10000)",
            "weights": "as for bench (default: SkimCaffe's if fetched, else the synthetic default)",
            "batch": "images per forward (default 1)", "blas": BLAS_HELP,
            "paths": "comma-separated forward paths, dense first (default: every path)",
            "forwards": "forwards after the warm-up (default 200)",
            "threads": "OpenMP/BLAS/MKL threads (default: every core)",
            "layers": "regex: only the convolutions it matches run on each path, the others dense "
                      "(default: every convolution)"})
@user_errors
def memory(c, net, weights="auto", batch=1, blas="openblas", paths=",".join(bench_stage.PATHS),
           forwards=200, threads=0, layers=None):
    """Peak resident memory of the whole net per forward path (fresh process each), and growth."""
    chosen = bench_stage.parse_paths(paths)
    if net == run_stage.SMALL_NET:
        bench_stage.check_paths(chosen)
    else:
        bench_stage.BenchOptions(net=net, weights=bench_stage.user_weights(weights), paths=chosen,
                                 batch=batch, threads=threads, layers=layers)
        weights = bench_stage.user_weights(weights)
    result = build_stage.build(BuildOptions(blas=blas))
    record, target = run_stage.memory(result, net, weights, batch, list(chosen), forwards,
                                      run_stage.check_threads(threads), layers)
    print(f"{'path':<15}{'peak MiB':>10}{'vs dense':>10}{'forwards MiB':>14}{'warm MiB':>10}"
          f"{'end MiB':>10}{'growth MiB':>12}")
    for path, entry in record["paths"].items():
        flag = "  > 1.2x dense" if entry["peak_vs_dense"] > run_stage.MEMORY_TOLERANCE else ""
        print(f"{path:<15}{entry['after_forwards']['peak_mib']:>10.0f}{entry['peak_vs_dense']:>9.2f}x"
              f"{entry['forward_peak_mib']:>14.1f}{entry['after_warmup']['rss_mib']:>10.1f}"
              f"{entry['after_forwards']['rss_mib']:>10.1f}{entry['growth_after_warmup_mib']:>12.1f}"
              f"{flag}")
    print("peak: the process's peak resident memory over the forwards (net built, then the peak "
          "restarted); forwards: that peak above the resident size before the first forward; "
          f"warm, end: resident memory after the warm-up and after {forwards} forwards more; "
          f"growth: end minus warm; {target}")


@task(help={"run_dir": "a folder written by ./inv bench (natively, OpenBLAS or MKL build)",
            "forwards": "forwards timed in the plain loop"})
@user_errors
def check_baseline(c, run_dir, forwards=30):
    """Cross-check a run's dense baseline against a plain pycaffe loop (OMP_WAIT_POLICY=passive)."""
    results = report_stage.load(Path(run_dir))
    result = build_stage.build(BuildOptions(blas=results["software"]["blas"]))
    bench, plain = run_stage.check_baseline(result, results, forwards)
    print(f"dense whole forward: bench {bench:.2f} ms, plain pycaffe loop {plain:.2f} ms "
          f"(ratio {bench / plain:.2f}, within {run_stage.BASELINE_TOLERANCE:.0%})")


@task(help={"run_a": "baseline run folder", "run_b": "run folder to compare with it"})
@user_errors
def compare(c, run_a, run_b):
    """Print per-layer times of two runs side by side, with ratios B/A."""
    a, b = user_path(run_a), user_path(run_b)
    print(report_stage.compare(report_stage.load(a), report_stage.load(b), a.name, b.name))


@task(help={"all": "also every other clone's builds, and the fetched sources, downloads, "
                   "weights and ccache: every cache folder sparse-caffe created"})
@user_errors
def clean(c, all=False):
    """Remove this clone's build trees from the cache (with --all: everything sparse-caffe put there)."""
    done = cache_stage.clean(everything=all)
    for folder in done.removed:
        print(f"removed {folder}")
    for folder, why in done.kept:
        print(f"kept {folder}: {why}", file=sys.stderr)
    if not done.removed:
        print(f"nothing to remove in {cache_dir()}")


namespace = Collection(fetch, render, build, test, fetch_weights, inspect, bench, report,
                       compare, bench_layer, check_baseline, memory, tune, caffe_tool, clean)
namespace.configure({"run": {"echo": True}})
