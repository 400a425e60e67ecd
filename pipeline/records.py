"""The record schema shared by the builder (writes) and the sampler (reads).

Each record is a ``tf.train.Example`` with the encoded image bytes (PNG, or the source JPEG
kept as it was), the class label within its split and the source file it came from.
"""

from __future__ import annotations

import tensorflow as tf

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "filename": tf.io.FixedLenFeature([], tf.string),
}

FEATURE_DOC = {
    "image": "bytes: the encoded image (PNG, or the source JPEG when it already had the target size)",
    "label": "int64: class index within the split, 0..num_classes-1, contiguous per class",
    "filename": "bytes: the source image (zip:member or path); rotated copies share it",
}


def serialize(image: bytes, label: int, filename: str) -> bytes:
  return tf.train.Example(features=tf.train.Features(feature={
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
      "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      "filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[filename.encode()])),
  })).SerializeToString()


def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  return tf.io.parse_single_example(serialized, FEATURES)
