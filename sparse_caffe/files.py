"""Small file helpers shared by the stages that write files: hashing, one writer at a time, and the
one way a file is written so that no reader ever sees half of it (atomic_path).

Python-3.6-clean: the Docker image ships it with sparse_caffe.inside.measure.
"""
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager


def file_sha256(path):
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(str(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def folder_lock(folder):
    """Serialise writers between processes sharing a cache folder (a lock on the folder itself)."""
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Write `path` all at once: the block writes the temporary name this yields (hidden, beside
    `path`, so on the same file system); when the block ends normally it is renamed onto `path`,
    when it raises it is removed and `path` is left as it was. Yields a str for a str path, else a
    pathlib.Path."""
    folder, name = os.path.split(str(path))
    tmp = os.path.join(folder, ".{}.{}.partial".format(name, os.getpid()))
    try:
        yield tmp if isinstance(path, str) else type(path)(tmp)
        os.replace(tmp, str(path))
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def remove_if_present(path):
    """Remove a file if it is there (Path.unlink(missing_ok=True), which Python 3.6 lacks)."""
    try:
        os.unlink(str(path))
    except FileNotFoundError:
        pass


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(str(tmp), "w") as f:
            f.write(text)


def atomic_write_json(path, data, **dump_options):
    atomic_write_text(path, json.dumps(data, **dump_options) + "\n")
