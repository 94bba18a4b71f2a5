"""The whole-net baselines: the Caffe net rebuilt in PyTorch (sparse_caffe.models.torch_net) and exported
to ONNX Runtime must compute what Caffe's dense forward computes, layer type by layer type, on a
small net that has every supported type, and on CaffeNet and ResNet-50 (synthetic weights)."""
from __future__ import annotations

import numpy as np
import pytest

from sparse_caffe.inside import baselines
from sparse_caffe.inside.prepare import prepare
from sparse_caffe.inside.protocol import RunSpec
from sparse_caffe.inside import measure
from sparse_caffe.models import torch_net
from sparse_caffe.models import images as images_stage
from sparse_caffe.patching.config import cache_dir
from sparse_caffe.errors import UserError

torch = pytest.importorskip("torch", reason="torch is installed on demand by ./inv bench "
                                            "--pytorch; run that once to test the baselines")

# Every supported layer type, with the settings where a rebuild most easily goes wrong: ceil-mode
# pooling (12x12, kernel 3, stride 2: Caffe rounds 4.5 up), padded MAX and AVE pooling (AVE's
# divisor counts the padding), grouped, strided, dilated and bias-free convolutions, fused_relu,
# LRN across and within channels, every Eltwise operation (SUM with coefficients), BatchNorm and
# Scale unfolded, Concat, Dropout, Flatten, Reshape, a leaky ReLU, InnerProduct, Softmax.
ALL_LAYERS = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 12 dim: 12 } } }
layer { name: "conv_g" type: "Convolution" bottom: "data" top: "conv_g"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 group: 2
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "conv_f" type: "Convolution" bottom: "conv_g" top: "conv_f"
  convolution_param { num_output: 8 kernel_size: 3 pad: 2 dilation: 2 fused_relu: true
    weight_filler { type: "gaussian" std: 0.2 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv_f" top: "bn" }
layer { name: "scale" type: "Scale" bottom: "bn" top: "bn"
  scale_param { bias_term: true filler { type: "gaussian" mean: 1 std: 0.2 }
                bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "leaky" type: "ReLU" bottom: "bn" top: "bn" relu_param { negative_slope: 0.1 } }
layer { name: "pool_ceil" type: "Pooling" bottom: "bn" top: "pool_ceil"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "pool_max_pad" type: "Pooling" bottom: "bn" top: "pool_max_pad"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_ave_pad" type: "Pooling" bottom: "bn" top: "pool_ave_pad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "crop_pool" type: "Pooling" bottom: "pool_max_pad" top: "crop_pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 1 round_mode: FLOOR } }
layer { name: "crop_ave" type: "Pooling" bottom: "pool_ave_pad" top: "crop_ave"
  pooling_param { pool: AVE kernel_size: 2 stride: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "pool_ceil" bottom: "crop_pool" bottom: "crop_ave"
  top: "sum" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 } }
layer { name: "prod" type: "Eltwise" bottom: "pool_ceil" bottom: "crop_ave" top: "prod"
  eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "sum" bottom: "prod" top: "max"
  eltwise_param { operation: MAX } }
layer { name: "lrn_across" type: "LRN" bottom: "max" top: "lrn_across"
  lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "lrn_within" type: "LRN" bottom: "max" top: "lrn_within"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL } }
layer { name: "concat" type: "Concat" bottom: "lrn_across" bottom: "lrn_within" top: "concat" }
layer { name: "conv_s" type: "Convolution" bottom: "concat" top: "conv_s"
  convolution_param { num_output: 6 kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1
    bias_term: false weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "conv_s" top: "conv_s" }
layer { name: "global" type: "Pooling" bottom: "conv_s" top: "global"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "drop" type: "Dropout" bottom: "conv_s" top: "drop" dropout_param { dropout_ratio: 0.5 } }
layer { name: "flat" type: "Flatten" bottom: "drop" top: "flat" }
layer { name: "reshape" type: "Reshape" bottom: "global" top: "reshape"
  reshape_param { shape { dim: 2 dim: -1 } } }
layer { name: "both" type: "Concat" bottom: "flat" bottom: "reshape" top: "both"
  concat_param { axis: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "both" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.1 }
                        bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / max(float(np.abs(b).max()), 1e-30))


@pytest.fixture
def small_net(caffe, make_net):
    net = make_net(ALL_LAYERS)
    rng = np.random.RandomState(3)
    # BatchNorm's stored statistics: mean, variance (scaled by the factor in blob 2).
    mean, var, factor = net.params["bn"]
    factor.data[...] = 2.0
    mean.data[...] = rng.standard_normal(mean.data.shape) * 0.2 * 2.0
    var.data[...] = (0.5 + rng.random_sample(var.data.shape)) * 2.0
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].data.shape)
    net.forward()
    return net


def test_every_layer_type_matches_caffe_blob_by_blob(caffe, small_net):
    model = torch_net.build(ALL_LAYERS, small_net, caffe.proto.caffe_pb2)
    types = {m.__class__.__name__ for m in model.layers}
    assert {"Conv", "Pool", "SumPool", "GlobalPool", "Eltwise", "LRN", "Concat", "BatchNorm", "Affine",
            "ReLU", "Multiply", "Flatten", "Reshape", "InnerProduct", "Softmax"} <= types
    assert small_net.blobs["pool_ceil"].data.shape[-1] == 6  # Caffe rounded up: 5 when floored
    with torch.inference_mode():
        blobs = model.blobs(torch.from_numpy(small_net.blobs["data"].data.copy()))
    for name, value in blobs.items():
        assert relative(value.numpy(), small_net.blobs[name].data) <= measure.AGREEMENT_TOLERANCE, name


def test_channels_last_and_onnxruntime_match_caffe(caffe, small_net, tmp_path):
    model = torch_net.build(ALL_LAYERS, small_net, caffe.proto.caffe_pb2)
    x = small_net.blobs["data"].data.copy()
    last = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = last(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
    assert relative(y.numpy(), small_net.blobs["prob"].data) <= measure.AGREEMENT_TOLERANCE
    model.output_name = "ip"  # before the softmax, which would flatten differences
    run, facts = baselines.onnxruntime_session(torch, model, torch.from_numpy(x), 1, str(tmp_path))
    assert facts["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert relative(run(x), small_net.blobs["ip"].data) <= measure.AGREEMENT_TOLERANCE


def test_torch_compile_matches_caffe_or_says_why_not(caffe, small_net, tmp_path):
    """torch.compile needs a C++ compiler at run time; where it works it must agree."""
    model = torch_net.build(ALL_LAYERS, small_net, caffe.proto.caffe_pb2)
    try:
        compiled = torch.compile(model)
        with torch.inference_mode():
            y = compiled(torch.from_numpy(small_net.blobs["data"].data.copy()))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torch.compile does not work here: {exc}")
    assert relative(y.numpy(), small_net.blobs["prob"].data) <= measure.AGREEMENT_TOLERANCE


def test_an_unsupported_layer_type_is_one_clear_line(caffe, make_net):
    text = ("layer { name: 'data' type: 'Input' top: 'data' input_param { shape { dim: 1 dim: 2 } } }\n"
            "layer { name: 'squash' type: 'Sigmoid' bottom: 'data' top: 'squash' }\n")
    net = make_net(text)
    with pytest.raises(UserError) as error:
        torch_net.build(text, net, caffe.proto.caffe_pb2)
    message = str(error.value)
    assert "\n" not in message and "'squash'" in message and "Sigmoid" in message
    assert "Softmax" in message  # names what is supported


def test_a_caffe_pooling_size_pytorch_cannot_match_is_refused(caffe, make_net):
    """Unpadded ceil mode with a kernel smaller than the stride: Caffe keeps a last window that
    starts past the input (MAX gives -FLT_MAX there), PyTorch drops it; the shapes differ, so the
    build refuses. AVE pooling of the same shape is spelled out (sum / Caffe's divisor) and
    matches."""
    text = ("layer { name: 'data' type: 'Input' top: 'data' "
            "input_param { shape { dim: 1 dim: 1 dim: 5 dim: 5 } } }\n"
            "layer { name: 'pool' type: 'Pooling' bottom: 'data' top: 'pool' "
            "pooling_param { pool: %s kernel_size: 1 stride: 3 } }\n")
    net = make_net(text % "MAX")
    assert net.blobs["pool"].data.shape[-1] == 3
    with pytest.raises(UserError, match="'pool'"):
        torch_net.build(text % "MAX", net, caffe.proto.caffe_pb2)
    net = make_net(text % "AVE")
    net.blobs["data"].data[...] = np.arange(25).reshape(1, 1, 5, 5)
    net.forward()
    model = torch_net.build(text % "AVE", net, caffe.proto.caffe_pb2)
    with torch.inference_mode():
        y = model(torch.from_numpy(net.blobs["data"].data.copy()))
    assert np.array_equal(y.numpy(), net.blobs["pool"].data)


@pytest.mark.parametrize("net_name", ["caffenet", "resnet50", "resnet50-1by2"])
def test_whole_net_baselines_agree_with_caffe_on_the_benchmark_nets(caffe, net_name):
    """The nets as ./inv bench builds them (BatchNorm folded, ReLUs fused), synthetic weights
    (open_nsfw's real ones, pruned, for resnet50-1by2):
    PyTorch in both memory formats and ONNX Runtime agree with Caffe's dense on every image, and
    are timed in the same rounds as Caffe's dense (torch.compile is covered on the small net; it
    takes minutes on ResNet-50 here)."""
    spec = RunSpec(kind="net", net=net_name,
                   weights="pruned" if net_name == "resnet50-1by2" else "synthetic",
                   batch=1, cache_dir=str(cache_dir()), transform="fold", images=2, warmup=1,
                   repeats=2, backend="openmp")
    net, text, _, _, images = prepare(caffe, spec)
    feeds = list(images_stage.batches(images, 1, measure.feed_count(spec, images.count)))
    raw = baselines.measure_whole_net(caffe, net, text, feeds, images.count, spec,
                                      {"dense": caffe.clear_conv_forward_paths},
                                      compile_too=False)
    assert set(raw["variants"]) == {"pytorch", "pytorch channels_last", "onnxruntime"}
    for name, variant in raw["variants"].items():
        assert "skipped" not in variant, variant
        assert variant["agrees"] and variant["top1_differs"] == 0, (name, variant)
        assert variant["max_rel_diff"] <= measure.AGREEMENT_TOLERANCE
        assert len(variant["times_ms"]) == 2 and min(variant["times_ms"]) > 0
        assert len(variant["back_to_back_ms"]) == 2 and min(variant["back_to_back_ms"]) > 0
    assert len(raw["caffe"]["dense"]["times_ms"]) == len(raw["caffe"]["dense"]["back_to_back_ms"]) == 2
    assert len(raw["openmp_runtimes"]) == 1  # PyTorch shares Caffe's libgomp


def test_auto_is_calibrated_again_before_the_baselines_rounds(caffe, small_net):
    """Building the PyTorch model reads every weight through pycaffe's writable `.data`, which
    counts as a write: auto re-plans. measure_whole_net calibrates it again before its rounds, so
    no timed round of the auto row is a calibration forward."""
    caffe.clear_conv_forward_paths()
    caffe.set_conv_forward_path("auto")
    caffe.reset_auto()
    feeds = [small_net.blobs["data"].data.copy()]
    for _ in range(measure.MAX_CALIBRATION_FORWARDS):
        small_net.forward()
        if all(c["state"] == "decided" for c in caffe.auto_choices().values()):
            break
    before = {name: c["replans"] for name, c in caffe.auto_choices().items()}
    assert before
    try:
        raw = baselines.measure_whole_net(
            caffe, small_net, ALL_LAYERS, feeds, 1,
            RunSpec(kind="net", net="small", batch=2, warmup=1, repeats=1),
            {"dense": caffe.clear_conv_forward_paths,
             "auto": lambda: caffe.set_conv_forward_path("auto")}, compile_too=False)
    finally:
        caffe.clear_conv_forward_paths()
    after = caffe.auto_choices()
    assert raw["recalibration_forwards"]["auto"] >= 1  # it did calibrate again ...
    assert all(after[name]["replans"] > before[name] for name in before)  # ... because of the read
    assert all(c["state"] == "decided" for c in after.values())
