"""Inside pycaffe: the runner of a "net" RunSpec (prepare the net, then measure it).

Started by the one measurement child, sparse_caffe.inside.child: natively in a subprocess whose
PYTHONPATH names the build, or in a container of the Docker image; the environment fixes the
threads. Everything that needs Caffe happens here; statistics, files and plots happen on the host.

Preparing a run (weights, images, the net as built) is sparse_caffe.inside.prepare; timing it is
sparse_caffe.inside.measure. The PyTorch and ONNX Runtime baselines (sparse_caffe.inside.baselines)
are imported only when the spec asks for them: the image has neither.

Python-3.6-clean: it runs in the image.
"""
import os
import statistics
import time
from typing import List

from . import measure, protocol
from ..models import images as images_stage
from ..models.nets import conv_geometry
from .prepare import prepare


def run(spec: protocol.RunSpec, folder: str, caffe) -> protocol.RawResult:
    """What sparse_caffe.inside.child runs for a "net" RunSpec."""
    net, net_text, layers, weights, images = prepare(caffe, spec)
    feeds = list(images_stage.batches(images, spec.batch,
                                      measure.feed_count(spec, images.count)))
    net.blobs["data"].data[...] = feeds[0]
    blas = measure.checked_blas_runtime(net, int(os.environ.get("OMP_NUM_THREADS", "1")))
    measured = measure.measure_paths(caffe, net, layers, feeds, images.count, spec)
    pytorch = (torch_baseline(caffe, net, net_text, layers, measured["dense_inputs"],
                              measured["reference"], spec)
               if spec.pytorch else None)
    raw = measure.raw_result(caffe, net, layers, measured, weights, images.describe(), pytorch,
                             blas)
    if spec.pytorch:
        from . import baselines
        raw = raw.replace(baselines=baselines.measure_whole_net(
            caffe, net, net_text, feeds, images.count, spec,
            caffe_rows(caffe, measured, spec, layers)))
    return raw


def caffe_rows(caffe, measured: dict, spec: dict, layers: List[str]) -> dict:
    """Caffe's whole-net configurations timed in the baselines' rounds: dense, the per-layer plan
    when the run made one, and auto when the run measured it (decided by then: its calibration
    ran in the warm-up) ({name: () -> None, switching the net to it})."""
    def dense():
        caffe.clear_conv_forward_paths()
        if hasattr(caffe, "set_fc_forward_path"):
            caffe.set_fc_forward_path("dense")
    rows = {"dense": dense}
    if measured.get("plan"):
        rows["plan"] = lambda: measure.use_plan(caffe, measured["plan"], spec)
    auto = spec.auto_path
    if auto and auto in measured["paths"]:
        def auto_row():  # as measure_paths() runs it: the timed convolutions and every InnerProduct
            caffe.clear_conv_forward_paths()
            caffe.set_conv_sparse_backend(spec.backend)
            for name in layers:
                caffe.set_conv_forward_path(auto, name)
            if hasattr(caffe, "set_fc_forward_path"):
                caffe.set_fc_forward_path(auto)
        rows["auto"] = auto_row
    return rows


def torch_baseline(caffe, net, net_text: str, layers: List[str], inputs: dict, outputs: dict,
                   spec: dict) -> dict:
    """The same layers, weights and inputs (per layer one array per bottom: the input, and with
    fused_residual the residual) through PyTorch's CPU convolution (dense), same threads and
    batch: where the sparse paths stand against what users would otherwise run.
    Each layer in both memory formats (contiguous and channels_last, the input converted before
    the timer, as a channels_last net would hand it over), interleaved forward by forward, under
    torch.inference_mode(); the format with the lower median is the layer's PyTorch time. F.conv2d
    has no preallocated-output form (no out=), so PyTorch allocates each output, as its users'
    code does."""
    import torch
    import torch.nn.functional as F
    from google.protobuf import text_format
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    param = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge(net_text, param)
    convs = {layer.name: layer.convolution_param for layer in param.layer if layer.name in layers}
    results = {"version": torch.__version__, "threads": torch.get_num_threads(), "layers": {},
               "note": "per layer: the memory format with the lower median of contiguous and "
                       "channels_last (both recorded), under torch.inference_mode()"}
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    for name in layers:
        c = convs[name]
        stride, pad, dilation = (conv_geometry(c)[key] for key in ("stride", "pad", "dilation"))
        blobs = net.params[name]
        b = torch.from_numpy(blobs[1].data.copy()) if len(blobs) > 1 else None
        weights = {f: torch.from_numpy(blobs[0].data.copy()).contiguous(memory_format=m)
                   for f, m in formats.items()}
        xs = {f: torch.from_numpy(inputs[name][0]).contiguous(memory_format=m)
              for f, m in formats.items()}
        # fused_residual: the layer adds its last bottom before the ReLU (ResNet's sum), and so
        # does PyTorch's (a separate add, as a PyTorch user writes it).
        residuals = ({f: torch.from_numpy(inputs[name][-1]).contiguous(memory_format=m)
                      for f, m in formats.items()} if c.fused_residual else None)

        def forward(f):
            y = F.conv2d(xs[f], weights[f], b, stride=stride, padding=pad, dilation=dilation,
                         groups=c.group)
            if residuals is not None:
                y = y + residuals[f]
            return torch.relu(y) if c.fused_relu else y
        times = {f: [] for f in formats}
        with torch.inference_mode():
            for _ in range(spec.warmup):
                for f in formats:
                    forward(f)
            for i in range(spec.repeats):
                for f in (list(formats) if i % 2 == 0 else list(formats)[::-1]):
                    start = time.perf_counter()
                    y = forward(f)
                    times[f].append((time.perf_counter() - start) * 1e3)
            best = min(formats, key=lambda f: statistics.median(times[f]))
            y = forward(best).contiguous()
        reference = outputs[name]
        difference = measure.relative_difference(y.numpy(), reference)
        results["layers"][name] = {"times_ms": times[best], "memory_format": best,
                                   "times_by_format_ms": times, "max_rel_diff": difference}
    return results
