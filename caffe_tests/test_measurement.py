"""The one measurement entry point (sparse_caffe.host.measurement) against the build: bench-layer
through the real command, and the Docker route's container side run natively: the container's
own command line (docker_route.container_command) run with this build's pycaffe on the run
folder the host wrote (its "net" RunSpec: the container prepares the run itself, into the
image's own cache), first alone, then under `bench --docker`'s host side end to end (no native
build passed), with a stand-in engine that runs it natively instead of in a container (no Docker
engine here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_caffe.errors import UserError
from sparse_caffe.host import bench, docker_route, measurement
from sparse_caffe.inside import protocol
from sparse_caffe.inside.protocol import RawResult, RunSpec
from sparse_caffe.patching.build import Build
from sparse_caffe.patching.config import PROJECT_ROOT

from .test_bench import inv

IMAGE_RECORD = {"caffe_commit": "c" * 40, "caffe_tree_sha256": "t" * 64,
                "patch_series_sha256": "p" * 64, "base_image": "ubuntu:18.04@sha256:x"}


@pytest.fixture(scope="module")
def build() -> Build:
    return Build.load(Path(os.environ["SPARSE_CAFFE_BUILD"]))


def test_bench_layer_through_the_real_command(tmp_path):
    done = inv("bench-layer", "--shape", "res5_branch2b", "--repeats", "2", "--threads", "1",
               results=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = list((tmp_path / "layer-bench").glob("res5_branch2b-*-t1-*.json"))
    assert len(written) == 1, written
    record = json.loads(written[0].read_text())
    assert record["synthetic"] and record["shape"] == "res5_branch2b" and record["channels"] == 512
    assert record["args"]["repeats"] == 2 and record["blas_runtime"]["name"]
    results = record["results"]
    assert (results[0]["path"], results[0]["backend"]) == ("dense", "openmp")
    assert {r["path"] for r in results} >= {"dense", "direct", "spmdm"}
    for r in results:  # every candidate timed once per rotated round, profiled and unprofiled
        assert len(r["forward_ms"]) == 2 and r["median_ms"] > 0 and r["phase_ms"]
        assert r["max_rel_diff"] <= 1e-4, r
    assert results[0]["speedup_vs_dense"] == 1.0
    assert 0.97 < record["weight_zeros_measured"] < 0.99
    assert "vs dense" in done.stdout and "direct kernel:" in done.stdout


class NativeEngine:
    """A stand-in Docker engine with no Docker: a created container runs its command natively
    with the build's pycaffe. The mounts' effect is reproduced by naming the host folders: the
    command's run folder and image record, and the container paths in the run folder's spec.json
    (the run folder's and the cache's) become the host folders mounted there."""

    def __init__(self, build: Build, image_info: Path):
        self.build, self.image_info, self.commands, self.specs = build, image_info, [], []
        self.containers = self

    def create(self, image, command, volumes, environment, **kwargs):
        host = {mount["bind"]: folder for folder, mount in volumes.items()}
        assert set(host) == {docker_route.CONTAINER_RUN_DIR, docker_route.CONTAINER_CACHE_DIR}
        assert all(mount["mode"] == "rw" for mount in volumes.values())
        assert kwargs["user"] == f"{os.getuid()}:{os.getgid()}"
        assert command == docker_route.container_command()
        native = [sys.executable if word == "python3" else
                  host.get(word, word) if word in host else
                  str(self.image_info) if word == docker_route.IMAGE_INFO else word
                  for word in command]
        self.commands.append(native)
        spec_file = Path(host[docker_route.CONTAINER_RUN_DIR]) / protocol.SPEC_FILE
        spec = RunSpec.read(spec_file)
        self.specs.append(spec)
        text = spec_file.read_text()
        for inside, outside in host.items():
            text = text.replace(json.dumps(inside)[:-1], json.dumps(outside)[:-1])
        spec_file.write_text(text)
        env = {**self.build.env(), **environment}
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(PROJECT_ROOT)])

        class Container:
            status = None

            def start(self):
                self.status = subprocess.run(native, env=env, cwd=PROJECT_ROOT).returncode

            def logs(self, stream, follow):
                return iter([])

            def wait(self):
                return {"StatusCode": self.status}

            def remove(self, force):
                pass
        return Container()


def small_options(**changes) -> bench.BenchOptions:
    return bench.BenchOptions(**{"net": "caffenet", "weights": "synthetic",
                                 "paths": ("dense", "direct"), "layers": "conv[35]", "repeats": 2,
                                 "warmup": 0, "images": "2", "threads": 1, **changes})


IMAGE = docker_route.Image(tag="sparse-caffe:native", id="sha256:" + "2" * 64, repo_digests=(),
                           blas="openblas")


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory) -> Path:
    """One cache folder for the module's containers, as an image keeps its own between runs
    (the synthetic model is built once)."""
    return tmp_path_factory.mktemp("cache")


def test_the_container_command_prepares_and_measures_natively(build, tmp_path, image_cache):
    """The container gets the native run's RunSpec (its cache its own) and builds the synthetic
    model, images and net itself; the host prepared nothing."""
    info = tmp_path / "image.json"
    info.write_text(json.dumps(IMAGE_RECORD))
    engine = NativeEngine(build, info)
    cache = docker_route.container_cache(IMAGE).relative_to(docker_route.cache_dir())
    executor = docker_route.ContainerExecutor(IMAGE, 1, engine, cache=image_cache / cache)
    spec = small_options().run_spec(1)
    raw = measurement.measure(spec, executor, tmp_path / "run")
    assert isinstance(raw, RawResult) and raw.kind == "net" and raw.layers == ("conv3", "conv5")
    assert set(raw.paths) == {"dense", "direct"} and raw.weights.kind == "synthetic"
    assert Path(raw.weights.path).is_relative_to(image_cache / cache / "synthetic")
    assert raw.environment["image"] == IMAGE_RECORD and raw.environment["numpy"]
    assert engine.specs == [spec.replace(cache_dir=docker_route.CONTAINER_CACHE_DIR)]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["raw.json", "spec.json"]
    assert len(engine.commands) == 1
    assert engine.commands[0][1:3] == ["-m", "sparse_caffe.inside.child"]


def test_the_container_side_reports_a_user_error_one_way(build, tmp_path, image_cache):
    """The container's command on a run whose --layers match nothing: its error record, exit 2,
    and the host's one line."""
    info = tmp_path / "image.json"
    info.write_text(json.dumps(IMAGE_RECORD))
    executor = docker_route.ContainerExecutor(IMAGE, 1, NativeEngine(build, info),
                                              cache=image_cache / "docker" / "x")
    spec = small_options(layers="conv9").run_spec(1)
    with pytest.raises(UserError, match=r"^--layers 'conv9' matches no convolution layer"):
        measurement.measure(spec, executor, tmp_path / "run")
    assert protocol.read_error(tmp_path / "run").startswith("--layers 'conv9' matches no")


