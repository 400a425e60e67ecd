"""Fetching the official Omniglot archives, verified by SHA-256, written atomically."""

from __future__ import annotations

import hashlib
import os
import urllib.request
import uuid
from pathlib import Path

from pipeline.checksums import sha256_file
from pipeline.errors import DataError

# brendenlake/omniglot, python/ folder; the same URLs and sums tensorflow-datasets 4.9.10 pins
# in url_checksums/omniglot.txt.
OMNIGLOT_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
OMNIGLOT_SHA256 = {
    "images_background.zip": "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
    "images_evaluation.zip": "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
}


def fetch(url: str, dest: Path, sha256: str, timeout: float = 60.0) -> Path:
  """Downloads ``url`` to ``dest`` unless a file with the right SHA-256 is already there."""
  dest = Path(dest)
  if dest.is_file() and sha256_file(dest) == sha256:
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
      while block := response.read(1 << 20):
        digest.update(block)
        f.write(block)
    if digest.hexdigest() != sha256:
      raise DataError(f"{url}: SHA-256 {digest.hexdigest()} does not match the expected "
                      f"{sha256}; the file was not kept")
    os.replace(partial, dest)
  except OSError as e:  # URLError is an OSError
    raise DataError(f"{url}: download failed ({e})") from e
  finally:
    partial.unlink(missing_ok=True)
  return dest


def fetch_omniglot(download_dir: Path, base_url: str = OMNIGLOT_BASE_URL,
                   sha256: dict[str, str] | None = None) -> Path:
  """Both Omniglot zips into ``download_dir``; returns that folder (a valid ``--source``)."""
  sums = sha256 or OMNIGLOT_SHA256
  for name, digest in sums.items():
    fetch(base_url.rstrip("/") + "/" + name, Path(download_dir) / name, digest)
  return Path(download_dir)
