"""./inv tune through the real command: the plan, the deploy prototxt run by plain pycaffe with no
SPARSE_CAFFE_* variables and by Caffe's own `caffe time`, and stale plans refused with one line
and nothing left behind. (The choices' timings are not asserted: only that they are applied.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caffe_tests.test_cli_bench import assert_one_error_line, inv
from sparse_caffe.patching.build import Build

TUNE_RUN = ["--net", "caffenet", "--weights", "synthetic", "--images", "1", "--threads", "1",
            "--repeats", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One small tune of CaffeNet (synthetic weights, one image, two rounds): its plan's path."""
    folder = tmp_path_factory.mktemp("tuned")
    done = inv("tune", *TUNE_RUN, "--out", str(folder / "plan.json"), results=folder / "results")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == ["plan.caffemodel", "plan.json",
                                                         "plan.prototxt"]
    return folder / "plan.json"


def files_of(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


def test_the_plan_holds_its_key_and_each_layers_choice(tuned):
    plan = json.loads(tuned.read_text())
    key = plan["key"]
    assert key["threads"] == 1 and key["batch"] == 1 and key["net"] == "caffenet"
    for name in ("cpu", "simd_flags", "blas_runtime", "patch_series_sha256", "caffe_source",
                 "weights_sha256"):
        assert key[name], name
    assert key["weights_sha256"] == plan["weights"]["sha256"]
    assert list(key["layers"]) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert key["layers"]["conv2"]["group"] == 2 and key["layers"]["conv1"]["stride"] == [4, 4]
    for name, choice in plan["layers"].items():
        assert choice["state"] == "decided"
        chosen = choice["candidate"]  # the auto path's choice, as caffe.auto_choices() gives it
        assert chosen.split("/")[0] == choice["path"]
        assert chosen in choice["candidates"] and chosen not in choice["pruned"]
        dense = choice["candidates"]["dense"]
        if dense is None:  # nothing but dense survived the cost model: nothing was timed
            assert choice["path"] == "dense"
            continue
        if choice["path"] != "dense":  # only a clear (> 5%) win leaves dense
            assert choice["candidates"][chosen] < 0.95 * dense
        assert min(t for t in choice["candidates"].values() if t is not None) <= dense


PLAIN_PYCAFFE = """
import json, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
plan = json.load(open(sys.argv[1]))
net = caffe.Net(plan["deploy"]["prototxt"], plan["deploy"]["weights"], caffe.TEST)
net.blobs["data"].data[...] = np.random.RandomState(0).uniform(
    -120, 150, net.blobs["data"].data.shape)
caffe.set_conv_profiling(True)
net.forward()
caffe.set_conv_profiling(False)
paths = {name: entry["path"] for name, entry in caffe.conv_profile().items()}
tuned = {name: net.blobs[name].data.copy() for name in ("fc8", "prob")}
caffe.set_conv_forward_path("dense")
caffe.set_fc_forward_path("dense")
net.forward()
print(json.dumps({"paths": paths, "diff": {
    name: float(np.abs(tuned[name] - net.blobs[name].data).max() /
                np.abs(net.blobs[name].data).max()) for name in tuned}}))
"""


def test_plain_pycaffe_runs_the_tuned_prototxt_as_planned(tuned, caffe_python_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSE_CAFFE_")}
    env.update(PYTHONPATH=str(caffe_python_path), GLOG_minloglevel="2", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PLAIN_PYCAFFE, str(tuned)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    plan = json.loads(tuned.read_text())
    assert result["paths"] == {name: choice["path"] for name, choice in plan["layers"].items()}
    assert max(result["diff"].values()) < 1e-4, result["diff"]


def test_caffe_time_runs_the_tuned_net_with_its_weights(tuned, caffe_python_path):
    build = Build(root=caffe_python_path.parents[1], key="", inputs={})
    plan = json.loads(tuned.read_text())
    done = subprocess.run([str(build.caffe_tool), "time", "-model", plan["deploy"]["prototxt"],
                           "-weights", plan["deploy"]["weights"], "-iterations", "2"],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "GLOG_minloglevel": "0",
                               "GLOG_logtostderr": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Timing with the weights of " + plan["deploy"]["weights"] in done.stderr
    assert "Average Forward pass" in done.stderr


def test_tune_again_keeps_a_current_plan(tuned):
    before = files_of(tuned.parent)
    done = inv("tune", *TUNE_RUN, "--out", str(tuned), results=tuned.parent / "results")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is current" in done.stderr and "--retune" in done.stderr
    assert files_of(tuned.parent) == before


def test_check_accepts_the_plan_it_wrote(tuned):
    done = inv("tune", "--check", str(tuned), results=tuned.parent / "results")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "matches this machine, build and weights" in done.stdout


def edited_plan(tuned: Path, tmp_path: Path, edit) -> Path:
    plan = json.loads(tuned.read_text())
    edit(plan["key"])
    target = tmp_path / "plan.json"
    target.write_text(json.dumps(plan))
    return target


@pytest.mark.parametrize("edit, named", [
    (lambda key: key.update(cpu="Intel(R) Xeon(R) Platinum 8480+"), "cpu differs"),
    (lambda key: key.update(simd_flags=key["simd_flags"] + ["avx512f"]), "simd_flags differs"),
    (lambda key: key.update(patch_series_sha256="0" * 64), "patch_series_sha256 differs"),
    (lambda key: key["blas_runtime"].update(threading="pthreads"), "blas_runtime differs"),
    (lambda key: key["layers"]["conv3"].update(pad=[0, 0]), "layer conv3 differs"),
])
def test_check_refuses_a_plan_from_another_machine_build_or_net(tuned, tmp_path, edit, named):
    plan = edited_plan(tuned, tmp_path, edit)
    done = inv("tune", "--check", str(plan), results=tmp_path / "results")
    assert_one_error_line(done, str(plan), "is stale", named, "--retune")


@pytest.mark.parametrize("option, named", [(["--threads", "2"], "threads differs (plan: 1, now: 2)"),
                                           (["--batch", "2"], "batch differs (plan: 1, now: 2)")])
def test_check_refuses_other_threads_or_batch(tuned, option, named):
    done = inv("tune", "--check", str(tuned), *option, results=tuned.parent / "results")
    assert_one_error_line(done, "is stale", named, "--retune")


def test_tune_refuses_a_stale_plan_for_other_weights_and_leaves_it_alone(tuned, tmp_path, caffe):
    plan = json.loads(tuned.read_text())
    net = caffe.Net(plan["deploy"]["prototxt"], plan["deploy"]["weights"], caffe.TEST)
    net.params["fc8"][0].data[0, 0] += 1.0  # the same net, one weight changed: other weights
    other = tmp_path / "other.caffemodel"
    net.save(str(other))
    before = files_of(tuned.parent)
    run = [str(other) if arg == "synthetic" else arg for arg in TUNE_RUN]
    done = inv("tune", *run, "--out", str(tuned), results=tuned.parent / "results")
    assert_one_error_line(done, "is stale", "weights_sha256 differs", "--retune",
                          f"--weights {other}")
    assert files_of(tuned.parent) == before  # nothing rewritten, no partial file left


def tune_runners(session: int) -> dict[int, str]:
    """The tune runners of a process session: {pid: command line}."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == session and "sparse_caffe.inside.tune_runner" in command:
            found[int(entry.name)] = command
    return found


def test_sigterm_during_tune_leaves_no_file_and_no_runner(tmp_path):
    from caffe_tests.test_cli_bench import inv_command, inv_env
    from sparse_caffe.patching.config import PROJECT_ROOT
    proc = subprocess.Popen(inv_command("tune", *TUNE_RUN[:-4], "--repeats", "200", "--out",
                                        str(tmp_path / "plan.json")),
                            cwd=PROJECT_ROOT, env=inv_env(tmp_path / "results"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not tune_runners(proc.pid):
        time.sleep(0.2)
    runners = tune_runners(proc.pid)
    assert runners, "the tune runner never started"
    time.sleep(3)  # measuring
    scratch = Path(next(iter(runners.values())).split()[-1])  # its run folder
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("tune did not stop after SIGTERM")
    assert proc.returncode == 143, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    assert [p.name for p in tmp_path.iterdir() if p.name != "results"] == []
    assert tune_runners(proc.pid) == {} and not scratch.exists()


def test_check_refuses_a_plan_whose_deploy_prototxt_is_gone(tuned, tmp_path):
    plan = json.loads(tuned.read_text())
    plan["deploy"]["prototxt"] = str(tmp_path / "gone.prototxt")
    copy = tmp_path / "plan.json"
    copy.write_text(json.dumps(plan))
    done = inv("tune", "--check", str(copy), results=tmp_path / "results")
    assert_one_error_line(done, "gone.prototxt is gone", "--retune")
