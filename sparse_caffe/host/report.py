"""Report stage: statistics, results.json / results.csv, plots, terminal tables, comparisons.

Everything here is derived from the raw measurements alone, so `./inv report RUN_DIR` re-draws a
run's plots and table from its results.json.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ..errors import UserError
from ..inside.protocol import RawResult
from ..inside.measure import lower_bound
from ..patching.config import CONV_TEMPLATE_CONFIG

SCHEMA = "sparse-caffe-bench/2"
# The whole forward and the sum of its layers' times (same forwards, one layer at a time) should
# agree; a larger gap means time lost outside the layers (e.g. two thread pools fighting).
CONSISTENCY_TOLERANCE = 0.10
# How the whole forward is broken down: Caffe layer types per stage, the rest is "other".
STAGES = (("convolution", ("Convolution",)), ("fully_connected", ("InnerProduct",)))
PHASES = CONV_TEMPLATE_CONFIG.phases
# One colour per path, in config's order (dense green, spmdm purple, as the seed study drew them).
PATH_COLOURS = dict(zip(CONV_TEMPLATE_CONFIG.selectable_paths,
                        ("tab:green", "tab:purple", "tab:blue", "tab:orange", "tab:brown",
                         "tab:cyan", "tab:pink", "tab:olive", "black")))
assert len(PATH_COLOURS) == len(CONV_TEMPLATE_CONFIG.selectable_paths), "a path has no colour"


def stats(values: list[float]) -> dict:
    ordered = sorted(values)
    q1, median, q3 = (statistics.quantiles(ordered, n=4, method="inclusive")
                      if len(ordered) > 1 else (ordered[0],) * 3)
    return {"min": ordered[0], "max": ordered[-1], "median": median, "q1": q1, "q3": q3,
            "iqr": q3 - q1, "mean": statistics.fmean(ordered),
            "stddev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            "rounds": len(ordered)}


def layer_limit(entry: dict, counters: dict, batch: int, probe: dict) -> dict:
    """lower_bound of one forward of `batch` images, from a run's per-image counters."""
    images = counters["calls"] or 1
    outputs = entry["num_output"] * _product(entry["output"][1:]) * batch
    # A fused residual (shaped as the output) is read once more.
    return lower_bound(counters["useful_macs"] / images * batch, counters["weight_nonzeros"],
                       counters["input_elements"] / images * batch,
                       outputs * (2 if entry.get("residual") else 1), probe)


def _product(values) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def round_ratios(dense: list[float], other: list[float]) -> dict:
    """dense / other round by round (the two were timed in the same round, side by side),
    summarised; a spread that straddles 1.0 is no clear difference, not a win or a loss."""
    summary = stats([d / o for d, o in zip(dense, other)])
    summary["verdict"] = ("no clear difference" if summary["q1"] <= 1.0 <= summary["q3"]
                          else "faster" if summary["q1"] > 1.0 else "slower")
    return summary


