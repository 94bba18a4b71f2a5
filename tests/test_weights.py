"""Weights fetch/place against a real HTTP server on 127.0.0.1 serving synthetic .caffemodel.bz2 files.

Every file here is a synthetic test file (random bytes standing in for a .caffemodel); no network
access leaves 127.0.0.1.
"""
from __future__ import annotations

import bz2
import hashlib
import http.server
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from sparse_caffe.models import weights
from sparse_caffe.errors import UserError
from sparse_caffe.models.weights import PrunedWeights, fetch, git_blob_id, place

PAYLOAD = {  # synthetic stand-ins for decompressed .caffemodel files
    "caffenet": os.urandom(6000),
    "resnet50": os.urandom(9000),
    "resnet50-dense": os.urandom(7000),
}
COMPRESSED = {net: bz2.compress(data) for net, data in PAYLOAD.items()}


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Server:
    """http.server in a thread: path -> (bytes, how to send them); counts requests per path."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.short: dict[str, int] = {}  # path -> bytes actually sent (Content-Length says all)
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:server.short.get(self.path, len(data))])
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/skim"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, entry: PrunedWeights, data: bytes) -> None:
        self.files[f"/skim/{entry.path}"] = data

    def hits_for(self, entry: PrunedWeights) -> int:
        return self.hits.get(f"/skim/{entry.path}", 0)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Requests must go straight to 127.0.0.1, whatever proxy this machine configures."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def table(monkeypatch) -> dict[str, PrunedWeights]:
    """SKIMCAFFE replaced by entries for the synthetic files (same names, pruned flags and paths)."""
    synthetic = {net: PrunedWeights(net=net, description=f"synthetic test file for {net}",
                                    path=f"test/{net}/synthetic.caffemodel.bz2",
                                    blob_id=blob_id(COMPRESSED[net]), top1=None,
                                    pruned=weights.SKIMCAFFE[net].pruned)
                 for net in PAYLOAD}
    monkeypatch.setattr(weights, "SKIMCAFFE", synthetic)
    return synthetic


@pytest.fixture
def server(table):
    srv = Server()
    for net, entry in table.items():
        srv.serve(entry, COMPRESSED[net])
    yield srv
    srv.stop()


def cache_files(cache: Path) -> list[str]:
    folder = cache / "weights"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the real table -------------------------------------------------------------------------------

def test_real_table_is_pinned_to_the_skimcaffe_commit():
    assert weights.SKIMCAFFE_COMMIT == "2f66b5a95329a478db3097849f2a6a74d74bb5eb"
    assert set(weights.SKIMCAFFE) == {"caffenet", "resnet50", "resnet50-dense"}
    for net, entry in weights.SKIMCAFFE.items():
        assert entry.net == net
        assert entry.url().startswith(
            "https://raw.githubusercontent.com/IntelLabs/SkimCaffe/"
            "2f66b5a95329a478db3097849f2a6a74d74bb5eb/models/")
    assert weights.SKIMCAFFE["caffenet"].blob_id == "356a55edc66ae82250bfba1e5c643d1ecdec9805"
    assert weights.SKIMCAFFE["resnet50"].blob_id == "fbc6d5ee2930adeeba29d7221b36ed706ed78dfd"
    assert weights.SKIMCAFFE["resnet50-dense"].blob_id == "1398d8953ef9182cbce9bdc00b8e36f5de48aee9"
    assert (weights.SKIMCAFFE["caffenet"].top1, weights.SKIMCAFFE["resnet50"].top1) == (0.5748, 0.7284)
    assert [e.pruned for e in weights.SKIMCAFFE.values()] == [True, True, False]


def test_entry_rejects_a_malformed_blob_id():
    with pytest.raises(ValueError, match="40 lower-case hex"):
        PrunedWeights("x", "x", "a.caffemodel.bz2", "abc", None, True)


# --- git_blob_id -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 5, 2 * weights.CHUNK + 123])
def test_git_blob_id_equals_git_hash_object(tmp_path, size):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(size))
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert git_blob_id(path) == expected


# --- fetch -----------------------------------------------------------------------------------------

def test_fetch_verifies_decompresses_and_is_idempotent(tmp_path, server, table):
    cache = tmp_path / "cache"
    seen = []
    path = fetch("caffenet", cache, base_url=server.base_url,
                 progress=lambda done, total: seen.append((done, total)))
    assert path == cache / "weights" / "caffenet.caffemodel"
    assert path.read_bytes() == PAYLOAD["caffenet"]
    assert seen and seen[-1] == (len(COMPRESSED["caffenet"]),) * 2
    assert cache_files(cache) == ["caffenet.caffemodel", "caffenet.caffemodel.json"]
    assert server.hits_for(table["caffenet"]) == 1
    assert fetch("caffenet", cache, base_url=server.base_url) == path
    assert server.hits_for(table["caffenet"]) == 1  # second call: no request
    assert weights.cached("caffenet", cache) == path


def test_fetch_replaces_a_damaged_cached_file(tmp_path, server, table):
    cache = tmp_path / "cache"
    path = fetch("resnet50", cache, base_url=server.base_url)
    path.write_bytes(b"damaged")
    assert weights.cached("resnet50", cache) is None
    assert fetch("resnet50", cache, base_url=server.base_url).read_bytes() == PAYLOAD["resnet50"]
    assert server.hits_for(table["resnet50"]) == 2


def test_wrong_blob_id_is_refused_and_nothing_is_kept(tmp_path, server, table):
    server.serve(table["caffenet"], COMPRESSED["resnet50"])  # a valid bz2, but not the pinned file
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as err:
        fetch("caffenet", cache, base_url=server.base_url)
    message = str(err.value)
    assert blob_id(COMPRESSED["resnet50"]) in message and table["caffenet"].blob_id in message
    assert "removed" in message and "\n" not in message
    assert cache_files(cache) == []


def test_short_download_is_refused_and_nothing_is_kept(tmp_path, server, table):
    server.short[f"/skim/{table['caffenet'].path}"] = 1000
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"cut short \(1000 of \d+ bytes\)"):
        fetch("caffenet", cache, base_url=server.base_url)
    assert cache_files(cache) == []


def test_corrupt_bz2_with_matching_blob_id_is_refused_and_nothing_is_kept(tmp_path, server,
                                                                           monkeypatch):
    truncated = COMPRESSED["caffenet"][:-200]  # the blob id matches, the bz2 stream is incomplete
    corrupt = PrunedWeights("caffenet", "synthetic truncated bz2", "test/bad.caffemodel.bz2",
                            blob_id(truncated), None, True)
    monkeypatch.setitem(weights.SKIMCAFFE, "caffenet", corrupt)
    server.serve(corrupt, truncated)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="not a complete bzip2 file"):
        fetch("caffenet", cache, base_url=server.base_url)
    assert cache_files(cache) == []


def test_http_404_names_the_url_and_status(tmp_path, server, table):
    del server.files[f"/skim/{table['caffenet'].path}"]
    with pytest.raises(UserError) as err:
        fetch("caffenet", tmp_path / "cache", base_url=server.base_url)
    assert "HTTP 404" in str(err.value)
    assert table["caffenet"].url(server.base_url) in str(err.value)
    assert cache_files(tmp_path / "cache") == []


def test_connection_refused_says_how_to_work_offline(tmp_path, table):
    base = f"http://127.0.0.1:{free_port()}/skim"
    with pytest.raises(UserError) as err:
        fetch("caffenet", tmp_path / "cache", base_url=base)
    message = str(err.value)
    assert "the SkimCaffe weights need the internet" in message
    assert f"download {table['caffenet'].url(base)} on a machine with internet" in message
    assert "--weights PATH" in message and "offline synthetic default model" in message
    assert cache_files(tmp_path / "cache") == []


def test_a_server_that_never_answers_times_out_with_the_offline_message(tmp_path, table):
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        base = f"http://127.0.0.1:{silent.getsockname()[1]}/skim"
        with pytest.raises(UserError, match="timed out.*need the internet"):
            fetch("caffenet", tmp_path / "cache", base_url=base, timeout=0.5)
    assert cache_files(tmp_path / "cache") == []


def test_dense_model_is_refused_unless_allowed(tmp_path, server, table):
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="no zeros.*starting point, not the pruned model"):
        fetch("resnet50-dense", cache, base_url=server.base_url)
    assert server.hits_for(table["resnet50-dense"]) == 0
    path = fetch("resnet50-dense", cache, base_url=server.base_url, allow_dense=True)
    assert path.read_bytes() == PAYLOAD["resnet50-dense"]


def test_unknown_net_lists_the_choices(tmp_path):
    for call in (lambda: fetch("vgg16", tmp_path), lambda: place("vgg16", tmp_path / "x", tmp_path)):
        with pytest.raises(UserError, match="unknown net 'vgg16'.*caffenet, resnet50, resnet50-dense"):
            call()


# --- place (offline) -------------------------------------------------------------------------------

def test_place_installs_the_downloaded_bz2_offline(tmp_path, table):
    given = tmp_path / "caffenet_train_iter_640000.caffemodel.bz2"
    given.write_bytes(COMPRESSED["caffenet"])
    cache = tmp_path / "cache"
    path = place("caffenet", given, cache)
    assert path.read_bytes() == PAYLOAD["caffenet"]
    assert given.read_bytes() == COMPRESSED["caffenet"]  # the user's file is left alone
    assert weights.cached("caffenet", cache) == path
    assert cache_files(cache) == ["caffenet.caffemodel", "caffenet.caffemodel.json"]


def test_place_refuses_a_wrong_bz2_and_keeps_nothing(tmp_path, table):
    given = tmp_path / "weights.caffemodel.bz2"
    given.write_bytes(bz2.compress(os.urandom(3000)))
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="does not match the pinned"):
        place("caffenet", given, cache)
    assert cache_files(cache) == []
    assert given.exists()


def test_place_names_the_file_when_it_is_another_net(tmp_path, table):
    given = tmp_path / "ResNet-50-model.caffemodel.bz2"
    given.write_bytes(COMPRESSED["resnet50-dense"])
    with pytest.raises(UserError, match="it is the resnet50-dense file, not resnet50"):
        place("resnet50", given, tmp_path / "cache")


def test_place_refuses_the_dense_model_unless_allowed(tmp_path, table):
    given = tmp_path / "ResNet-50-model.caffemodel.bz2"
    given.write_bytes(COMPRESSED["resnet50-dense"])
    with pytest.raises(UserError, match="no zeros"):
        place("resnet50-dense", given, tmp_path / "cache")
    assert place("resnet50-dense", given, tmp_path / "cache", allow_dense=True).read_bytes() == \
        PAYLOAD["resnet50-dense"]


def test_place_plain_caffemodel_needs_a_verified_record(tmp_path, table):
    plain = tmp_path / "caffenet.caffemodel"
    plain.write_bytes(PAYLOAD["caffenet"])
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="cannot be checked.*give the .caffemodel.bz2 as downloaded"):
        place("caffenet", plain, cache)
    assert cache_files(cache) == []

    given = tmp_path / "caffenet.caffemodel.bz2"
    given.write_bytes(COMPRESSED["caffenet"])
    installed = place("caffenet", given, cache)
    installed.unlink()  # the record stays; the identical plain file is now accepted
    assert place("caffenet", plain, cache).read_bytes() == PAYLOAD["caffenet"]

    other = tmp_path / "other.caffemodel"
    other.write_bytes(os.urandom(6000))
    with pytest.raises(UserError, match="SHA-256 differs"):
        place("caffenet", other, cache)
    assert cache_files(cache) == ["caffenet.caffemodel", "caffenet.caffemodel.json"]


def test_place_missing_file(tmp_path, table):
    with pytest.raises(UserError, match="no such file"):
        place("caffenet", tmp_path / "nope.caffemodel.bz2", tmp_path / "cache")
