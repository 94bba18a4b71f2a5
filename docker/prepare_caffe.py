"""Inside the image build: unpack the pinned Caffe, verify it, apply our series; Python 3.6.

The same checks as the native build, re-stated for Ubuntu 18.04's Python 3.6 (the package's own
modules need a newer Python):
  - the tree hash is sparse_caffe.patching.source.tree_sha256: every file's relative path, kind
    (f/x/l) and content; a single top-level folder (GitHub's tarball has one) is looked through;
  - the series is applied as sparse_caffe.patching.render.apply_series does: in the order of
    patches/series, `patch -p1 --batch --forward --fuzz=0`, the first failure stops the build;
  - the series hash is sparse_caffe.patching.render.series_sha256.
tests/test_docker.py checks on the host that both hashes equal the package's. The record written
to --info (JSON) is what the image says about itself; `./inv bench --docker` puts it in
results.json. Any failure: one `error:` line on stderr, exit 1.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile


class Failure(Exception):
    pass


def content_root(root):
    entries = [e for e in os.listdir(root) if e != ".git"]
    if len(entries) == 1:
        only = os.path.join(root, entries[0])
        if os.path.isdir(only) and not os.path.islink(only):
            return only
    return root


def _walk(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git" or dirpath != root]
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                yield os.path.join(dirpath, name)
        for name in filenames:
            yield os.path.join(dirpath, name)


def tree_sha256(root):
    """Hash of a tree's contents, as sparse_caffe.patching.source.tree_sha256."""
    root = content_root(root)
    entries = []
    for path in _walk(root):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        entries.append((rel, path))
    digest = hashlib.sha256()
    for rel, path in sorted(entries):
        if os.path.islink(path):
            kind, data = "l", os.readlink(path).encode()
        else:
            kind = "x" if os.stat(path).st_mode & 0o111 else "f"
            with open(path, "rb") as f:
                data = f.read()
        digest.update("{} {} {}\n".format(kind, hashlib.sha256(data).hexdigest(), rel).encode())
    return digest.hexdigest()


def series_files(patches_dir):
    series = os.path.join(patches_dir, "series")
    if not os.path.isfile(series):
        raise Failure("{} is missing: the build context lacks patches/series".format(series))
    with open(series) as f:
        names = [line.strip() for line in f.read().splitlines() if line.strip()]
    return [os.path.join(patches_dir, name) for name in names]


def series_sha256(patches_dir):
    """Hash of the series as applied, as sparse_caffe.patching.render.series_sha256."""
    digest = hashlib.sha256()
    for patch in series_files(patches_dir):
        digest.update("{}\n".format(os.path.basename(patch)).encode())
        with open(patch, "rb") as f:
            digest.update(hashlib.sha256(f.read()).hexdigest().encode())
    return digest.hexdigest()


def apply_series(tree, patches_dir):
    for patch in series_files(patches_dir):
        result = subprocess.run(["patch", "-p1", "--batch", "--forward", "--fuzz=0", "-i", patch],
                                cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True)
        print(result.stdout, end="", flush=True)
        if result.returncode != 0:
            last = (result.stdout.strip().splitlines() or ["patch failed"])[-1]
            raise Failure("{} does not apply to Caffe: {}".format(os.path.basename(patch), last))


def unpack(tarball, dest):
    """Unpack into dest (which must not exist), looking through a single top-level folder."""
    parent = os.path.dirname(os.path.abspath(dest))
    staging = tempfile.mkdtemp(prefix=".unpack-", dir=parent)
    try:
        with tarfile.open(tarball) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if member.name.startswith("/") or ".." in parts or member.isdev():
                    raise Failure("{}: refusing unsafe member {!r}".format(tarball, member.name))
            tar.extractall(staging)
        os.rename(content_root(staging), dest)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise Failure("cannot unpack {}: {}".format(tarball, exc))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare(args):
    unpack(args.tarball, args.dest)
    actual = tree_sha256(args.dest)
    if actual != args.tree_sha256:
        raise Failure("the Caffe tarball does not match the pinned commit {}: tree hash {}..., "
                      "expected {}...".format(args.commit[:12], actual[:16], args.tree_sha256[:16]))
    print("Caffe {} verified: tree sha256 {}".format(args.commit[:12], actual), flush=True)
    apply_series(args.dest, args.patches)
    record = {"caffe_commit": args.commit, "caffe_tree_sha256": actual,
              "patch_series_sha256": series_sha256(args.patches),
              "patches": [os.path.basename(p) for p in series_files(args.patches)],
              "blas": args.blas, "base_image": args.base_image,
              "openblas": ("Ubuntu's openblas {} source rebuilt with USE_OPENMP=1 (the archive's "
                           "binaries thread with pthreads)".format(args.openblas_source)
                           if args.blas == "openblas" and args.openblas_source else None)}
    with open(args.info, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    print("patch series {} applied".format(record["patch_series_sha256"][:12]), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", required=True, help="GitHub's tarball of the commit")
    parser.add_argument("--dest", required=True, help="where the patched tree goes (must not exist)")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--tree-sha256", required=True, help="CaffePin.tree_sha256")
    parser.add_argument("--patches", required=True, help="the folder holding series and patches")
    parser.add_argument("--info", required=True, help="where to write the image's record (JSON)")
    parser.add_argument("--blas", default="openblas")
    parser.add_argument("--base-image", default="")
    parser.add_argument("--openblas-source", default="",
                        help="the Ubuntu openblas source version the image rebuilt with OpenMP")
    args = parser.parse_args(argv)
    try:
        prepare(args)
    except Failure as exc:
        print("error: {}".format(exc), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