def derive(raw: RawResult, batch: int) -> tuple[list[dict], dict, list[str]]:
    """Per-layer and per-net results with statistics, from the child's "net" RawResult."""
    paths = list(raw.paths)
    baseline = paths[0]
    layers, problems = [], []
    for name in raw.layers:
        per_path = {}
        for path in paths:
            measured = raw.paths[path]
            phases = measured["phases_ms"][name]
            totals = [sum(values) for values in zip(*phases.values())]
            counters = measured["counters"][name]
            per_path[path] = {"times_ms": totals, "stats": stats(totals),
                              "phases_ms": {k: statistics.median(v) for k, v in phases.items()},
                              "phases_raw_ms": phases, "counters": counters,
                              # the layer alone on dense's input; chain_: through the net
                              "max_rel_diff": measured["max_rel_diff"][name],
                              "chain_max_rel_diff": measured.get("chain_max_rel_diff",
                                                                 {}).get(name)}
        dense = per_path[baseline]
        c = dense["counters"]
        images = c["calls"]
        entry = {"name": name, **raw.shapes[name],
                 "weight_sparsity": 1 - c["weight_nonzeros"] / c["weight_elements"],
                 "input_sparsity": 1 - c["input_nonzeros"] / c["input_elements"],
                 "dense_macs_per_image": c["dense_macs"] / images,
                 "useful_macs_per_image": c["useful_macs"] / images, "paths": per_path}
        probe = raw.machine_probe
        if probe:
            entry["limit"] = layer_limit(entry, c, batch, probe)
        for path, result in per_path.items():
            seconds = result["stats"]["median"] / 1e3
            if probe:
                result["limit_fraction"] = entry["limit"]["t_min_ms"] / result["stats"]["median"]
            result["speedup_per_round"] = round_ratios(dense["times_ms"], result["times_ms"])
            result["speedup_vs_dense"] = result["speedup_per_round"]["median"]
            result["effective_gflops"] = 2 * entry["dense_macs_per_image"] * batch / seconds / 1e9
            result["useful_gflops"] = 2 * entry["useful_macs_per_image"] * batch / seconds / 1e9
            result["input2csr_share"] = result["phases_ms"].get("input2csr", 0.0) / result["stats"]["median"]
            result["agrees"] = result["max_rel_diff"] <= raw.agreement_tolerance
            if not result["agrees"]:
                problems.append(f"{name} on {path}: output differs from dense by "
                                f"{result['max_rel_diff']:.1e} of its largest value")
        for path in paths:  # the auto path: what each layer's calibration chose, and why
            calibration = raw.paths[path].get("auto")
            if calibration and name in calibration["choices"]:
                entry["auto_choice"] = calibration["choices"][name]
        torch_run = (raw.pytorch or {}).get("layers", {}).get(name)
        if torch_run:
            entry["pytorch"] = {"times_ms": torch_run["times_ms"], "stats": stats(torch_run["times_ms"]),
                                "memory_format": torch_run.get("memory_format", "contiguous"),
                                "times_by_format_ms": torch_run.get("times_by_format_ms"),
                                "max_rel_diff": torch_run["max_rel_diff"],
                                "agrees": torch_run["max_rel_diff"] <= raw.agreement_tolerance}
            entry["pytorch"]["speedup_vs_dense"] = (dense["stats"]["median"] /
                                                    entry["pytorch"]["stats"]["median"])
            if not entry["pytorch"]["agrees"]:
                problems.append(f"{name} in PyTorch: output differs from Caffe's dense by "
                                f"{torch_run['max_rel_diff']:.1e} of its largest value")
        layers.append(entry)
    net = {}
    for path in paths:
        times = raw.paths[path]["net_times_ms"]
        net[path] = {"times_ms": times, "stats": stats(times),
                     "top1_agreement": raw.paths[path]["top1_agreement"],
                     # the last blob's difference from dense's, through the whole net
                     "output_max_rel_diff": raw.paths[path].get("output_max_rel_diff"),
                     **layer_breakdown(raw.net_layers, raw.paths[path]["layer_times_ms"])}
        whole, layer_sum = net[path]["stats"]["median"], net[path]["layer_sum_ms"]
        net[path]["consistency_gap"] = (whole - layer_sum) / whole
        if abs(net[path]["consistency_gap"]) > CONSISTENCY_TOLERANCE:
            why = ("time is lost outside the layers (thread pools fighting, or other processes)"
                   if whole > layer_sum else "the same layers timed one at a time took longer "
                   "(other processes on the cores make the timings drift)")
            problems.append(f"whole net on {path}: its layers take {layer_sum:.2f} ms one at a "
                            f"time but the whole forward {whole:.2f} ms "
                            f"({net[path]['consistency_gap']:+.0%}): {why}; re-run on a quiet "
                            "machine")
        net[path]["solo_regions"] = raw.paths[path].get("solo_regions")  # None: an older run
        if net[path]["solo_regions"]:
            problems.append(f"whole net on {path}: {net[path]['solo_regions']} parallel regions "
                            "of our kernels ran on one thread in its timed rounds (a thread of the "
                            "OpenMP team was late: another process busy on a core); its times are "
                            "a loaded machine's; re-run on a quiet machine")
        if net[path]["top1_agreement"] < 1.0:
            problems.append(f"whole net on {path}: top-1 agrees with dense on "
                            f"{net[path]['top1_agreement']:.1%} of the images")
        output_diff = net[path]["output_max_rel_diff"]
        if output_diff is not None and output_diff > raw.agreement_tolerance:
            problems.append(f"whole net on {path}: its last blob differs from dense's by "
                            f"{output_diff:.1e} of its largest value")
        calibration = raw.paths[path].get("auto")
        if calibration:
            net[path]["auto"] = calibration
            if calibration.get("replanned_during_rounds"):
                problems.append(f"{path} re-planned during the timed rounds on "
                                f"{', '.join(calibration['replanned_during_rounds'])}: their "
                                "times include calibration forwards")
    for path in paths:
        net[path]["speedup_per_round"] = round_ratios(net[baseline]["times_ms"], net[path]["times_ms"])
        net[path]["speedup_vs_dense"] = net[path]["speedup_per_round"]["median"]
    plan = raw.plan
    if plan:
        dense_times, times = plan["dense_net_times_ms"], plan["net_times_ms"]
        per_round = round_ratios(dense_times, times)
        net["plan"] = {"layers": plan["layers"], "rule": plan["rule"], "times_ms": times,
                       "stats": stats(times), "dense_times_ms": dense_times,
                       "dense_stats": stats(dense_times),
                       "speedup_vs_dense": per_round["median"], "speedup_per_round": per_round,
                       "top1_agreement": plan["top1_agreement"]}
        if plan["top1_agreement"] < 1.0:
            problems.append(f"whole net on the per-layer plan: top-1 agrees with dense on "
                            f"{plan['top1_agreement']:.1%} of the images")
    return layers, net, problems


