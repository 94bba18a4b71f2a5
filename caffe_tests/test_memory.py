"""./inv memory through the real command: per path, in fresh processes, the peak resident memory of
the forwards, its ratio to dense's, and the growth after the warm-up (a leak check)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sparse_caffe.patching.config import CONV_TEMPLATE_CONFIG, PROJECT_ROOT


def test_memory_per_path_in_fresh_processes(tmp_path):
    env = {**os.environ, "SPARSE_CAFFE_RESULTS": str(tmp_path)}
    done = subprocess.run([str(Path(sys.executable).parent / "invoke"), "memory", "--net",
                           "caffenet", "--weights", "synthetic", "--paths", "dense,direct",
                           "--forwards", "3", "--threads", "1"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [record_file] = (tmp_path / "memory").iterdir()
    record = json.loads(record_file.read_text())
    assert list(record["paths"]) == ["dense", "direct"] and record["forwards"] == 3
    dense, direct = record["paths"]["dense"], record["paths"]["direct"]
    for entry in (dense, direct):
        # the peak restarts once the net is built: it covers the forwards, never less than now
        assert entry["after_forwards"]["peak_mib"] >= entry["after_forwards"]["rss_mib"] > 0
        assert entry["forward_peak_mib"] == entry["after_forwards"]["peak_mib"] - \
            entry["before_forward"]["rss_mib"]
    assert direct["peak_vs_dense"] == direct["after_forwards"]["peak_mib"] / \
        dense["after_forwards"]["peak_mib"]
    assert "direct" in done.stdout and str(record_file) in done.stdout


def test_memory_leak_check_on_the_small_synthetic_net(tmp_path):
    env = {**os.environ, "SPARSE_CAFFE_RESULTS": str(tmp_path)}
    done = subprocess.run([str(Path(sys.executable).parent / "invoke"), "memory", "--net", "small",
                           "--forwards", "20", "--threads", "1"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [record_file] = (tmp_path / "memory").iterdir()
    assert record_file.name.startswith("small-b1-")
    record = json.loads(record_file.read_text())
    assert record["net"] == "small" and record["weights"] == "synthetic"
    assert list(record["paths"]) == ["dense", *CONV_TEMPLATE_CONFIG.forward_paths[1:], "auto"]
    for path, entry in record["paths"].items():
        assert entry["forwards"] == 20, path
        assert entry["growth_after_warmup_mib"] == \
            entry["after_forwards"]["rss_mib"] - entry["after_warmup"]["rss_mib"]
        assert f"{path:<15}" in done.stdout


def test_memory_refuses_a_bad_path_list_for_the_small_net(tmp_path):
    env = {**os.environ, "SPARSE_CAFFE_RESULTS": str(tmp_path)}
    done = subprocess.run([str(Path(sys.executable).parent / "invoke"), "memory", "--net", "small",
                           "--paths", "dense,direct,direct"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "--paths names direct more than once" in done.stderr
    assert not (tmp_path / "memory").exists() or not any((tmp_path / "memory").iterdir())
