"""The Docker route: the pinned Caffe with our series, built on Ubuntu 18.04 in an image, and
benchmarks timed in a container of it. Talks to the engine through the Docker SDK for Python.

- `./inv build --docker` builds docker/Dockerfile from `build_context()` (what .dockerignore lets
  through, packed as the SDK packs a folder), with the pins of sparse_caffe/patching/config.py as build
  arguments, streaming the build's log; the image is tagged sparse-caffe:<patch series hash[:12]>
  (-mkl for an MKL image), so a checkout finds the image of its own series.
- `./inv bench --docker` measures through the one measurement entry point
  (sparse_caffe.host.measurement) with its container executor: a container of that image runs
  the one measurement child (`python3 -m sparse_caffe.inside.child`) on the same "net" RunSpec a
  native run gets, and builds the weights, images and net with the image's own pycaffe; the
  host needs no build. The run's folder and the image's cache folder are mounted, the container
  runs as the host user, so what it writes belongs to that user; results.json records the image.
- No engine, or no network inside the build: one line saying so and pointing to the native build.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..patching import series
from ..patching.build import GTEST_SUITES, MKL_REQUIREMENT
from ..patching.config import CAFFE, PATCHES_DIR, PROJECT_ROOT, BuildOptions, cache_dir
from ..errors import UserError
from . import measurement
from ..inside import protocol
from ..models import weights as weights_stage
from ..models.images import IMAGE_SUFFIXES
from .measurement import thread_env
from ..terminal import say

IMAGE_REPOSITORY = "sparse-caffe"
DOCKERFILE = "docker/Dockerfile"  # inside the build context
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
# Far above what the context holds (the Dockerfile, one script, the patches, ten modules):
# anything near it means a build tree or a results folder slipped in.
MAX_CONTEXT_BYTES = 1 << 20
# Inside the image (docker/Dockerfile).
CONTAINER_RUN_DIR = "/workspace/run"
CONTAINER_CACHE_DIR = "/workspace/cache"
IMAGE_INFO = "/opt/sparse-caffe/image.json"
# Where a --weights file (with a synthetic model's records beside it) and a --images folder's
# image files are copied into the run folder.
STAGED_WEIGHTS = "weights"
STAGED_IMAGES = "images"

ENGINE_ERROR = "engine error:"
NATIVE = "use the native build instead (./inv build, and ./inv bench without --docker)"
# Lines in a build log that mean the build could not reach the internet (apt, curl, DNS).
NETWORK_SIGNS = ("Temporary failure resolving", "Could not resolve host", "Could not resolve '",
                 "Name or service not known", "Network is unreachable", "Failed to fetch",
                 "Could not connect to", "Connection timed out")


@dataclass(frozen=True)
class Image:
    """A built image of the Docker route, as the engine knows it."""

    tag: str
    id: str  # the image's content digest (sha256 of its configuration)
    repo_digests: tuple[str, ...]  # registry digests: none until it is pushed somewhere
    blas: str

    def describe(self) -> dict:
        return {"image": self.tag, "image_id": self.id, "repo_digests": list(self.repo_digests)}


def image_tag(blas: str = "openblas") -> str:
    """The tag of the image of this checkout's patch series."""
    suffix = "" if blas == "openblas" else f"-{blas}"
    return f"{IMAGE_REPOSITORY}:{series.series_sha256(PATCHES_DIR)[:12]}{suffix}"


def build_args(options: BuildOptions) -> dict[str, str]:
    """The Dockerfile's ARGs, from the one place each is pinned."""
    return {"CAFFE_COMMIT": CAFFE.commit, "CAFFE_TREE_SHA256": CAFFE.tree_sha256,
            "BLAS": options.blas, "MKL_VERSION": MKL_REQUIREMENT.split("==")[1],
            "JOBS": str(options.jobs), "GTEST_SUITES": ",".join(GTEST_SUITES)}


def ignore_patterns(path: Path = DOCKERIGNORE) -> list[str]:
    """.dockerignore's patterns, read as the Docker SDK reads them."""
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def build_context() -> io.BytesIO:
    """The build context as an uncompressed tarball: the repository less what .dockerignore
    excludes, packed by the SDK's own function, exactly what it would send for the folder."""
    from docker.utils.build import tar
    context = tar(str(PROJECT_ROOT), exclude=ignore_patterns(), dockerfile=(DOCKERFILE, None),
                  fileobj=io.BytesIO())
    size = len(context.getvalue())
    if size > MAX_CONTEXT_BYTES:
        raise UserError(f"the Docker build context is {size / 1e6:.1f} MB, far more than it "
                        f"should hold; check {DOCKERIGNORE.name}")
    return context


# ----------------------------------------------------------------------------- the engine

def client():
    """A client of a running Docker engine, or one line saying there is none."""
    import docker
    import requests
    try:
        engine = docker.from_env()
        engine.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        raise UserError(f"no Docker engine is reachable at {where}, and the Docker route needs "
                        f"one; {NATIVE}") from None
    return engine


