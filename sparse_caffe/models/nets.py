"""The networks the benchmark runs, in Caffe's deploy form, and the deploy transform that folds
BatchNorm/Scale (and optionally a ReLU) into the convolution before them.

- CaffeNet: BVLC's own models/bvlc_reference_caffenet/deploy.prototxt, read from the Caffe source
  tree at run time (never copied here), with the batch size set.
- ResNet-50: Kaiming He's deploy layout (layer names as in his ResNet-50-deploy.prototxt, which
  SkimCaffe's pruned weights use), generated with caffe.net_spec.

pycaffe is imported inside the functions that need it, so this module imports where Caffe is absent.
Nets go around as prototxt text; weights as {layer name: [blob arrays]}, as a caffe.Net's params.
`fold_batchnorm` is numpy and protobuf only (pycaffe's caffe_pb2, which has our convolution fields).

Python-3.6-clean: the Docker image runs it (tests/test_docker.py checks).
"""
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import UserError

CAFFENET_DEPLOY = Path("models") / "bvlc_reference_caffenet" / "deploy.prototxt"

# ResNet-50's stages: (stage number, blocks, bottleneck channels); each block outputs 4x those.
RESNET50_STAGES = ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512))


@dataclass(frozen=True)
class NetInfo:
    """A supported net and its input: square, BGR, 0..255 minus the per-channel mean."""

    name: str
    input_size: int
    mean_bgr: Tuple[float, float, float]


NETS = {
    "caffenet": NetInfo("caffenet", 227, (104.0, 117.0, 123.0)),
    "resnet50": NetInfo("resnet50", 224, (104.0, 117.0, 123.0)),
    # Yahoo's open_nsfw, a half-width ResNet-50 trained on real photos (models/onnx_import; its deploy prototxt: models/zoo).
    "resnet50-1by2": NetInfo("resnet50-1by2", 224, (104.0, 117.0, 123.0)),
}


def net_info(name: str) -> NetInfo:
    """The table entry for `name`; a UserError naming the choices if there is none."""
    if name not in NETS:
        raise UserError(f"unknown net {name!r}: choose one of {', '.join(NETS)}")
    return NETS[name]


# ----------------------------------------------------------------------------- pycaffe access

def _caffe():
    try:
        import caffe
    except ImportError as error:
        raise UserError(f"pycaffe is not importable ({error}): put <build>/src/python on "
                        "PYTHONPATH") from None
    return caffe


def _caffe_pb2():
    return _caffe().proto.caffe_pb2


def _text_format():
    from google.protobuf import text_format
    return text_format


def _check_batch(batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"the batch size must be a whole number of at least 1, got {batch!r}")


def parse_net(text: str):
    """A NetParameter from prototxt text; UserError if it is not one, or has no layers."""
    net = _caffe_pb2().NetParameter()
    text_format = _text_format()
    try:
        text_format.Parse(text, net)
    except (text_format.ParseError, TypeError, UnicodeDecodeError) as error:
        message = " ".join(str(error).split())
        raise UserError(f"not a valid Caffe NetParameter: {message}") from None
    if len(net.layers):
        raise UserError("the net uses Caffe's old V1 'layers' format: upgrade it first with "
                        "Caffe's upgrade_net_proto_text tool")
    if not len(net.layer):
        raise UserError("the net has no layers")
    return net


def net_text(net) -> str:
    """Prototxt text of a NetParameter."""
    return _text_format().MessageToString(net)


# ----------------------------------------------------------------------------- the nets

def caffenet_deploy(caffe_source: Path, batch: int) -> str:
    """BVLC's reference CaffeNet deploy prototxt from the Caffe tree, with batch size `batch`."""
    _check_batch(batch)
    path = Path(caffe_source) / CAFFENET_DEPLOY
    if not path.is_file():
        raise UserError(f"no {CAFFENET_DEPLOY} under {caffe_source}: is that a Caffe source tree?")
    net = parse_net(path.read_text())
    inputs = [layer for layer in net.layer if layer.type == "Input"]
    if len(inputs) != 1 or len(inputs[0].input_param.shape) != 1:
        raise UserError(f"{path} does not have the one Input layer with one shape it should have")
    inputs[0].input_param.shape[0].dim[0] = batch
    return net_text(net)


