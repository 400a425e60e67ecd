"""Paths that may be local folders or remote URLs (``gs://bucket/records``).

Records must be reachable where the work runs: a cloud TPU reads its records from a bucket, and
a Dataflow build writes them there. ``pathlib`` folds ``gs://b/x`` into ``gs:/b/x``, so paths
that may be remote are plain strings joined here. Two libraries reach remote storage, and each
side uses the one its runtime already has: the readers (the sampler, the trainer's checks) go
through ``tf.io.gfile``; the Beam builder's workers and driver go through Beam's
``FileSystems``, so every runner Beam supports can read the sources and write the shards.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def join(base: str | os.PathLike, *parts: str) -> str:
  if is_remote(base):
    return posixpath.join(str(base), *parts)
  return os.path.join(str(base), *parts)


def canonical(path: str | os.PathLike) -> str:
  """Local paths absolute (``~`` expanded, links resolved); URLs unchanged but for a final /."""
  if is_remote(path):
    return str(path).rstrip("/")
  return str(Path(path).expanduser().resolve())


# --- readers: tf.io.gfile --------------------------------------------------------------------


def gfile():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.io.gfile


def is_file(path: str) -> bool:
  g = gfile()
  return g.exists(path) and not g.isdir(path)


def read_text(path: str) -> str:
  with gfile().GFile(path, "r") as f:
    return f.read()


def modified_ns(path: str) -> int | None:
  try:
    return gfile().stat(path).mtime_nsec
  except Exception:  # pylint: disable=broad-except  (NotFound, or a filesystem without mtimes)
    return None


# --- the builder: Beam's FileSystems ---------------------------------------------------------


def beam_read(path: str) -> bytes:
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read()


def beam_open(path: str):
  """A readable, seekable binary file (zip archives are read through it)."""
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def beam_write(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path.inprogress``, then renames it into place."""
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  partial = path + ".inprogress"
  with FileSystems.create(partial, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(data)
  beam_rename(partial, path)


def beam_copy_file(local_path: str, path: str, chunk: int = 8 << 20) -> None:
  """Streams a local file to ``path`` (any Beam filesystem) via a temporary name."""
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  partial = path + ".inprogress"
  with open(local_path, "rb") as src, FileSystems.create(
      partial, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
    for block in iter(lambda: src.read(chunk), b""):
      dst.write(block)
  beam_rename(partial, path)


def beam_rename(source: str, destination: str) -> None:
  from apache_beam.io.filesystems import FileSystems
  if FileSystems.exists(destination):
    FileSystems.delete([destination])
  FileSystems.rename([source], [destination])


def beam_exists(path: str) -> bool:
  from apache_beam.io.filesystems import FileSystems
  return FileSystems.exists(path)


def beam_list(folder: str) -> list[str]:
  """Paths of the files directly or indirectly under ``folder`` (empty when there is none)."""
  from apache_beam.io.filesystems import FileSystems
  found = []
  for result in FileSystems.match([join(folder, "**")]):
    found.extend(m.path for m in result.metadata_list)
  return sorted(found)


def beam_delete(paths: list[str]) -> None:
  from apache_beam.io.filesystems import FileSystems
  existing = [p for p in paths if FileSystems.exists(p)]
  if existing:
    FileSystems.delete(existing)


def beam_mkdirs(path: str) -> None:
  from apache_beam.io.filesystems import FileSystems
  if not is_remote(path):  # object stores have no folders
    FileSystems.mkdirs(path)
