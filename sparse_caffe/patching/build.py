"""Build stage: Debian packages, the patched tree, CMake + make with ccache, in a keyed build folder.

A build folder is named by a hash of everything that goes into it (source identity, patch series,
BLAS, Python and its numpy/protobuf, compiler, CMake options), so configurations never overwrite each
other and an unchanged one is not rebuilt. A folder is trusted only once `complete.json` is written,
last; an interrupted build is resumed (make is incremental) or, if its tree was never fully patched,
redone from a fresh copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import cache, series
from .config import PATCHES_DIR, PROJECT_ROOT, BuildOptions, cache_dir
from ..errors import UserError
from .requirements import requirement
from ..shell import run_logged, step
from ..terminal import say
from .source import SourceTree, ensure_source

# Bump when the recipe below changes in a way the key would not otherwise see.
RECIPE_VERSION = 2

APT_PACKAGES = (
    "ca-certificates", "dpkg-dev", "patch", "xz-utils", "diffutils", "cmake", "make", "g++", "ccache",
    "libboost-dev", "libboost-filesystem-dev", "libboost-system-dev", "libboost-thread-dev",
    "libboost-python-dev", "libgflags-dev", "libgoogle-glog-dev", "libhdf5-dev", "libprotobuf-dev",
    "protobuf-compiler", "libopenblas-openmp-dev", "python3-dev",
    # oneDNN 2.6 for the onednn path: Debian builds it with GNU OpenMP, Caffe's own thread pool.
    "libdnnl-dev",
    # Not linked: the test that bench refuses a BLAS threading with pthreads preloads it.
    "libopenblas0-pthread",
)
MKL_REQUIREMENT = requirement("mkl", "mkl-devel")
# Debian's OpenMP build of OpenBLAS (libopenblas-openmp-dev): one thread pool with Caffe's libgomp.
OPENBLAS_OPENMP_INCLUDE = "/usr/include/x86_64-linux-gnu/openblas-openmp"
OPENBLAS_OPENMP_LIB = "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so"
# Caffe's own gtest suites built with every build and run by caffe_tests/.
# Caffe's own gtest suites for every layer our patches change (neuron_layer holds ReLU's).
GTEST_SUITES = ("convolution_layer", "deconvolution_layer", "im2col_layer", "inner_product_layer",
                "pooling_layer", "eltwise_layer", "neuron_layer")
# caffe.bin is Caffe's command-line tool (tools/caffe.cpp; written as build/tools/caffe), so a
# tuned deploy prototxt runs under `caffe time` with no Python of ours.
MAKE_TARGETS = ("caffe", "pycaffe", "test.testbin", "caffe.bin")
KEEP_BUILDS_PER_BLAS = 3


@dataclass(frozen=True)
class Build:
    """A finished build: where its pieces are, and what went into it."""

    root: Path
    key: str
    inputs: dict

    @classmethod
    def load(cls, root: Path) -> "Build":
        """A finished build folder (as named by SPARSE_CAFFE_BUILD); refuses an unfinished one."""
        done = Path(root) / "complete.json"
        if not done.is_file():
            raise UserError(f"{root} is not a finished build (no complete.json); run ./inv build")
        info = json.loads(done.read_text())
        return cls(root=Path(root), key=info["key"], inputs=info["inputs"])

    @property
    def source(self) -> Path:
        return self.root / "src"

    @property
    def python_path(self) -> Path:
        return self.source / "python"

    @property
    def gtest_binary(self) -> Path:
        return self.root / "build" / "test" / "test.testbin"

    @property
    def caffe_tool(self) -> Path:
        """Caffe's own command-line tool (`caffe time`, `caffe test`, ...)."""
        return self.root / "build" / "tools" / "caffe"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    def env(self, base: dict | None = None) -> dict:
        """Environment in which `import caffe` gets this build."""
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.python_path), env.get("PYTHONPATH")]))
        env.setdefault("GLOG_minloglevel", "2")
        env.update(runtime_env(self.inputs.get("blas", "openblas")))
        return env


def runtime_env(blas: str) -> dict:
    """What a process using a build of this BLAS needs: MKL must thread with GNU OpenMP, the
    runtime our own kernels use, so that two OpenMP runtimes never share the cores."""
    return {"MKL_THREADING_LAYER": "GNU"} if blas == "mkl" else {}


# ----------------------------------------------------------------------------- inputs and key