def resnet50_deploy(batch: int) -> str:
    """ResNet-50 in Kaiming He's deploy layout: conv/BatchNorm/Scale/ReLU with his layer names,
    BatchNorm and Scale in place on the convolution's top, bias only on conv1, no loss layers."""
    _check_batch(batch)
    caffe = _caffe()
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()

    def conv_bn(bottom, conv, suffix, num_output, kernel, stride=1, pad=0, bias=False, relu=None):
        geometry = dict(kernel_size=kernel)
        if stride != 1:
            geometry["stride"] = stride
        if pad:
            geometry["pad"] = pad
        n[conv] = L.Convolution(bottom, num_output=num_output, bias_term=bias, **geometry)
        n[f"bn{suffix}"] = L.BatchNorm(n[conv], use_global_stats=True, in_place=True)
        n[f"scale{suffix}"] = L.Scale(n[f"bn{suffix}"], bias_term=True, in_place=True)
        top = n[f"scale{suffix}"]
        if relu:
            n[relu] = L.ReLU(top, in_place=True)
            top = n[relu]
        return top

    n.data = L.Input(shape=dict(dim=[batch, 3, 224, 224]))
    top = conv_bn(n.data, "conv1", "_conv1", 64, 7, stride=2, pad=3, bias=True, relu="conv1_relu")
    top = L.Pooling(top, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.pool1 = top
    for stage, blocks, channels in RESNET50_STAGES:
        for index in range(blocks):
            block = f"{stage}{'abcdef'[index]}"
            stride = 2 if index == 0 and stage > 2 else 1
            if index == 0:  # projection shortcut, first block of each stage
                shortcut = conv_bn(top, f"res{block}_branch1", f"{block}_branch1", 4 * channels, 1,
                                   stride=stride)
            else:
                shortcut = top
            branch = conv_bn(top, f"res{block}_branch2a", f"{block}_branch2a", channels, 1,
                             stride=stride, relu=f"res{block}_branch2a_relu")
            branch = conv_bn(branch, f"res{block}_branch2b", f"{block}_branch2b", channels, 3,
                             pad=1, relu=f"res{block}_branch2b_relu")
            branch = conv_bn(branch, f"res{block}_branch2c", f"{block}_branch2c", 4 * channels, 1)
            n[f"res{block}"] = L.Eltwise(shortcut, branch, operation=P.Eltwise.SUM)
            n[f"res{block}_relu"] = L.ReLU(n[f"res{block}"], in_place=True)
            top = n[f"res{block}_relu"]
    n.pool5 = L.Pooling(top, pool=P.Pooling.AVE, kernel_size=7, stride=1)
    n.fc1000 = L.InnerProduct(n.pool5, num_output=1000)
    n.prob = L.Softmax(n.fc1000)
    return net_text(n.to_proto())


# ----------------------------------------------------------------------------- nets and weights

def load_net(text: str, weights: Optional[dict] = None):
    """A TEST-phase caffe.Net from prototxt text, with `weights` (if given) copied in.

    The text is checked as a NetParameter here; a net Caffe cannot build (a wrong bottom, say)
    still stops the process in Caffe's own CHECK. `weights` must name exactly the layers that have
    parameters, each with the blob count and shapes the net expects.
    """
    caffe = _caffe()
    parse_net(text)
    with tempfile.TemporaryDirectory(prefix="sparse-caffe-net-") as folder:
        path = Path(folder) / "net.prototxt"
        path.write_text(text)
        net = caffe.Net(str(path), caffe.TEST)
    if weights is not None:
        unknown = sorted(set(weights) - set(net.params))
        missing = [name for name in net.params if name not in weights]
        if unknown or missing:
            raise UserError(f"the weights do not fit the net: no such layers {unknown}, "
                            f"no weights for {missing}")
        for name, blobs in net.params.items():
            given = weights[name]
            if len(given) != len(blobs):
                raise UserError(f"layer {name!r} has {len(blobs)} parameter blobs, the weights "
                                f"give {len(given)}")
            for index, (blob, array) in enumerate(zip(blobs, given)):
                if tuple(np.shape(array)) != tuple(blob.data.shape):
                    raise UserError(f"blob {index} of layer {name!r} has shape {blob.data.shape}, "
                                    f"the weights give {np.shape(array)}")
                blob.data[...] = array
    return net


def net_weights(net) -> Dict[str, List[np.ndarray]]:
    """A copy of a caffe.Net's parameters: {layer name: [blob arrays]}, in layer order."""
    return {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}


# ----------------------------------------------------------------------------- the deploy transform

def fold_batchnorm(net_param_text: str, weights: Dict[str, List[np.ndarray]],
                   fuse_relu: bool = False) -> Tuple[str, Dict[str, List[np.ndarray]]]:
    """Fold every BatchNorm (and the Scale after it) into the Convolution it follows.

    A Convolution whose output only a BatchNorm reads (and that BatchNorm's only a Scale, if there
    is one) becomes one convolution with bias: for channel c, with Caffe's stored statistics
    mean = blob0 / s, var = blob1 / s (s = blob2; Caffe uses mean = var = 0 when s == 0) and
    a = gamma / sqrt(var + eps), W'[c] = a W[c] and b'[c] = a (b[c] - mean) + beta. The BatchNorm
    and Scale layers go, and the convolution writes their top, so the layers after them still find
    their bottoms (in ResNet they are in place, so no name changes). A BatchNorm that computes
    batch statistics (use_global_stats: false) is left alone.

    With fuse_relu, a ReLU (negative_slope 0) that is then the only reader of a convolution's
    output goes too, and the convolution gets `convolution_param { fused_relu: true }` (our
    patched Caffe); likewise an Eltwise SUM's ReLU becomes `eltwise_param { fused_relu: true }`,
    and then the sum itself goes into the convolution that feeds it (`fused_residual`, see
    _fuse_residual_sums). An output that anything else also reads is never changed.

    Returns new prototxt text and a new weights dict (copies; the inputs are not modified).
    """
    net = parse_net(net_param_text)
    new_weights = {name: [np.array(blob, copy=True) for blob in blobs]
                   for name, blobs in weights.items()}
    layers = list(net.layer)
    i = 0
    while i < len(layers):
        conv = layers[i]
        if not _foldable_conv(conv):
            i += 1
            continue
        bn = _sole_reader(layers, i)
        if bn is not None and _foldable_batchnorm(layers[bn]):
            scale = _sole_reader(layers, bn)
            if scale is not None and not _foldable_scale(layers[scale]):
                scale = None
            if _rewirable(layers, i, bn) and (scale is None or _rewirable(layers, bn, scale)):
                new_weights[conv.name] = _folded(conv, layers[bn],
                                                 None if scale is None else layers[scale],
                                                 new_weights)
                for absorbed in ([bn] if scale is None else [bn, scale]):
                    new_weights.pop(layers[absorbed].name, None)
                conv.convolution_param.bias_term = True
                conv.top[0] = layers[bn if scale is None else scale].top[0]
                layers = [layer for j, layer in enumerate(layers) if j not in (bn, scale)]
        if fuse_relu and _absorb_relu(layers, i):
            conv.convolution_param.fused_relu = True
        i += 1
    if fuse_relu:
        layers = _fuse_residual_sums(_fuse_sum_relus(layers))
    del net.layer[:]
    net.layer.extend(layers)
    return net_text(net), new_weights


def _fuse_sum_relus(layers: list) -> list:
    """Each Eltwise SUM whose only reader is a ReLU (negative_slope 0) absorbs it as
    `eltwise_param { fused_relu: true }` (our patched Caffe), as ResNet's resNx -> resNx_relu."""
    i = 0
    while i < len(layers):
        if _fusable_sum(layers[i]) and _absorb_relu(layers, i):
            layers[i].eltwise_param.fused_relu = True
        i += 1
    return layers


def _fuse_residual_sums(layers: list) -> list:
    """Each two-input Eltwise SUM (coefficients 1) of a convolution's output and another blob
    (ResNet's resNx: branch2c + shortcut) goes into that convolution: it gets the other blob as a
    last bottom, `convolution_param { fused_residual: true }`, the sum's fused_relu, and writes
    the sum's top (our patched Caffe adds the residual while the outputs are hot). Only when the
    sum is the convolution's sole reader, the other blob is final before the convolution runs,
    and the sum is not in place; of two convolutions (res2a: branch1 and branch2c) the later."""
    i = 0
    while i < len(layers):
        conv = _residual_conv(layers, i)
        if conv is None:
            i += 1
            continue
        total = layers[i]
        other = total.bottom[1] if total.bottom[0] == layers[conv].top[0] else total.bottom[0]
        param = layers[conv].convolution_param
        param.fused_residual = True
        param.fused_relu = total.eltwise_param.fused_relu
        layers[conv].bottom.append(other)
        layers[conv].top[0] = total.top[0]
        del layers[i]
    return layers


def _residual_conv(layers: list, i: int) -> Optional[int]:
    """The index of the convolution that layer i (an Eltwise SUM) can go into, or None."""
    total = layers[i]
    if not (_plain_sum(total) and len(total.bottom) == 2
            and all(c == 1 for c in total.eltwise_param.coeff)
            and total.top[0] not in total.bottom and total.bottom[0] != total.bottom[1]):
        return None
    writers = {}  # blob -> index of its latest writer before i
    for j in range(i):
        for top in layers[j].top:
            writers[top] = j
    readers = _readers(layers)
    candidates = []
    for mine, other in ((0, 1), (1, 0)):
        conv = writers.get(total.bottom[mine])
        if conv is None or not _foldable_conv(layers[conv]) or readers[conv] != [i]:
            continue
        if layers[conv].convolution_param.fused_residual:
            continue
        # The residual must be final when the convolution runs: written before it (or a net
        # input), and by nothing between it and the sum.
        if writers.get(total.bottom[other], -1) >= conv:
            continue
        if not _rewirable(layers, conv, i):
            continue
        candidates.append(conv)
    return max(candidates) if candidates else None


def _absorb_relu(layers: list, i: int) -> bool:
    """If a ReLU (negative_slope 0) is the only reader of layer i's output and i can write its
    top instead, remove it from `layers` and rewire i's top; True when it did (the caller marks
    layer i's fused_relu)."""
    relu = _sole_reader(layers, i)
    if relu is None or not _fusable_relu(layers[relu]) or not _rewirable(layers, i, relu):
        return False
    layers[i].top[0] = layers[relu].top[0]
    del layers[relu]
    return True


def _readers(layers) -> Dict[int, List[int]]:
    """For each layer, the layers that read what it wrote (a blob name's latest writer before
    the reader), once per bottom."""
    last_writer: Dict[str, int] = {}
    readers: Dict[int, List[int]] = defaultdict(list)
    for j, layer in enumerate(layers):
        for bottom in layer.bottom:
            if bottom in last_writer:
                readers[last_writer[bottom]].append(j)
        for top in layer.top:
            last_writer[top] = j
    return readers


def _sole_reader(layers, i: int) -> Optional[int]:
    """The one layer that reads layer i's output, if exactly one layer reads it, once."""
    readers = _readers(layers)[i]
    return readers[0] if len(readers) == 1 else None


def _rewirable(layers, i: int, j: int) -> bool:
    """Whether layer i can write layer j's top instead of j: j is in place, or no layer between
    them touches j's top (which would otherwise see a different version of it)."""
    top = layers[j].top[0]
    if top == layers[i].top[0]:
        return True
    return not any(top in layer.bottom or top in layer.top for layer in layers[i + 1:j])


def _single(layer, type_: str) -> bool:
    return (layer.type == type_ and len(layer.bottom) == 1 and len(layer.top) == 1
            and not len(layer.include) and not len(layer.exclude))


def _foldable_conv(layer) -> bool:
    return (_single(layer, "Convolution") and layer.convolution_param.axis == 1
            and not layer.convolution_param.fused_relu)


def _foldable_batchnorm(layer) -> bool:
    param = layer.batch_norm_param
    return _single(layer, "BatchNorm") and (not param.HasField("use_global_stats")
                                            or param.use_global_stats)


def _foldable_scale(layer) -> bool:
    # One bottom: the scale is a learned per-channel blob (not a second input).
    return (_single(layer, "Scale") and layer.scale_param.axis == 1
            and layer.scale_param.num_axes == 1)


def _plain_sum(layer) -> bool:
    """An Eltwise SUM with one top, in every phase."""
    return (layer.type == "Eltwise" and len(layer.top) == 1 and not len(layer.include)
            and not len(layer.exclude) and layer.eltwise_param.operation == layer.eltwise_param.SUM)


def _fusable_sum(layer) -> bool:
    return _plain_sum(layer) and not layer.eltwise_param.fused_relu


def _fusable_relu(layer) -> bool:
    return _single(layer, "ReLU") and layer.relu_param.negative_slope == 0


def _blobs(weights, layer, counts: Tuple[int, ...]) -> List[np.ndarray]:
    if layer.name not in weights:
        raise UserError(f"no weights for layer {layer.name!r}")
    blobs = weights[layer.name]
    if len(blobs) not in counts:
        raise UserError(f"layer {layer.name!r} ({layer.type}) should have "
                        f"{' or '.join(map(str, counts))} parameter blobs, the weights give "
                        f"{len(blobs)}")
    return [np.asarray(blob, np.float64) for blob in blobs]


def _folded(conv, bn, scale, weights) -> List[np.ndarray]:
    """The convolution's weights and bias with the BatchNorm (and Scale) folded in."""
    conv_blobs = _blobs(weights, conv, (1, 2))
    w = conv_blobs[0]
    channels = w.shape[0]
    b = conv_blobs[1].reshape(-1) if len(conv_blobs) == 2 else np.zeros(channels)
    mean, var, factor = _blobs(weights, bn, (3,))
    stored = factor.reshape(-1)[0]
    factor = 0.0 if stored == 0 else 1.0 / stored  # as Caffe's BatchNormLayer::Forward_cpu
    mean, var = mean.reshape(-1) * factor, var.reshape(-1) * factor
    gamma, beta = np.ones(channels), np.zeros(channels)
    if scale is not None:
        scale_blobs = _blobs(weights, scale, (2,) if scale.scale_param.bias_term else (1,))
        gamma = scale_blobs[0].reshape(-1)
        if scale.scale_param.bias_term:
            beta = scale_blobs[1].reshape(-1)
    for what, array in (("bias", b), ("mean", mean), ("variance", var), ("Scale gamma", gamma),
                        ("Scale beta", beta)):
        if array.shape != (channels,):
            raise UserError(f"convolution {conv.name!r} has {channels} output channels, but its "
                            f"{what} has {array.size} values")
    # eps is a float in caffe.proto, and Caffe adds it in the net's precision.
    denominator = var + np.float32(bn.batch_norm_param.eps)
    if not np.all(denominator > 0):
        raise UserError(f"BatchNorm {bn.name!r} has variance + eps <= 0 in channel "
                        f"{int(np.argmin(denominator))}: its statistics cannot be folded")
    a = gamma / np.sqrt(denominator)
    dtype = np.asarray(weights[conv.name][0]).dtype
    new_w = (w * a.reshape((channels,) + (1,) * (w.ndim - 1))).astype(dtype)
    new_b = (a * (b - mean) + beta).astype(dtype)
    if len(conv_blobs) == 2:
        new_b = new_b.reshape(np.shape(weights[conv.name][1]))
    return [new_w, new_b]


def hw_pair(values, h: int, w: int, default: int) -> Tuple[int, int]:
    """Caffe's (h, w) of a spatial setting: the _h/_w fields when set, else the repeated field
    (one value for both, or one per axis), else the default."""
    if h or w:
        return (int(h), int(w))
    values = list(values) or [default]
    return (int(values[0]), int(values[-1]))


def conv_geometry(c) -> dict:
    """A 2-D convolution_param's stride, pad and dilation as (h, w) pairs (hw_pair), and its
    group."""
    return {"stride": hw_pair(c.stride, c.stride_h, c.stride_w, 1),
            "pad": hw_pair(c.pad, c.pad_h, c.pad_w, 0),
            "dilation": hw_pair(c.dilation, 0, 0, 1), "group": int(c.group)}
