"""Report stage: statistics, results.json / results.csv, plots, terminal tables, comparisons.

Everything here is derived from the raw measurements alone, so `./inv report RUN_DIR` re-draws a
run's plots and table from its results.json.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from .errors import UserError

SCHEMA = "sparse-caffe-bench/1"
PHASES = ("im2col", "input2csr", "multiply", "output", "bias", "weight2csr")
PATH_COLOURS = {"dense": "tab:green", "spmdm": "tab:purple", "sparse_sparse": "tab:blue",
                "sparse_output": "tab:orange", "direct": "tab:brown"}


def stats(values: list[float]) -> dict:
    ordered = sorted(values)
    q1, median, q3 = (statistics.quantiles(ordered, n=4, method="inclusive")
                      if len(ordered) > 1 else (ordered[0],) * 3)
    return {"min": ordered[0], "max": ordered[-1], "median": median, "q1": q1, "q3": q3,
            "iqr": q3 - q1, "mean": statistics.fmean(ordered),
            "stddev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            "rounds": len(ordered)}


def derive(raw: dict, batch: int) -> tuple[list[dict], dict, list[str]]:
    """Per-layer and per-net results with statistics, from the runner's raw measurements."""
    paths = list(raw["paths"])
    baseline = paths[0]
    layers, problems = [], []
    for name in raw["layers"]:
        per_path = {}
        for path in paths:
            measured = raw["paths"][path]
            phases = measured["phases_ms"][name]
            totals = [sum(values) for values in zip(*phases.values())]
            counters = measured["counters"][name]
            per_path[path] = {"times_ms": totals, "stats": stats(totals),
                              "phases_ms": {k: statistics.median(v) for k, v in phases.items()},
                              "phases_raw_ms": phases, "counters": counters,
                              "max_rel_diff": measured["max_rel_diff"][name]}
        dense = per_path[baseline]
        c = dense["counters"]
        images = c["calls"]
        entry = {"name": name, **raw["shapes"][name],
                 "weight_sparsity": 1 - c["weight_nonzeros"] / c["weight_elements"],
                 "input_sparsity": 1 - c["input_nonzeros"] / c["input_elements"],
                 "dense_macs_per_image": c["dense_macs"] / images,
                 "useful_macs_per_image": c["useful_macs"] / images, "paths": per_path}
        for path, result in per_path.items():
            seconds = result["stats"]["median"] / 1e3
            result["speedup_vs_dense"] = dense["stats"]["median"] / result["stats"]["median"]
            result["effective_gflops"] = 2 * entry["dense_macs_per_image"] * batch / seconds / 1e9
            result["useful_gflops"] = 2 * entry["useful_macs_per_image"] * batch / seconds / 1e9
            result["input2csr_share"] = result["phases_ms"].get("input2csr", 0.0) / result["stats"]["median"]
            result["agrees"] = result["max_rel_diff"] <= raw["agreement_tolerance"]
            if not result["agrees"]:
                problems.append(f"{name} on {path}: output differs from dense by "
                                f"{result['max_rel_diff']:.1e} of its largest value")
        torch_run = (raw.get("pytorch") or {}).get("layers", {}).get(name)
        if torch_run:
            entry["pytorch"] = {"times_ms": torch_run["times_ms"], "stats": stats(torch_run["times_ms"]),
                                "max_rel_diff": torch_run["max_rel_diff"],
                                "agrees": torch_run["max_rel_diff"] <= raw["agreement_tolerance"]}
            entry["pytorch"]["speedup_vs_dense"] = (dense["stats"]["median"] /
                                                    entry["pytorch"]["stats"]["median"])
            if not entry["pytorch"]["agrees"]:
                problems.append(f"{name} in PyTorch: output differs from Caffe's dense by "
                                f"{torch_run['max_rel_diff']:.1e} of its largest value")
        layers.append(entry)
    net = {}
    for path in paths:
        times = raw["paths"][path]["net_times_ms"]
        net[path] = {"times_ms": times, "stats": stats(times),
                     "top1_agreement": raw["paths"][path]["top1_agreement"]}
        if net[path]["top1_agreement"] < 1.0:
            problems.append(f"whole net on {path}: top-1 agrees with dense on "
                            f"{net[path]['top1_agreement']:.1%} of the images")
    for path in paths:
        net[path]["speedup_vs_dense"] = net[baseline]["stats"]["median"] / net[path]["stats"]["median"]
    return layers, net, problems


