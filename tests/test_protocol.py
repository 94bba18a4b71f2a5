"""The records that cross the measurement's process boundary (sparse_caffe.inside.protocol):
round trips, one clear line for a bad or missing key, and the one way a child ends."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparse_caffe.errors import UserError
from sparse_caffe.host import measurement
from sparse_caffe.inside import protocol
from sparse_caffe.inside.protocol import (ErrorRecord, RawResult, RecordError, RunSpec,
                                          WeightsRecord)
from sparse_caffe.patching.config import PROJECT_ROOT

WEIGHTS = WeightsRecord(kind="synthetic", synthetic=True, path="/c/w.caffemodel", sha256="a" * 64,
                        description="synthetic caffenet", seed=0,
                        target_input_zeros={"conv2": 0.3})


def test_a_run_spec_survives_json():
    spec = RunSpec(kind="net", net="caffenet", paths=["dense", "direct"], batch=2, threads=3,
                   images=4, layers="conv[35]", cache_dir="/workspace/cache")
    text = json.dumps(spec.to_json())
    again = RunSpec.from_json(json.loads(text))
    assert again == spec and again.paths == ("dense", "direct")
    assert json.loads(text)["schema"] == protocol.SCHEMA
    assert spec.replace(batch=1) != spec and spec.replace(batch=1).batch == 1


def test_a_nested_record_survives_json():
    raw = RawResult(kind="layer", blas_runtime={}, machine_probe={}, layer={"results": []},
                    weights=WEIGHTS)
    again = RawResult.from_json(json.loads(json.dumps(raw.to_json())))
    assert again == raw and again.weights.seed == 0


def test_records_are_frozen():
    spec = RunSpec(kind="net", net="caffenet")
    with pytest.raises(AttributeError):
        spec.batch = 4


def test_weights_record_keeps_results_json_shape():
    """results.json's "weights": the keys a record has, none written as null."""
    data = WEIGHTS.to_json()
    assert data == {"kind": "synthetic", "synthetic": True, "path": "/c/w.caffemodel",
                    "sha256": "a" * 64, "description": "synthetic caffenet", "seed": 0,
                    "target_input_zeros": {"conv2": 0.3}}
    assert WeightsRecord.from_json(data) == WEIGHTS


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("kind"), "the run spec has no 'kind'"),
    (lambda d: d.update(batchsize=2), "the run spec has no key 'batchsize'"),
    (lambda d: d.update(batch="2"), "the run spec: 'batch' must be int, got '2'"),
    (lambda d: d.update(batch=True), "the run spec: 'batch' must be int, got True"),
    (lambda d: d.update(batch=0), "the run spec's batch must be at least 1"),
    (lambda d: d.update(paths=["direct"]), "the run spec's paths must start with dense"),
    (lambda d: d.update(kind="train"), "the run spec's kind 'train' is none of"),
    (lambda d: d.update(kind="layer"), "a 'layer' run spec needs 'shape'"),
    (lambda d: d.update(schema=0), f"the run spec has schema 0, this code reads {protocol.SCHEMA}"),
    (lambda d: d.pop("schema"), "the run spec has schema None"),
    # What a "prepared" spec (schema 1: the host prepared the Docker route's run) had.
    (lambda d: d.update(layer_names=["conv1"]), "the run spec has no key 'layer_names'"),
])
def test_a_bad_or_missing_key_is_one_clear_line(change, message):
    data = RunSpec(kind="net", net="caffenet").to_json()
    change(data)
    with pytest.raises(RecordError) as raised:
        RunSpec.from_json(data)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert isinstance(raised.value, UserError)  # one line at the command, never a traceback


def test_a_raw_result_needs_what_its_kind_measures():
    with pytest.raises(RecordError, match="a 'net' raw result needs 'weights'"):
        RawResult(kind="net", blas_runtime={}, machine_probe={})
    with pytest.raises(RecordError, match="a 'layer' raw result needs 'layer'"):
        RawResult(kind="layer", blas_runtime={}, machine_probe={})
    raw = RawResult(kind="layer", blas_runtime={}, machine_probe={}, layer={"results": []})
    assert RawResult.from_json(json.loads(json.dumps(raw.to_json()))) == raw


def test_a_file_that_is_not_a_record_is_one_line(tmp_path):
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(RecordError, match="^cannot read the run spec from .*spec.json: "):
        RunSpec.read(tmp_path / "spec.json")
    with pytest.raises(RecordError, match="^the run spec must be a JSON object, got"):
        RunSpec.from_json([1])


def test_a_child_ends_one_way(tmp_path):
    def fails():
        raise UserError("--weights x: no such file")
    assert protocol.end_child(tmp_path, fails) == protocol.ERROR_EXIT
    assert protocol.read_error(tmp_path) == "--weights x: no such file"
    assert ErrorRecord.read(tmp_path / protocol.ERROR_FILE).message == "--weights x: no such file"
    assert not (tmp_path / protocol.RAW_FILE).exists()
    raw = RawResult(kind="layer", blas_runtime={}, machine_probe={}, layer={})
    ok = tmp_path / "ok"
    ok.mkdir()
    assert protocol.end_child(ok, lambda: raw) == 0 and protocol.read_error(ok) is None
    assert RawResult.read(ok / protocol.RAW_FILE) == raw


def test_the_child_main_reports_a_bad_spec_through_the_protocol(tmp_path):
    """The real child, started as an executor starts it, on a spec with a missing key: its error
    record and exit 2, which the host's run_child turns into that one line (no pycaffe needed:
    the spec is refused before pycaffe is imported)."""
    (tmp_path / protocol.SPEC_FILE).write_text(json.dumps({"schema": protocol.SCHEMA,
                                                           "kind": "layer"}))
    done = subprocess.run([sys.executable, "-m", "sparse_caffe.inside.child", str(tmp_path)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == protocol.ERROR_EXIT, done.stderr
    assert protocol.read_error(tmp_path) == "a 'layer' run spec needs 'shape'"

    class Native:  # runs the child as LocalExecutor does, without a build
        def prepared(self, spec, folder):
            return spec

        def on_host(self, raw):
            return raw

        def run(self, folder, module, args):
            result = subprocess.run([sys.executable, "-m", f"sparse_caffe.{module}", str(folder),
                                     *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
            return result.returncode, result.stderr
    spec = RunSpec(kind="net", net="caffenet")
    # Without pycaffe on its path the child crashes: a failure with its exit status and its
    # output's tail, never a silent success.
    with pytest.raises(UserError, match=r"(?s)^the benchmark process failed \(exit 1\):\n.*"
                                        r"No module named .caffe.$"):
        measurement.measure(spec, Native(), tmp_path / "run")
