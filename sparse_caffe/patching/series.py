"""What identifies a Caffe tree and our patch series, and how the series is applied: one
definition for every route. The native build (source, build), the render check and the Docker
image (docker/prepare_caffe.py, under Ubuntu 18.04's Python 3.6, so this module stays 3.6-clean:
no `from __future__ import annotations`, no builtin generics) all use these functions.

- tree_sha256: every file's relative path, kind (f, x for executable, l for a link) and content;
  tarball timestamps, owners and compression do not enter it, and a single top-level folder (as in
  GitHub's tarball) is looked through, so Debian's and GitHub's tarballs of one commit hash alike;
- series_sha256: the series as applied, its order and every patch's bytes;
- apply_series: in the order of the series file, `patch -p1 --fuzz=0`; the first failure stops.
"""
import hashlib
import os
import subprocess
from pathlib import Path

from ..errors import UserError

SERIES_FILE = "series"


def content_root(root) -> Path:
    """root, or its only entry when that is a folder (GitHub's tarball has one top-level folder)."""
    root = Path(root)
    entries = [e for e in root.iterdir() if e.name != ".git"]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return root


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(str(root)):
        dirnames[:] = [d for d in dirnames if d != ".git" or Path(dirpath) != root]
        for name in dirnames:
            if (Path(dirpath) / name).is_symlink():
                yield Path(dirpath) / name
        for name in filenames:
            yield Path(dirpath) / name


def tree_sha256(root) -> str:
    """Hash of a tree's contents (see the module doc)."""
    root = content_root(root)
    digest = hashlib.sha256()
    for path in sorted(_walk(root), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            kind, data = "l", os.readlink(str(path)).encode()
        else:
            kind, data = ("x" if path.stat().st_mode & 0o111 else "f"), path.read_bytes()
        digest.update("{} {} {}\n".format(kind, hashlib.sha256(data).hexdigest(), rel).encode())
    return digest.hexdigest()


def series_files(patches_dir) -> list:
    """The patches of the series in patches_dir, in order (a list of Paths)."""
    series = Path(patches_dir) / SERIES_FILE
    if not series.is_file():
        raise UserError("{} is missing: ./inv render writes it (and the Docker build context "
                        "must carry it)".format(series))
    return [series.parent / line.strip() for line in series.read_text().splitlines()
            if line.strip()]


def series_sha256(patches_dir) -> str:
    """Hash of the series as applied: its order and every patch's bytes."""
    digest = hashlib.sha256()
    for patch in series_files(patches_dir):
        digest.update("{}\n".format(patch.name).encode())
        digest.update(hashlib.sha256(patch.read_bytes()).hexdigest().encode())
    return digest.hexdigest()


def apply_series(tree, patches_dir, log=None) -> None:
    """Apply the series to `tree` in order with no fuzz; a patch that does not apply is one clear
    error. Each patch's output is appended to the file `log`, or printed when log is None."""
    for patch in series_files(patches_dir):
        result = subprocess.run(["patch", "-p1", "--batch", "--forward", "--fuzz=0", "-i",
                                 str(patch)], cwd=str(tree), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True)
        if log is None:
            print(result.stdout, end="", flush=True)
        else:
            with open(str(log), "a") as out:
                out.write("$ patch -p1 --fuzz=0 -i {}\n{}".format(patch, result.stdout))
        if result.returncode != 0:
            last = (result.stdout.strip().splitlines() or ["patch failed"])[-1]
            raise UserError("{} does not apply to {}: {}".format(patch.name, tree, last))
