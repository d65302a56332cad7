"""Tests of tljax.download: cache, checksum, atomic replace and every way a download fails,
against a local HTTP server (the ``server`` fixture of conftest)."""

import functools
import hashlib
import os
import socket
import struct
import threading
import time

import pytest

from tljax import download

fetch = functools.partial(download.fetch, what="weights", instead="use a local copy")


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("TLJAX_CACHE", str(tmp_path / "cache"))
  assert download.default_cache_dir() == tmp_path / "cache"
  monkeypatch.delenv("TLJAX_CACHE")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert download.default_cache_dir() == tmp_path / ".cache" / "tljax"


# ---------------------------------------------------------------------------------------------
# Download and cache, against a local server.


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_fetch_downloads_once_then_uses_the_cache(server, tmp_path):
  server.files["/w.h5"] = b"weights" * 1000
  sha = _sha256(server.files["/w.h5"])
  path = fetch(f"{server.url}/w.h5", tmp_path, sha)
  assert path == tmp_path / "w.h5"
  assert path.read_bytes() == server.files["/w.h5"]
  assert fetch(f"{server.url}/w.h5", tmp_path, sha) == path
  assert server.requests == ["/w.h5"]
  assert sorted(os.listdir(tmp_path)) == ["w.h5"]


def test_fetch_reuses_an_unverifiable_cached_file(server, tmp_path):
  (tmp_path / "w.h5").write_bytes(b"cached")
  assert fetch(f"{server.url}/w.h5", tmp_path).read_bytes() == b"cached"
  assert server.requests == []


def test_fetch_replaces_a_cached_file_with_a_wrong_sha256(server, tmp_path):
  server.files["/w.h5"] = b"good weights"
  (tmp_path / "w.h5").write_bytes(b"stale or damaged")
  path = fetch(f"{server.url}/w.h5", tmp_path, _sha256(b"good weights"))
  assert path.read_bytes() == b"good weights"
  assert server.requests == ["/w.h5"]


def test_fetch_rejects_a_download_with_a_wrong_sha256(server, tmp_path):
  server.files["/w.h5"] = b"tampered"
  with pytest.raises(download.DownloadError, match="downloaded with sha256 .* expected 0{64}; "
                     "nothing was cached"):
    fetch(f"{server.url}/w.h5", tmp_path, "0" * 64)
  assert os.listdir(tmp_path) == []


def test_fetch_leaves_nothing_behind_when_the_connection_breaks_off(server, tmp_path):
  server.files["/w.h5"] = b"x" * 100_000
  server.cut_short.add("/w.h5")
  with pytest.raises(download.DownloadError,
                     match=r"download of .*/w.h5 broke off after 50000 of 100000 bytes"):
    fetch(f"{server.url}/w.h5", tmp_path / "cache")
  assert os.listdir(tmp_path / "cache") == []


def test_fetch_leaves_nothing_behind_when_interrupted(server, tmp_path, monkeypatch):
  def interrupted(url, out, what, instead, timeout):
    out.write(b"partial")
    raise KeyboardInterrupt

  monkeypatch.setattr(download, "stream", interrupted)
  with pytest.raises(KeyboardInterrupt):
    fetch(f"{server.url}/w.h5", tmp_path)
  assert os.listdir(tmp_path) == []


def test_fetch_reports_http_errors(server, tmp_path):
  with pytest.raises(download.DownloadError, match=r"/absent.h5 answered HTTP 404 .*"
                     r"To run without it, use a local copy"):
    fetch(f"{server.url}/absent.h5", tmp_path)
  assert os.listdir(tmp_path) == []


def test_fetch_offline_fails_at_once(tmp_path):
  port = _closed_port()
  start = time.monotonic()
  with pytest.raises(download.DownloadError) as error:
    fetch(f"http://127.0.0.1:{port}/w.h5", tmp_path)
  assert time.monotonic() - start < 5
  message = str(error.value)
  assert f"the weights host 127.0.0.1:{port} could not be reached" in message
  assert "are you offline? To run without it, use a local copy." in message
  assert os.listdir(tmp_path) == []


def test_fetch_times_out_on_a_silent_host(tmp_path):
  with socket.socket() as silent:  # Accepts connections (backlog) and never answers.
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/w.h5"
    start = time.monotonic()
    with pytest.raises(download.DownloadError, match="could not be reached .*use a local copy"):
      fetch(url, tmp_path, timeout=0.5)
    assert time.monotonic() - start < 5



def test_fetch_reports_a_dropped_connection(server, tmp_path):
  server.dropped.add("/w.h5")
  with pytest.raises(download.DownloadError, match=r"the weights host 127.0.0.1:\d+ closed the "
                     r"connection before sending w.h5 \(RemoteDisconnected: .*\)\. Retry; to run "
                     r"without it, use a local copy\."):
    fetch(f"{server.url}/w.h5", tmp_path)
  assert os.listdir(tmp_path) == []


def test_fetch_reports_a_reset_connection(tmp_path):
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def reset():  # Reads the request, then closes with a TCP reset instead of an answer.
      conn, _ = listener.accept()
      conn.recv(4096)
      conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
      conn.close()

    thread = threading.Thread(target=reset, daemon=True)
    thread.start()
    with pytest.raises(download.DownloadError, match=r"closed the connection before sending "
                       r"w.h5 \(ConnectionResetError: .*\)\. Retry"):
      fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/w.h5", tmp_path, timeout=5)
    thread.join()
  assert os.listdir(tmp_path) == []


def test_fetch_explains_an_unwritable_cache(tmp_path):
  (tmp_path / "file").write_bytes(b"")
  with pytest.raises(download.DownloadError, match=r"cannot write to the download cache "
                     r".*file/sub .*TLJAX_CACHE"):
    fetch("http://127.0.0.1:9/w.h5", tmp_path / "file" / "sub")


def test_download_ignores_a_partial_file_left_by_a_killed_process(tmp_path, monkeypatch):
  (tmp_path / ".w.h5.k1ll3d.part").write_bytes(b"half of the")
  monkeypatch.setattr(download, "stream",
                      lambda url, out, what, instead, timeout: out.write(b"whole"))
  path = fetch("http://127.0.0.1:9/w.h5", tmp_path, hashlib.sha256(b"whole").hexdigest())
  assert path == tmp_path / "w.h5" and path.read_bytes() == b"whole"
