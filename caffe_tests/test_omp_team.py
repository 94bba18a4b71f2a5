"""Our OpenMP regions under background load (omp_team.hpp): when a thread of the team has no core,
the regions run on one thread for a while, and the results stay exact.

The load is made so that it always bites, whatever the scheduler: the child pins its OpenMP
threads one per CPU (GOMP_CPU_AFFINITY) and runs at the lowest priority, and a process spinning at
normal priority is pinned to the CPU of the second thread. That thread then starts each region late
(by a scheduler time slice or more), which is what the watch must notice.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import json, sys, tempfile
import numpy as np
import caffe
from sparse_caffe.inside.layer_bench import SHAPES, synthetic_layer
caffe.set_mode_cpu()
path, shape = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    net, w, x = synthetic_layer(caffe, SHAPES[shape], 0.9 if path != "gemm_1x1" else 0.0, 0.65, 0, tmp)
    caffe.set_conv_forward_path("dense", "conv")
    dense = net.forward()["conv"].copy()
    caffe.set_conv_forward_path(path, "conv")
    worst = 0.0
    for _ in range(int(sys.argv[3])):
        got = net.forward()["conv"]
        worst = max(worst, float(np.abs(got - dense).max() / np.abs(dense).max()))
print(json.dumps({"solo": caffe.team_solo_regions(), "worst": worst}))
"""

# (path, layer shape from layer_bench.SHAPES): each path's own parallel regions are watched.
CASES = [("direct", "res4_branch2b"), ("spmdm", "res5_branch2b"),
         ("sparse_sparse", "res5_branch2b"), ("gemm_1x1", "res5_branch2c")]


def two_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: one for each thread of the team")
    return cpus[:2]


def run_child(caffe_python_path, path, shape, forwards, env_extra, nice):
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="2", GLOG_minloglevel="2",
               PYTHONPATH=os.pathsep.join([str(caffe_python_path), str(root)]), **env_extra)
    result = subprocess.run([sys.executable, "-c", CHILD, path, shape, str(forwards)], env=env,
                            capture_output=True, text=True, cwd=root, timeout=300,
                            preexec_fn=(lambda: os.nice(19)) if nice else None)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path,shape", CASES, ids=[p for p, _ in CASES])
def test_a_late_team_runs_on_one_thread_and_stays_exact(caffe_python_path, path, shape):
    first, second = two_cpus()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                               preexec_fn=lambda: os.sched_setaffinity(0, {second}))
    try:
        got = run_child(caffe_python_path, path, shape, 200,
                        {"GOMP_CPU_AFFINITY": f"{first} {second}"}, nice=True)
    finally:
        spinner.kill()
        spinner.wait()
    assert got["solo"] > 0, got
    assert got["worst"] < 1e-5, got
