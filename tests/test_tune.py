"""The tune plan's key, its comparison and reading, and tune's bad inputs through ./inv (none of
this needs a build; caffe_tests/test_tune.py runs tune itself)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sparse_caffe.host import tune
from sparse_caffe.errors import UserError
from tests.test_cli_inputs import assert_one_error_line, inv

LAYERS = {"conv1": {"type": "Convolution", "bottom": [[1, 3, 8, 8]], "top": [[1, 4, 6, 6]]},
          "fc": {"type": "InnerProduct", "bottom": [[1, 144]], "top": [[1, 10]]}}


def key(**changes) -> dict:
    base = {"net": "caffenet", "transform": "fold", "cpu": "AMD EPYC", "simd_flags": ["avx2"],
            "direct_isa": "avx2", "blas": "openblas", "mkl": None, "blas_runtime": {"name": "x"},
            "caffe_source": "s", "patch_series_sha256": "p", "compiler": "g++ 12",
            "weights_sha256": "w", "threads": 2, "batch": 1, "layers": json.loads(json.dumps(LAYERS))}
    return {**base, **changes}


def test_the_key_order_covers_every_key_once():
    assert sorted(tune.KEY_ORDER) == sorted(key())
    assert len(set(tune.KEY_ORDER)) == len(tune.KEY_ORDER)


def test_a_matching_key_has_no_mismatch():
    assert tune.first_mismatch(key(), key()) is None


@pytest.mark.parametrize("change, named", [
    ({"cpu": "Intel Xeon"}, "cpu"),
    ({"simd_flags": ["avx2", "avx512f"]}, "simd_flags"),
    ({"patch_series_sha256": "q"}, "patch_series_sha256"),
    ({"weights_sha256": "v"}, "weights_sha256"),
    ({"threads": 1}, "threads"),
    ({"batch": 8}, "batch"),
])
def test_the_mismatch_is_named(change, named):
    assert tune.first_mismatch(key(), key(**change))[0] == named


def test_the_first_mismatch_in_key_order_is_named():
    # Another machine with other weights and threads: the machine comes first.
    assert tune.first_mismatch(key(), key(cpu="Intel", weights_sha256="v", threads=1)) == \
        ("cpu", "AMD EPYC", "Intel")


def test_a_layer_mismatch_names_the_layer():
    layers = json.loads(json.dumps(LAYERS))
    layers["fc"]["top"] = [[1, 11]]
    assert tune.first_mismatch(key(), key(layers=layers))[0] == "layer fc"
    del layers["conv1"]
    assert tune.first_mismatch(key(), key(layers=layers))[0] == "layer fc"
    assert tune.first_mismatch(key(layers=layers), key())[0] == "layer conv1"


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("content, message", [
    ("not json", "is not a tune plan (not JSON)"),
    ({"some": "dict"}, "is not a tune plan"),
    ({"kind": tune.KIND, "schema": 0, "key": {}}, "is a plan of schema 0"),
])
def test_a_file_that_is_not_a_current_plan_is_refused(tmp_path, content, message):
    with pytest.raises(UserError, match=re.escape(message)):
        tune.load_plan(write(tmp_path / "plan.json", content))


def test_a_missing_plan_is_refused(tmp_path):
    with pytest.raises(UserError, match="no such plan file"):
        tune.load_plan(tmp_path / "none.json")


def test_check_takes_what_is_not_given_from_the_plan():
    plan = {"key": key(threads=3, batch=4), "params": {"weights": "synthetic"}}
    options = tune.options_from(None, None, None, None, 20, 3, plan=plan)
    assert (options.net, options.weights, options.threads, options.batch) == \
        ("caffenet", "synthetic", 3, 4)
    options = tune.options_from("resnet50", None, "1", None, 20, 3, plan=plan)
    assert (options.net, options.threads, options.batch) == ("resnet50", 1, 4)


def test_tune_defaults():
    options = tune.options_from("resnet50", None, None, None, 20, 3)
    assert (options.weights, options.threads, options.batch) == ("auto", 0, 1)
    assert tune.default_plan(options, 2).name == "resnet50-auto-2t-b1.json"


def test_the_retune_command_repeats_the_options(tmp_path):
    options = tune.TuneOptions(net="caffenet", weights="synthetic", threads=1, batch=2)
    assert tune.retune_command(options, tmp_path / "p.json") == \
        f"./inv tune --net caffenet --weights synthetic --threads 1 --batch 2 --out {tmp_path}/p.json --retune"


# ----------------------------------------------------------------------------- through ./inv

def test_tune_without_a_net_is_refused(tmp_path):
    assert_one_error_line(inv("tune", cwd=tmp_path), "--net is required")


def test_tune_with_a_bad_batch_is_refused(tmp_path):
    assert_one_error_line(inv("tune", "--net", "caffenet", "--batch", "abc", cwd=tmp_path),
                          "--batch abc", "whole number")


def test_tune_with_a_path_override_in_the_environment_is_refused(tmp_path):
    done = inv("tune", "--net", "caffenet", cwd=tmp_path, SPARSE_CAFFE_FORWARD_PATH="direct")
    assert_one_error_line(done, "SPARSE_CAFFE_FORWARD_PATH is set", "unset")


def test_check_of_a_missing_plan_is_refused(tmp_path):
    assert_one_error_line(inv("tune", "--check", "none.json", cwd=tmp_path), "none.json",
                          "no such plan file")
    assert list(tmp_path.iterdir()) == []
