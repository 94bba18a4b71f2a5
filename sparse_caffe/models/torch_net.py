"""A Caffe net as a PyTorch module: the same layers, the same weights, the same arithmetic.

The whole-net baselines (sparse_caffe.inside.baselines) time what a user would run instead of Caffe:
the net in PyTorch (eager or torch.compile, contiguous or channels_last) and the same module
exported to ONNX for ONNX Runtime. This module builds that PyTorch module from a TEST-phase
caffe.Net and the prototxt it was built from: each Caffe layer becomes one small module that
computes what Caffe's CPU layer computes (Caffe's ceil-mode pooling size, its LRN formula, its
average pooling divisor, Dropout's test-time scaling), and the blobs flow by name as in Caffe.
A layer type it does not know, or a setting of a known one that it cannot match exactly, is a
UserError naming the layer.

Runs inside pycaffe on the host (Python 3.11; never in the Docker image), with torch imported
by the caller's process: `build` imports it.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from .nets import hw_pair

SUPPORTED = ("Input", "Convolution", "ReLU", "Pooling", "Eltwise", "InnerProduct", "LRN",
             "Softmax", "Dropout", "Concat", "Flatten", "Reshape", "BatchNorm", "Scale")


def build(net_text: str, net, caffe_pb2):
    """The PyTorch module computing `net` (a TEST-phase caffe.Net built from `net_text`) with
    its current weights, in eval mode. Its forward takes the input blob and returns the net's
    last output blob; `blobs(x)` returns every blob by name."""
    import torch
    from google.protobuf import text_format

    param = caffe_pb2.NetParameter()
    text_format.Merge(net_text, param)
    in_net = set(net._layer_names)  # the TEST phase's layers (include/exclude applied)
    steps, inputs = [], []
    for layer in param.layer:
        if layer.name not in in_net:
            continue
        if layer.type == "Input":
            inputs.extend(layer.top)
            continue
        blobs = ([torch.from_numpy(np.array(b.data, dtype=np.float32, copy=True))
                  for b in net.params[layer.name]] if layer.name in net.params else [])
        shapes = [tuple(net.blobs[b].data.shape) for b in layer.bottom]
        steps.append(_Step(_layer_module(layer, blobs, shapes), list(layer.bottom),
                           list(layer.top)))
    if len(inputs) != 1:
        raise UserError(f"the PyTorch baseline needs a net with one Input blob, this one has "
                        f"{len(inputs)} ({', '.join(inputs)})")
    model = CaffeModule(steps, inputs[0], net.outputs[-1]).eval()
    check_shapes(model, net)
    return model


def check_shapes(model, net) -> None:
    """Every blob of the module has the shape Caffe gave it (a pooling whose output size PyTorch
    would round differently is refused here, not discovered as a wrong answer)."""
    import torch
    shape = tuple(net.blobs[model.input_name].data.shape)
    with torch.inference_mode():
        blobs = model.blobs(torch.zeros(shape))
    for name, value in blobs.items():
        want = tuple(net.blobs[name].data.shape)
        if tuple(value.shape) != want:
            writer = next(step.layer_name for step in model.steps if name in step.tops)
            raise UserError(f"the PyTorch baseline cannot match layer {writer!r}: it gives "
                            f"{name!r} the shape {tuple(value.shape)}, Caffe {want}")


def _torch():
    import torch
    return torch


class _Lazy:
    """Module classes are made on first use, so importing this module needs no torch."""
    classes: dict = {}


def _classes() -> dict:
    if _Lazy.classes:
        return _Lazy.classes
    torch = _torch()
    F = torch.nn.functional
    nn = torch.nn

    class Conv(nn.Module):
        def __init__(self, weight, bias, stride, pad, dilation, groups, relu):
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
            self.stride, self.pad, self.dilation = stride, pad, dilation
            self.groups, self.relu = groups, relu

        def forward(self, x, residual=None):
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation,
                         self.groups)
            if residual is not None:  # our Caffe's fused_residual: the sum, then the ReLU
                y = y + residual
            return F.relu(y) if self.relu else y

    class ReLU(nn.Module):
        def __init__(self, slope):
            super().__init__()
            self.slope = slope

        def forward(self, x):
            return F.relu(x) if self.slope == 0 else F.leaky_relu(x, self.slope)

    class Pool(nn.Module):
        def __init__(self, method, kernel, stride, pad, ceil):
            super().__init__()
            self.method, self.kernel, self.stride, self.pad, self.ceil = (
                method, kernel, stride, pad, ceil)

        def forward(self, x):
            if self.method == "max":
                return F.max_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil)
            # Caffe divides by the window clipped to the padded input, padding included: as
            # PyTorch's count_include_pad=True.
            return F.avg_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil,
                                count_include_pad=True)

    class SumPool(nn.Module):
        """Caffe's AVE pooling where rounding up adds windows that overhang the padded input:
        the zero-padded sum over each window, divided by Caffe's divisor (the window clipped to
        the padded input). ONNX Runtime's AveragePool divides such windows differently, so the
        module that is exported spells the arithmetic out."""

        def __init__(self, kernel, stride, pad, extra, divisor):
            super().__init__()
            self.kernel, self.stride = kernel, stride
            self.padding = (pad[1], pad[1] + extra[1], pad[0], pad[0] + extra[0])
            self.register_buffer("divisor", divisor)

        def forward(self, x):
            window = self.kernel[0] * self.kernel[1]
            y = F.avg_pool2d(F.pad(x, self.padding), self.kernel, self.stride, 0)
            return y * window / self.divisor

    class GlobalPool(nn.Module):
        def __init__(self, method):
            super().__init__()
            self.method = method

        def forward(self, x):
            if self.method == "max":
                return F.adaptive_max_pool2d(x, 1)
            return F.adaptive_avg_pool2d(x, 1)

    class Eltwise(nn.Module):
        def __init__(self, operation, coeffs, relu):
            super().__init__()
            self.operation, self.coeffs, self.relu = operation, coeffs, relu

        def forward(self, *xs):
            if self.operation == "sum":
                y = self._sum(xs)
                return torch.relu(y) if self.relu else y  # our Caffe's fused_relu
            y = xs[0]
            for x in xs[1:]:
                y = y * x if self.operation == "prod" else torch.maximum(y, x)
            return y

        def _sum(self, xs):
            if self.coeffs is None:
                y = xs[0] + xs[1]
                for x in xs[2:]:
                    y = y + x
                return y
            y = xs[0] * self.coeffs[0]
            for c, x in zip(self.coeffs[1:], xs[1:]):
                y = y + x * c
            return y

    class InnerProduct(nn.Module):
        def __init__(self, weight, bias, axis):
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
            self.axis = axis

        def forward(self, x):
            return F.linear(torch.flatten(x, self.axis), self.weight, self.bias)

    class LRN(nn.Module):
        """ACROSS_CHANNELS: x / (k + alpha/n * sum of x^2 over the n channels around)^beta,
        which is PyTorch's local_response_norm for odd n (Caffe allows only odd n).
        WITHIN_CHANNEL: x / (1 + alpha * mean of x^2 over the n x n window, zero-padded)^beta."""

        def __init__(self, size, alpha, beta, k, across):
            super().__init__()
            self.size, self.alpha, self.beta, self.k, self.across = size, alpha, beta, k, across

        def forward(self, x):
            if self.across:
                return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
            pad = (self.size - 1) // 2
            mean = F.avg_pool2d(x * x, self.size, 1, pad, count_include_pad=True)
            return x * torch.pow(1 + self.alpha * mean, -self.beta)

    class Softmax(nn.Module):
        def __init__(self, axis):
            super().__init__()
            self.axis = axis

        def forward(self, x):
            return F.softmax(x, self.axis)

    class Multiply(nn.Module):  # Dropout at test time: identity, or (1 - ratio) without scale_train
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x if self.factor == 1.0 else x * self.factor

    class Concat(nn.Module):
        def __init__(self, axis):
            super().__init__()
            self.axis = axis

        def forward(self, *xs):
            return torch.cat(xs, self.axis)

    class Flatten(nn.Module):
        def __init__(self, axis, end_axis):
            super().__init__()
            self.axis, self.end_axis = axis, end_axis

        def forward(self, x):
            return torch.flatten(x, self.axis, self.end_axis)

    class Reshape(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.shape = shape

        def forward(self, x):
            return x.reshape(self.shape)

    class Affine(nn.Module):  # BatchNorm with global statistics, and Scale: x * a + b per channel
        def __init__(self, scale, shift):
            super().__init__()
            self.register_buffer("scale", scale)
            self.register_buffer("shift", shift)

        def forward(self, x):
            y = x * self.scale
            return y if self.shift is None else y + self.shift

    class BatchNorm(nn.Module):
        def __init__(self, mean, var, eps):
            super().__init__()
            self.register_buffer("mean", mean)
            self.register_buffer("var", var)
            self.eps = eps

        def forward(self, x):
            return F.batch_norm(x, self.mean, self.var, None, None, False, 0.0, self.eps)

    _Lazy.classes = {k: v for k, v in locals().items() if isinstance(v, type)}
    return _Lazy.classes


class _Step:
    """One Caffe layer: its module, the blobs it reads and the blobs it writes."""

    def __init__(self, module, bottoms, tops):
        self.module, self.bottoms, self.tops = module, bottoms, tops


def CaffeModule(steps: list[_Step], input_name: str, output_name: str):
    """The net as a torch.nn.Module (a function so that this module imports without torch)."""
    torch = _torch()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([s.module for s in steps])
            self.bottoms = [tuple(s.bottoms) for s in steps]
            self.tops = [tuple(s.tops) for s in steps]
            self.input_name, self.output_name = input_name, output_name
            self.steps = [_StepInfo(s.module.caffe_name, s.tops) for s in steps]

        def blobs(self, x):
            values = {self.input_name: x}
            for layer, bottoms, tops in zip(self.layers, self.bottoms, self.tops):
                values[tops[0]] = layer(*[values[b] for b in bottoms])
            return values

        def forward(self, x):
            return self.blobs(x)[self.output_name]

    return Net()


class _StepInfo:
    def __init__(self, layer_name, tops):
        self.layer_name, self.tops = layer_name, tops


def _blob_count(layer, blobs, counts: tuple[int, ...]) -> None:
    if len(blobs) not in counts:
        raise UserError(f"layer {layer.name!r} ({layer.type}) has {len(blobs)} parameter blobs; "
                        f"the PyTorch baseline expects {' or '.join(map(str, counts))}")


def _unsupported(layer, why: str) -> UserError:
    return UserError(f"the PyTorch baseline does not support layer {layer.name!r} "
                     f"({layer.type}): {why}")


def _layer_module(layer, blobs, shapes):
    """The module computing one Caffe layer (with its parameter blobs as tensors; shapes: its
    bottoms' shapes in the Caffe net)."""
    c = _classes()
    kind = layer.type
    if kind not in SUPPORTED:
        raise _unsupported(layer, f"unknown layer type; supported: {', '.join(SUPPORTED)}")
    if len(layer.top) != 1:
        raise _unsupported(layer, f"it has {len(layer.top)} outputs, the baseline handles one")
    if kind == "Convolution":
        p = layer.convolution_param
        _blob_count(layer, blobs, (1, 2))
        if blobs[0].dim() != 4 or p.axis != 1:
            raise _unsupported(layer, "only 2-D convolutions over axis 1")
        if len(layer.bottom) != 1 + bool(getattr(p, "fused_residual", False)):
            raise _unsupported(layer, f"{len(layer.bottom)} inputs; the baseline handles one (and "
                                      f"the residual with fused_residual)")
        module = c["Conv"](blobs[0], blobs[1].reshape(-1) if len(blobs) == 2 else None,
                           hw_pair(p.stride, p.stride_h, p.stride_w, 1),
                           hw_pair(p.pad, p.pad_h, p.pad_w, 0), hw_pair(p.dilation, 0, 0, 1),
                           int(p.group), bool(getattr(p, "fused_relu", False)))
    elif kind == "ReLU":
        module = c["ReLU"](float(layer.relu_param.negative_slope))
    elif kind == "Pooling":
        module = _pooling(layer, c, shapes[0])
    elif kind == "Eltwise":
        p = layer.eltwise_param
        operation = {0: "prod", 1: "sum", 2: "max"}[p.operation]
        coeffs = [float(v) for v in p.coeff] or None
        if coeffs is not None and (operation != "sum" or len(coeffs) != len(layer.bottom)):
            raise _unsupported(layer, "coefficients need SUM and one per input")
        module = c["Eltwise"](operation, None if coeffs and all(v == 1 for v in coeffs)
                              else coeffs, bool(getattr(p, "fused_relu", False)))
    elif kind == "InnerProduct":
        p = layer.inner_product_param
        _blob_count(layer, blobs, (1, 2) if p.bias_term else (1,))
        weight = blobs[0].reshape(blobs[0].shape[-2], blobs[0].shape[-1])
        weight = weight.t().contiguous() if p.transpose else weight
        module = c["InnerProduct"](weight, blobs[1].reshape(-1) if len(blobs) == 2 else None,
                                   int(p.axis))
    elif kind == "LRN":
        p = layer.lrn_param
        if p.local_size % 2 == 0:
            raise _unsupported(layer, "an even local_size (Caffe refuses it too)")
        module = c["LRN"](int(p.local_size), float(p.alpha), float(p.beta), float(p.k),
                          p.norm_region == p.ACROSS_CHANNELS)
    elif kind == "Softmax":
        module = c["Softmax"](int(layer.softmax_param.axis))
    elif kind == "Dropout":
        p = layer.dropout_param
        module = c["Multiply"](1.0 if getattr(p, "scale_train", True) else 1.0 - float(p.dropout_ratio))
    elif kind == "Concat":
        p = layer.concat_param
        module = c["Concat"](int(p.axis) if p.HasField("axis") or not p.HasField("concat_dim")
                             else int(p.concat_dim))
    elif kind == "Flatten":
        module = c["Flatten"](int(layer.flatten_param.axis), int(layer.flatten_param.end_axis))
    elif kind == "Reshape":
        p = layer.reshape_param
        if p.axis != 0 or p.num_axes != -1:
            raise _unsupported(layer, "only a reshape of every axis (axis 0, num_axes -1)")
        module = c["Reshape"](tuple(int(d) for d in p.shape.dim))
        if any(d == 0 for d in module.shape):
            raise _unsupported(layer, "a 0 (copy this axis) in its shape")
    elif kind == "BatchNorm":
        p = layer.batch_norm_param
        if p.HasField("use_global_stats") and not p.use_global_stats:
            raise _unsupported(layer, "batch statistics at test time (use_global_stats: false)")
        _blob_count(layer, blobs, (3,))
        stored = float(blobs[2].reshape(-1)[0])
        factor = 0.0 if stored == 0 else 1.0 / stored  # as Caffe's BatchNormLayer
        module = c["BatchNorm"](blobs[0].reshape(-1) * factor, blobs[1].reshape(-1) * factor,
                                float(p.eps))
    else:  # Scale
        p = layer.scale_param
        if len(layer.bottom) != 1 or p.axis != 1 or p.num_axes != 1:
            raise _unsupported(layer, "only a learned per-channel scale (one input, axis 1, "
                                      "num_axes 1)")
        _blob_count(layer, blobs, (2,) if p.bias_term else (1,))
        module = c["Affine"](blobs[0].reshape(1, -1, 1, 1),
                             blobs[1].reshape(1, -1, 1, 1) if p.bias_term else None)
    module.caffe_name = layer.name
    return module


def _caffe_pooled(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Caffe's pooled output size along one axis (PoolingLayer::Reshape)."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pooling(layer, c, shape):
    p = layer.pooling_param
    method = {0: "max", 1: "ave"}.get(p.pool)
    if method is None:
        raise _unsupported(layer, "STOCHASTIC pooling")
    if p.global_pooling:
        return c["GlobalPool"](method)
    kernel = hw_pair([p.kernel_size] if p.HasField("kernel_size") else [], p.kernel_h, p.kernel_w,
                     0)
    stride = hw_pair([p.stride], p.stride_h, p.stride_w, 1)
    pad = hw_pair([p.pad], p.pad_h, p.pad_w, 0)
    # Caffe rounds the output size up (CEIL, its default) unless round_mode is FLOOR; PyTorch's
    # ceil_mode drops a last window that would start in the padding, as Caffe does when padded
    # (check_shapes catches the unpadded corner case where they differ).
    floor = getattr(p, "round_mode", 0) == 1
    if any(2 * q > k for q, k in zip(pad, kernel)):
        raise _unsupported(layer, f"padding {pad} over half the kernel {kernel}")
    ceil = not floor
    out = [_caffe_pooled(n, k, st, q, ceil) for n, k, st, q in zip(shape[2:], kernel, stride, pad)]
    extra = [max(0, (o - 1) * st + k - (n + 2 * q))
             for o, n, k, st, q in zip(out, shape[2:], kernel, stride, pad)]
    if method == "ave" and any(extra):
        torch = _torch()
        sizes = []
        for o, n, k, st, q in zip(out, shape[2:], kernel, stride, pad):
            sizes.append([min(i * st - q + k, n + q) - (i * st - q) for i in range(o)])
        divisor = torch.tensor(np.outer(sizes[0], sizes[1]), dtype=torch.float32)
        return c["SumPool"](kernel, stride, pad, extra, divisor)
    return c["Pool"](method, kernel, stride, pad, ceil)
