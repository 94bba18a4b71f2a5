from __future__ import annotations

import json

import pytest

from sparse_caffe.patching import build
from sparse_caffe.patching.config import BuildOptions
from sparse_caffe.errors import UserError

PYTHON = {"executable": "/x/bin/python", "version": "3.11.2", "numpy": "2.4.6", "protobuf": "4.21.12",
          "include": "/usr/include/python3.11", "library": "/usr/lib/libpython3.11.so"}


def inputs(**changes):
    base = {"recipe": 1, "source": "abc+none", "patch_series_sha256": "p1", "blas": "openblas",
            "mkl": None, "python": {k: PYTHON[k] for k in ("executable", "version", "numpy", "protobuf")},
            "compiler": "12.2.0", "cmake_options": build.cmake_options(BuildOptions(), PYTHON)}
    base.update(changes)
    return base


@pytest.mark.parametrize("change", [
    {"source": "abc+debian/8"}, {"patch_series_sha256": "p2"}, {"blas": "mkl"}, {"compiler": "13.1"},
    {"python": {**inputs()["python"], "numpy": "2.3.0"}}, {"recipe": 2},
])
def test_key_changes_with_every_input(change):
    assert build.build_key(inputs(**change)) != build.build_key(inputs())


def test_key_is_stable_and_order_free():
    a = inputs()
    b = json.loads(json.dumps(a, sort_keys=True))
    assert build.build_key(a) == build.build_key(dict(reversed(list(b.items()))))


def test_unknown_blas_is_refused():
    with pytest.raises(UserError, match="unknown BLAS 'atlas': choose one of openblas, mkl"):
        BuildOptions(blas="atlas")


def test_cmake_options_follow_blas():
    open_flags = build.cmake_options(BuildOptions(blas="openblas"), PYTHON)
    mkl_flags = build.cmake_options(BuildOptions(blas="mkl"), PYTHON)
    assert "-DBLAS=Open" in open_flags and "-DCPU_ONLY=ON" in open_flags
    assert "-DBLAS=MKL" in mkl_flags
    assert any(f.startswith("-DMKL_RT_LIBRARY=") and f.endswith("libmkl_rt.so.3") for f in mkl_flags)
    assert f"-DPYTHON_EXECUTABLE={PYTHON['executable']}" in open_flags


def test_build_folders_are_keyed_and_unfinished_ones_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_CAFFE_CACHE", str(tmp_path))
    root = build.build_dir(BuildOptions(blas="mkl"), "0123456789abcdef" * 4)
    assert root == tmp_path / "builds" / "mkl-0123456789abcdef"
    root.mkdir(parents=True)
    with pytest.raises(UserError, match="not a finished build"):
        build.Build.load(root)
    (root / "complete.json").write_text(json.dumps({"key": "k", "inputs": {"blas": "mkl"}}))
    assert build.Build.load(root).inputs == {"blas": "mkl"}


def test_prune_keeps_the_newest_finished_builds_of_this_clone_only(tmp_path, monkeypatch):
    import os
    monkeypatch.setenv("SPARSE_CAFFE_CACHE", str(tmp_path))
    clone, other = tmp_path / "clone a", tmp_path / "clone b"
    made, others = [], []
    for i in range(5):
        for owner, folders in ((clone, made), (other, others)):
            folder = tmp_path / "builds" / f"openblas-{owner.name[-1]}{i:015d}"
            folder.mkdir(parents=True)
            (folder / "complete.json").write_text(json.dumps({"clone": str(owner)}))
            os.utime(folder / "complete.json", (i, i))
            folders.append(folder)
    in_progress = tmp_path / "builds" / "openblas-inprogress"
    in_progress.mkdir()
    build.prune_old_builds("openblas", keep=made[0], count=2, clone=clone)
    assert sorted(p.name for p in (tmp_path / "builds").iterdir()) == sorted(
        [made[0].name, made[3].name, made[4].name, in_progress.name] + [f.name for f in others])


def test_missing_apt_packages_are_found():
    assert build.missing_apt_packages(("dpkg", "surely-not-a-package-xyz")) == ["surely-not-a-package-xyz"]
