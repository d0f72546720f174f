"""A prepared corpus published in a bucket: what a gs:// data.data_dir means.

The loader prepares a corpus into a local directory and array_record reads its shards with random
access from local files, so a gs:// data.data_dir is worked on in a local cache directory
(`paths.cache_path(url)`, under $SHARDLM_GCS_CACHE) and the bucket holds a published copy of it:

  * `<url>/corpus.published.json`, the marker, is written last. It lists every file with its size and
    sha256 (`{"version": 1, "files": {relative path: {"bytes", "sha256"}}, "content_sha256"}`, the
    last a hash of the listing). Objects under `<url>` that it does not list (a half-finished upload,
    leftovers of an older corpus) are never read; a prefix without the marker counts as empty: the
    corpus is prepared locally and published over it.
  * `fetch` downloads the listed files (each checked against its sha256, then renamed into place) unless
    the cache already holds them; loader.prepare then finds the corpus prepared and returns at once.
  * `publish` runs after loader.prepare: when the cache directory is not what the marker lists (nothing
    was published yet, or prepare rewrote files because the corpus or the tokenizer changed) it
    deletes the marker, uploads every file, and writes the new marker last.

In a multi-process run only process 0 publishes; the others fetch when the marker is there and
otherwise prepare locally, exactly as for a local data.data_dir (preparation is deterministic, and
several processes may share one cache directory: every file lands by rename). Beside the cache
directory, `<dir>.published.json` records what was last fetched or published into it (sizes and
mtimes), so an unchanged cache costs one read of the marker and a stat per file.
"""

import hashlib
import json
import os

from launch.storage import paths

MARKER = "corpus.published.json"
VERSION = 1
_SCRATCH = (".partial.", ".tmp", "incomplete")  # files being written by another process here


def _local_stats(local_dir: str) -> dict[str, list[int]]:
  """{relative path: [bytes, mtime_ns]} of every finished file under `local_dir`."""
  stats = {}
  for rel in paths.files_under(local_dir) if os.path.isdir(local_dir) else []:
    if not any(s in rel for s in _SCRATCH):
      st = os.stat(os.path.join(local_dir, *rel.split("/")))
      stats[rel] = [st.st_size, st.st_mtime_ns]
  return stats


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _content_sha256(files: dict) -> str:
  return _sha256(json.dumps(files, sort_keys=True).encode())


def _record_path(local_dir: str) -> str:
  return local_dir.rstrip(os.sep) + ".published.json"


def _read_json(path: str) -> dict | None:
  """The JSON in a local file or object, or None when it is missing."""
  if not paths.isfile(path):
    return None
  return json.loads(paths.read_text(path))


def _write_record(local_dir: str, content_sha256: str) -> None:
  """Notes that `local_dir` now holds the corpus whose listing hashes to `content_sha256`."""
  record = {"content_sha256": content_sha256, "files": _local_stats(local_dir)}
  partial = f"{_record_path(local_dir)}.partial.{os.getpid()}"
  with open(partial, "w") as f:
    json.dump(record, f)
  os.replace(partial, _record_path(local_dir))


def _cache_holds(local_dir: str, content_sha256: str) -> bool:
  """True when the record says `local_dir` holds that corpus and no file changed since."""
  record = _read_json(_record_path(local_dir))
  return bool(record and record["content_sha256"] == content_sha256 and record["files"] == _local_stats(local_dir))


def fetch(url: str, local_dir: str) -> str | None:
  """Makes `local_dir` hold the corpus published at `url`; returns a one-line note of what was done,
  or None when `url` has no marker (nothing published: prepare locally).

  Raises ValueError when a downloaded file does not match the marker (another run is publishing).
  """
  marker = _read_json(paths.join(url, MARKER))
  if marker is None:
    return None
  if _cache_holds(local_dir, marker["content_sha256"]):
    return f"data: {url} is published and already cached in {local_dir}"
  downloaded = 0
  for rel, info in marker["files"].items():
    local = os.path.join(local_dir, *rel.split("/"))
    if os.path.isfile(local) and os.path.getsize(local) == info["bytes"] and _file_sha256(local) == info["sha256"]:
      continue  # already here (another process of this host, or an earlier download)
    data = paths.read_bytes(paths.join(url, rel))
    if _sha256(data) != info["sha256"]:
      raise ValueError(f"data.data_dir={url!r}: {rel} changed while it was downloaded (another run is "
                       "publishing the corpus there); run again once it has finished.")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = f"{local}.partial.{os.getpid()}"
    with open(partial, "wb") as f:
      f.write(data)
    os.replace(partial, local)
    downloaded += info["bytes"]
  for rel in set(_local_stats(local_dir)) - set(marker["files"]):  # an older corpus's files
    paths.remove(os.path.join(local_dir, *rel.split("/")))
  _write_record(local_dir, marker["content_sha256"])
  return (f"data: downloaded the prepared corpus published at {url} ({len(marker['files'])} files, "
          f"{downloaded / 1e6:.1f} MB) into {local_dir}")


def publish(url: str, local_dir: str) -> str | None:
  """Uploads the corpus prepared in `local_dir` to `url`, marker last, unless `url` already publishes
  exactly these files; returns a one-line note when it uploaded, else None."""
  marker = _read_json(paths.join(url, MARKER))
  if marker is not None and _cache_holds(local_dir, marker["content_sha256"]):
    return None
  files = {rel: {"bytes": size, "sha256": _file_sha256(os.path.join(local_dir, *rel.split("/")))}
           for rel, (size, _) in _local_stats(local_dir).items()}
  content = _content_sha256(files)
  if marker is None or marker["content_sha256"] != content:
    paths.remove(paths.join(url, MARKER))  # a reader never pairs the old marker with new files
    held = marker["files"] if marker is not None else {}
    for rel, info in files.items():
      if held.get(rel) != info:  # objects the old marker lists with this content stay
        with open(os.path.join(local_dir, *rel.split("/")), "rb") as f:
          paths.write_bytes(paths.join(url, rel), f.read())
    paths.write_text(paths.join(url, MARKER), json.dumps(
        {"version": VERSION, "files": files, "content_sha256": content}, indent=1, sort_keys=True))
  _write_record(local_dir, content)
  if marker is not None and marker["content_sha256"] == content:
    return None  # the same corpus was published already (by another process)
  return f"data: published the corpus prepared in {local_dir} to {url} ({len(files)} files, marker {MARKER})"
