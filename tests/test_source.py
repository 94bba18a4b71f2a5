from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparse_caffe.errors import UserError
from sparse_caffe.patching.source import debian_mirror_uri, ensure_source, tree_sha256

from .conftest import UPSTREAM, make_tarball, make_tree


def test_tree_hash_ignores_a_single_top_folder_and_timestamps(tmp_path):
    flat = make_tree(tmp_path / "flat", UPSTREAM)
    nested = make_tree(tmp_path / "nested" / "caffe-99bd997", UPSTREAM)
    os.utime(nested / "README.md", (1, 1))
    assert tree_sha256(flat) == tree_sha256(tmp_path / "nested")


@pytest.mark.parametrize("change", ["content", "name", "mode", "extra"])
def test_tree_hash_sees_every_change(tmp_path, change):
    before = tree_sha256(make_tree(tmp_path / "a", UPSTREAM))
    b = make_tree(tmp_path / "b", UPSTREAM)
    if change == "content":
        (b / "README.md").write_text("upstream!\n")
    elif change == "name":
        (b / "README.md").rename(b / "README")
    elif change == "mode":
        (b / "README.md").chmod(0o755)
    else:
        (b / "NEW").write_text("")
    assert tree_sha256(b) != before


@pytest.mark.parametrize("top", ["", "caffe-99bd99795dcdf0b1d3086a8d67ab1782a8a08383"])
def test_local_tarball_is_verified_unpacked_and_reused(tmp_path, pin, top):
    tarball = make_tarball(tmp_path / "caffe.tar.gz", UPSTREAM, top=top)
    cache = tmp_path / "cache"
    tree = ensure_source(str(tarball), pin=pin, root=cache)
    assert tree.debian_patches == "none"
    assert (tree.path / "src/caffe/util/io.cpp").read_text() == UPSTREAM["src/caffe/util/io.cpp"]
    tarball.unlink()  # the second call must use the cache, not the tarball
    assert ensure_source(pin=pin, root=cache, debian_patches=False) == tree


def test_local_folder_route(tmp_path, upstream, pin):
    tree = ensure_source(str(upstream), pin=pin, root=tmp_path / "cache")
    assert tree_sha256(tree.path) != ""  # marker file added beside the tree
    assert (tree.path / "README.md").read_text() == "upstream\n"


def test_wrong_hash_is_one_error_and_leaves_no_tree(tmp_path, pin):
    tampered = dict(UPSTREAM, **{"README.md": "tampered\n"})
    tarball = make_tarball(tmp_path / "caffe.tar.gz", tampered)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="does not match the pinned commit"):
        ensure_source(str(tarball), pin=pin, root=cache)
    leftovers = [p for p in (cache / "source").iterdir()] if (cache / "source").exists() else []
    assert leftovers == []


def test_missing_local_source_is_a_clear_error(tmp_path, pin):
    with pytest.raises(UserError, match="no such file or folder"):
        ensure_source(str(tmp_path / "nowhere.tar.gz"), pin=pin, root=tmp_path / "cache")


def test_corrupt_tarball_is_a_clear_error(tmp_path, pin):
    bad = tmp_path / "caffe.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UserError, match="cannot unpack"):
        ensure_source(str(bad), pin=pin, root=tmp_path / "cache")


def test_dsc_route_needs_its_tarballs_with_the_pinned_hashes(tmp_path, pin):
    dsc = tmp_path / pin.debian_files[0][0]
    dsc.write_text("not the real dsc\n")
    for name, _ in pin.debian_files[1:]:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(UserError, match="does not match the pinned"):
        ensure_source(str(dsc), pin=pin, root=tmp_path / "cache")
    (tmp_path / pin.orig_tarball).unlink()
    with pytest.raises(UserError, match="missing beside the .dsc"):
        ensure_source(str(dsc), pin=pin, root=tmp_path / "cache")


def test_a_stale_unmarked_tree_is_never_trusted(tmp_path, pin):
    cache = tmp_path / "cache"
    tarball = make_tarball(tmp_path / "caffe.tar.gz", UPSTREAM)
    good = ensure_source(str(tarball), pin=pin, root=cache)
    (good.path / ".sparse-caffe-source.json").unlink()  # as if interrupted before the marker
    (good.path / "README.md").write_text("half-made\n")
    again = ensure_source(str(tarball), pin=pin, root=cache)
    assert (again.path / "README.md").read_text() == "upstream\n"


@pytest.mark.parametrize("text, expected", [
    ("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n", "http://mirror.example/debian"),
    ("deb [arch=amd64] http://mirror.example/debian bookworm main\n", "http://mirror.example/debian"),
    ("Types: deb\nURIs: http://mirror.example/debian-security\n", None),
])
def test_mirror_is_read_from_apt_configuration(tmp_path, text, expected):
    sources = tmp_path / "debian.sources"
    sources.write_text(text)
    if expected is None:
        with pytest.raises(UserError, match="no Debian mirror"):
            debian_mirror_uri([sources])
    else:
        assert debian_mirror_uri([sources, Path("/nonexistent")]) == expected
