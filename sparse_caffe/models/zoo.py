"""The supported nets by name (nets.NETS): the deploy prototxt of each, wherever it comes from.

CaffeNet's is the Caffe tree's, ResNet-50's is generated (nets), resnet50-1by2's is converted from
Yahoo's open_nsfw (onnx_import, which builds on nets: so this table lives above both).

Python-3.6-clean: the Docker image runs it (tests/test_docker.py checks).
"""
from pathlib import Path

from . import nets, onnx_import


def deploy(name: str, batch: int, caffe_source: Path) -> str:
    """Deploy prototxt text of a supported net (caffe_source: the Caffe tree, for CaffeNet)."""
    name = nets.net_info(name).name
    if name == "caffenet":
        return nets.caffenet_deploy(caffe_source, batch)
    if name == "resnet50-1by2":
        return onnx_import.convert(batch=batch)[0]
    return nets.resnet50_deploy(batch)
