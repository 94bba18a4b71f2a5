"""The one measurement child: `python -m sparse_caffe.inside.child RUN_DIR [--image-info FILE]`.

Every measurement (./inv bench, ./inv bench-layer, ./inv bench --docker) runs this, started by an
executor of sparse_caffe.host.measurement: a local pycaffe subprocess, or a container of the
Docker image, where RUN_DIR is the mounted run folder. It reads RUN_DIR/spec.json (a RunSpec),
does what its kind says, and ends the one way every child ends (protocol.end_child): the
RawResult in RUN_DIR/raw.json and exit 0, or an error record in RUN_DIR/error.json and exit 2.

The kinds and their runners (each `run(spec, folder, caffe)`, returning a RawResult):
  net       sparse_caffe.inside.bench_runner: prepare the net (weights, images, the net as
            built), then measure it; natively and in the container alike
  layer     sparse_caffe.inside.layer_bench: one synthetic layer on every path
Runners are imported by name when their kind is asked for: the Docker image ships the net
runner and what it imports (Python 3.6); the others need the host's Python and packages.

Python-3.6-clean: it runs in the image.
"""
import argparse
import importlib
import json
import sys

from ..errors import UserError
from . import protocol

RUNNERS = {"net": "sparse_caffe.inside.bench_runner", "layer": "sparse_caffe.inside.layer_bench"}


def run(folder, image_info=None):
    """Do what RUN_DIR/spec.json asks; returns its RawResult."""
    spec = protocol.RunSpec.read("{}/{}".format(folder, protocol.SPEC_FILE))
    try:
        runner = importlib.import_module(RUNNERS[spec.kind])
    except ImportError as exc:
        raise UserError("a {!r} run needs {} ({}), which is not here".format(
            spec.kind, RUNNERS[spec.kind], exc))
    import caffe
    caffe.set_mode_cpu()
    result = runner.run(spec, folder, caffe)
    if image_info:  # in the image: its software, which results.json reports in place of a build's
        from .measure import environment
        with open(image_info) as f:
            result = result.replace(environment=dict(environment(), image=json.load(f)))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run folder holding spec.json (a RunSpec)")
    parser.add_argument("--image-info", help="the Docker image's own record (JSON), added to the "
                                             "raw result's environment")
    args = parser.parse_args(argv)
    return protocol.end_child(args.folder, lambda: run(args.folder, args.image_info))


if __name__ == "__main__":
    sys.exit(main())