def load(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no results.json; give a folder written by ./inv bench")
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a {SCHEMA} results file")
    return data


def write_csv(results: dict, path: Path) -> None:
    columns = ["layer", "path", "backend", "num_output", "channels_per_group", "kernel", "input",
               "weight_sparsity", "input_sparsity", "dense_macs_per_image", "useful_macs_per_image",
               "median_ms", "min_ms", "q1_ms", "q3_ms", *[f"{p}_ms" for p in PHASES],
               "speedup_vs_dense", "effective_gflops", "useful_gflops", "input2csr_share",
               "max_rel_diff", "agrees"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for layer in results["layers"]:
            for path_name, r in layer["paths"].items():
                s = r["stats"]
                writer.writerow([layer["name"], path_name, results["params"]["backend"],
                                 layer["num_output"], layer["channels_per_group"],
                                 "x".join(map(str, layer["kernel"])),
                                 "x".join(map(str, layer["input"])), layer["weight_sparsity"],
                                 layer["input_sparsity"], layer["dense_macs_per_image"],
                                 layer["useful_macs_per_image"], s["median"], s["min"], s["q1"],
                                 s["q3"], *[r["phases_ms"].get(p, 0.0) for p in PHASES],
                                 r["speedup_vs_dense"], r["effective_gflops"], r["useful_gflops"],
                                 r["input2csr_share"], r["max_rel_diff"], r["agrees"]])


def table(results: dict) -> str:
    """The terminal table: per layer, each path's median time and speedup over dense."""
    paths = list(results["params"]["paths"])
    torch = all("pytorch" in layer for layer in results["layers"]) and results["layers"]
    head = (f"{'layer':<18}{'w 0%':>6}{'in 0%':>6}" + "".join(f"{p[:13]:>15}" for p in paths)
            + (f"{'pytorch':>15}" if torch else "") + "   best")
    lines = [head, "-" * len(head)]
    for layer in results["layers"]:
        cells = []
        for p in paths:
            r = layer["paths"][p]
            mark = "!" if not r["agrees"] else ""
            cells.append(f"{r['stats']['median']:8.3f} {r['speedup_vs_dense']:4.1f}x{mark}")
        if torch:
            t = layer["pytorch"]
            cells.append(f"{t['stats']['median']:8.3f} {t['speedup_vs_dense']:4.1f}x"
                         + ("" if t["agrees"] else "!"))
        best = max(paths, key=lambda p: layer["paths"][p]["speedup_vs_dense"])
        lines.append(f"{layer['name'][:18]:<18}{layer['weight_sparsity']:6.0%}{layer['input_sparsity']:6.0%}"
                     + "".join(f"{c:>15}" for c in cells) + f"   {best}")
    net = results["net"]
    lines.append("-" * len(head))
    lines.append(f"{'whole net (ms)':<30}" + "".join(
        f"{net[p]['stats']['median']:8.2f} {net[p]['speedup_vs_dense']:4.1f}x " for p in paths))
    lines.append(f"{'top-1 agreement':<30}" + "".join(f"{net[p]['top1_agreement']:>14.0%} " for p in paths))
    weights = results["weights"]
    lines.append(f"weights: {weights['kind']}{' (SYNTHETIC)' if weights['synthetic'] else ''}; "
                 f"times are medians of {results['params']['repeats']} forwards, ms; "
                 "'!' = output differs from dense")
    for problem in results["problems"]:
        lines.append(f"WARNING: {problem}")
    return "\n".join(lines)


def plot(results: dict, out_dir: Path) -> list[Path]:
    """The three charts, as PNG files in out_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = results["layers"]
    names = [layer["name"] for layer in layers]
    paths = list(results["params"]["paths"])
    title = (f"{results['params']['net']} ({results['weights']['kind']}"
             f"{', SYNTHETIC weights' if results['weights']['synthetic'] else ''}), batch "
             f"{results['params']['batch']}, {results['params']['threads']} threads, "
             f"{results['params']['backend']} - {results['machine_info']['cpu']}")
    written = []
    x = list(range(len(names)))
    width = 0.8 / len(paths)

    # 1. the seed study's chart: time per layer; sparse paths stacked input2CSR (red) + rest.
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.5), 5))
    for i, p in enumerate(paths):
        xs = [v + (i - (len(paths) - 1) / 2) * width for v in x]
        medians = [layer["paths"][p]["stats"]["median"] for layer in layers]
        if p in ("sparse_sparse", "sparse_output"):
            conversion = [layer["paths"][p]["phases_ms"].get("input2csr", 0.0) for layer in layers]
            rest = [m - c for m, c in zip(medians, conversion)]
            ax.bar(xs, conversion, width, color="tab:red",
                   label="input2CSR" if p == "sparse_sparse" or "sparse_sparse" not in paths else None)
            ax.bar(xs, rest, width, bottom=conversion, color=PATH_COLOURS.get(p),
                   label=f"{p} (multiply and rest)")
        else:
            ax.bar(xs, medians, width, color=PATH_COLOURS.get(p), label=p)
    written.append(_save_per_layer(fig, ax, names, "median time per forward (ms)", title,
                                   out_dir / "layer_times.png"))

    # 2. speedup over dense per layer and path.
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.5), 5))
    for i, p in enumerate(paths[1:], start=1):
        xs = [v + (i - len(paths) / 2) * width for v in x]
        ax.bar(xs, [layer["paths"][p]["speedup_vs_dense"] for layer in layers], width,
               color=PATH_COLOURS.get(p), label=p)
    ax.axhline(1.0, color="black", linewidth=1)
    written.append(_save_per_layer(fig, ax, names, "speedup over dense (same run)", title,
                                   out_dir / "speedup.png"))

    # 3. speedup against measured input sparsity and weight sparsity.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in ((axes[0], "input_sparsity", "measured input sparsity (zeros)"),
                           (axes[1], "weight_sparsity", "weight sparsity (zeros)")):
        for p in paths[1:]:
            ax.scatter([layer[key] for layer in layers],
                       [layer["paths"][p]["speedup_vs_dense"] for layer in layers],
                       color=PATH_COLOURS.get(p), label=p, s=18)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xlabel(label)
    axes[0].set_ylabel("speedup over dense")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "speedup_vs_sparsity.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def _save_per_layer(fig, ax, names: list[str], ylabel: str, title: str, path: Path) -> Path:
    """Label a per-layer bar chart (one tick per layer), save it as PNG, close it."""
    import matplotlib.pyplot as plt
    ax.set_xticks(list(range(len(names))), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(a: dict, b: dict) -> str:
    """Ratios of B to A per layer and path (median times), for runs of the same net."""
    if a["params"]["net"] != b["params"]["net"]:
        raise UserError(f"cannot compare a {a['params']['net']} run with a {b['params']['net']} run")
    layers_b = {layer["name"]: layer for layer in b["layers"]}
    paths = [p for p in a["params"]["paths"] if p in b["params"]["paths"]]
    head = f"{'layer':<18}" + "".join(f"{p[:13]:>26}" for p in paths)
    lines = [head, f"{'':<18}" + "".join(f"{'A ms':>9}{'B ms':>9}{'B/A':>8}" for _ in paths)]
    for layer in a["layers"]:
        other = layers_b.get(layer["name"])
        if other is None:
            continue
        cells = []
        for p in paths:
            ta, tb = layer["paths"][p]["stats"]["median"], other["paths"][p]["stats"]["median"]
            cells.append(f"{ta:9.3f}{tb:9.3f}{tb / ta:8.2f}")
        lines.append(f"{layer['name'][:18]:<18}" + "".join(cells))
    cells = []
    for p in paths:
        ta, tb = a["net"][p]["stats"]["median"], b["net"][p]["stats"]["median"]
        cells.append(f"{ta:9.2f}{tb:9.2f}{tb / ta:8.2f}")
    lines.append(f"{'whole net':<18}" + "".join(cells))
    return "\n".join(lines)
