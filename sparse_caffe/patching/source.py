"""Source stage: get the pinned Caffe tree, verified, into the cache; never leave a half-made tree.

Routes, in the order tried:
  1. --caffe-source PATH: a local tarball (Debian's orig or GitHub's), a folder holding the tree, or
     Debian's .dsc (with its two tarballs beside it);
  2. Debian's bullseye source package through apt-get, with a private apt configuration whose one
     sources line uses the mirror this machine is already configured with;
  3. BVLC's GitHub tarball of the pinned commit (machines with internet).
Every route is verified by one hash of the unpacked tree's contents (CaffePin.tree_sha256). The Debian
routes then apply Debian's own patch series on top, as dpkg-source would.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from . import cache
from .config import CAFFE, CaffePin, user_path
from .series import content_root, tree_sha256
from ..errors import UserError
from ..files import atomic_path, file_sha256
from ..shell import run_logged
from ..terminal import say

APT_SOURCES_FILES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


@dataclass(frozen=True)
class SourceTree:
    """A verified, unpacked Caffe tree in the cache. `identity` keys everything built from it."""

    path: Path
    tree_sha256: str
    debian_patches: str  # "debian/<version>" when Debian's series is applied, else "none"
    route: str

    @property
    def identity(self) -> str:
        return f"{self.tree_sha256}+{self.debian_patches}"


def ensure_source(caffe_source: str | None = None, *, debian_patches: bool = True,
                  pin: CaffePin = CAFFE, root: Path | None = None) -> SourceTree:
    """Return the verified tree for this request, fetching and unpacking it only if needed.

    debian_patches=False gives the pristine commit tree, which the render stage diffs against, so
    that our series applies to every route (Debian's patches do not touch the lines we change).
    """
    root = root or cache.prepare()
    if caffe_source:
        return _from_local(user_path(caffe_source), pin, root, debian_patches)
    variants = [f"debian/{pin.debian_version}", "none"] if debian_patches else ["none"]
    for variant in variants:
        cached = _cached(pin, variant, root)
        if cached:
            return cached
    failures = []
    try:
        files = fetch_debian_source(pin, root / "downloads" / "debian")
        return _install(files[pin.orig_tarball], files[pin.debian_tarball] if debian_patches else None,
                        pin, root, "debian")
    except UserError as exc:
        failures.append(f"Debian mirror: {exc}")
    try:
        tarball = _download_github(pin, root / "downloads" / "github")
        return _install(tarball, None, pin, root, "github")
    except UserError as exc:
        failures.append(f"GitHub: {exc}")
    raise UserError("could not fetch Caffe (" + "; ".join(failures) + "); pass --caffe-source PATH "
                    "with a local copy (Debian's .dsc or orig tarball, GitHub's tarball, or a folder)")


def _tree_dir(pin: CaffePin, variant: str, root: Path) -> Path:
    return root / "source" / f"caffe-{pin.tree_sha256[:16]}-{variant.replace('/', '-')}"


def _cached(pin: CaffePin, variant: str, root: Path) -> SourceTree | None:
    marker = _tree_dir(pin, variant, root) / ".sparse-caffe-source.json"
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    return SourceTree(path=marker.parent, tree_sha256=info["tree_sha256"],
                      debian_patches=info["debian_patches"], route=info["route"])


def _from_local(path: Path, pin: CaffePin, root: Path, debian_patches: bool) -> SourceTree:
    if not path.exists():
        raise UserError(f"--caffe-source {path}: no such file or folder; give Debian's .dsc or orig "
                        "tarball, GitHub's tarball of the pinned commit, or a folder holding the tree")
    if path.suffix == ".dsc":
        files = {name: path.parent / name for name, _ in pin.debian_files}
        missing = [name for name, candidate in files.items() if not candidate.is_file()]
        if missing:
            raise UserError(f"--caffe-source {path}: {', '.join(missing)} missing beside the .dsc")
        for name, expected in pin.debian_files:
            _check_file(files[name], expected)
        return _install(files[pin.orig_tarball], files[pin.debian_tarball] if debian_patches else None,
                        pin, root, f"local:{path}")
    return _install(path, None, pin, root, f"local:{path}")


def _install(tree_source: Path, debian_tarball: Path | None, pin: CaffePin, root: Path,
             route: str) -> SourceTree:
    """Unpack into a temporary folder, verify, patch, then rename into place (atomic)."""
    variant = f"debian/{pin.debian_version}" if debian_tarball else "none"
    dest = _tree_dir(pin, variant, root)
    cached = _cached(pin, variant, root)
    if cached:
        return cached
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=dest.parent) as tmp:
        staging = Path(tmp) / "tree"
        if tree_source.is_dir():
            shutil.copytree(content_root(tree_source), staging, symlinks=True,
                            ignore=shutil.ignore_patterns(".git"))
        else:
            _unpack_tarball(tree_source, staging)
            inner = content_root(staging)
            if inner != staging:
                inner.rename(Path(tmp) / "inner")
                staging.rmdir()
                (Path(tmp) / "inner").rename(staging)
        actual = tree_sha256(staging)
        if actual != pin.tree_sha256:
            raise UserError(f"Caffe source from {route} does not match the pinned commit "
                            f"{pin.commit[:12]}: tree hash {actual[:16]}..., expected "
                            f"{pin.tree_sha256[:16]}...; use the source of that exact commit")
        if debian_tarball:
            _apply_debian_series(debian_tarball, staging, Path(tmp))
        info = SourceTree(path=dest, tree_sha256=actual, debian_patches=variant, route=route)
        (staging / ".sparse-caffe-source.json").write_text(
            json.dumps({**asdict(info), "path": str(dest)}, indent=2) + "\n")
        if dest.exists():  # a stale, unmarked tree from an interrupted run: never trusted
            shutil.rmtree(dest)
        staging.rename(dest)
    say(f"Caffe source ready: {dest} (tree {actual[:12]}, Debian patches: {variant}, from {route})")
    return info


def _unpack_tarball(tarball: Path, dest: Path) -> None:
    try:
        with tarfile.open(tarball) as tar:
            # Debian's Python 3.11.2 predates extraction filters: refuse unsafe members by hand.
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts or member.isdev():
                    raise UserError(f"{tarball}: refusing unsafe member {member.name!r}")
            tar.extractall(dest)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot unpack {tarball}: {exc}") from None


def _apply_debian_series(debian_tarball: Path, tree: Path, scratch: Path) -> None:
    """Apply debian/patches/series in order, as dpkg-source -x does for a 3.0 (quilt) package."""
    _unpack_tarball(debian_tarball, scratch / "debian-pkg")
    patches = scratch / "debian-pkg" / "debian" / "patches"
    series = [ln.split("#")[0].strip() for ln in (patches / "series").read_text().splitlines()]
    for name in filter(None, series):
        result = subprocess.run(["patch", "-p1", "--batch", "--fuzz=0", "-s", "-i", str(patches / name)],
                                cwd=tree, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"Debian patch {name} does not apply: {result.stdout}{result.stderr}")


def _check_file(path: Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise UserError(f"{path.name}: SHA-256 {actual[:16]}... does not match the pinned "
                        f"{expected[:16]}...; delete it and fetch again")


def debian_mirror_uri(sources_files=APT_SOURCES_FILES) -> str:
    """The Debian mirror this machine's apt already uses (never written into the repo)."""
    for path in sources_files:
        if not path.is_file():
            continue
        text = path.read_text()
        deb822 = re.search(r"^URIs:\s*(\S+)", text, re.M)
        if deb822 and "security" not in deb822.group(1):
            return deb822.group(1)
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] in ("deb", "deb-src"):
                uri = next(f for f in fields[1:] if not f.startswith("["))
                if "security" not in uri:
                    return uri
    raise UserError("no Debian mirror is configured in /etc/apt; pass --caffe-source PATH")


