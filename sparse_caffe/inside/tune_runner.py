"""Inside pycaffe: tune a net (measure it, choose each layer's path, write the deploy prototxt and
its weights), or only read the facts a plan's key needs from the net as built.

Started by sparse_caffe.host.tune in a subprocess whose PYTHONPATH names the build and whose
environment fixes the threads. The choices are the auto path's (its cost model and interleaved
calibration, as in ./inv bench): a tuned prototxt runs what auto would pick. The plan is then
timed whole against dense in alternating rounds. It ends as every child does
(sparse_caffe.inside.protocol.end_child): its result in RUN_DIR/raw.json, or an error record in
RUN_DIR/error.json and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import measure, prepare, protocol
from ..models import nets
from ..models.net_layers import layers_of
from ..models import images as images_stage

TUNED_TYPES = ("Convolution", "InnerProduct")


def auto_plan(caffe, net, feeds, spec) -> dict:
    """Each tuned layer's choice as the auto path makes it in ./inv bench: every convolution and
    InnerProduct layer under auto, forwards until all have calibrated (measure.calibrate_auto),
    then caffe.auto_choices(): {layer: {"state", "kind", "path", "backend", "candidate" (the
    chosen candidate's name, "spmdm/mkl" say), "candidates": {candidate: median ms or None},
    "pruned": {candidate: reason}, "predicted", "input_density", "weight_density", "forwards",
    "replans"}}."""
    caffe.clear_conv_forward_paths()
    caffe.clear_fc_forward_paths()
    caffe.set_conv_forward_path(spec.auto_path)
    caffe.set_fc_forward_path(spec.auto_path)

    def forward(feed):
        net.blobs["data"].data[...] = feed
        net.forward()
    calibrated = measure.calibrate_auto(caffe, net, forward, feeds, spec.warmup)
    caffe.clear_conv_forward_paths()
    caffe.clear_fc_forward_paths()
    tuned = set(tuned_layers(net))
    return {name: dict(choice, candidate=candidate_name(choice))
            for name, choice in calibrated["choices"].items() if name in tuned}


def candidate_name(choice: dict) -> str:
    """The name auto gives the chosen candidate: its path, with "/backend" when that candidate
    exists only on one sparse back end."""
    qualified = "{}/{}".format(choice["path"], choice["backend"])
    return qualified if qualified in choice["candidates"] else choice["path"]


def tuned_layers(net, layer_type: str | None = None) -> list[str]:
    types = (layer_type,) if layer_type else TUNED_TYPES
    return [name for name, _ in layers_of(net, types)]


def layer_key(net, net_text: str) -> dict:
    """What each tuned layer's choice depends on: its type, bottom and top shapes, and for a
    convolution its kernel, stride, pad, dilation and group, in layer order."""
    params = {layer.name: layer for layer in nets.parse_net(net_text).layer}
    key = {}
    for name in tuned_layers(net):
        layer = params[name]
        entry = {"type": layer.type,
                 "bottom": [list(net.blobs[b].data.shape) for b in net.bottom_names[name]],
                 "top": [list(net.blobs[t].data.shape) for t in net.top_names[name]],
                 "weights": list(net.params[name][0].data.shape)}
        if layer.type == "Convolution":
            geometry = nets.conv_geometry(layer.convolution_param)
            entry.update(kernel=list(net.params[name][0].data.shape[2:]),
                         stride=list(geometry["stride"]), pad=list(geometry["pad"]),
                         dilation=list(geometry["dilation"]), group=geometry["group"])
        key[name] = entry
    return key


def enum_number(message, field: str, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_name[name.upper()].number


def deploy_text(net_text: str, choices: dict, header: str) -> str:
    """The net's prototxt with each tuned layer's forward_path (and a convolution's
    sparse_backend) set from `choices`, so Caffe runs the plan with no overrides."""
    param = nets.parse_net(net_text)
    for layer in param.layer:
        choice = choices.get(layer.name)
        if choice is None:
            continue
        if layer.type == "Convolution":
            conv = layer.convolution_param
            conv.forward_path = enum_number(conv, "forward_path", choice["path"])
            conv.sparse_backend = enum_number(conv, "sparse_backend", choice["backend"])
        else:
            fc = layer.inner_product_param
            fc.forward_path = enum_number(fc, "forward_path", choice["path"])
    return "".join("# {}\n".format(line) for line in header.splitlines()) + nets.net_text(param)


def check_deploy(caffe, prototxt: Path, weights: Path, feed, reference, choices: dict) -> float:
    """Load the written prototxt and weights as a user would (no overrides) and check that every
    layer runs its planned path and the output equals dense's; returns the difference."""
    caffe.clear_conv_forward_paths()
    caffe.clear_fc_forward_paths()
    net = caffe.Net(str(prototxt), str(weights), caffe.TEST)
    net.blobs["data"].data[...] = feed
    caffe.reset_conv_profile()
    caffe.set_conv_profiling(True)
    net.forward()
    caffe.set_conv_profiling(False)
    profile = caffe.conv_profile()
    for name, choice in choices.items():
        if profile[name]["path"] != choice["path"]:
            raise RuntimeError("the tuned prototxt runs {} on {}, the plan says {}".format(
                name, profile[name]["path"], choice["path"]))
    difference = measure.relative_difference(net.blobs[net.outputs[-1]].data, reference)
    if difference > measure.AGREEMENT_TOLERANCE:
        raise RuntimeError("the tuned net's output differs from dense by {:.1e}".format(difference))
    return difference


def key_facts(caffe, net, net_text: str, weights: dict, blas: dict) -> dict:
    return {"weights": weights, "blas_runtime": blas, "direct_isa": caffe.conv_direct_isa(),
            "layers": layer_key(net, net_text)}


def run(spec: protocol.RunSpec, key_only: bool) -> dict:
    import caffe
    caffe.set_mode_cpu()
    net, net_text, convolutions, weights, images = prepare.prepare(caffe, spec)
    feeds = list(images_stage.batches(images, spec.batch,
                                      measure.feed_count(spec, images.count)))
    net.blobs["data"].data[...] = feeds[0]
    blas = measure.checked_blas_runtime(net, int(os.environ.get("OMP_NUM_THREADS", "1")))
    facts = key_facts(caffe, net, net_text, weights.to_json(), blas)
    if key_only:
        return facts
    choices = auto_plan(caffe, net, feeds, spec)
    whole = whole_net(caffe, net, convolutions, feeds, images.count, spec, choices)
    caffe.clear_conv_forward_paths()
    caffe.clear_fc_forward_paths()
    net.blobs["data"].data[...] = feeds[0]  # dense reference output for the deploy check
    net.forward()
    reference = net.blobs[net.outputs[-1]].data.copy()
    prototxt, caffemodel = Path(spec.prototxt_out), Path(spec.caffemodel_out)
    net.save(str(caffemodel))
    prototxt.write_text(deploy_text(net_text, choices, spec.prototxt_header))
    difference = check_deploy(caffe, prototxt, caffemodel, feeds[0], reference, choices)
    return {**facts, "choices": choices, "deploy_max_rel_diff": difference,
            "top1_agreement": whole["top1_agreement"], "whole_net": whole,
            "images": images.describe()}


def whole_net(caffe, net, convolutions, feeds, image_count, spec, choices) -> dict:
    """The plan timed whole against dense in alternating rounds (measure.measure_plan), and
    its top-1 agreement with dense over every image."""
    given = {"layers": {n: choices[n]["path"] for n in convolutions},
             "backends": {n: choices[n]["backend"] for n in convolutions},
             "fc_layers": {n: c["path"] for n, c in choices.items() if n not in convolutions},
             "rule": "tune's choices"}
    plan = measure.measure_plan(caffe, net, convolutions, feeds, spec, {}, given)
    top1 = measure.top1_of(net, feeds, image_count, spec.batch, net.outputs[-1])
    caffe.clear_conv_forward_paths()
    caffe.clear_fc_forward_paths()
    caffe.set_fc_forward_path("dense")
    dense = measure.top1_of(net, feeds, image_count, spec.batch, net.outputs[-1])
    caffe.clear_fc_forward_paths()
    return {"plan_ms": plan["net_times_ms"], "dense_ms": plan["dense_net_times_ms"],
            "top1_agreement": sum(a == b for a, b in zip(top1, dense)) / len(dense)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="a run folder holding spec.json (a RunSpec of kind tune)")
    parser.add_argument("--key-only", action="store_true",
                        help="only the facts of the plan's key (no measuring, nothing written)")
    args = parser.parse_args(argv)
    return protocol.end_child(args.folder, lambda: run(
        protocol.RunSpec.read(f"{args.folder}/{protocol.SPEC_FILE}"), args.key_only))


if __name__ == "__main__":
    sys.exit(main())
