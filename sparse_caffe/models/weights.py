"""Pruned weights: SkimCaffe's published .caffemodel files, fetched, verified and kept in the cache.

Intel Labs' SkimCaffe repository holds pruned networks as bzip2-compressed .caffemodel files. We pin
one commit and, for each file, its git blob id (what `git hash-object` prints: SHA-1 of
b"blob <size>\\0" followed by the bytes), so a download is checked against the repository's own
record of the file without trusting the transport. The verified .bz2 is decompressed into
`<cache>/weights/<net>.caffemodel`, beside a JSON sidecar that records the blob id it came from and
the SHA-256 of the decompressed file; a later call re-checks that SHA-256 and does nothing more.

Two ways in:
  * fetch(): download from raw.githubusercontent.com (or any base URL serving the same paths);
  * place(): a file given by hand (--weights PATH) on a machine without internet: the .bz2 as
    downloaded is checked by blob id; a plain .caffemodel only if it is byte-identical to a
    decompression this cache has already verified.
Nothing partial or unverified is ever left in the cache: downloads go to a .part file and the
decompression to a temporary name, both removed on any failure; only verified files are renamed
into place.

Python-3.6-clean: the Docker image runs it (tests/test_docker.py checks).
"""
import bz2
import hashlib
import http.client
import json
import os
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from ..errors import UserError
from ..files import atomic_path, atomic_write_json, file_sha256, folder_lock, remove_if_present

SKIMCAFFE_COMMIT = "2f66b5a95329a478db3097849f2a6a74d74bb5eb"
RAW_BASE_URL = f"https://raw.githubusercontent.com/IntelLabs/SkimCaffe/{SKIMCAFFE_COMMIT}"

CHUNK = 1 << 20
SIDECAR_SUFFIX = ".json"

Progress = Callable[[int, "int | None"], None]


def license_beside(weights: Path) -> Path:
    """Where the licence of a weights file goes: beside it, named after it (real weights whose
    terms ask that the licence travel with them, and weights made from those)."""
    return weights.with_name(weights.name + ".LICENSE")


@dataclass(frozen=True)
class PrunedWeights:
    """One SkimCaffe weights file at the pinned commit, identified by its git blob id."""

    net: str           # our name for it, the key in SKIMCAFFE
    description: str
    path: str          # inside the SkimCaffe repository: a .caffemodel.bz2
    blob_id: str       # git blob id of that .bz2 at SKIMCAFFE_COMMIT
    top1: Optional[float]  # ImageNet top-1 accuracy SkimCaffe reports for it (None: not recorded)
    pruned: bool       # False: a dense model (no zero weights), refused unless asked for

    def __post_init__(self) -> None:
        if len(self.blob_id) != 40 or any(c not in "0123456789abcdef" for c in self.blob_id):
            raise ValueError(f"{self.net}: blob id must be 40 lower-case hex digits, got {self.blob_id!r}")
        if not self.path.endswith(".caffemodel.bz2"):
            raise ValueError(f"{self.net}: expected a .caffemodel.bz2 path, got {self.path!r}")

    @property
    def file_name(self) -> str:
        """Name of the decompressed file in the cache's weights folder."""
        return f"{self.net}.caffemodel"

    def url(self, base_url: str = RAW_BASE_URL) -> str:
        return f"{base_url.rstrip('/')}/{urllib.parse.quote(self.path)}"


SKIMCAFFE: Dict[str, PrunedWeights] = {
    "caffenet": PrunedWeights(
        net="caffenet",
        description="SkimCaffe's pruned CaffeNet (AlexNet variant), top-1 0.5748",
        path="models/bvlc_reference_caffenet/logs/acc_57.5_0.001_5e-5_ft_0.001_5e-5/"
             "0.001_5e-05_0_1_0_0_0_0_Sun_Jan__8_07-35-54_PST_2017/"
             "caffenet_train_iter_640000.caffemodel.bz2",
        blob_id="356a55edc66ae82250bfba1e5c643d1ecdec9805",
        top1=0.5748,
        pruned=True,
    ),
    "resnet50": PrunedWeights(
        net="resnet50",
        description="SkimCaffe's pruned ResNet-50, top-1 0.7284",
        path="models/resnet/logs/0.0001_0.00005_0.0001_10_0_0_0_0_2017-04-02-22-29-02/"
             "caffenet_train_iter_2000000.caffemodel.bz2",
        blob_id="fbc6d5ee2930adeeba29d7221b36ed706ed78dfd",
        top1=0.7284,
        pruned=True,
    ),
    "resnet50-dense": PrunedWeights(
        net="resnet50-dense",
        description="SkimCaffe's dense ResNet-50 starting model",
        path="models/resnet/ResNet-50-model.caffemodel.bz2",
        blob_id="1398d8953ef9182cbce9bdc00b8e36f5de48aee9",
        top1=None,
        pruned=False,
    ),
}