def _image(found, tag: str, blas: str) -> Image:
    return Image(tag=tag, id=found.id, repo_digests=tuple(found.attrs.get("RepoDigests") or ()),
                 blas=blas)


def build_failure(log: list[str], log_path: Path) -> str:
    """The one line for a failed image build: no network, or which step failed and why."""
    text = "\n".join(log)
    if any(sign in text for sign in NETWORK_SIGNS):
        return ("the image build has no network (it downloads Ubuntu packages and Caffe): build "
                f"it where the Docker engine reaches the internet, or {NATIVE}; log: {log_path}")
    steps = [line for line in log if re.match(r"Step \d+/\d+ : ", line)]
    step = f" at {_shorten(steps[-1])}" if steps else ""
    ours = [line for line in log if line.startswith("error:")]  # docker/prepare_caffe.py
    engine = [line for line in log if line.startswith(ENGINE_ERROR)]
    if ours:
        reason = ours[-1][len("error:"):].strip()
    elif engine:
        reason = engine[-1][len(ENGINE_ERROR):].strip()
        code = re.search(r"returned a non-zero code: (\d+)", reason)
        reason = f"the step exited with status {code.group(1)}" if code else _shorten(reason)
    else:
        reason = _shorten(log[-1]) if log else "the engine said nothing"
    return f"the image build failed{step}: {reason}; full log: {log_path}"


