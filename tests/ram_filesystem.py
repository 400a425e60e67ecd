"""A stand-in bucket both libraries reach: Beam's ``ram://`` filesystem over TensorFlow's.

TensorFlow ships an in-memory ``ram://`` filesystem for ``tf.io.gfile``; registering this Beam
``FileSystem`` for the same scheme (importing the module is enough: Beam finds subclasses)
makes Beam's ``FileSystems`` read and write the very same objects. Like a bucket it is not the
local disk, so paths through it prove that nothing falls back to ``open()`` or ``pathlib``.
It lives in one process: builds into it use Beam's in-memory DirectRunner.
"""

from __future__ import annotations

import io

import tensorflow as tf
from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata, FileSystem

SCHEME = "ram"


class _Writer(io.RawIOBase):
  """Buffers the bytes, stores them on close (as an object store commits an upload)."""

  def __init__(self, path: str):
    super().__init__()
    self._path, self._buf = path, io.BytesIO()

  def writable(self):
    return True

  def write(self, b):
    return self._buf.write(b)

  def close(self):
    if not self.closed:
      with tf.io.gfile.GFile(self._path, "wb") as f:
        f.write(self._buf.getvalue())
    super().close()


class RamFileSystem(FileSystem):

  @classmethod
  def scheme(cls):
    return SCHEME

  def join(self, basepath, *paths):
    return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

  def split(self, path):
    head, _, tail = path.rstrip("/").rpartition("/")
    return head, tail

  def mkdirs(self, path):
    tf.io.gfile.makedirs(path)

  def has_dirs(self):
    return False

  def _list(self, dir_or_prefix):
    prefix = dir_or_prefix.rstrip("/")
    if not tf.io.gfile.isdir(prefix):
      return
    for root, _, files in tf.io.gfile.walk(prefix):
      for name in files:
        path = f"{root.rstrip('/')}/{name}"
        yield FileMetadata(path, tf.io.gfile.stat(path).length)

  def create(self, path, mime_type="application/octet-stream",
             compression_type=CompressionTypes.AUTO):
    tf.io.gfile.makedirs(self.split(path)[0])
    return io.BufferedWriter(_Writer(path))  # the builder never asks for compression

  def open(self, path, mime_type="application/octet-stream",
           compression_type=CompressionTypes.AUTO):
    if not self.exists(path):
      raise BeamIOError(f"no such object: {path}")
    with tf.io.gfile.GFile(path, "rb") as f:
      return io.BytesIO(f.read())

  def copy(self, source_file_names, destination_file_names):
    for s, d in zip(source_file_names, destination_file_names):
      tf.io.gfile.copy(s, d, overwrite=True)

  def rename(self, source_file_names, destination_file_names):
    for s, d in zip(source_file_names, destination_file_names):
      tf.io.gfile.makedirs(self.split(d)[0])
      tf.io.gfile.rename(s, d, overwrite=True)

  def exists(self, path):
    # TensorFlow's ram:// answers exists() for any prefix of a stored name ("a.tfrecord" when
    # only "a.tfrecord.inprogress" is there); a listing of the parent is exact.
    parent, name = self.split(path)
    return tf.io.gfile.isdir(parent) and name in {
        n.rstrip("/") for n in tf.io.gfile.listdir(parent)}

  def size(self, path):
    return tf.io.gfile.stat(path).length

  def last_updated(self, path):
    return 0.0

  def metadata(self, path):
    return FileMetadata(path, self.size(path), 0.0)

  def checksum(self, path):
    return str(self.size(path))

  def delete(self, paths):
    for path in paths:
      try:
        tf.io.gfile.remove(path)
      except tf.errors.OpError:
        tf.io.gfile.rmtree(path)
