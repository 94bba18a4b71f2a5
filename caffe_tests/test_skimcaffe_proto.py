"""SkimCaffe's prototxts and binary messages load here, and its conv_mode picks one of our paths.

SkimCaffe adds fields to ConvolutionParameter (conv_mode = 21, dump_parameter = 22,
dump_activation = 23, parameter_sparsity_pattern_histogram = 24) and ParamSpec
(breadth_decay_mult = 5, kernel_shape_decay_mult = 6, block_group_lasso = 7,
regularization_type = 8). Ours live at 40-42, so a binary message from SkimCaffe reads as it meant.
"""
from __future__ import annotations

import numpy as np
import pytest

from .test_forward_paths import paths  # noqa: F401 - a fixture

NET = """name: "skimcaffe_style"
layer {{
  name: "data"
  type: "Input"
  top: "data"
  input_param {{ shape {{ dim: 1 dim: 3 dim: 8 dim: 8 }} }}
}}
layer {{
  name: "{name}"
  type: "Convolution"
  bottom: "data"
  top: "{name}"
  param {{
    lr_mult: 1
    decay_mult: 1
    regularization_type: "L1"
    breadth_decay_mult: 0
    kernel_shape_decay_mult: 0.5
    block_group_lasso {{ xdimen: 9 ydimen: 1 block_decay_mult: 1.5 }}
  }}
  param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{
    num_output: 4
    kernel_size: 3
    pad: 1
    {fields}
    dump_parameter: false
    dump_activation: false
    parameter_sparsity_pattern_histogram: false
  }}
}}
"""

# SkimCaffe's mode -> the path it runs here (forward_path_of_conv_mode in sparse_conv.cpp).
CONV_MODES = {"LOWERED_GEMM": "dense", "LOWERED_CCNMM": "spmdm", "DIRECT_SCONV": "direct",
              "DIRECT_DCONV": "dense"}


def profiled_path(caffe, make_net, name, fields):
    net = make_net(NET.format(name=name, fields=fields))
    rng = np.random.default_rng(1)
    w = rng.standard_normal(net.params[name][0].data.shape).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0.0
    net.params[name][0].data[...] = w
    net.blobs["data"].data[...] = rng.standard_normal((1, 3, 8, 8))
    out = net.forward()[name].copy()
    path = caffe.conv_profile()[name]["path"]
    caffe.set_conv_forward_path("dense", name)
    np.testing.assert_allclose(out, net.forward()[name], rtol=1e-4, atol=1e-4)
    return path


@pytest.mark.parametrize("mode", sorted(CONV_MODES))
def test_skimcaffe_prototxt_loads_and_conv_mode_picks_the_path(caffe, make_net, paths, profiling,
                                                               mode):
    name = f"skim_{mode.lower()}"
    assert profiled_path(caffe, make_net, name, f"conv_mode: {mode}") == CONV_MODES[mode]


def test_an_explicit_forward_path_wins_over_conv_mode(caffe, make_net, paths, profiling):
    fields = "conv_mode: DIRECT_SCONV forward_path: SPARSE_SPARSE"
    assert profiled_path(caffe, make_net, "skim_explicit", fields) == "sparse_sparse"


def test_skimcaffe_training_fields_are_kept(caffe, tmp_path):
    from google.protobuf import text_format
    param = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge(NET.format(name="c", fields="conv_mode: LOWERED_CCNMM"), param)
    spec = param.layer[1].param[0]
    assert (spec.regularization_type, spec.kernel_shape_decay_mult) == ("L1", 0.5)
    assert (spec.block_group_lasso[0].xdimen, spec.block_group_lasso[0].block_decay_mult) == (9, 1.5)


def varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number, payload):
    """A length-delimited field (wire type 2), or a varint field (0) when payload is an int."""
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_a_binary_message_with_conv_mode_reads_as_conv_mode(caffe):
    # Encoded by hand as SkimCaffe writes it: NetParameter.layer (100) { name (1),
    # param (6) { regularization_type (8): "L1" }, convolution_param (106) { num_output (1): 4,
    # conv_mode (21): DIRECT_SCONV (2) } }.
    pb2 = caffe.proto.caffe_pb2
    conv = field(1, 4) + field(21, 2)
    layer = field(1, b"conv") + field(6, field(8, b"L1")) + field(106, conv)
    param = pb2.NetParameter()
    param.ParseFromString(field(100, layer))
    c = param.layer[0].convolution_param
    assert c.HasField("conv_mode") and c.conv_mode == pb2.ConvolutionParameter.DIRECT_SCONV
    assert not c.HasField("fused_relu") and not c.HasField("forward_path")
    assert param.layer[0].param[0].regularization_type == "L1"
