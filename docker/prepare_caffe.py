"""Inside the image build: unpack the pinned Caffe, verify it, apply our series; Python 3.6.

The same checks as the native build, by the same code: sparse_caffe.patching.series (tree_sha256,
series_sha256, apply_series; kept Python-3.6-clean for this script) is copied into the image
beside this script. The record written to --info (JSON) is what the image says about itself;
`./inv bench --docker` puts it in results.json. Any failure: one `error:` line on stderr, exit 1.
"""
import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile

from sparse_caffe.errors import UserError
from sparse_caffe.patching.series import (apply_series, content_root, series_files, series_sha256,
                                          tree_sha256)


class Failure(Exception):
    pass


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
        os.rename(str(content_root(staging)), dest)
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
              "patches": [p.name for p in series_files(args.patches)],
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
    except (Failure, UserError) as exc:
        print("error: {}".format(exc), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
