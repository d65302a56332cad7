"""Downloads into a local cache: a temporary file, a sha256 check, an atomic rename.

One job: get the bytes at a URL into ``cache_dir`` exactly once, or fail with one message that
names the URL, the cause and the setting to use instead. Weights (``tljax.models.weights``) and the
IDX datasets (``tljax.data``) both come through here.

Typical use::

  path = fetch(url, cache_dir, sha256, what="MNIST", instead="--config.data.dir=<folder>")
"""

import hashlib
import http.client
import logging
import os
import pathlib
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO

import tqdm

TIMEOUT_S = 10.0
_CHUNK = 1 << 20


class DownloadError(ValueError):
  """A file that could not be downloaded or did not verify; the message says what to do."""


def default_cache_dir() -> pathlib.Path:
  """``$TLJAX_CACHE``, else ``~/.cache/tljax``."""
  return pathlib.Path(os.environ.get("TLJAX_CACHE") or "~/.cache/tljax").expanduser()


def sha256_of(path: str | os.PathLike) -> str:
  """The hex sha256 of the file at ``path``."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def file_name(url: str) -> str:
  """The last path component of ``url``: the name its download is cached under."""
  return pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name


def fetch(url: str, cache_dir: str | os.PathLike | None = None, sha256: str | None = None, *,
          what: str, instead: str, timeout: float = TIMEOUT_S) -> pathlib.Path:
  """Returns the cached copy of ``url``, downloading it first if absent or not as expected.

  A cached file whose sha256 differs from ``sha256`` is downloaded again (None: any cached
  file is taken). A download goes to a temporary file in ``cache_dir`` (None: the default)
  that replaces the cached one only once complete and verified. ``what`` names the file in
  messages ("the weights", "MNIST"); ``instead`` says how to run without the download.
  """
  name = file_name(url)
  cache_dir = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  target = cache_dir / name
  if target.is_file():
    if sha256 is None or sha256_of(target) == sha256:
      return target
    logging.warning("%s does not have the expected sha256 %s; downloading it again.",
                    target, sha256)
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.", suffix=".part")
  except OSError as e:
    raise DownloadError(f"cannot write to the download cache {cache_dir} ({e.strerror}); set "
                        f"TLJAX_CACHE to a writable folder, or {instead}.") from None
  try:
    with os.fdopen(fd, "wb") as out:
      stream(url, out, what, instead, timeout)
    if sha256 is not None and (actual := sha256_of(tmp)) != sha256:
      raise DownloadError(f"{url} downloaded with sha256 {actual}, expected {sha256}; nothing "
                          f"was cached. Retry later, or {instead}.")
    os.replace(tmp, target)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return target


def _dropped_by_server(error: BaseException) -> bool:
  """Whether ``error`` (or the reason a URLError gives) says the server was reached and then
  closed or reset the connection, rather than that it could not be reached."""
  reason = getattr(error, "reason", error)
  return isinstance(reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                             http.client.HTTPException))


def stream(url: str, out: BinaryIO, what: str, instead: str, timeout: float) -> None:
  """Streams ``url`` into ``out`` with a progress bar; an unreachable host, a dropped
  connection or a short body raises."""
  try:
    response = urllib.request.urlopen(url, timeout=timeout)
  except urllib.error.HTTPError as e:
    raise DownloadError(f"{url} answered HTTP {e.code} ({e.reason}). To run without it, "
                        f"{instead}.") from None
  except (OSError, http.client.HTTPException) as e:  # URLError (DNS, refused), resets...
    host = urllib.parse.urlparse(url).netloc or url
    reason = getattr(e, "reason", e)
    if _dropped_by_server(e):
      raise DownloadError(f"the {what} host {host} closed the connection before sending "
                          f"{file_name(url)} ({type(reason).__name__}: {reason}). Retry; to "
                          f"run without it, {instead}.") from None
    raise DownloadError(f"the {what} host {host} could not be reached ({reason}); are you "
                        f"offline? To run without it, {instead}.") from None
  length = response.headers.get("Content-Length")
  total = int(length) if length else None
  received = 0
  with response, tqdm.tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=file_name(url)) as bar:
    try:
      while chunk := response.read(_CHUNK):
        out.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:
      raise DownloadError(f"the download of {url} broke off after {received} bytes ({e!r}). "
                          f"Retry, or {instead}.") from None
  if total is not None and received != total:
    raise DownloadError(f"the download of {url} broke off after {received} of {total} bytes. "
                        f"Retry, or {instead}.")
