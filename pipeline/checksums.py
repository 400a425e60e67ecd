"""SHA-256 of files, for the manifest and for verifying downloads."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  """Local paths and, through Beam's filesystems, remote ones (``gs://``)."""
  digest = hashlib.sha256()
  if "://" in str(path):
    from pipeline import storage  # pylint: disable=import-outside-toplevel
    opened = storage.beam_open(str(path))
  else:
    opened = open(path, "rb")
  with opened as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()