def _shorten(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def build_image(options: BuildOptions, caffe_source: str | None = None) -> Image:
    """Build (or let the engine's cache find) the image of this checkout; stream its log."""
    import docker
    import requests
    if caffe_source:
        raise UserError("--caffe-source does not apply to --docker: the image build fetches the "
                        "pinned Caffe from GitHub itself (and verifies it)")
    engine = client()
    tag = image_tag(options.blas)
    log_path = cache_dir() / "logs" / f"docker-build-{tag.split(':')[1]}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    context = build_context()
    say(f"building {tag}: Caffe {CAFFE.commit[:12]} with patch series "
        f"{tag.split(':')[1][:12]} on Ubuntu 18.04, {options.blas}; log: {log_path}")
    lines: list[str] = []
    try:
        with open(log_path, "w") as log:
            for chunk in engine.api.build(fileobj=context, custom_context=True,
                                          dockerfile=DOCKERFILE, tag=tag,
                                          buildargs=build_args(options), rm=True, forcerm=True,
                                          decode=True):
                text = _chunk_text(chunk)
                if text:
                    log.write(text + "\n")
                    log.flush()
                    lines.extend(text.splitlines())
                    for line in text.splitlines():
                        say("    " + line)  # indented: the build's own lines, not ours
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        lines.append(" ".join(str(exc).split()))
        raise UserError(build_failure(lines, log_path)) from None
    if any(line.startswith(ENGINE_ERROR) for line in lines):
        raise UserError(build_failure(lines, log_path))
    return _image(engine.images.get(tag), tag, options.blas)


def _chunk_text(chunk: dict) -> str:
    """One decoded item of the engine's build stream as log text ("" for progress bars)."""
    if "error" in chunk:
        return ENGINE_ERROR + " " + " ".join(str(chunk["error"]).split())
    if "stream" in chunk:
        return chunk["stream"].rstrip("\n")
    if "status" in chunk and not chunk.get("progressDetail"):  # pulling the base image
        return " ".join(filter(None, [chunk.get("id"), chunk["status"]]))
    return ""


def find_image(blas: str = "openblas") -> Image:
    """The image of this checkout's patch series, or one line saying how to build it."""
    import docker
    engine = client()
    tag = image_tag(blas)
    try:
        found = engine.images.get(tag)
    except docker.errors.ImageNotFound:
        option = "" if blas == "openblas" else f" --blas {blas}"
        raise UserError(f"no image {tag} for this checkout's patch series: build it with "
                        f"./inv build --docker{option}") from None
    return _image(found, tag, blas)


def container_command() -> list[str]:
    """What a container of the image runs: the one measurement child on the mounted run folder
    (the same command line a native run gives the build's pycaffe, plus the image's record)."""
    return ["python3", "-m", "sparse_caffe.inside.child", CONTAINER_RUN_DIR,
            "--image-info", IMAGE_INFO]


def run_measurement(image: Image, folder: Path, threads: int, engine=None,
                    cache: Path | None = None) -> int:
    """Run the measurement child on the run folder `folder` in a container of `image`: the
    folder is mounted at CONTAINER_RUN_DIR and `cache` (default: container_cache(image)) at
    CONTAINER_CACHE_DIR, the container runs as this user, its output streams to the terminal;
    the child leaves raw.json (or error.json) in the folder. The container is removed afterwards
    (and on Ctrl-C). Returns its exit status. `engine`: a client of the Docker engine (default:
    the running engine's)."""
    engine = engine or client()
    cache = cache or container_cache(image)
    cache.mkdir(parents=True, exist_ok=True)
    container = engine.containers.create(
        image.id, container_command(),
        volumes={str(folder.resolve()): {"bind": CONTAINER_RUN_DIR, "mode": "rw"},
                 str(cache.resolve()): {"bind": CONTAINER_CACHE_DIR, "mode": "rw"}},
        user=f"{os.getuid()}:{os.getgid()}", working_dir="/workspace",
        environment={**thread_env(threads), "HOME": "/tmp"})
    try:
        container.start()
        for chunk in container.logs(stream=True, follow=True):
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
        return container.wait()["StatusCode"]
    finally:
        container.remove(force=True)


def container_cache(image: Image) -> Path:
    """The cache the containers of `image` keep between runs (mounted at CONTAINER_CACHE_DIR):
    the synthetic models the image's own Caffe built (they may differ in the last bits from the
    native build's, so they are kept apart), the open_nsfw conversion, and SkimCaffe weights
    linked in from the host's cache."""
    return cache_dir() / "docker" / image.id.split(":")[-1][:12]


class ContainerExecutor:
    """The measurement executor of the Docker route (see sparse_caffe.host.measurement): the one
    measurement child runs in a container of `image` on a "net" RunSpec, exactly as natively:
    the image's pycaffe builds the weights, images and net itself, so the host needs no build.
    What the container cannot reach is staged first (`prepared`): a --weights file and a
    --images folder into the run folder, SkimCaffe weights the host fetched into the container's
    cache; results name the host's files again (`on_host`). `engine`: the Docker engine's client
    (default: the running engine's)."""

    def __init__(self, image: Image, threads: int, engine=None, cache: Path | None = None):
        self.image, self.threads, self.engine = image, threads, engine
        self.cache = cache or container_cache(image)
        self.renames: dict[str, str] = {}  # container path -> host path, for on_host

    def prepared(self, spec: protocol.RunSpec, folder: Path) -> protocol.RunSpec:
        """`spec` as the container sees it: its cache, and the user's files staged where the
        container finds them."""
        folder.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.renames = {CONTAINER_CACHE_DIR: str(self.cache)}
        changes = {"cache_dir": CONTAINER_CACHE_DIR}
        if spec.weights not in protocol.WEIGHT_KEYWORDS:  # a .caffemodel's absolute path
            given = Path(spec.weights)
            staged = folder / STAGED_WEIGHTS
            staged.mkdir()
            # The file under its own name, and a synthetic model's sidecar and prototxt if it
            # has them (so that the container still knows it for what it is).
            for path in (given, given.with_suffix(".json"), given.with_suffix(".prototxt")):
                if path == given or path.is_file():
                    shutil.copyfile(path, staged / path.name)
            changes["weights"] = f"{CONTAINER_RUN_DIR}/{STAGED_WEIGHTS}/{given.name}"
            self.renames[f"{CONTAINER_RUN_DIR}/{STAGED_WEIGHTS}"] = str(given.parent)
        elif spec.weights in ("auto", "skimcaffe") and spec.net in weights_stage.SKIMCAFFE:
            weights_stage.copy_cached(spec.net, Path(spec.cache_dir or cache_dir()), self.cache)
        if isinstance(spec.images, str):  # a folder of the user's: its image files
            staged = folder / STAGED_IMAGES
            staged.mkdir()
            for path in sorted(Path(spec.images).iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    shutil.copyfile(path, staged / path.name)
            changes["images"] = f"{CONTAINER_RUN_DIR}/{STAGED_IMAGES}"
            self.renames[changes["images"]] = spec.images
        return spec.replace(**changes)

    def on_host(self, raw: protocol.RawResult) -> protocol.RawResult:
        """`raw` with the container's paths of the weights and images replaced by the host's."""
        def host(path):
            for inside, outside in self.renames.items():
                if isinstance(path, str) and (path == inside or path.startswith(inside + "/")):
                    return outside + path[len(inside):]
            return path
        weights, images = raw.weights, raw.images
        if weights is not None:
            weights = weights.replace(path=host(weights.path), license=host(weights.license))
        if images and "sources" in images:
            images = dict(images, sources=[host(source) for source in images["sources"]])
        return raw.replace(weights=weights, images=images)

    def run(self, folder: Path, module: str = measurement.CHILD,
            args: tuple = ()) -> tuple[int, str]:
        if module != measurement.CHILD or args:
            raise UserError(f"the container runs only the measurement child, not {module}")
        return run_measurement(self.image, folder, self.threads, self.engine, self.cache), ""


def software_info(image: Image, environment: dict) -> dict:
    """What results.json says about the software a containerised run measured."""
    record = environment.get("image", {})
    return {"caffe_commit": record.get("caffe_commit"),
            "caffe_source": f"{record.get('caffe_tree_sha256')}+none",  # as SourceTree.identity
            "patch_series_sha256": record.get("patch_series_sha256"),
            "blas": image.blas, "mkl": MKL_REQUIREMENT.split("==")[1] if image.blas == "mkl" else None,
            "compiler": f"g++ {environment.get('compiler')}",
            "python": {key: environment.get(key) for key in ("executable", "version", "numpy",
                                                              "protobuf")},
            "build": f"docker image {image.tag}",
            "docker": {**image.describe(), "base_image": record.get("base_image"),
                       "caffe_from": "BVLC's GitHub tarball, verified and patched in the image"}}
