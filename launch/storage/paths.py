"""The one path layer: every path a user gives may be local or a gs:// URL (object storage).

Paths stay strings in the rest of the code (they appear in messages and configs); this module turns
them into `etils.epath.Path`s, the library orbax already uses, whose gs:// backend is gcsfs (or
tf.io.gfile when TensorFlow is importable). A local path is made absolute, exactly as before; a URL
is kept as written. Code that may see a URL never calls os.path/os.makedirs/open on it: it calls these.

Object storage has no directories, no rename and no append: `makedirs` is a no-op there, and what
needs those has its own object-storage rules beside this module: checkpoint steps (step_store.py),
the workdir lock (bucket_lock.py), metrics (metric_chunks.py).
"""

import io
import logging
import os
import posixpath

from etils import epath

URL_SCHEMES = ("gs://",)


def is_url(path: str | os.PathLike | None) -> bool:
  """True when `path` is an object-storage URL (gs://...), False for a local path or None."""
  return path is not None and str(path).startswith(URL_SCHEMES)


def _configure_gcsfs() -> None:
  """Sets gcsfs up before its first file system is made (fsspec caches instances): at import, since
  orbax may open a gs:// path before this module's functions see one."""
  # gcsfs logs a WARNING per bucket it cannot classify without credentials (an emulator, or a
  # bucket the user can write but not inspect); it falls back to the plain client, which is right.
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  # No directory-listing cache: another process (a run, the other hosts) adds objects that a
  # long-lived reader (a test, a notebook, restore after a save) must see at its next listing.
  import fsspec.config
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


_configure_gcsfs()


def normalize(path: str | os.PathLike) -> str:
  """`path` as the string the run uses: a URL unchanged (no trailing '/'), a local path made absolute."""
  path = str(path)
  if is_url(path):
    return path.rstrip("/") if path.rstrip("/").count("/") > 2 else path
  return os.path.abspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An `epath.Path` for a local path (made absolute) or a gs:// URL."""
  return epath.Path(normalize(path))


def join(base: str | os.PathLike, *parts: str) -> str:
  """`base`/`parts` joined with '/' for a URL and os.path.join locally; returns a string."""
  base = str(base)
  return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
  """The parent of `path` (posix rules for a URL)."""
  return posixpath.dirname(str(path).rstrip("/")) if is_url(path) else os.path.dirname(path)


def exists(path: str | os.PathLike) -> bool:
  """True when a file, a directory or (for a URL) any object under that prefix exists."""
  return as_path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  """True for a local directory, or a URL prefix that holds objects."""
  return as_path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
  """True for a local file or an existing object."""
  return as_path(path).is_file()