# The two timed forwards of each row in the baselines' rounds (sparse_caffe.inside.baselines):
# the first after the settling pause, and the second right after it.
BASELINE_REGIMES = (("after idle", "times_ms", "stats"),
                    ("back to back", "back_to_back_ms", "back_to_back_stats"))


def derive_baselines(raw: dict | None, tolerance: float) -> tuple[dict | None, list[str]]:
    """The whole-net baselines' results (sparse_caffe.inside.baselines measured them): per variant and
    per Caffe configuration timed in the same rounds, statistics of both timed forwards; per
    framework the fastest variant by median among those that agree with Caffe's dense; and each
    Caffe configuration's speedup over each framework's fastest (its median / ours, with the
    round-by-round ratios), after idle (fastest, speedups) and back to back (back_to_back: the
    same two, from runs that timed it). A variant that disagrees with Caffe is a problem and
    never the baseline."""
    if not raw:
        return None, []
    regimes = [r for r in BASELINE_REGIMES
               if all(r[1] in row for row in raw["caffe"].values())]
    problems = []
    variants = {}
    for name, record in raw["variants"].items():
        entry = dict(record)
        if "skipped" not in record:
            for _, times, stats_key in regimes:
                entry[stats_key] = stats(record[times])
            if record["max_rel_diff"] > tolerance or record["top1_differs"]:
                entry["agrees"] = False
                problems.append(f"whole net in {name}: its output differs from Caffe's dense by "
                                f"{record['max_rel_diff']:.1e} of the largest value, top-1 on "
                                f"{record['top1_differs']} of {record['images']} images")
        variants[name] = entry
    caffe = {name: {k: v for _, times, stats_key in regimes
                    for k, v in ((times, row[times]), (stats_key, stats(row[times])))}
             for name, row in raw["caffe"].items()}
    compared = {}
    for regime, times, stats_key in regimes:
        fastest = {}
        for framework in ("pytorch", "onnxruntime"):
            timed = [n for n, v in variants.items() if v["framework"] == framework
                     and stats_key in v and v["agrees"]]
            fastest[framework] = (min(timed, key=lambda n: variants[n][stats_key]["median"])
                                  if timed else None)
        ratios = {}
        for ours, row in caffe.items():
            ratios[ours] = {}
            for framework, name in fastest.items():
                if name is None:
                    continue
                theirs = variants[name]
                per_round = round_ratios(theirs[times], row[times])
                ratios[ours][framework] = {"baseline": name, "speedup": per_round["median"],
                                           "speedup_per_round": per_round}
        compared[regime] = {"fastest": fastest, "speedups": ratios}
    result = {**{k: v for k, v in raw.items() if k not in ("variants", "caffe")},
              "variants": variants, "caffe": caffe, **compared["after idle"],
              "rule": "per framework, the variant with the lowest median whole-net time among "
                      "those agreeing with Caffe's dense is the baseline; speedup: the median "
                      "over the rounds of the baseline's time over the Caffe configuration's "
                      "in the same round; "
                      "fastest and speedups time each row's first forward after the settling "
                      "pause, back_to_back its second, right after the first"}
    if "back to back" in compared:
        result["back_to_back"] = compared["back to back"]
    return result, problems


