"""Plots, tables and comparisons from a committed results.json (no Caffe needed)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
from PIL import Image

from sparse_caffe.host import report
from sparse_caffe.patching.config import CONV_TEMPLATE_CONFIG, PROJECT_ROOT

RUNS = PROJECT_ROOT / "results"


def latest_run(net: str) -> dict:
    """The newest committed reference run of a net (its results.json) that measured every path:
    runs of a few paths (--paths) are committed beside them."""
    for path in sorted(RUNS.glob(f"{net}-synthetic-*/results.json"), reverse=True):
        results = json.loads(path.read_text())
        if set(CONV_TEMPLATE_CONFIG.selectable_paths) <= set(results["params"]["paths"]):
            return results
    raise AssertionError(f"no committed {net} run measured every path")


CAFFENET = latest_run("caffenet")
RESNET = latest_run("resnet50")


def only_paths(results: dict, paths: list[str]) -> dict:
    results = copy.deepcopy(results)
    results["params"]["paths"] = paths
    for layer in results["layers"]:
        layer["paths"] = {p: layer["paths"][p] for p in paths}
        layer.pop("pytorch", None)  # only the paths asked for
    results["net"] = {p: results["net"][p] for p in paths}
    return results


def test_charts_read_at_natural_size(tmp_path):
    """ResNet-50's 53 layers wrap into rows: no chart wider than a screen; the title says
    SYNTHETIC once."""
    for path in report.plot(RESNET, tmp_path):
        width, height = Image.open(path).size
        assert width <= 1500 and height <= 1300, (path.name, width, height)
    title = report.plot_title(RESNET)
    assert title.count("SYNTHETIC") == 1 and "synthetic," not in title


def test_a_dense_only_run_draws_no_empty_chart(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "no artists with labels" among them
        written = report.plot(only_paths(CAFFENET, ["dense"]), tmp_path)
    assert [p.name for p in written] == ["layer_times.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_times.png"]
    assert "whole net" in report.table(only_paths(CAFFENET, ["dense"]))


def test_pytorch_is_in_the_charts_and_the_best_column(tmp_path):
    results = only_paths(CAFFENET, ["dense", "spmdm"])
    for layer in results["layers"]:
        dense = layer["paths"]["dense"]["stats"]["median"]
        layer["pytorch"] = {"times_ms": [dense / 100], "stats": report.stats([dense / 100]),
                            "max_rel_diff": 0.0, "agrees": True, "speedup_vs_dense": 100.0}
    assert report.series(results) == ["dense", "spmdm", "pytorch"]
    rows = report.table(results).splitlines()
    assert "pytorch" in rows[0]
    assert all(row.endswith("pytorch") for row in rows[2:2 + len(results["layers"])])
    # speedup-vs-sparsity is for the sparse paths; PyTorch is drawn in the per-layer charts
    assert [p.name for p in report.plot(results, tmp_path)] == [
        "layer_times.png", "speedup.png", "speedup_vs_sparsity.png"]
    torch_only = only_paths(results, ["dense"])
    torch_only["layers"] = [{**layer, "pytorch": with_torch["pytorch"]} for layer, with_torch
                            in zip(torch_only["layers"], results["layers"])]
    (tmp_path / "torch").mkdir()
    assert [p.name for p in report.plot(torch_only, tmp_path / "torch")] == [
        "layer_times.png", "speedup.png"]


def test_compare_says_which_runs_and_what_differs():
    other = copy.deepcopy(CAFFENET)
    other["params"]["threads"] = 1
    text = report.compare(CAFFENET, other, "run-a", "run-b")
    a, b, differ = text.splitlines()[:3]
    assert a.startswith("A: run-a: caffenet, SYNTHETIC weights (sha256 ")
    assert "batch 1, 2 threads" in a and "batch 1, 1 threads" in b
    assert CAFFENET["machine_info"]["cpu"] in a  # the CPU the run was on (runs differ in that)
    assert differ == "parameters that differ: threads"


def raw_baselines(pytorch_ms: float, disagreeing_ms: float) -> dict:
    """Raw whole-net baselines as sparse_caffe.inside.baselines writes them: Caffe's dense and plan and
    three variants in the same 3 rounds, one of which disagrees with Caffe, one skipped. Back to
    back, every row is 10% faster, but ONNX Runtime 40 ms (its threads awake: faster than the plan
    back to back, slower after idle)."""
    def variant(framework, times, diff=1e-6, top1=0):
        return {"framework": framework, "memory_format": "contiguous", "compiled": False,
                "times_ms": times, "back_to_back_ms": [0.9 * t for t in times],
                "max_rel_diff": diff, "top1_differs": top1, "images": 6,
                "agrees": diff <= 1e-4 and top1 == 0, "setup_s": 1.0}
    onnxruntime = variant("onnxruntime", [65.0, 60.0, 70.0])
    onnxruntime["back_to_back_ms"] = [40.0] * 3
    return {"torch_version": "2.13.0", "threads": 2, "batch": 1, "settle_s": 0.02,
            "caffe": {"dense": {"times_ms": [100.0, 110.0, 105.0],
                                "back_to_back_ms": [90.0, 99.0, 94.5]},
                      "plan": {"times_ms": [50.0, 55.0, 52.0],
                               "back_to_back_ms": [45.0, 49.5, 46.8]}},
            "variants": {"pytorch": variant("pytorch", [pytorch_ms] * 3),
                         "pytorch channels_last": variant("pytorch", [disagreeing_ms] * 3, 0.2),
                         "pytorch compile": {"framework": "pytorch", "compiled": True,
                                             "memory_format": "contiguous",
                                             "skipped": "RuntimeError: no compiler"},
                         "onnxruntime": onnxruntime}}


def test_whole_net_baselines_fastest_agreeing_variant_and_ratios():
    baselines, problems = report.derive_baselines(raw_baselines(80.0, 40.0), 1e-4)
    # The disagreeing variant is faster but never the baseline, and is a problem.
    assert baselines["fastest"] == {"pytorch": "pytorch", "onnxruntime": "onnxruntime"}
    assert len(problems) == 1 and "pytorch channels_last" in problems[0]
    plan_vs = baselines["speedups"]["plan"]
    assert plan_vs["pytorch"]["speedup"] == 80.0 / 52.0
    # Round by round (65/50, 60/55, 70/52), the median of those: not the ratio of the medians.
    assert plan_vs["onnxruntime"]["speedup"] == 65.0 / 50.0 != 65.0 / 52.0
    assert plan_vs["onnxruntime"]["speedup_per_round"]["q1"] < plan_vs["onnxruntime"]["speedup"]
    assert baselines["speedups"]["dense"]["pytorch"]["speedup"] == 80.0 / 105.0
    assert baselines["variants"]["pytorch compile"]["skipped"]
    lines = report.baselines_table(baselines)
    text = "\n".join(lines)
    assert "skipped: RuntimeError: no compiler" in text
    assert any(line.startswith("pytorch channels_last") and line.endswith("!") for line in lines)
    assert "PyTorch baseline (after idle): pytorch;" in text and "plan 1.54x" in text
    assert "ONNX Runtime baseline (after idle): onnxruntime;" in text
    # Back to back: the same rule on each row's second forward.
    b2b = baselines["back_to_back"]
    assert b2b["fastest"] == {"pytorch": "pytorch", "onnxruntime": "onnxruntime"}
    assert b2b["speedups"]["plan"]["pytorch"]["speedup"] == pytest.approx(72.0 / 46.8)
    assert b2b["speedups"]["plan"]["onnxruntime"]["speedup"] == pytest.approx(40.0 / 46.8)
    assert baselines["caffe"]["plan"]["back_to_back_stats"]["median"] == 46.8
    assert "ONNX Runtime baseline (back to back): onnxruntime; Caffe's speedup over it (round " \
           "quartiles): dense 0.42x" in text and "plan 0.85x" in text


def test_baselines_from_runs_that_timed_one_forward_per_row():
    """Results written before rows were timed twice: the after-idle comparison alone."""
    raw = raw_baselines(80.0, 40.0)
    for row in [*raw["caffe"].values(), *raw["variants"].values()]:
        row.pop("back_to_back_ms", None)
    baselines, _ = report.derive_baselines(raw, 1e-4)
    assert "back_to_back" not in baselines and "back_to_back_stats" not in baselines["caffe"]["plan"]
    text = "\n".join(report.baselines_table(baselines))
    assert "b2b" not in text and "(back to back)" not in text
    assert baselines["speedups"]["plan"]["pytorch"]["speedup"] == 80.0 / 52.0


def test_no_agreeing_variant_means_no_baseline():
    raw = raw_baselines(80.0, 40.0)
    raw["variants"]["pytorch"]["top1_differs"] = 1
    baselines, problems = report.derive_baselines(raw, 1e-4)
    assert baselines["fastest"]["pytorch"] is None and "pytorch" not in baselines["speedups"]["plan"]
    assert len(problems) == 2
    assert "PyTorch: no variant agrees" in "\n".join(report.baselines_table(baselines))
    assert report.derive_baselines(None, 1e-4) == (None, [])
