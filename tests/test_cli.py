"""User mistakes through the real command line: one clear line, non-zero exit, nothing half-made."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_caffe.patching.cache import OWNED_MARKER
from sparse_caffe.patching.config import PROJECT_ROOT

from .conftest import UPSTREAM, make_tarball


def inv(*args, cache: Path):
    env = {**os.environ, "SPARSE_CAFFE_CACHE": str(cache)}
    invoke = Path(sys.executable).parent / "invoke"
    return subprocess.run([str(invoke), *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def made_in(folder: Path) -> list[Path]:
    """What a folder holds besides the marker the cache's folders are created with."""
    return [p for p in folder.iterdir() if p.name != OWNED_MARKER]


def assert_one_error_line(result, *fragments):
    assert result.returncode != 0
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("task", ["build", "test"])
def test_unknown_blas(tmp_path, task):
    assert_one_error_line(inv(task, "--blas", "atlas", cache=tmp_path), "unknown BLAS 'atlas'")


@pytest.mark.parametrize("task", ["fetch", "build", "render"])
def test_missing_caffe_source(tmp_path, task):
    result = inv(task, "--caffe-source", str(tmp_path / "no-such.tar.gz"), cache=tmp_path / "cache")
    assert_one_error_line(result, "no-such.tar.gz", "no such file or folder")
    builds = tmp_path / "cache" / "builds"  # the cache's folders may be made, but no build
    assert not builds.exists() or not [p for p in builds.iterdir() if p.is_dir()]


def test_wrong_hash(tmp_path):
    """A tarball that is not the pinned commit: refused, and no tree is left in the cache."""
    tarball = make_tarball(tmp_path / "caffe-other.tar.gz", UPSTREAM, top="caffe-other")
    result = inv("fetch", "--caffe-source", str(tarball), cache=tmp_path / "cache")
    assert_one_error_line(result, "does not match the pinned commit 99bd99795dcd", "tree hash")
    source = tmp_path / "cache" / "source"
    assert not source.exists() or not made_in(source)


def test_fetch_weights_unknown_net(tmp_path):
    assert_one_error_line(inv("fetch-weights", "--net", "vgg16", cache=tmp_path),
                          "unknown net 'vgg16'", "caffenet, resnet50")


def test_fetch_weights_refuses_a_missing_hand_downloaded_file(tmp_path):
    result = inv("fetch-weights", "--net", "resnet50", "--weights", str(tmp_path / "nope.bz2"),
                 cache=tmp_path / "cache")
    assert_one_error_line(result, "nope.bz2")
    weights = tmp_path / "cache" / "weights"
    assert not weights.exists() or not made_in(weights)