def baselines_table(baselines: dict) -> list[str]:
    """The whole-net baselines block of the terminal table."""
    caffe, variants = baselines["caffe"], baselines["variants"]
    ours = list(caffe)
    both = "back_to_back" in baselines
    head = (f"{'whole net, same rounds':<32}{'median ms':>10}{'min ms':>9}"
            + (f"{'b2b med':>9}" if both else "")
            + "".join(f"{o + ' is':>12}" for o in ours))
    lines = [head]
    rows = [(f"caffe {n}", r) for n, r in caffe.items()] + list(variants.items())
    for name, row in rows:
        if "skipped" in row:
            lines.append(f"{name[:31]:<32}skipped: {row['skipped'][:160]}")
            continue
        mark = "" if row.get("agrees", True) else " !"
        lines.append(f"{name[:31]:<32}{row['stats']['median']:10.2f}{row['stats']['min']:9.2f}"
                     + (f"{row['back_to_back_stats']['median']:9.2f}" if both else "")
                     + "".join(f"{row['stats']['median'] / caffe[o]['stats']['median']:11.2f}x"
                               for o in ours) + mark)
    regimes = [("after idle", baselines)] + ([("back to back", baselines["back_to_back"])]
                                             if both else [])
    for regime, compared in regimes:
        for framework, label in (("pytorch", "PyTorch"), ("onnxruntime", "ONNX Runtime")):
            name = compared["fastest"].get(framework)
            if name is None:
                lines.append(f"{label}: no variant agrees with Caffe's dense: no baseline")
                continue
            parts = []
            for o in ours:
                r = compared["speedups"][o][framework]
                q = r["speedup_per_round"]
                parts.append(f"{o} {r['speedup']:.2f}x ({q['q1']:.2f}-{q['q3']:.2f})")
            lines.append(f"{label} baseline ({regime}): {name}; Caffe's speedup over it (round "
                         "quartiles): " + ", ".join(parts))
    lines.append("whole net, same rounds: every row timed once per round, in rotated order, "
                 "after a pause (median, min, and '<caffe row> is': how many times faster "
                 "Caffe's whole forward in that configuration is than the row, median over "
                 "median)" + ("; b2b: the same row's second forward, right after the first"
                              if both else "")
                 + "; '!' = disagrees with Caffe's dense, never the baseline")
    return lines


def layer_breakdown(net_layers: list, layer_times: dict) -> dict:
    """Medians over the forwards of: every layer's time, their sum, and the sum per stage
    (convolutions, fully connected layers, everything else)."""
    forwards = len(next(iter(layer_times.values())))
    stage_of = {name: next((stage for stage, types in STAGES if kind in types), "other")
                for name, kind in net_layers}
    sums = {stage: [0.0] * forwards for stage in [s for s, _ in STAGES] + ["other"]}
    for name, _ in net_layers:
        for i, ms in enumerate(layer_times[name]):
            sums[stage_of[name]][i] += ms
    total = [sum(values) for values in zip(*sums.values())]
    return {"layer_sum_ms": statistics.median(total),
            "stages_ms": {stage: statistics.median(values) for stage, values in sums.items()},
            "layers_ms": {name: statistics.median(layer_times[name]) for name, _ in net_layers}}


