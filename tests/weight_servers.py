"""Local stand-ins for the Hugging Face hub and download.pytorch.org, on 127.0.0.1.

`HubServer` answers what `huggingface_hub.hf_hub_download` asks (huggingface_hub 2.x):
`HEAD` then `GET` on `/{repo_id}/resolve/{revision}/{filename}`, with the headers it
requires: `X-Repo-Commit` (the commit the revision points at), `ETag` (a file's git
blob SHA-1; for large files the hub adds `X-Linked-Etag`, the SHA-256 of the content,
and `X-Linked-Size`), and `Content-Length`. A missing repository or file is a 404 with
the hub's `X-Error-Code` (`RepoNotFound`, `EntryNotFound`). huggingface_hub may also
ask other endpoints now and then (2.4 reads `/api/agent-harnesses` once a day for its
user agent); those are answered 404 and are not file requests. `FileServer` serves files
by name, as download.pytorch.org/models/ does. Both record the file requests they get.

`huggingface_hub` reads `HF_ENDPOINT`, `HF_HOME` and `HF_HUB_OFFLINE` once, when it is
imported; `hub_environment` sets them and re-reads them (reloading its `constants`
module), and restores both afterwards.
"""

import contextlib
import hashlib
import http.server
import importlib
import os
import threading

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_sha1(data: bytes) -> str:
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Server:
  def __init__(self):
    self.requests = []  # (method, path) of every file request answered.
    owner = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_HEAD(self):
        owner.record("HEAD", self.path)
        owner.answer(self, body=False)

      def do_GET(self):
        owner.record("GET", self.path)
        owner.answer(self, body=True)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    # A short poll interval: shutdown() waits for the serving loop's next poll.
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,),
                                   daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()

  def record(self, method: str, path: str) -> None:
    if not path.startswith("/api/"):
      self.requests.append((method, path))

  def gets(self) -> int:
    return sum(1 for method, _ in self.requests if method == "GET")

  @staticmethod
  def send(handler, status, headers, data: bytes, body: bool, cut: bool = False):
    handler.send_response(status)
    for name, value in headers.items():
      handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if body:
      handler.wfile.write(data[:len(data) // 2] if cut else data)
      if cut:  # Close mid-body: the client sees a connection cut short.
        handler.close_connection = True


class HubServer(_Server):
  """files: {repo_id: {filename: bytes}}. `served` may replace what a GET sends
  (a truncated or altered copy) while the headers describe the real file."""

  def __init__(self, files: dict, served: dict | None = None):
    super().__init__()
    self.files, self.served = files, served or {}

  def answer(self, handler, body: bool):
    repo_id, sep, rest = handler.path.lstrip("/").partition("/resolve/")
    revision, _, filename = rest.partition("/")
    if not sep or repo_id not in self.files:
      return self.send(handler, 404, {"X-Error-Code": "RepoNotFound"}, b"", body)
    headers = {"X-Repo-Commit": COMMIT}
    if revision not in ("main", COMMIT):
      return self.send(handler, 404, {**headers, "X-Error-Code": "RevisionNotFound"}, b"",
                       body)
    if filename not in self.files[repo_id]:
      return self.send(handler, 404, {**headers, "X-Error-Code": "EntryNotFound"}, b"",
                       body)
    data = self.files[repo_id][filename]
    headers["ETag"] = f'"{git_blob_sha1(data)}"'
    if filename.endswith(".safetensors"):  # Large files are LFS files on the hub.
      headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
      headers["X-Linked-Size"] = str(len(data))
    self.send(handler, 200, headers, self.served.get((repo_id, filename), data), body)


class FileServer(_Server):
  """files: {name: bytes} at /name; names in `cut` are sent half and cut off."""

  def __init__(self, files: dict, cut: tuple = ()):
    super().__init__()
    self.files, self.cut = files, cut

  def answer(self, handler, body: bool):
    name = handler.path.lstrip("/")
    if name not in self.files:
      return self.send(handler, 404, {}, b"", body)
    self.send(handler, 200, {}, self.files[name], body, cut=name in self.cut)


@contextlib.contextmanager
def hub_environment(home: str, endpoint: str | None = None, offline: bool = False):
  """huggingface_hub with HF_HOME=home, HF_ENDPOINT=endpoint and HF_HUB_OFFLINE."""
  from huggingface_hub import constants
  names = ("HF_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE")
  saved = {name: os.environ.get(name) for name in names}
  values = {"HF_HOME": home, "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "1" if offline else None, "HF_HUB_CACHE": None}
  try:
    _set_environment(values)
    importlib.reload(constants)
    yield os.path.join(home, "hub")
  finally:
    _set_environment(saved)
    importlib.reload(constants)


def _set_environment(values: dict) -> None:
  for name, value in values.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
