from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from sparse_caffe.patching.config import CaffePin
from sparse_caffe.patching.source import tree_sha256


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def make_tarball(path: Path, files: dict[str, str], top: str = "", mtime: int = 0) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{rel}" if top else rel)
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


UPSTREAM = {
    "src/caffe/util/io.cpp": "#include <x>\n\nint f() {\n  return 1;\n}\n",
    "src/caffe/layers/conv.cpp": "int g() {\n  int a = 1;\n  return a;\n}\n",
    "README.md": "upstream\n",
}


@pytest.fixture
def upstream(tmp_path) -> Path:
    """A small stand-in for the Caffe tree (synthetic)."""
    return make_tree(tmp_path / "upstream", UPSTREAM)


@pytest.fixture
def pin(upstream) -> CaffePin:
    """A pin whose tree hash is the synthetic upstream's."""
    return CaffePin(tree_sha256=tree_sha256(upstream))