def load(run_dir: Path) -> dict:
    """A run's results.json; UserError in one line if it is missing, unreadable or not one."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no results.json; give a folder written by ./inv bench")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, so not a results file of ./inv bench") from None
    except ValueError as exc:  # empty, truncated or not JSON
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); it is "
                        "truncated or damaged: run the benchmark again") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a {SCHEMA} results file")
    missing = [key for key in ("params", "weights", "machine_info", "layers", "net", "problems")
               if key not in data]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it is incomplete: run the benchmark "
                        "again")
    return data


def plot_into(results: dict, out_dir: Path) -> list[Path]:
    """plot(), with one line instead of a traceback when out_dir cannot be written."""
    try:
        return plot(results, out_dir)
    except PermissionError as exc:
        raise UserError(f"cannot write the plots into {out_dir} ({exc.strerror}); copy the run "
                        "folder somewhere writable and report that") from None


def write_csv(results: dict, path: Path) -> None:
    columns = ["layer", "path", "backend", "num_output", "channels_per_group", "kernel", "input",
               "weight_sparsity", "input_sparsity", "dense_macs_per_image", "useful_macs_per_image",
               "median_ms", "min_ms", "q1_ms", "q3_ms", *[f"{p}_ms" for p in PHASES],
               "speedup_vs_dense", "effective_gflops", "useful_gflops", "input2csr_share",
               "max_rel_diff", "agrees", "t_min_ms", "limit_fraction"]
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
                                 r["input2csr_share"], r["max_rel_diff"], r["agrees"],
                                 layer.get("limit", {}).get("t_min_ms", ""),
                                 r.get("limit_fraction", "")])


# A layer under auto slower than this fraction of dense's speed is named in the table.
AUTO_SLOW = 0.95


def auto_name(choice: dict) -> str:
    """An auto choice as one word: the path, with its back end unless openmp."""
    backend = choice.get("backend", "openmp")
    return choice["path"] + ("" if backend == "openmp" else f"/{backend}")


def unclear(result: dict, is_baseline: bool) -> str:
    """'~' when a path's round-by-round ratio to dense does not clearly differ from 1."""
    verdict = result.get("speedup_per_round", {}).get("verdict")
    return "~" if verdict == "no clear difference" and not is_baseline else ""