def makedirs(path: str | os.PathLike) -> None:
  """Creates a local directory and its parents (exist_ok); nothing to do for a URL (no directories)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
  """Names directly under `path` (files and sub-directories), sorted."""
  return sorted(p.name for p in as_path(path).iterdir())


def read_text(path: str | os.PathLike) -> str:
  """The whole text of a file or object."""
  return as_path(path).read_text()


def read_bytes(path: str | os.PathLike) -> bytes:
  """The whole content of a file or object."""
  return as_path(path).read_bytes()


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` as the whole file/object (one upload on object storage; parents made locally)."""
  makedirs(dirname(normalize(path)))
  as_path(path).write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` as the whole file/object (one upload on object storage; parents made locally)."""
  makedirs(dirname(normalize(path)))
  as_path(path).write_bytes(data)


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> str:
  """Saves a matplotlib figure to `path` (local or gs://; the format from its suffix) through one write;
  returns `path` as a string. matplotlib only writes local files, so the image is made in memory first."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format=os.path.splitext(str(path))[1].lstrip(".") or "png", **savefig_kwargs)
  write_bytes(path, buffer.getvalue())
  return str(path)


def glob(pattern: str) -> list[str]:
  """Sorted paths matching a glob `pattern` (local or gs://; '**' is not supported on gs://)."""
  if not is_url(pattern):
    import glob as glob_lib
    return sorted(glob_lib.glob(pattern))
  root, rest = split_glob(pattern)
  return sorted(str(p) for p in epath.Path(root).glob(rest)) if rest else ([root] if exists(root) else [])


def split_glob(pattern: str) -> tuple[str, str]:
  """('gs://b/dir', 'part-*.txt'): the longest prefix without wildcards, and the rest."""
  parts = pattern.split("/")
  for i, part in enumerate(parts):
    if i > 2 and any(c in part for c in "*?["):
      return "/".join(parts[:i]), "/".join(parts[i:])
  return pattern, ""


def remove(path: str | os.PathLike) -> None:
  """Deletes one file or object (missing is fine)."""
  as_path(path).unlink(missing_ok=True)


def rmtree(path: str | os.PathLike) -> None:
  """Deletes a directory or URL prefix and everything under it (missing is fine)."""
  p = as_path(path)
  if p.exists():
    p.rmtree()


def copy_tree(src: str, dst: str) -> None:
  """Copies every file under `src` to the same relative place under `dst` (local or gs://, any mix)."""
  source = as_path(src)
  for item in source.iterdir():
    target = join(dst, item.name)
    if item.is_dir():
      copy_tree(str(item), target)
    else:
      write_bytes(target, item.read_bytes())


def bucket_of(url: str) -> str:
  """The bucket name of a gs:// URL ('gs://b/runs/x' -> 'b')."""
  return str(url).split("://", 1)[1].split("/", 1)[0]


def object_name(url: str) -> str:
  """The object name (key) of a gs:// URL within its bucket ('gs://b/runs/x' -> 'runs/x')."""
  rest = str(url).split("://", 1)[1]
  return rest.split("/", 1)[1] if "/" in rest else ""


def cache_root() -> str:
  """Where `local_copy` keeps downloaded objects: $SHARDLM_GCS_CACHE, else ~/.cache/shardlm/gcs."""
  return os.environ.get("SHARDLM_GCS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "shardlm", "gcs")


def cache_path(url: str) -> str:
  """The local path under `cache_root()` that stands for a gs:// URL: <root>/<bucket>/<object name>."""
  url = normalize(url)
  return os.path.join(cache_root(), bucket_of(url), *[p for p in object_name(url).split("/") if p])


def local_copy(path: str) -> str:
  """A local path holding `path`'s content: `path` itself when local, else a downloaded copy of the object
  or of every object under the prefix (for libraries that only open local files: safetensors,
  sentencepiece, tokenizers). An object already cached with the same size is not downloaded again."""
  if not is_url(path):
    return path
  url = normalize(path)
  local = cache_path(url)
  source = as_path(url)
  if not source.exists():
    raise ValueError(f"{url}: no such object or prefix in gs://{bucket_of(url)}.")
  if source.is_dir():
    for item in source.iterdir():
      local_copy(str(item))
    return local
  if not (os.path.isfile(local) and os.path.getsize(local) == source.stat().length):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = f"{local}.partial.{os.getpid()}"
    with open(partial, "wb") as f:
      f.write(source.read_bytes())
    os.replace(partial, local)
  return local


def upload_tree(local_dir: str, url: str) -> list[str]:
  """Copies every file under the local `local_dir` to the same relative name under `url`; returns the
  names written (relative, sorted)."""
  written = []
  for root, _, files in os.walk(local_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      with open(os.path.join(root, name), "rb") as f:
        write_bytes(join(url, *rel.split(os.sep)), f.read())
      written.append(rel)
  return sorted(written)


def files_under(root: str) -> list[str]:
  """Every file under `root` (a local directory or a gs:// prefix) as a '/'-separated path relative to
  it, sorted by directory, then name (as `sorted(os.walk(root))` visits them)."""
  if is_url(root):
    found = []
    for item in as_path(root).iterdir():
      found += [f"{item.name}/{rel}" for rel in files_under(str(item))] if item.is_dir() else [item.name]
  else:
    found = [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, files in os.walk(root)
             for f in files]
  return sorted(found, key=lambda rel: posixpath.split(rel))


def tree_bytes(path: str) -> int:
  """Total size in bytes of every file under `path` (a local directory or a gs:// prefix)."""
  if not is_url(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
  return sum(tree_bytes(str(item)) if item.is_dir() else item.stat().length for item in as_path(path).iterdir())
