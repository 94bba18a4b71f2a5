"""Bad inputs and interruptions of the commands that drive pycaffe, through the real ./inv:
one line, a non-zero exit, nothing left behind, no process left computing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparse_caffe.patching.config import PROJECT_ROOT

SMALL_RUN = ["--net", "caffenet", "--weights", "synthetic", "--images", "1", "--threads", "1"]


def inv_command(*args):
    return [str(PROJECT_ROOT / "inv"), *args]


def inv_env(results: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SPARSE_CAFFE_CALLER_CWD"}
    return {**env, "SPARSE_CAFFE_VENV": sys.prefix, "SPARSE_CAFFE_RESULTS": str(results)}


def inv(*args, results: Path, timeout=600):
    return subprocess.run(inv_command(*args), cwd=PROJECT_ROOT, env=inv_env(results),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result, *fragments):
    assert result.returncode != 0
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr and "Check failed" not in result.stderr


def runners_of(folder: Path) -> list[int]:
    """Processes whose command line names `folder` (the benchmark runner of a run in it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(folder).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("kind", ["empty", "random", "another net"])
def test_inspect_refuses_weights_that_do_not_fit(tmp_path, caffe, kind):
    weights = tmp_path / "w.caffemodel"
    if kind == "empty":
        weights.write_bytes(b"")
    elif kind == "random":
        weights.write_bytes(os.urandom(5000))
    else:
        n = caffe.NetSpec()
        n.data = caffe.layers.Input(shape=dict(dim=[1, 3, 8, 8]))
        n.conv1 = caffe.layers.Convolution(n.data, num_output=2, kernel_size=3)
        (tmp_path / "small.prototxt").write_text(str(n.to_proto()))
        caffe.Net(str(tmp_path / "small.prototxt"), caffe.TEST).save(str(weights))
    out = tmp_path / "out" / "report.json"
    done = inv("inspect", "--net", "caffenet", "--weights", str(weights), "--images", "1",
               "--json", str(out), results=tmp_path / "results")
    assert_one_error_line(done, "w.caffemodel")
    assert "does not fit this net" in done.stderr or "does not parse" in done.stderr
    assert list(out.parent.iterdir()) == []


def test_a_batch_beyond_memory_is_refused_up_front(tmp_path):
    started = time.monotonic()
    done = inv("bench", *SMALL_RUN, "--batch", "100000", results=tmp_path)
    assert_one_error_line(done, "--batch 100000 needs about", "GiB", "use --batch")
    assert time.monotonic() - started < 60
    assert list(tmp_path.iterdir()) == []


def start_bench(results: Path) -> subprocess.Popen:
    proc = subprocess.Popen(inv_command("bench", *SMALL_RUN, "--repeats", "200"), cwd=PROJECT_ROOT,
                            env=inv_env(results), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not runners_of(results):
        time.sleep(0.2)
    time.sleep(3)  # the runner is computing
    assert runners_of(results), "the benchmark runner never started"
    return proc


def test_sigterm_stops_bench_like_ctrl_c(tmp_path):
    proc = start_bench(tmp_path)
    proc.send_signal(signal.SIGTERM)  # `timeout` or `kill`: the parent only, not its group
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("bench did not stop after SIGTERM")
    assert proc.returncode == 143
    assert err.rstrip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert runners_of(tmp_path) == []


def test_kill_9_leaves_no_runner_and_the_next_run_removes_its_folder(tmp_path):
    proc = start_bench(tmp_path)
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and runners_of(tmp_path):
        time.sleep(0.2)
    assert runners_of(tmp_path) == []  # the runner died with its parent
    stale = [p for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].name.startswith(".partial-")
    done = inv("bench", *SMALL_RUN, "--layers", "conv5", "--paths", "dense", "--repeats", "1",
               "--warmup", "0", results=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"removed {stale[0]}, left by an interrupted run" in done.stderr
    assert "warning: --warmup 0: the first measured forward" in done.stderr
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert len(runs) == 1 and runs[0].startswith("caffenet-synthetic-")
    assert sorted(p.name for p in (tmp_path / runs[0]).iterdir()) == [
        "layer_times.png", "results.csv", "results.json"]  # dense only: no empty speedup chart