def python_facts(python: str = sys.executable) -> dict:
    """The Python pycaffe is built for, with the packages whose ABI or generated code it depends on."""
    code = ("import json, sys, sysconfig, numpy, google.protobuf as pb;"
            "print(json.dumps({'executable': sys.executable, 'version': sys.version.split()[0],"
            "'numpy': numpy.__version__, 'protobuf': pb.__version__,"
            "'include': sysconfig.get_paths()['include'],"
            "'library': sysconfig.get_config_var('LIBDIR') + '/' + sysconfig.get_config_var('LDLIBRARY')}))")
    result = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"{python} lacks numpy or protobuf ({result.stderr.strip().splitlines()[-1:]}); "
                        "run through ./inv, which installs requirements.txt")
    return json.loads(result.stdout)


def compiler_version() -> str:
    result = subprocess.run(["g++", "-dumpfullversion"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "missing"


def mkl_prefix() -> Path:
    return Path(sys.prefix)


def mkl_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("mkl-devel")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def cmake_options(options: BuildOptions, python: dict) -> list[str]:
    flags = [
        "-DCPU_ONLY=ON", "-DCMAKE_BUILD_TYPE=Release", "-Dpython_version=3",
        f"-DPYTHON_EXECUTABLE={python['executable']}", f"-DPYTHON_INCLUDE_DIR={python['include']}",
        f"-DPYTHON_LIBRARY={python['library']}", "-DBUILD_python=ON", "-DBUILD_python_layer=ON",
        "-DUSE_OPENCV=OFF", "-DUSE_LEVELDB=OFF", "-DUSE_LMDB=OFF", "-DBUILD_docs=OFF",
        "-DUSE_OPENMP=ON",  # our sparse kernels are OpenMP-parallel
        "-DUSE_ONEDNN=ON",  # the onednn forward path (libdnnl-dev)
        "-DBUILD_matlab=OFF", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache",
        f"-DBUILD_only_tests={','.join(GTEST_SUITES)}",
    ]
    if options.blas == "mkl":
        flags += ["-DBLAS=MKL", f"-DMKL_RT_LIBRARY={mkl_prefix() / 'lib' / 'libmkl_rt.so.3'}"]
    else:
        # Named explicitly, never through the libblas/libopenblas alternatives: Debian's default
        # OpenBLAS threads with pthreads, whose pool fights Caffe's OpenMP pool for the cores.
        flags += ["-DBLAS=Open", f"-DOpenBLAS_INCLUDE_DIR={OPENBLAS_OPENMP_INCLUDE}",
                  f"-DOpenBLAS_LIB={OPENBLAS_OPENMP_LIB}"]
    return flags


def build_inputs(source: SourceTree, options: BuildOptions, python: dict) -> dict:
    return {
        "recipe": RECIPE_VERSION,
        "source": source.identity,
        "patch_series_sha256": series.series_sha256(PATCHES_DIR),
        "blas": options.blas,
        "mkl": mkl_version() if options.blas == "mkl" else None,
        "python": {k: python[k] for k in ("executable", "version", "numpy", "protobuf")},
        "compiler": compiler_version(),
        "cmake_options": cmake_options(options, python),
        "make_targets": list(MAKE_TARGETS),
    }


def build_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def builds_root() -> Path:
    return cache_dir() / "builds"


def build_dir(options: BuildOptions, key: str) -> Path:
    return builds_root() / f"{options.blas}-{key[:16]}"


# ----------------------------------------------------------------------------- steps

def missing_apt_packages(packages=APT_PACKAGES) -> list[str]:
    missing = []
    for package in packages:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                                capture_output=True, text=True)
        if "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def install_apt_packages(log: Path) -> None:
    missing = missing_apt_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise UserError(f"missing Debian packages: {' '.join(missing)}; install them as root with apt-get")
    say(f"      installing {len(missing)} Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_logged(["apt-get", "update", "-q"], log, env=env, what="apt-get update")
    run_logged(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], log, env=env,
               what="apt-get install")


def install_mkl(log: Path) -> None:
    if mkl_version() == MKL_REQUIREMENT.split("==")[1]:
        return
    say(f"      installing {MKL_REQUIREMENT} from PyPI into {sys.prefix} (about 1 GB)")
    run_logged([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                MKL_REQUIREMENT], log, what=f"pip install {MKL_REQUIREMENT}")


def ccache_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["CCACHE_DIR"] = str(cache_dir() / "ccache")
    # Paths under the builds folder are hashed relative to it, so every build folder (and every
    # fresh clone) shares cache hits.
    env["CCACHE_BASEDIR"] = str(builds_root())
    env["CCACHE_NOHASHDIR"] = "1"
    env.setdefault("CCACHE_MAXSIZE", "5G")
    return env


def prepare_tree(source: SourceTree, root: Path, log: Path) -> None:
    marker = root / "src" / ".sparse-caffe-patched"
    if marker.is_file():
        return
    shutil.rmtree(root / "src", ignore_errors=True)
    shutil.rmtree(root / "build", ignore_errors=True)  # configured against a tree we no longer trust
    staging = root / "src.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source.path, staging, symlinks=True)
    series.apply_series(staging, PATCHES_DIR, log=log)
    (staging / ".sparse-caffe-patched").write_text(series.series_sha256(PATCHES_DIR) + "\n")
    staging.rename(root / "src")


def configure(root: Path, options: BuildOptions, python: dict, log: Path) -> None:
    if (root / "build" / ".sparse-caffe-configured").is_file():
        return
    env = ccache_env()
    if options.blas == "mkl":
        env["MKLROOT"] = str(mkl_prefix())
    run_logged(["cmake", "-S", root / "src", "-B", root / "build", *cmake_options(options, python)],
               log, env=env, what="cmake configure")
    (root / "build" / ".sparse-caffe-configured").write_text("ok\n")


def compile_targets(root: Path, options: BuildOptions, log: Path) -> None:
    run_logged(["make", "-C", root / "build", f"-j{options.jobs}", *MAKE_TARGETS], log,
               env=ccache_env(), what="make " + " ".join(MAKE_TARGETS))


def smoke_test(build: Build, log: Path) -> None:
    code = ("import caffe; caffe.set_conv_profiling(False); caffe.reset_conv_profile();"
            "print(caffe.__file__)")
    run_logged([sys.executable, "-c", code], log, env=build.env(), what="import caffe (smoke test)")


# ----------------------------------------------------------------------------- the stage

def build(options: BuildOptions, caffe_source: str | None = None) -> Build:
    """Build (or find already built) Caffe + pycaffe + Caffe's gtests for these options."""
    started = time.monotonic()
    cache.prepare()
    scratch_log = cache_dir() / "logs" / "build-prepare.log"
    total = 6
    with step("Debian packages", 1, total):
        install_apt_packages(scratch_log)
        if options.blas == "mkl":
            install_mkl(scratch_log)
    with step("Caffe source", 2, total):
        source = ensure_source(caffe_source)
    python = python_facts()
    inputs = build_inputs(source, options, python)
    key = build_key(inputs)
    root = build_dir(options, key)
    done = root / "complete.json"
    if done.is_file():
        say(f"up to date: {root} (nothing to do)")
        return Build(root=root, key=key, inputs=inputs)
    if not root.is_dir():
        root.mkdir(parents=True)
        cache.mark_build(root)  # ./inv clean removes only folders that say they are this clone's
    log = root / "build.log"
    (root / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
    say(f"building into {root}; log: {log}")
    with step("patched tree", 3, total):
        prepare_tree(source, root, log)
    with step("cmake configure", 4, total):
        configure(root, options, python, log)
    with step("make " + " ".join(MAKE_TARGETS), 5, total):
        compile_targets(root, options, log)
    result = Build(root=root, key=key, inputs=inputs)
    with step("import caffe", 6, total):
        smoke_test(result, log)
    partial = done.with_suffix(".partial")
    partial.write_text(json.dumps({"key": key, "inputs": inputs, "clone": str(PROJECT_ROOT),
                                   "seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")
    partial.rename(done)
    prune_old_builds(options.blas, keep=root)
    say(f"built in {time.monotonic() - started:.0f} s: {root}")
    return result


def built_by(folder: Path) -> str | None:
    """The clone (project folder) whose ./inv build finished this build folder, if recorded."""
    try:
        return json.loads((folder / "complete.json").read_text()).get("clone")
    except (OSError, ValueError, AttributeError):
        return None


def prune_old_builds(blas: str, keep: Path, count: int = KEEP_BUILDS_PER_BLAS,
                     clone: Path = PROJECT_ROOT) -> None:
    """Keep this clone's newest few finished builds per BLAS; never touch another clone's builds
    (or any in progress). ccache keeps rebuilds cheap."""
    finished = sorted((p for p in builds_root().glob(f"{blas}-*")
                       if (p / "complete.json").is_file() and built_by(p) == str(clone)),
                      key=lambda p: (p / "complete.json").stat().st_mtime, reverse=True)
    for old in finished[count:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)