def weights_entry(net: str, *, allow_dense: bool = False) -> PrunedWeights:
    """The table entry for net; UserError for an unknown name, or a dense model not asked for."""
    entry = SKIMCAFFE.get(net)
    if entry is None:
        raise UserError(f"unknown net {net!r} for SkimCaffe weights; choose one of: "
                        f"{', '.join(sorted(SKIMCAFFE))}")
    if not entry.pruned and not allow_dense:
        pruned = [name for name, e in sorted(SKIMCAFFE.items()) if e.pruned]
        raise UserError(f"{net} is refused by default: it is {entry.description}, which has no zeros "
                        f"(it is the starting point, not the pruned model), so the sparse paths have "
                        f"nothing to skip; use {' or '.join(pruned)}, or allow the dense model "
                        f"explicitly (--allow-dense) for a dense baseline only")
    return entry


def weights_dir(cache_root: Path) -> Path:
    return Path(cache_root) / "weights"


def git_blob_id(path: Path) -> str:
    """What `git hash-object path` prints: SHA-1 of b"blob <size>\\0" + contents, read in chunks."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest = hashlib.sha1(b"blob %d\0" % size)
        read = 0
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
            read += len(block)
    if read != size:
        raise UserError(f"{path} changed while it was being read; try again")
    return digest.hexdigest()


def cached(net: str, cache_root: Path, *, allow_dense: bool = False) -> Optional[Path]:
    """The verified decompressed file for net if the cache holds one (SHA-256 re-checked), else None."""
    entry = weights_entry(net, allow_dense=allow_dense)
    return _verified(entry, weights_dir(cache_root))


def copy_cached(net: str, cache_root: Path, to_root: Path) -> Optional[Path]:
    """The verified file for net from the cache `cache_root`, with its record, put into the cache
    `to_root` (linked where the two share a file system, else copied), so that `cached(net,
    to_root)` finds it there; None if `cache_root` holds none. The Docker route gives a
    container's own cache what the host has fetched."""
    entry = weights_entry(net)
    found = _verified(entry, weights_dir(cache_root))
    if found is None:
        return None
    folder = weights_dir(to_root)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        if _verified(entry, folder) is None:
            for source in (found, _sidecar(found.parent, entry)):  # the file, then its record
                with atomic_path(folder / source.name) as partial:
                    try:
                        os.link(source, partial)
                    except OSError:
                        shutil.copyfile(source, partial)
    return folder / entry.file_name


def fetch(net: str, cache_root: Path, *, base_url: str = RAW_BASE_URL, allow_dense: bool = False,
          timeout: float = 30, progress: Optional[Progress] = None) -> Path:
    """Return `<cache_root>/weights/<net>.caffemodel`, verified; download it only if needed."""
    entry = weights_entry(net, allow_dense=allow_dense)
    folder = weights_dir(cache_root)
    found = _verified(entry, folder)
    if found:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    url = entry.url(base_url)
    with folder_lock(folder):
        found = _verified(entry, folder)  # another process may have finished it meanwhile
        if found:
            return found
        part = folder / f"{entry.file_name}.bz2.part"
        try:
            _download(url, part, timeout, progress)
            actual = git_blob_id(part)
            if actual != entry.blob_id:
                raise UserError(f"{url}: git blob id {actual} does not match the pinned "
                                f"{entry.blob_id}; the file is removed; try again, or download it by "
                                f"hand and pass it with --weights PATH")
            return _install(entry, part, folder, source=url)
        finally:
            remove_if_present(part)