def test_bench_docker_end_to_end_on_a_native_stand_in_engine(build, tmp_path, monkeypatch,
                                                             image_cache):
    """./inv bench --docker's host side as the task runs it (bench.run_benchmark with an image
    and no build), the engine answering with the container's command run natively: a complete
    results folder whose software record describes the image."""
    info = tmp_path / "image.json"
    info.write_text(json.dumps(IMAGE_RECORD))
    engine = NativeEngine(build, info)
    monkeypatch.setattr(docker_route, "client", lambda: engine)
    monkeypatch.setenv("SPARSE_CAFFE_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("SPARSE_CAFFE_CACHE", str(image_cache))
    final = bench.run_benchmark(None, small_options(), IMAGE)
    results = json.loads((final / "results.json").read_text())
    assert final.name.startswith("caffenet-synthetic-") and (final / "results.csv").is_file()
    assert sorted(p.name for p in final.iterdir()) == sorted(
        ["results.json", "results.csv", "layer_times.png", "speedup.png",
         "speedup_vs_sparsity.png"])
    software = results["software"]
    assert software["build"] == "docker image sparse-caffe:native"
    assert software["docker"]["image_id"] == IMAGE.id
    assert software["patch_series_sha256"] == "p" * 64
    assert [layer["name"] for layer in results["layers"]] == ["conv3", "conv5"]
    assert results["weights"]["kind"] == "synthetic" and results["weights"]["sha256"]
    assert results["weights"]["path"].startswith(str(docker_route.container_cache(IMAGE)))
    assert len(engine.commands) == 1