def table(results: dict) -> str:
    """The terminal table: per layer, each path's median time and speedup over dense."""
    paths = list(results["params"]["paths"])
    auto_shown = any(results["net"].get(p, {}).get("auto") for p in paths)
    torch = all("pytorch" in layer for layer in results["layers"]) and results["layers"]
    head = (f"{'layer':<18}{'w 0%':>6}{'in 0%':>6}" + "".join(f"{p[:13]:>15}" for p in paths)
            + (f"{'pytorch':>15}{'pytorch min':>15}" if torch else "") + "   best")
    lines = [head, "-" * len(head)]
    for layer in results["layers"]:
        cells = []
        for p in paths:
            r = layer["paths"][p]
            mark = "!" if not r["agrees"] else unclear(r, p == paths[0])
            cells.append(f"{r['stats']['median']:8.3f} {r['speedup_vs_dense']:4.1f}x{mark}")
        if torch:
            t = layer["pytorch"]
            cells.append(f"{t['stats']['median']:8.3f} {t['speedup_vs_dense']:4.1f}x"
                         + ("" if t["agrees"] else "!"))
            cells.append(f"{t['stats']['min']:8.3f}")
        best = max(series(results), key=lambda p: _layer_result(layer, p)["speedup_vs_dense"])
        at_limit = _layer_result(layer, best).get("limit_fraction")
        # auto's choice, when auto is one of the table's columns
        choice = layer.get("auto_choice") if auto_shown else None
        lines.append(f"{layer['name'][:18]:<18}{layer['weight_sparsity']:6.0%}{layer['input_sparsity']:6.0%}"
                     + "".join(f"{c:>15}" for c in cells) + f"   {best}"
                     + (f" ({at_limit:.0%} of limit)" if at_limit is not None else "")
                     + (f"; auto: {auto_name(choice)}" if choice else ""))
    net = results["net"]
    lines.append("-" * len(head))
    fc_path = results["params"].get("fc_path", "dense")
    lines.append(f"{'whole net (ms)':<30}" + "".join(
        f"{net[p]['stats']['median']:8.2f} {net[p]['speedup_vs_dense']:4.1f}x"
        f"{unclear(net[p], p == paths[0]) or ' '}" for p in paths))
    lines.append(f"{'top-1 agreement':<30}" + "".join(f"{net[p]['top1_agreement']:>14.0%} " for p in paths))
    plan = results.get("plan")
    if plan:
        chosen = {}
        for path in plan["layers"].values():
            chosen[path] = chosen.get(path, 0) + 1
        lines.append(f"{'per-layer plan (ms)':<30}{plan['stats']['median']:8.2f} "
                     f"{plan['speedup_vs_dense']:4.1f}x{unclear(plan, False)} vs dense "
                     f"{plan['dense_stats']['median']:.2f} ms timed alongside; top-1 "
                     f"{plan['top1_agreement']:.0%}; layers: "
                     + ", ".join(f"{n} {p}" for p, n in sorted(chosen.items(), key=lambda x: -x[1])))
    for p in paths:
        calibration = net[p].get("auto")
        if not calibration:
            continue
        chosen = {}
        for choice in calibration["choices"].values():
            chosen[auto_name(choice)] = chosen.get(auto_name(choice), 0) + 1
        below = [layer for layer in results["layers"]
                 if layer["paths"][p]["speedup_vs_dense"] < AUTO_SLOW]
        slow = [layer["name"] for layer in below if not unclear(layer["paths"][p], False)]
        unclear_count = len(below) - len(slow)
        lines.append(f"{p + ' (ms)':<30}{net[p]['stats']['median']:8.2f} "
                     f"{net[p]['speedup_vs_dense']:4.2f}x{unclear(net[p], False)} vs dense; "
                     f"calibrated in {calibration['calibration_forwards']} forwards; layers: "
                     + ", ".join(f"{n} {c}" for c, n in sorted(chosen.items(), key=lambda x: -x[1]))
                     + (f"; clearly below {AUTO_SLOW}x dense: {', '.join(slow)}" if slow else "")
                     + (f"; {unclear_count} below {AUTO_SLOW}x with no clear difference "
                        "round by round" if unclear_count else ""))
    if results.get("baselines"):
        lines.extend(baselines_table(results["baselines"]))
    if all("stages_ms" in net[p] for p in paths):
        lines.append(f"{'sum of layers (ms)':<30}" + "".join(
            f"{net[p]['layer_sum_ms']:8.2f} {net[p]['consistency_gap']:+5.0%} " for p in paths))
        for stage in net[paths[0]]["stages_ms"]:
            lines.append(f"{'  ' + stage.replace('_', ' '):<30}" + "".join(
                f"{net[p]['stages_ms'][stage]:8.2f} {net[p]['stages_ms'][stage] / net[p]['layer_sum_ms']:5.0%} "
                for p in paths))
    weights = results["weights"]
    lines.append(f"weights: {weights['kind']}{' (SYNTHETIC)' if weights['synthetic'] else ''}; "
                 f"times are medians of {results['params']['repeats']} forwards, ms; "
                 "'!' = output differs from dense; '~' = no clear difference from dense (the "
                 "round-by-round ratios' quartiles straddle 1); whole net: the convolutions on "
                 f"the column's path, fully connected layers {fc_path} (dense under dense"
                 + (", auto under auto" if any(net[p].get("auto") for p in paths) else "") + "); "
                 "limit = t_min / t, t_min = "
                 "max(useful multiply-adds at the measured GEMM rate, bytes at the measured "
                 "bandwidth)")
    for problem in results["problems"]:
        lines.append(f"WARNING: {problem}")
    return "\n".join(lines)


LAYERS_PER_ROW = 14  # per-layer charts wrap into rows of this many layers
TORCH_COLOUR = "tab:gray"
LEGEND_COLUMNS = 6
DPI = 110


def series(results: dict) -> list[str]:
    """What the per-layer charts draw: the forward paths, then PyTorch when it was timed."""
    torch = bool(results["layers"]) and all("pytorch" in layer for layer in results["layers"])
    return list(results["params"]["paths"]) + (["pytorch"] if torch else [])


def _layer_result(layer: dict, name: str) -> dict:
    return layer["pytorch"] if name == "pytorch" else layer["paths"][name]


