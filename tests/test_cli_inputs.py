"""Bad inputs a new user hits, each through the real command (./inv): one line that says what is
wrong and what to do, a non-zero exit, and nothing left behind. None of these needs a build."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_caffe.patching import cache
from sparse_caffe.patching.config import PROJECT_ROOT

INV = str(PROJECT_ROOT / "inv")


def inv(*args, cwd: Path = PROJECT_ROOT, user: str | None = None, **env_vars):
    """./inv as a user runs it, from `cwd`; `user="nobody"` runs it without root's rights."""
    env = {k: v for k, v in os.environ.items() if k != "SPARSE_CAFFE_CALLER_CWD"}
    env.update(SPARSE_CAFFE_VENV=sys.prefix, **env_vars)
    env.setdefault("SPARSE_CAFFE_CACHE", str(Path(cwd) / "unused-cache"))
    command = [INV, *args]
    if user == "nobody" and os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_error_line(result, *fragments):
    assert result.returncode != 0, result.stdout + result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def shared_tmp(tmp_path):
    """A temporary folder that user nobody can enter too (pytest's are root's alone)."""
    for folder in (tmp_path, *tmp_path.parents):
        if str(folder).startswith("/tmp/") and folder != Path("/tmp"):
            folder.chmod(0o755)
    return tmp_path


# ----------------------------------------------------------------------------- clean

def make_build(builds: Path, name: str, clone: str | None, marker: bool = True) -> Path:
    folder = builds / name
    (folder / "build").mkdir(parents=True)
    (folder / "build" / "object.o").write_text("x")
    if clone is not None and marker:
        (folder / cache.BUILD_MARKER).write_text(json.dumps({"clone": clone}))
    if clone is not None and not marker:  # finished before markers existed: complete.json says
        (folder / "complete.json").write_text(json.dumps({"key": "k", "clone": clone}))
    return folder


WEIRD = "my cache; touch PWNED $(touch PWNED2) `touch PWNED3` & * 'q' \"d\""


def test_clean_removes_only_this_clones_builds_whatever_the_path_holds(tmp_path):
    root = tmp_path / WEIRD
    cache.prepare(root)
    builds = root / "builds"
    mine = make_build(builds, "openblas-mine", str(PROJECT_ROOT))
    mine_old = make_build(builds, "openblas-mine-old", str(PROJECT_ROOT), marker=False)
    other = make_build(builds, "openblas-other", "/somewhere/else")
    unmarked = make_build(builds, "openblas-unmarked", None)
    decoy = tmp_path / "my"  # what an unquoted `rm -rf <tmp>/my cache...` would hit first
    decoy.mkdir()
    (decoy / "keep.txt").write_text("mine")
    before = set(os.listdir(PROJECT_ROOT))
    done = inv("clean", cwd=tmp_path, SPARSE_CAFFE_CACHE=str(root))
    assert done.returncode == 0, done.stderr
    assert not mine.exists() and not mine_old.exists()
    assert other.is_dir() and unmarked.is_dir() and (decoy / "keep.txt").is_file()
    assert "another clone's build" in done.stderr and "not marked" in done.stderr
    assert not list(tmp_path.glob("PWNED*")) and not list(PROJECT_ROOT.glob("PWNED*"))
    assert set(os.listdir(PROJECT_ROOT)) == before
    # --all: every build, and every cache folder sparse-caffe made; nothing it did not make
    (root / "weights" / "w.caffemodel").write_text("w")
    shutil.rmtree(root / "source")
    (root / "source").mkdir()  # the user's own folder of that name: no marker
    (root / "notes.txt").write_text("the user's")
    done = inv("clean", "--all", cwd=tmp_path, SPARSE_CAFFE_CACHE=str(root))
    assert done.returncode == 0, done.stderr
    assert tree(root) == {"source", "notes.txt"}
    assert (decoy / "keep.txt").is_file()


