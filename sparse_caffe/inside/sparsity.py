"""The sparsity report: for each convolution of a net with given weights, its shape, how many of its
weights and of its input values are zero on given images, and how many multiply-adds a dense
product does against how many a sparse x sparse product cannot avoid.

The counts come from the patched Caffe's own per-layer profile (caffe.conv_profile()), read after
a forward pass over the images, so they are what the convolution layers saw: `input_zeros_pct` is
100 x (1 - input_nonzeros / input_elements) over every image fed, `dense_macs` and `useful_macs`
(sum over k of nnz(column k of W) x nnz(row k of the lowered input)) are per image (totals / calls).
Weight zeros are counted in the loaded weight blob. The net is loaded the way real weights are:
caffe.Net(deploy prototxt, caffemodel, caffe.TEST).

Images go through a net with a fixed batch size; when the batch does not divide the number of
images, the last batch is topped up by cycling from the first image (images.batches), and those
images count twice in the averages; the metadata says how often each image was fed.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..models import nets, zoo
from ..models.net_layers import convolution_names
from ..errors import UserError
from ..models.images import ImageSet, batches, fed_counts
from ..models.synthetic import cached_synthetic, caffe_source_of_pycaffe
from ..models.weights import SIDECAR_SUFFIX, file_sha256

REPORT_VERSION = 1


@dataclass(frozen=True)
class LayerRow:
    """One Convolution layer of the report; MACs are per image, sparsities in % zeros."""

    name: str
    num_output: int
    channels_per_group: int
    kernel_h: int
    kernel_w: int
    group: int
    stride: tuple[int, int]
    pad: tuple[int, int]
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    weight_zeros_pct: float
    input_zeros_pct: float
    dense_macs: float
    useful_macs: float
    images: int  # images the layer ran on (the profile's calls)

    @property
    def useful_fraction(self) -> float:
        return self.useful_macs / self.dense_macs if self.dense_macs else 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LayerRow":
        values = dict(data)
        for name in ("stride", "pad", "input_hw", "output_hw"):
            values[name] = tuple(values[name])
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"not a layer row of this report version: unknown fields "
                            f"{sorted(unknown)}")
        return cls(**values)


def load_weights(net_name: str, weights_path: Path, batch: int, caffe_source: Path | None = None):
    """caffe.Net(deploy prototxt of `net_name` with `batch`, weights_path, caffe.TEST)."""
    caffe = nets._caffe()
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise UserError(f"--weights {weights_path}: no such file")
    if caffe_source is None:
        caffe_source = caffe_source_of_pycaffe()
    text = zoo.deploy(net_name, batch, caffe_source)
    with tempfile.TemporaryDirectory(prefix="sparse-caffe-inspect-") as folder:
        prototxt = Path(folder) / f"{net_name}.prototxt"
        prototxt.write_text(text)
        net = caffe.Net(str(prototxt), caffe.TEST)
    # The benchmark's check: an empty, random or other net's file is refused in one line here
    # (Caffe would abort with a stack, or leave the layers it does not name at zero).
    from .prepare import check_weights_fit
    check_weights_fit(caffe, net, weights_path)
    net.copy_from(str(weights_path))
    return text, net


def layer_rows(net_name: str, weights_path: Path, images: ImageSet, batch: int, *,
            caffe_source: Path | None = None) -> list[LayerRow]:
    """Per Convolution layer of `net_name` with `weights_path`, measured on `images` fed in
    batches of `batch` (see the module doc). Resets the process's convolution profile."""
    caffe = nets._caffe()
    info = nets.net_info(net_name)
    if images.net != info.name:
        raise UserError(f"the images were preprocessed for {images.net}, not {info.name}")
    text, net = load_weights(info.name, weights_path, batch, caffe_source)
    protos = {layer.name: layer for layer in nets.parse_net(text).layer}
    convs = convolution_names(net)
    was_on = caffe.conv_profiling()
    caffe.reset_conv_profile()
    caffe.set_conv_profiling(True)
    try:
        for array in batches(images, batch):
            net.blobs["data"].data[...] = array
            net.forward()
        profile = caffe.conv_profile()
    finally:
        caffe.set_conv_profiling(was_on)
        caffe.reset_conv_profile()
    rows = []
    for name in convs:
        entry = profile.get(name)
        if not entry or not entry["calls"]:
            raise RuntimeError(f"the convolution profile has no entry for {name}")
        weights = net.params[name][0].data
        num_output, per_group, kernel_h, kernel_w = weights.shape
        geometry = nets.conv_geometry(protos[name].convolution_param)
        group, stride, pad = geometry["group"], geometry["stride"], geometry["pad"]
        bottom = net.blobs[net.bottom_names[name][0]].data.shape
        top = net.blobs[net.top_names[name][0]].data.shape
        calls = entry["calls"]
        rows.append(LayerRow(
            name=name, num_output=int(num_output), channels_per_group=int(per_group),
            kernel_h=int(kernel_h), kernel_w=int(kernel_w), group=group, stride=stride, pad=pad,
            input_hw=(int(bottom[2]), int(bottom[3])), output_hw=(int(top[2]), int(top[3])),
            weight_zeros_pct=100.0 * float((weights == 0).sum()) / weights.size,
            input_zeros_pct=100.0 * (1.0 - entry["input_nonzeros"] / entry["input_elements"]),
            dense_macs=entry["dense_macs"] / calls, useful_macs=entry["useful_macs"] / calls,
            images=int(calls)))
    return rows


# ----------------------------------------------------------------------------- identity, output