def plot_title(results: dict) -> str:
    params, weights = results["params"], results["weights"]
    label = "SYNTHETIC weights" if weights.get("synthetic") else f"{weights['kind']} weights"
    return (f"{params['net']}, {label}, batch {params['batch']}, {params['threads']} threads, "
            f"{params['backend']} back end - {results['machine_info']['cpu']}")


def plot(results: dict, out_dir: Path) -> list[Path]:
    """The charts, as PNG files in out_dir: per-layer times, and (when a sparse path or PyTorch
    was measured) speedups per layer and against sparsity. A dense-only run draws no empty chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = results["layers"]
    drawn = series(results)
    others = drawn[1:]
    title = plot_title(results)
    written = [_per_layer_chart(results, drawn, "time", out_dir / "layer_times.png", title)]
    if not others or not layers:
        return written
    written.append(_per_layer_chart(results, others, "speedup", out_dir / "speedup.png", title))

    sparse = [p for p in others if p != "pytorch"]
    if not sparse:
        return written
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in ((axes[0], "input_sparsity", "measured input sparsity (zeros)"),
                           (axes[1], "weight_sparsity", "weight sparsity (zeros)")):
        for p in sparse:
            ax.scatter([layer[key] for layer in layers],
                       [layer["paths"][p]["speedup_vs_dense"] for layer in layers],
                       color=PATH_COLOURS.get(p), label=p, s=18)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xlabel(label)
    axes[0].set_ylabel("speedup over dense (same run)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    written.append(out_dir / "speedup_vs_sparsity.png")
    fig.savefig(written[-1], dpi=DPI)
    plt.close(fig)
    return written


def _per_layer_chart(results: dict, names: list[str], kind: str, path: Path, title: str) -> Path:
    """Bars per layer for each of `names`, in rows of LAYERS_PER_ROW layers, each row with its
    own scale. kind "time": median ms, sparse paths stacked as input2CSR (red) + the rest (the
    seed study's chart); "speedup": speedup over dense. A bar far above the rest of its row (conv1
    on the sparse paths) is cut at the row's scale and its value written at the top."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers = results["layers"]
    rows = [layers[i:i + LAYERS_PER_ROW] for i in range(0, len(layers), LAYERS_PER_ROW)] or [[]]
    columns = max(1, min(LAYERS_PER_ROW, len(layers)))
    fig, axes = plt.subplots(len(rows), 1, squeeze=False,
                             figsize=(min(13, max(8, 1.5 + 0.85 * columns)), 0.9 + 2.6 * len(rows)))
    width = 0.8 / len(names)
    stacked = kind == "time"
    cuts = []
    every = [_value(_layer_result(layer, n), kind) for layer in layers for n in names]
    low, top = min([v for v in every if v > 0] + [1.0]), max(every + [1.0])  # speedup: one scale
    for ax, row in zip(axes[:, 0], rows):
        heights = {n: [_value(_layer_result(layer, n), kind) for layer in row] for n in names}
        # speedups: a log scale around 1 (bars up are faster than dense, down slower), uncut
        cap = _row_cap([h for hs in heights.values() for h in hs]) if stacked else top
        for i, n in enumerate(names):
            xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(row))]
            colour = TORCH_COLOUR if n == "pytorch" else PATH_COLOURS.get(n)
            values = [min(h, cap) for h in heights[n]]
            if stacked and n in ("sparse_sparse", "sparse_output"):
                conversion = [min(layer["paths"][n]["phases_ms"].get("input2csr", 0.0), v)
                              for layer, v in zip(row, values)]
                ax.bar(xs, conversion, width, color="tab:red")
                ax.bar(xs, [v - c for v, c in zip(values, conversion)], width, bottom=conversion,
                       color=colour)
            elif stacked:
                ax.bar(xs, values, width, color=colour)
            else:
                ax.bar(xs, [v - 1 for v in values], width, bottom=1, color=colour)
            for x, h in zip(xs, heights[n]):
                cuts.append(h > cap)
                if h > cap:
                    ax.text(x, cap, f"{h:.0f}" if h >= 10 else f"{h:.1f}", ha="center",
                            va="bottom", fontsize=7, rotation=90)
        if stacked:
            ax.set_ylim(0, cap * 1.18)
        else:
            ax.set_yscale("log")
            ax.set_ylim(low / 1.3, cap * 1.3)
            ticks = [t for t in (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
                     if low / 1.3 <= t <= cap * 1.3]
            ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
            ax.minorticks_off()
            ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xlim(-0.6, columns - 0.4)
        ax.set_xticks(list(range(len(row))), [layer["name"] for layer in row], rotation=30,
                      ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_ylabel("median ms" if stacked else "speedup", fontsize=9)
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    handles = []
    for n in names:
        label = f"{n} (multiply and rest)" if stacked and n in ("sparse_sparse", "sparse_output") else n
        handles.append(Patch(color=TORCH_COLOUR if n == "pytorch" else PATH_COLOURS.get(n),
                             label=label if n != "pytorch" else "PyTorch (dense, CPU)"))
    if stacked and {"sparse_sparse", "sparse_output"} & set(names):
        handles.append(Patch(color="tab:red", label="input2CSR"))
    what = ("median time per forward, per layer (ms)" if stacked
            else "speedup over dense per layer, measured in the same run (log scale: above 1x "
                 "faster than dense, below slower)")
    if any(cut for cut in cuts):
        what += "; a bar cut at the top of its row is labelled with its value"
    height = fig.get_figheight()
    fig.suptitle(f"{what}\n{title}", fontsize=10, y=1 - 0.05 / height)
    columns = min(len(handles), LEGEND_COLUMNS)  # (one row of every path ran off the figure)
    legend_rows = -(-len(handles) // columns)
    fig.legend(handles=handles, loc="upper center", ncol=columns, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.5 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.45 + 0.2 * legend_rows) / height))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _value(result: dict, kind: str) -> float:
    return result["stats"]["median"] if kind == "time" else result["speedup_vs_dense"]


def _row_cap(values: list[float]) -> float:
    """The top of a row's scale: its tallest bar, unless that is over 5 times the row's median
    bar (an outlier such as conv1 on a sparse path, flattening the rest); then 4 times it."""
    ordered = sorted(v for v in values if v > 0)
    if not ordered:
        return 1.0
    median = statistics.median(ordered)
    return ordered[-1] if ordered[-1] <= 5 * median else 4 * median


def describe_run(results: dict) -> str:
    """One line saying which run this is and what it measured: when, weights, parameters,
    machine and code."""
    params, weights = results["params"], results["weights"]
    software, machine = results.get("software", {}), results["machine_info"]
    label = "SYNTHETIC weights" if weights.get("synthetic") else f"{weights.get('kind')} weights"
    commit = (software.get("project_commit") or "?")[:10] + ("+dirty" if software.get("project_dirty") else "")
    return (f"{params['net']}, {label} (sha256 {str(weights.get('sha256'))[:12]}), "
            f"created {results.get('created', '?')}; batch {params['batch']}, "
            f"{params['threads']} threads, {params['backend']}, {params['repeats']} forwards after "
            f"{params['warmup']} warm-up, transform {params.get('transform')}, "
            f"layers {params.get('layers') or 'all'}; {machine.get('cpu')}, "
            f"{software.get('blas')}; commit {commit}")


def compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Ratios of B to A per layer and path (median times), for runs of the same net, under a
    header saying which runs A and B are and with what parameters."""
    if a["params"]["net"] != b["params"]["net"]:
        raise UserError(f"cannot compare a {a['params']['net']} run with a {b['params']['net']} run")
    layers_b = {layer["name"]: layer for layer in b["layers"]}
    paths = [p for p in a["params"]["paths"] if p in b["params"]["paths"]]
    head = f"{'layer':<18}" + "".join(f"{p[:13]:>26}" for p in paths)
    differ = sorted(k for k in set(a["params"]) | set(b["params"])
                    if k not in ("warmup_note", "timing_note")
                    and a["params"].get(k) != b["params"].get(k))
    lines = [f"A: {name_a}: {describe_run(a)}", f"B: {name_b}: {describe_run(b)}",
             "parameters that differ: " + (", ".join(differ) if differ else "none"), "",
             head, f"{'':<18}" + "".join(f"{'A ms':>9}{'B ms':>9}{'B/A':>8}" for _ in paths)]
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