def test_clean_never_follows_a_link(tmp_path):
    root = tmp_path / "cache"
    cache.prepare(root)
    precious = tmp_path / "precious"
    make_build(precious, "openblas-x", str(PROJECT_ROOT))
    (root / "builds" / "openblas-link").symlink_to(precious / "openblas-x")
    done = inv("clean", "--all", cwd=tmp_path, SPARSE_CAFFE_CACHE=str(root))
    assert done.returncode == 0, done.stderr
    assert (precious / "openblas-x" / "build" / "object.o").is_file()


def test_relative_cache_path_is_taken_from_the_callers_folder(tmp_path):
    root = tmp_path / "rel cache"
    cache.prepare(root)
    mine = make_build(root / "builds", "openblas-mine", str(PROJECT_ROOT))
    done = inv("clean", cwd=tmp_path, SPARSE_CAFFE_CACHE="rel cache")
    assert done.returncode == 0, done.stderr
    assert not mine.exists() and not (PROJECT_ROOT / "rel cache").exists()


# ----------------------------------------------------------------------------- option values

@pytest.mark.parametrize("args, message", [
    (["bench", "--net", "caffenet", "--batch", "abc"], "--batch abc: expected a whole number"),
    (["bench", "--net", "caffenet", "--threads=x2"], "--threads x2: expected a whole number"),
    (["bench-layer", "--weight-zeros", "lots"], "--weight-zeros lots: expected a number"),
    (["bench", "--net", "caffenet", "--paths", "dense,spmdm,spmdm"], "names spmdm more than once"),
    (["bench", "--net", "caffenet", "--paths", "spmdm,dense"], "names dense more than once"),
    (["bench", "--net", "caffenet", "--threads", "1000"], "--threads 1000 on"),
    (["bench", "--net", "caffenet", "--threads", "-1"], "--threads must be at least 1"),
    (["bench", "--net", "caffenet", "--warmup", "-1"], "--warmup cannot be negative"),
    (["bench-layer", "--threads", "-1"], "--threads must be at least 1"),
    (["bench-layer", "--threads", "1000"], "--threads 1000 on"),
    (["bench-layer", "--weight-zeros", "1.5"], "--weight-zeros is a fraction of zeros"),
    (["bench-layer", "--input-zeros", "-0.1"], "--input-zeros is a fraction of zeros"),
    (["bench-layer", "--shape", "vgg"], "unknown --shape 'vgg'"),
    (["inspect", "--net", "caffenet", "--batch", "0"], "--batch must be at least 1"),
])
def test_bad_option_values(tmp_path, args, message):
    results = tmp_path / "results"
    done = inv(*args, cwd=tmp_path, SPARSE_CAFFE_RESULTS=str(results))
    assert_one_error_line(done, message)
    assert not results.exists() or not any(results.iterdir())
    assert not (tmp_path / "unused-cache" / "builds").exists()  # refused before building


def test_test_k_reaches_pytest_whole(tmp_path):
    done = inv("test", "--unit", "-k", "test_csr_reference or test_templating")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "file or directory not found" not in done.stdout + done.stderr
    assert " passed" in done.stdout and "deselected" in done.stdout


# ----------------------------------------------------------------------------- folders

@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_results_folder_that_cannot_be_made(tmp_path, case):
    (tmp_path / "afile").write_text("x")
    results = tmp_path / "afile" if case == "a file" else tmp_path / "afile" / "results"
    done = inv("bench", "--net", "caffenet", cwd=tmp_path, SPARSE_CAFFE_RESULTS=str(results))
    assert_one_error_line(done, str(results), "SPARSE_CAFFE_RESULTS")
    assert (tmp_path / "afile").read_text() == "x"


def test_results_folder_read_only(shared_tmp):
    results = shared_tmp / "results"
    results.mkdir()
    results.chmod(0o555)
    done = inv("bench-layer", cwd=shared_tmp, user="nobody", SPARSE_CAFFE_RESULTS=str(results),
               SPARSE_CAFFE_CACHE=str(shared_tmp / "cache"), HOME=str(shared_tmp))
    assert_one_error_line(done, "the results folder (SPARSE_CAFFE_RESULTS)", str(results))
    assert list(results.iterdir()) == []