def weights_identity(weights_path: Path) -> dict:
    """What the weights are: `synthetic` (a synthetic.py model its sidecar vouches for),
    `skimcaffe` (a file weights.py verified; its sidecar's SHA-256 still matches) or `unverified`
    (anything else: synthetic is then None, as nothing says which it is)."""
    path = Path(weights_path).resolve()
    sha256 = file_sha256(path)
    model = cached_synthetic(path)
    if model is not None:
        return {"path": str(path), "sha256": sha256, "kind": "synthetic", "synthetic": True,
                "seed": model.seed, "profile": model.profile,
                "profile_sha256": model.profile_sha256,
                "calibration_images_sha256": model.images_sha256,
                "code_version": model.code_version}
    try:
        record = json.loads(path.with_name(path.name + SIDECAR_SUFFIX).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("sha256") == sha256 and record.get("blob_id"):
        return {"path": str(path), "sha256": sha256, "kind": "skimcaffe", "synthetic": False,
                "skimcaffe_commit": record.get("skimcaffe_commit"),
                "blob_id": record["blob_id"], "source": record.get("source")}
    return {"path": str(path), "sha256": sha256, "kind": "unverified", "synthetic": None}


def make_meta(net_name: str, weights_path: Path, images: ImageSet, batch: int) -> dict:
    """The report's metadata: net, weights identity, images used and how often each was fed."""
    return {"net": nets.net_info(net_name).name, "batch": batch,
            "weights": weights_identity(weights_path),
            "images": {**images.describe(), "fed": fed_counts(images, batch)}}


def to_json(rows: list[LayerRow], meta: dict) -> dict:
    """The report as JSON-ready data: {"version", "meta", "layers", "totals"}."""
    dense = sum(row.dense_macs for row in rows)
    useful = sum(row.useful_macs for row in rows)
    return {"version": REPORT_VERSION, "meta": meta, "layers": [row.to_json() for row in rows],
            "totals": {"dense_macs": dense, "useful_macs": useful,
                       "useful_fraction": useful / dense if dense else 0.0}}


def from_json(data: dict) -> tuple[list[LayerRow], dict]:
    """(rows, meta) back from to_json's data."""
    if not isinstance(data, dict) or data.get("version") != REPORT_VERSION:
        raise UserError(f"not a sparsity report of version {REPORT_VERSION}")
    return [LayerRow.from_json(row) for row in data["layers"]], data["meta"]


def format_table(rows: list[LayerRow]) -> str:
    """A plain-text table for the terminal, with a total line."""
    header = ("layer", "out x in/g x kh x kw", "g", "stride", "pad", "input", "w zeros%",
              "in zeros%", "dense MMAC", "useful MMAC", "useful%")
    lines = []
    for row in rows:
        lines.append((row.name,
                      f"{row.num_output}x{row.channels_per_group}x{row.kernel_h}x{row.kernel_w}",
                      str(row.group), "x".join(map(str, row.stride)), "x".join(map(str, row.pad)),
                      "x".join(map(str, row.input_hw)), f"{row.weight_zeros_pct:.2f}",
                      f"{row.input_zeros_pct:.2f}", f"{row.dense_macs / 1e6:.1f}",
                      f"{row.useful_macs / 1e6:.1f}", f"{100 * row.useful_fraction:.2f}"))
    dense = sum(row.dense_macs for row in rows)
    useful = sum(row.useful_macs for row in rows)
    lines.append(("total", "", "", "", "", "", "", "", f"{dense / 1e6:.1f}", f"{useful / 1e6:.1f}",
                  f"{100 * useful / dense:.2f}" if dense else "0.00"))
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]

    def render(cells) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(render(header))
    return "\n".join([render(header), rule] + [render(line) for line in lines[:-1]]
                     + [rule, render(lines[-1])])


__all__ = ["LayerRow", "layer_rows", "load_weights", "weights_identity", "make_meta", "to_json",
           "from_json", "format_table", "REPORT_VERSION"]


def run(folder: str, json_path: str) -> None:
    """The report for the "net" RunSpec in `folder`: the table printed, the JSON at json_path."""
    from ..models import images as images_stage
    from .prepare import resolve_weights
    from .protocol import SPEC_FILE, RunSpec

    spec = RunSpec.read(f"{folder}/{SPEC_FILE}")
    import caffe
    caffe.set_mode_cpu()
    source = Path(caffe.__file__).resolve().parents[2]
    chosen = resolve_weights(spec, source)
    images_arg = spec.images
    if isinstance(images_arg, str):
        images_arg = Path(images_arg)
    images = images_stage.load_images(spec.net, images_arg)
    rows = layer_rows(spec.net, Path(chosen.path), images, spec.batch, caffe_source=source)
    meta = make_meta(spec.net, Path(chosen.path), images, spec.batch)
    Path(json_path).write_text(json.dumps(to_json(rows, meta), indent=1) + "\n")
    label = "SYNTHETIC weights" if chosen.synthetic else f"{chosen.kind} weights"
    print(f"{spec.net}, {label} ({chosen.path}), {images.count} images")
    print(format_table(rows))


def main(argv=None) -> int:
    """Entry point inside pycaffe (run by ./inv inspect on a run folder holding a RunSpec of kind
    net): print the table, write the JSON; a failure ends as every child's
    (sparse_caffe.inside.protocol.end_child)."""
    import argparse

    from .protocol import end_child

    parser = argparse.ArgumentParser(description="Per-layer sparsity report of a net")
    parser.add_argument("folder", help="a run folder holding spec.json (a RunSpec of kind net)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    return end_child(args.folder, lambda: run(args.folder, args.json))


if __name__ == "__main__":
    raise SystemExit(main())
