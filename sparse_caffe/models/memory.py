"""How much memory a benchmark of a net at a batch size needs, estimated before it runs.

Run inside pycaffe (`python -m sparse_caffe.models.memory NET`): it builds the net's deploy prototxt at
batch 1 without weights (Caffe allocates blobs lazily, so this is cheap) and prints, as JSON, the
bytes of its blobs per image, of its parameters, and of the convolutions' im2col buffers. The host
(bench.check_memory) scales them by the batch and compares with the memory available, so that
`--batch 1000` is refused in a second with one line instead of failing on an allocation later.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

FLOAT_BYTES = 4
# The estimate's rules, an upper bound for a forward on any path: each activation blob once, and
# once more for the CSR copies sparse_output keeps with its outputs and sparse_sparse builds of
# its inputs (values and column indices of the nonzeros: at most as large again at the
# sparsities these nets reach); the weights dense and as CSR (twice as large again, at most);
# each convolution's own im2col buffer (one image at a time).
ACTIVATION_COPIES = 2
PARAMETER_COPIES = 3


def needed_bytes(facts: dict, batch: int, images: int = 6) -> int:
    """Bytes a run at `batch` may need: from main()'s facts (per image, fixed), plus the
    preprocessed images and one batch of them as fed."""
    per_image = facts["blob_bytes_per_image"] * ACTIVATION_COPIES
    fixed = facts["param_bytes"] * PARAMETER_COPIES + facts["col_buffer_bytes"]
    inputs = facts["input_bytes_per_image"] * (images + batch)
    return batch * per_image + fixed + inputs


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def facts(net_name: str) -> dict:
    """Sizes of the net at batch 1 (see the module doc)."""
    import caffe
    from . import zoo
    from .net_layers import convolution_names
    caffe.set_mode_cpu()
    source = Path(caffe.__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="sparse-caffe-memory-") as folder:
        prototxt = Path(folder) / "deploy.prototxt"
        prototxt.write_text(zoo.deploy(net_name, 1, source))
        net = caffe.Net(str(prototxt), caffe.TEST)
    blob_bytes = sum(blob.count for blob in net.blobs.values()) * FLOAT_BYTES
    param_bytes = sum(p.count for params in net.params.values() for p in params) * FLOAT_BYTES
    col = 0
    for name in convolution_names(net):
        weights = net.params[name][0]
        top = net.blobs[net.top_names[name][0]]
        # K x N: (channels per group x kernel) x output pixels, times the groups
        group = net.blobs[net.bottom_names[name][0]].channels // weights.channels
        col += weights.count // weights.num * group * top.height * top.width
    return {"net": net_name, "blob_bytes_per_image": blob_bytes, "param_bytes": param_bytes,
            "col_buffer_bytes": col * FLOAT_BYTES,
            "input_bytes_per_image": net.blobs["data"].count * FLOAT_BYTES}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(facts(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
