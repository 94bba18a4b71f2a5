"""The cache's folders, and the only code that removes them (`./inv clean`).

The cache (config.cache_dir()) may be a path the user chose, holding things of theirs, and it is
shared by every clone on the machine. So nothing is removed by name alone: a folder is removed
only if this project created it, which it records at creation with a marker file, and it is
removed with shutil.rmtree on the exact path (never through a shell):

- each subfolder in SUBFOLDERS gets OWNED_MARKER when prepare() creates it (one that already
  existed without it is left alone, and `clean` says so);
- each build folder gets build.BUILD_MARKER (naming the clone) when build() creates it; a build
  finished before that marker existed is recognised by its complete.json naming the clone.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import PROJECT_ROOT, cache_dir, writable_folder

# Every folder the project keeps directly under the cache.
SUBFOLDERS = ("builds", "ccache", "downloads", "logs", "source", "weights", "synthetic",
              "open_nsfw")
OWNED_MARKER = ".sparse-caffe-owned"
BUILD_MARKER = ".sparse-caffe-build"


def prepare(root: Path | None = None) -> Path:
    """Create the cache and its known subfolders (each marked as ours when created here);
    UserError in one line if the cache cannot be created or written."""
    root = writable_folder(cache_dir() if root is None else root,
                           "the cache folder (SPARSE_CAFFE_CACHE)")
    for name in SUBFOLDERS:
        folder = root / name
        if not folder.exists():
            folder.mkdir()
            (folder / OWNED_MARKER).write_text("created by sparse-caffe; ./inv clean --all may "
                                               "remove this folder\n")
    return root


def owned(folder: Path) -> bool:
    """A real folder (not a link) that carries our marker."""
    return folder.is_dir() and not folder.is_symlink() and (folder / OWNED_MARKER).is_file()


def mark_build(folder: Path, clone: Path = PROJECT_ROOT) -> None:
    """Record, in a new build folder, that this project made it and for which clone."""
    (folder / BUILD_MARKER).write_text(json.dumps({"clone": str(clone)}) + "\n")


def build_clone(folder: Path) -> str | None:
    """The clone a build folder belongs to, from its marker or its complete.json; None when
    neither says (then it is not known to be ours, and is never removed)."""
    for name in (BUILD_MARKER, "complete.json"):
        try:
            clone = json.loads((folder / name).read_text()).get("clone")
        except (OSError, ValueError, AttributeError):
            continue
        if clone:
            return clone
    return None


@dataclass
class Cleaned:
    removed: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why)


def clean(everything: bool = False, root: Path | None = None,
          clone: Path = PROJECT_ROOT) -> Cleaned:
    """Remove this clone's build folders (everything=True: every clone's builds and every known
    subfolder of the cache that this project created). Never follows links, never a shell."""
    root = cache_dir() if root is None else Path(root)
    done = Cleaned()
    if not root.is_dir():
        return done
    builds = root / "builds"
    whole_builds = everything and owned(builds)  # removed below, with whatever it holds
    if builds.is_dir() and not builds.is_symlink() and not whole_builds:
        for folder in sorted(builds.iterdir()):
            if folder.is_symlink() or not folder.is_dir():
                continue
            owner = build_clone(folder)
            if owner is None:
                done.kept.append((folder, "not marked as a sparse-caffe build"))
            elif owner != str(clone) and not everything:
                done.kept.append((folder, f"another clone's build ({owner}; --all removes it)"))
            else:
                _remove(folder, done)
    if everything:
        for name in SUBFOLDERS:
            folder = root / name
            if owned(folder):
                _remove(folder, done)
            elif folder.exists() and name != "builds":
                done.kept.append((folder, "not created by sparse-caffe (no marker); remove it "
                                          "by hand if it is"))
    return done


def _remove(folder: Path, done: Cleaned) -> None:
    shutil.rmtree(folder)
    done.removed.append(folder)
