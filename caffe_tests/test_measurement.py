"""The one measurement entry point (sparse_caffe.host.measurement) against the build: bench-layer
through the real command, and the Docker route's container side run natively: the container's
own command line (docker_route.container_command) run with this build's pycaffe on the run
folder the host prepared, first alone, then under `bench --docker`'s host side end to end, with a
stand-in engine that runs it natively instead of in a container (no Docker engine here)."""
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
    with the build's pycaffe, the mounted folder and the image's record mapped to host paths."""

    def __init__(self, build: Build, image_info: Path):
        self.build, self.image_info, self.commands = build, image_info, []
        self.containers = self

    def create(self, image, command, volumes, environment, **kwargs):
        (host_folder, mount), = volumes.items()
        assert mount["mode"] == "rw" and kwargs["user"] == f"{os.getuid()}:{os.getgid()}"
        assert command == docker_route.container_command()
        native = [sys.executable if word == "python3" else
                  host_folder if word == mount["bind"] else
                  str(self.image_info) if word == docker_route.IMAGE_INFO else word
                  for word in command]
        self.commands.append(native)
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


def small_options(**more) -> bench.BenchOptions:
    return bench.BenchOptions(net="caffenet", weights="synthetic", paths=("dense", "direct"),
                              layers="conv[35]", repeats=2, warmup=0, images="2", threads=1,
                              **more)


IMAGE = docker_route.Image(tag="sparse-caffe:native", id="sha256:" + "2" * 64, repo_digests=(),
                           blas="openblas")


def test_the_container_command_measures_a_prepared_folder_natively(build, tmp_path):
    info = tmp_path / "image.json"
    info.write_text(json.dumps(IMAGE_RECORD))
    engine = NativeEngine(build, info)
    executor = docker_route.ContainerExecutor(IMAGE, 1, measurement.LocalExecutor(build, 1),
                                              engine)
    spec = small_options().run_spec(1)
    raw = measurement.measure(spec, executor, tmp_path / "run")
    assert isinstance(raw, RawResult) and raw.kind == "net" and raw.layers == ("conv3", "conv5")
    assert set(raw.paths) == {"dense", "direct"} and raw.weights.kind == "synthetic"
    assert raw.environment["image"] == IMAGE_RECORD and raw.environment["numpy"]
    prepared = RunSpec.read(tmp_path / "run" / protocol.SPEC_FILE)
    assert prepared == spec.replace(kind="prepared", layer_names=["conv3", "conv5"],
                                    weights_info=raw.weights, images_info=raw.images)
    assert len(engine.commands) == 1
    assert engine.commands[0][1:3] == ["-m", "sparse_caffe.inside.child"]


def test_the_container_side_reports_a_user_error_one_way(build, tmp_path):
    """The container's command on a prepared folder whose layers the net lacks: its error record,
    exit 2, and the host's one line."""
    info = tmp_path / "image.json"
    info.write_text(json.dumps(IMAGE_RECORD))

    class Preparer(measurement.LocalExecutor):  # prepares, then spoils the layer list
        def run(self, folder, module=measurement.CHILD, args=()):
            status, tail = super().run(folder, module, args)
            spec = RunSpec.read(folder / protocol.SPEC_FILE)
            spec.replace(layer_names=["conv9"]).write(folder / protocol.SPEC_FILE)
            return status, tail
    executor = docker_route.ContainerExecutor(IMAGE, 1, Preparer(build, 1),
                                              NativeEngine(build, info))
    with pytest.raises(UserError, match=r"^the prepared net has no convolution layer "
                                                 r"conv9; prepare the run again"):
        measurement.measure(small_options().run_spec(1), executor, tmp_path / "run")
    assert protocol.read_error(tmp_path / "run").startswith("the prepared net has no")


def test_bench_docker_end_to_end_on_a_native_stand_in_engine(build, tmp_path, monkeypatch):
    """./inv bench --docker's host side as the task runs it (bench.run_benchmark with an image),
    the engine answering with the container's command run natively: a complete results folder
    whose software record describes the image."""
    info = tmp_path / "image.json"
    info.write_text(json.dumps(IMAGE_RECORD))
    engine = NativeEngine(build, info)
    monkeypatch.setattr(docker_route, "client", lambda: engine)
    monkeypatch.setenv("SPARSE_CAFFE_RESULTS", str(tmp_path / "results"))
    final = bench.run_benchmark(build, small_options(), IMAGE)
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
    assert len(engine.commands) == 1
