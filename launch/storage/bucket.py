"""The bucket behind a gs:// path: a client, and a probe that fails fast before a run writes anything.

A missing bucket, missing credentials or a missing write permission would otherwise surface minutes
later, deep inside a checkpoint save (or as a hang while libraries retry). `probe(url)` writes and
deletes one small object under `url` with a short timeout and no retries, and turns each failure into
a ValueError naming the bucket and the fix, which the command prints as one `error:` line.

With STORAGE_EMULATOR_HOST set (a local emulator, tests) the client is anonymous.
"""

import os
import socket
import uuid

from launch.storage import paths

TIMEOUT_S = 15.0  # one request; the probe makes two


def client(what: str = "gs:// paths"):
  """A google-cloud-storage Client: anonymous against an emulator, else Application Default Credentials.

  Raises ValueError when there are no credentials (`what` names what they were needed for).
  """
  from google.cloud import storage
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    from google.auth.credentials import AnonymousCredentials
    return storage.Client(project="emulator", credentials=AnonymousCredentials())
  import google.auth.exceptions
  try:
    return storage.Client()
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise ValueError(f"no Google Cloud credentials for {what}: run `gcloud auth application-default "
                     "login`, or use a VM/TPU whose service account can write the bucket.") from e


def _server_message(error) -> str:
  """The sentence in GCS's JSON error body ({"error": {"message": ...}}), else the exception's message
  (google-cloud-storage puts the whole body, after the method and URL, into the message of an upload)."""
  try:
    return error.response.json()["error"]["message"]
  except Exception:  # noqa: BLE001 (no response, or not GCS's JSON: the library's own message)
    return getattr(error, "message", str(error))


def describe_error(url: str, error: Exception) -> str | None:
  """One sentence for a storage failure on `url` (missing bucket, permission, unreachable), or None."""
  from google.api_core import exceptions as api
  import requests
  bucket = paths.bucket_of(url)
  if isinstance(error, api.NotFound):
    return f"bucket gs://{bucket} does not exist (for {url}); create it or fix the path."
  if isinstance(error, (api.Forbidden, api.Unauthorized)):
    why = _server_message(error).rstrip(".")
    return (f"no permission to write to bucket gs://{bucket} (for {url}): {why}; grant the account Storage "
            "Object Admin on the bucket or use another path.")
  if isinstance(error, (requests.exceptions.RequestException, api.ServiceUnavailable, api.GatewayTimeout,
                        TimeoutError, ConnectionError)):
    return f"cannot reach bucket gs://{bucket} (for {url}) within {TIMEOUT_S:g}s: {type(error).__name__}: {error}"
  if isinstance(error, api.GoogleAPICallError):
    return f"bucket gs://{bucket} refused a write (for {url}): {error}"
  return None


def probe(url: str) -> None:
  """Checks that `url`'s bucket exists and takes writes: writes then deletes one small object.

  Returns quietly for a local path or a writable bucket; raises ValueError naming the bucket otherwise.
  """
  if not paths.is_url(url):
    return
  bucket = paths.bucket_of(url)
  name = paths.object_name(paths.normalize(url)).rstrip("/")
  probe_name = f"{name}/.shardlm-probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}".lstrip("/")
  try:
    blob = client(f"bucket gs://{bucket} (for {url})").bucket(bucket).blob(probe_name)
    blob.upload_from_string(b"probe", timeout=TIMEOUT_S, retry=None)
    blob.delete(timeout=TIMEOUT_S, retry=None)
  except ValueError:
    raise
  except Exception as e:  # noqa: BLE001 (each storage failure becomes one sentence; the rest re-raise)
    reason = describe_error(url, e)
    if reason is None:
      raise
    raise ValueError(reason) from e
