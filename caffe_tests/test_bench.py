"""./inv bench end to end on a small slice of CaffeNet (1-2 repeats): schema, numbers derived from
measurements, CSV = JSON, report from the JSON alone, and the bad-input cases."""
from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparse_caffe.patching.config import CONV_TEMPLATE_CONFIG, PROJECT_ROOT

ARGS = ["--net", "caffenet", "--weights", "synthetic", "--layers", "conv[35]", "--repeats", "2",
        "--warmup", "0", "--images", "2", "--threads", "1"]


def inv(*args, results: Path, timeout=900):
    env = {**os.environ, "SPARSE_CAFFE_RESULTS": str(results)}
    invoke = Path(sys.executable).parent / "invoke"
    return subprocess.run([str(invoke), *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    done = inv("bench", *ARGS, results=results)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in results.iterdir()]
    assert len(runs) == 1 and runs[0].name.startswith("caffenet-synthetic-"), runs
    return runs[0]


def test_results_folder_is_complete(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "layer_times.png", "results.csv", "results.json", "speedup.png", "speedup_vs_sparsity.png"]


def test_json_schema(run_dir):
    r = json.loads((run_dir / "results.json").read_text())
    assert r["schema"] == "sparse-caffe-bench/2"
    assert {"cpu", "cores", "threads", "simd_flags", "memory_mib", "load_average_before",
            "load_average_after"} <= set(r["machine_info"])
    assert {"project_commit", "project_dirty", "caffe_commit", "caffe_source", "patch_series_sha256",
            "blas", "compiler", "python"} <= set(r["software"])
    assert r["weights"]["synthetic"] is True and r["weights"]["kind"] == "synthetic"
    assert len(r["weights"]["sha256"]) == 64
    assert r["images"]["count"] == 2 and len(r["images"]["sha256"]) == 64
    assert r["params"]["paths"] == list(CONV_TEMPLATE_CONFIG.selectable_paths)
    assert [layer["name"] for layer in r["layers"]] == ["conv3", "conv5"]
    for layer in r["layers"]:
        assert set(layer["paths"]) == set(r["params"]["paths"])
        for result in layer["paths"].values():
            assert len(result["times_ms"]) == 2
            assert {"min", "median", "q1", "q3", "iqr", "mean", "stddev"} <= set(result["stats"])
    assert set(r["net"]) == set(r["params"]["paths"])
    for result in r["net"].values():
        assert {"layer_sum_ms", "consistency_gap", "stages_ms", "layers_ms"} <= set(result)
    # the per-layer plan: every timed convolution on one of the paths, the whole net timed
    # alongside dense round by round, its top-1 equal to dense's
    plan = r["plan"]
    assert set(plan["layers"]) == {layer["name"] for layer in r["layers"]}
    assert set(plan["layers"].values()) <= set(r["params"]["paths"])
    assert len(plan["times_ms"]) == len(plan["dense_times_ms"]) == 2
    assert plan["speedup_vs_dense"] == pytest.approx(statistics.median(
        [d / t for d, t in zip(plan["dense_times_ms"], plan["times_ms"])]))
    assert plan["top1_agreement"] == 1.0
    # auto: calibrated during the warm-up (none given: as long as it took), each timed layer's
    # choice and candidates recorded, the whole net's choices and calibration length with it.
    # the last blob through the whole net, against dense's
    assert r["net"]["dense"]["output_max_rel_diff"] == 0
    assert all(0 <= r["net"][p]["output_max_rel_diff"] <= 1e-4 for p in r["net"])
    auto = r["net"]["auto"]["auto"]
    assert auto["calibration_forwards"] >= 1
    assert auto["warmup_forwards"] == auto["calibration_forwards"]
    assert auto["replanned_during_rounds"] == []
    assert {"conv3", "conv5", "fc6", "fc7", "fc8"} <= set(auto["choices"])
    for layer in r["layers"]:
        choice = layer["auto_choice"]
        assert choice == auto["choices"][layer["name"]] and choice["state"] == "decided"
        assert choice["path"] in CONV_TEMPLATE_CONFIG.forward_paths
        assert choice["candidates"]["dense"] is not None
        assert "sparse_output" in choice["pruned"]
        # what the profile saw auto run in the timed rounds is what it chose
        assert layer["paths"]["auto"]["counters"]["path"] == choice["path"]
    # The whole-vs-layers gap depends on the machine's load; every other problem is a failure.
    assert [p for p in r["problems"] if "one at a time" not in p] == []
    # The BLAS that pycaffe loaded, read from the library at run time.
    blas = r["software"]["blas_runtime"]
    assert blas["name"] in ("openblas", "mkl") and blas["threading"] in ("openmp", "gnu")
    assert [Path(p).name.split(".")[0] for p in blas["openmp_runtimes"]] == ["libgomp"]


def test_every_number_is_derived_from_measurements(run_dir, caffe):
    r = json.loads((run_dir / "results.json").read_text())
    for layer in r["layers"]:
        dense = layer["paths"]["dense"]
        for path, result in layer["paths"].items():
            # per-forward layer time = the sum of its phases, forward by forward
            phases = result["phases_raw_ms"]
            assert result["times_ms"] == pytest.approx([sum(v) for v in zip(*phases.values())])
            assert result["stats"]["median"] == pytest.approx(statistics.median(result["times_ms"]))
            assert result["stats"]["min"] == min(result["times_ms"]) > 0
            # paths timed side by side, round by round: ratios per round, then summarised; the
            # speedup is their median
            per_round = [d / t for d, t in zip(dense["times_ms"], result["times_ms"])]
            assert result["speedup_per_round"]["median"] == pytest.approx(statistics.median(per_round))
            assert result["speedup_vs_dense"] == result["speedup_per_round"]["median"]
            assert result["speedup_per_round"]["verdict"] in ("faster", "slower", "no clear difference")
            seconds = result["stats"]["median"] / 1e3
            assert result["effective_gflops"] == pytest.approx(
                2 * layer["dense_macs_per_image"] / seconds / 1e9)
            assert result["agrees"] and result["max_rel_diff"] < 1e-4
            # the layer alone on dense's input, and through the net: dense's own are exactly 0
            assert result["chain_max_rel_diff"] is not None
            if path == "dense":
                assert result["max_rel_diff"] == result["chain_max_rel_diff"] == 0
        # dense MACs from the layer's own shape: M x K x N
        out_c, in_per_group, (kh, kw) = layer["num_output"], layer["channels_per_group"], layer["kernel"]
        assert layer["dense_macs_per_image"] == out_c * in_per_group * kh * kw * np.prod(layer["output"][1:])
        assert 0 < layer["useful_macs_per_image"] < layer["dense_macs_per_image"]
    # weight sparsity equals that of the weights file itself
    from sparse_caffe.models import nets, zoo
    net = nets.load_net(zoo.deploy("caffenet", 1, Path(caffe.__file__).resolve().parents[2]))
    net.copy_from(r["weights"]["path"])
    for layer in r["layers"]:
        w = net.params[layer["name"]][0].data
        assert layer["weight_sparsity"] == pytest.approx(np.mean(w == 0))
    for path, result in r["net"].items():
        assert result["stats"]["median"] == pytest.approx(statistics.median(result["times_ms"]))
        assert result["top1_agreement"] == 1.0
        # every layer of the net is timed (not only the convolutions), and the stages add up
        assert list(result["layers_ms"])[:2] == ["data", "conv1"] and "fc8" in result["layers_ms"]
        assert sum(result["stages_ms"].values()) == pytest.approx(result["layer_sum_ms"], rel=0.2)
        assert result["stages_ms"]["convolution"] > 0 and result["stages_ms"]["fully_connected"] > 0
        assert result["consistency_gap"] == pytest.approx(
            1 - result["layer_sum_ms"] / result["stats"]["median"])
        # one thread (--threads 1): no team, so nothing ever ran on one thread for being late
        assert result["solo_regions"] == 0


def test_csv_agrees_with_json(run_dir):
    r = json.loads((run_dir / "results.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    assert len(rows) == len(r["layers"]) * len(r["params"]["paths"])
    for row in rows:
        layer = next(x for x in r["layers"] if x["name"] == row["layer"])
        result = layer["paths"][row["path"]]
        assert float(row["median_ms"]) == pytest.approx(result["stats"]["median"])
        assert float(row["speedup_vs_dense"]) == pytest.approx(result["speedup_vs_dense"])
        assert float(row["input_sparsity"]) == pytest.approx(layer["input_sparsity"])
        assert float(row["input2csr_ms"]) == pytest.approx(result["phases_ms"]["input2csr"])


def test_report_redraws_from_the_json_alone(run_dir, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "results.json").write_text((run_dir / "results.json").read_text())
    done = inv("report", str(copy), results=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in copy.glob("*.png")} == {"layer_times.png", "speedup.png",
                                                    "speedup_vs_sparsity.png"}
    assert "conv3" in done.stdout and "whole net" in done.stdout
    compared = inv("compare", str(run_dir), str(copy), results=tmp_path)
    assert compared.returncode == 0 and "1.00" in compared.stdout


@pytest.mark.parametrize("args, message", [
    (["--net", "vgg16"], "unknown net 'vgg16'"),
    (["--net", "caffenet", "--paths", "dense,fastest"], "unknown path fastest"),
    (["--net", "caffenet", "--backend", "cuda"], "unknown backend 'cuda'"),
    (["--net", "caffenet", "--repeats", "0"], "--repeats must be at least 1"),
    (["--net", "caffenet", "--backend", "mkl"], "--backend mkl needs an MKL build"),
    (["--net", "caffenet", "--images", "/no/such/folder"], "no such folder"),
    (["--net", "caffenet", "--weights", "/no/such.caffemodel"], "no such file"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    done = inv("bench", *args, results=tmp_path)
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_empty_image_folder_and_unfitting_weights(tmp_path, caffe):
    empty = tmp_path / "empty"
    empty.mkdir()
    results = tmp_path / "results"
    done = inv("bench", *ARGS[:-6], "--images", str(empty), results=results)
    assert done.returncode != 0 and "error:" in done.stderr.splitlines()[-1]
    assert not results.exists() or list(results.iterdir()) == []
    # weights of another net: a one-layer net's .caffemodel
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv1 = L.Convolution(n.data, num_output=2, kernel_size=3)
    (tmp_path / "small.prototxt").write_text(str(n.to_proto()))
    caffe.Net(str(tmp_path / "small.prototxt"), caffe.TEST).save(str(tmp_path / "small.caffemodel"))
    done = inv("bench", "--net", "caffenet", "--weights", str(tmp_path / "small.caffemodel"),
               "--repeats", "1", results=results)
    assert done.returncode != 0
    assert "does not fit this net" in done.stderr.splitlines()[-1], done.stderr[-1500:]
    assert not results.exists() or list(results.iterdir()) == []


def test_interrupted_run_leaves_nothing(tmp_path):
    env = {**os.environ, "SPARSE_CAFFE_RESULTS": str(tmp_path)}
    invoke = Path(sys.executable).parent / "invoke"
    proc = subprocess.Popen([str(invoke), "bench", "--net", "caffenet", "--weights", "synthetic",
                             "--repeats", "50", "--images", "1", "--threads", "1"],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, text=True,
                            # as in a terminal: a shell running us in the background (CI may)
                            # leaves SIGINT ignored, and ignored signals are inherited
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    try:
        # communicate, not wait: the pipes must be drained or a chatty process blocks on them
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"bench did not stop after Ctrl-C; its output:\n{out[-1500:]}\n{err[-3000:]}")
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == [], err[-2000:]


PTHREAD_OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


def test_bench_refuses_a_blas_that_threads_with_another_runtime(tmp_path):
    """Debian's default OpenBLAS threads with pthreads: preloaded into pycaffe (as an
    LD_LIBRARY_PATH or alternatives mix-up would), bench must refuse to time with it."""
    assert PTHREAD_OPENBLAS.is_file(), "libopenblas0-pthread is installed by ./inv build"
    env = {**os.environ, "SPARSE_CAFFE_RESULTS": str(tmp_path), "LD_PRELOAD": str(PTHREAD_OPENBLAS)}
    invoke = Path(sys.executable).parent / "invoke"
    done = subprocess.run([str(invoke), "bench", *ARGS[:-2], "--threads", "2"], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "threads with pthreads" in errors[0], done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_pytorch_side_by_side_baseline(tmp_path):
    """--pytorch installs torch on demand and times the same layers with the same weights and
    inputs in PyTorch's CPU convolution, and the whole net in PyTorch and ONNX Runtime; their
    outputs must match Caffe's dense ones."""
    done = inv("bench", *ARGS[:4], "--layers", "conv3", "--repeats", "1", "--warmup", "0",
               "--images", "1", "--threads", "1", "--paths", "dense,spmdm", "--pytorch",
               results=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(next(tmp_path.iterdir()).joinpath("results.json").read_text())
    torch_run = r["layers"][0]["pytorch"]
    assert torch_run["agrees"] and len(torch_run["times_ms"]) == 1
    assert torch_run["speedup_vs_dense"] == pytest.approx(
        r["layers"][0]["paths"]["dense"]["stats"]["median"] / torch_run["stats"]["median"])
    assert torch_run["memory_format"] in ("contiguous", "channels_last")
    assert set(torch_run["times_by_format_ms"]) == {"contiguous", "channels_last"}
    assert "pytorch" in done.stdout and "pytorch min" in done.stdout
    # The whole net in PyTorch and ONNX Runtime, beside Caffe's dense and plan in the same rounds.
    whole = r["baselines"]
    assert set(whole["caffe"]) == {"dense", "plan"}
    assert {"pytorch", "pytorch channels_last", "pytorch compile", "pytorch compile channels_last",
            "onnxruntime"} == set(whole["variants"])
    for variant in whole["variants"].values():
        assert "skipped" in variant or (variant["agrees"] and len(variant["times_ms"]) == 1)
    assert whole["fastest"]["onnxruntime"] == "onnxruntime" and whole["fastest"]["pytorch"]
    ort, plan_row = whole["variants"]["onnxruntime"], whole["caffe"]["plan"]
    assert whole["speedups"]["plan"]["onnxruntime"]["speedup"] == pytest.approx(statistics.median(
        [o / p for o, p in zip(ort["times_ms"], plan_row["times_ms"])]))
    for regime in ("after idle", "back to back"):
        assert f"PyTorch baseline ({regime}): " in done.stdout
        assert f"ONNX Runtime baseline ({regime}): onnxruntime" in done.stdout
    assert whole["back_to_back"]["speedups"]["plan"]["onnxruntime"]["speedup"] == pytest.approx(
        statistics.median([o / p for o, p in zip(ort["back_to_back_ms"],
                                                  plan_row["back_to_back_ms"])]))
    assert not r["problems"] or not any("whole net in" in p for p in r["problems"])


def test_open_nsfw_net_with_real_weights(tmp_path):
    """resnet50-1by2: Yahoo's open_nsfw converted from ONNX, pruned to SkimCaffe's profile."""
    done = inv("bench", "--net", "resnet50-1by2", "--layers", "res5c_branch2b", "--repeats", "1",
               "--warmup", "0", "--images", "1", "--threads", "1", "--paths", "dense,sparse_sparse",
               results=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = next(tmp_path.iterdir())
    assert run.name.startswith("resnet50-1by2-open_nsfw-pruned-")
    r = json.loads((run / "results.json").read_text())
    assert r["weights"]["synthetic"] is False and "open_nsfw" in r["weights"]["description"]
    # The model's licence beside the converted weights (its terms ask that it travel with them).
    license_file = Path(r["weights"]["license"])
    assert license_file.name == Path(r["weights"]["path"]).name + ".LICENSE"
    assert "Copyright 2016, Yahoo Inc." in license_file.read_text()
    layer = r["layers"][0]
    assert layer["weight_sparsity"] == pytest.approx(0.9792, abs=1e-4)
    assert layer["paths"]["sparse_sparse"]["agrees"]