@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_cache_folder_that_cannot_be_made(tmp_path, case):
    (tmp_path / "afile").write_text("x")
    root = tmp_path / "afile" if case == "a file" else tmp_path / "afile" / "cache"
    done = inv("fetch", cwd=tmp_path, SPARSE_CAFFE_CACHE=str(root))
    assert_one_error_line(done, str(root), "SPARSE_CAFFE_CACHE")


def test_cache_folder_read_only(shared_tmp):
    root = shared_tmp / "cache"
    root.mkdir()
    root.chmod(0o555)
    done = inv("fetch", cwd=shared_tmp, user="nobody", SPARSE_CAFFE_CACHE=str(root),
               HOME=str(shared_tmp))
    assert_one_error_line(done, "cannot write into the cache folder", str(root))
    assert list(root.iterdir()) == []


def test_inspect_json_where_it_cannot_be_written(shared_tmp):
    (shared_tmp / "afile").write_text("x")
    done = inv("inspect", "--net", "caffenet", "--json", "afile/out.json", cwd=shared_tmp)
    assert_one_error_line(done, str(shared_tmp / "afile"), "--json")
    ro = shared_tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    done = inv("inspect", "--net", "caffenet", "--json", "ro/out.json", cwd=shared_tmp,
               user="nobody", HOME=str(shared_tmp), SPARSE_CAFFE_CACHE=str(shared_tmp / "c"))
    assert_one_error_line(done, "cannot write into the folder for --json", str(ro))


# ----------------------------------------------------------------------------- relative paths

def test_relative_paths_are_taken_from_the_callers_folder(tmp_path):
    done = inv("bench", "--net", "caffenet", "--images", "pics", cwd=tmp_path)
    assert_one_error_line(done, f"--images {tmp_path / 'pics'}: no such folder")
    (tmp_path / "myres").write_text("a file")
    done = inv("bench", "--net", "caffenet", cwd=tmp_path, SPARSE_CAFFE_RESULTS="myres")
    assert_one_error_line(done, str(tmp_path / "myres"), "is a file")
    done = inv("fetch-weights", "--net", "resnet50", "--weights", "nope.bz2", cwd=tmp_path)
    assert_one_error_line(done, str(tmp_path / "nope.bz2"))
    (tmp_path / "afile").write_text("x")
    done = inv("inspect", "--net", "caffenet", "--json", "afile/x.json", cwd=tmp_path)
    assert_one_error_line(done, str(tmp_path / "afile"))


# ----------------------------------------------------------------------------- report

# The newest committed reference run of CaffeNet.
COMMITTED_RUN = sorted((PROJECT_ROOT / "results").glob("caffenet-synthetic-*/results.json"))[-1].parent


@pytest.mark.parametrize("content, message", [
    (b"", "is not valid JSON"),
    (COMMITTED_RUN.joinpath("results.json").read_bytes()[:5000], "is not valid JSON"),
    (b'{"schema": "sparse-caffe-bench/2", "caf\xe9": 1}', "is not UTF-8 text"),
    (b'[1, 2]', "is not a sparse-caffe-bench/2 results file"),
    (b'{"schema": "sparse-caffe-bench/2"}', "lacks params"),
])
def test_report_on_a_damaged_results_file(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_bytes(content)
    for task in (["report", "run"], ["compare", "run", "run"]):
        done = inv(*task, cwd=tmp_path)
        assert_one_error_line(done, message)
        assert tree(run) == {"results.json"}


def test_report_into_a_read_only_run_folder(shared_tmp):
    run = shared_tmp / "run"
    run.mkdir()
    shutil.copy(COMMITTED_RUN / "results.json", run / "results.json")
    run.chmod(0o555)
    done = inv("report", str(run), cwd=shared_tmp, user="nobody", HOME=str(shared_tmp),
               MPLCONFIGDIR=str(shared_tmp))
    assert_one_error_line(done, "cannot write the plots into", str(run))
    assert tree(run) == {"results.json"}
