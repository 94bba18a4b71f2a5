"""Plots, tables and comparisons from a committed results.json (no Caffe needed)."""
from __future__ import annotations

import copy
import json
import warnings

from PIL import Image

from sparse_caffe import report
from sparse_caffe.config import PROJECT_ROOT

RUNS = PROJECT_ROOT / "results"


def latest_run(net: str) -> dict:
    """The newest committed reference run of a net (its results.json)."""
    return json.loads(sorted(RUNS.glob(f"{net}-synthetic-*/results.json"))[-1].read_text())


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
    assert "batch 1, 2 threads" in a and "batch 1, 1 threads" in b and "AMD EPYC" in a
    assert differ == "parameters that differ: threads"