def fetch_debian_source(pin: CaffePin, dest: Path) -> dict[str, Path]:
    """Download Debian's source package through a private apt configuration; verify its SHA-256s."""
    dest.mkdir(parents=True, exist_ok=True)
    files = {name: dest / name for name, _ in pin.debian_files}
    if all(p.is_file() and file_sha256(p) == h for (n, h), p in zip(pin.debian_files, files.values())):
        return files
    if not shutil.which("apt-get"):
        raise UserError("apt-get is not available")
    apt = dest / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(f"deb-src [signed-by={DEBIAN_KEYRING}] {debian_mirror_uri()} "
                       f"{pin.debian_suite} main\n")
    options = ["-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
               "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
               "-o", "APT::Sandbox::User=root", "-o", "Acquire::Retries=2", "-q"]
    log = dest / "apt.log"
    run_logged(["apt-get", *options, "update"], log, what="apt-get update (private bullseye deb-src)")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        run_logged(["apt-get", *options, "source", "--download-only",
                    f"{pin.debian_package}={pin.debian_version}"], log, cwd=Path(tmp),
                   what=f"apt-get source {pin.debian_package}={pin.debian_version}")
        for name, expected in pin.debian_files:
            _check_file(Path(tmp) / name, expected)
        for name, path in files.items():
            os.replace(Path(tmp) / name, path)
    return files


def _download_github(pin: CaffePin, dest: Path, timeout: float = 20.0) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"caffe-{pin.commit}.tar.gz"
    if target.is_file():
        return target
    try:
        with atomic_path(target) as partial, \
                urllib.request.urlopen(pin.github_tarball_url, timeout=timeout) as response, \
                open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"cannot download {pin.github_tarball_url}: {exc}") from None
    return target