def place(net: str, file: Path, cache_root: Path, allow_dense: bool = False) -> Path:
    """Install a file given by hand (--weights PATH) into the cache, verified as fetch() does.

    The .caffemodel.bz2 as downloaded is checked by its git blob id; a plain .caffemodel only if its
    SHA-256 equals a decompression this cache has verified before. The given file is never altered.
    """
    entry = weights_entry(net, allow_dense=allow_dense)
    file = Path(file).expanduser()
    if not file.is_file():
        raise UserError(f"--weights {file}: no such file; give {entry.url().rsplit('/', 1)[1]} as "
                        f"downloaded from {entry.url()}")
    folder = weights_dir(cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        actual = git_blob_id(file)
        if actual == entry.blob_id:
            found = _verified(entry, folder)
            return found if found else _install(entry, file, folder, source=f"local:{file}")
        if _is_bzip2(file):
            other = next((e.net for e in SKIMCAFFE.values() if e.blob_id == actual), None)
            what = f"it is the {other} file, not {net}" if other else \
                f"git blob id {actual} does not match the pinned {entry.blob_id}"
            raise UserError(f"--weights {file}: {what}; give the file downloaded from {entry.url()}")
        return _place_plain(entry, file, folder)


def _place_plain(entry: PrunedWeights, file: Path, folder: Path) -> Path:
    record = _read_sidecar(entry, folder)
    if record is None:
        raise UserError(f"--weights {file}: a plain .caffemodel cannot be checked against SkimCaffe's "
                        f"blob id; give the .caffemodel.bz2 as downloaded from {entry.url()}")
    if file_sha256(file) != record["sha256"]:
        raise UserError(f"--weights {file}: not the verified {entry.net} weights (SHA-256 differs from "
                        f"the decompression recorded in {folder}); give the .caffemodel.bz2 as "
                        f"downloaded from {entry.url()}")
    found = _verified(entry, folder)
    if found:
        return found
    dest = folder / entry.file_name
    with atomic_path(dest) as tmp:
        digest = hashlib.sha256()
        with open(file, "rb") as src, open(tmp, "wb") as out:
            for block in iter(lambda: src.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != record["sha256"]:
            raise UserError(f"--weights {file} changed while it was being copied; try again")
    return dest


def _download(url: str, part: Path, timeout: float, progress: Optional[Progress]) -> None:
    internet = (f"the SkimCaffe weights need the internet; download {url} on a machine with internet "
                f"and pass it with --weights PATH (checked the same way); without them the benchmark "
                f"uses the offline synthetic default model")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    except urllib.error.HTTPError as exc:
        raise UserError(f"{url}: HTTP {exc.code} {exc.reason}; check the pinned path and commit, or "
                        f"download the file by hand and pass it with --weights PATH") from None
    except urllib.error.URLError as exc:
        raise UserError(f"cannot reach {url} ({_reason(exc.reason)}): {internet}") from None
    except (ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException) as exc:
        raise UserError(f"download of {url} broke off ({_reason(exc)}): {internet}") from None
    if total is not None and done != total:
        raise UserError(f"download of {url} was cut short ({done} of {total} bytes); nothing was "
                        f"kept; try again, or pass the file with --weights PATH")


def _reason(reason: object) -> str:
    if isinstance(reason, socket.gaierror):
        return f"name lookup failed: {reason.strerror or reason}"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _install(entry: PrunedWeights, bz2_file: Path, folder: Path, *, source: str) -> Path:
    """Decompress a blob-verified .bz2 to a temporary name, then rename it and write the sidecar."""
    dest = folder / entry.file_name
    with atomic_path(dest) as tmp:
        digest = hashlib.sha256()
        try:
            with bz2.open(bz2_file, "rb") as src, open(tmp, "wb") as out:
                for block in iter(lambda: src.read(CHUNK), b""):
                    digest.update(block)
                    out.write(block)
        except (OSError, EOFError, ValueError) as exc:
            raise UserError(f"{source}: not a complete bzip2 file ({exc}); nothing was kept; "
                            f"download it again from {entry.url()}") from None
        remove_if_present(_sidecar(folder, entry))  # before the new file is in place
    atomic_write_json(_sidecar(folder, entry), {
        "net": entry.net, "path": entry.path, "skimcaffe_commit": SKIMCAFFE_COMMIT,
        "blob_id": entry.blob_id, "sha256": digest.hexdigest(), "size": dest.stat().st_size,
        "source": source,
    }, indent=2, sort_keys=True)
    return dest


def _sidecar(folder: Path, entry: PrunedWeights) -> Path:
    return folder / f"{entry.file_name}{SIDECAR_SUFFIX}"


def _read_sidecar(entry: PrunedWeights, folder: Path) -> Optional[dict]:
    """The record of a verified decompression of exactly this blob, or None."""
    try:
        record = json.loads(_sidecar(folder, entry).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("blob_id") != entry.blob_id \
            or not isinstance(record.get("sha256"), str):
        return None
    return record


def _verified(entry: PrunedWeights, folder: Path) -> Optional[Path]:
    record = _read_sidecar(entry, folder)
    dest = folder / entry.file_name
    if record is None or not dest.is_file():
        return None
    if file_sha256(dest) != record["sha256"]:
        dest.unlink()  # damaged since it was verified: never used, made again
        return None
    return dest




def _is_bzip2(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == b"BZh" or path.name.endswith(".bz2")


__all__ = ["SKIMCAFFE", "SKIMCAFFE_COMMIT", "RAW_BASE_URL", "PrunedWeights", "weights_entry",
           "weights_dir", "git_blob_id", "cached", "copy_cached", "fetch", "place"]
