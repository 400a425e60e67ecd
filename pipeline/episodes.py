"""N-way K-shot Q-query episodes from a records folder, sampled in graph code from memory.

A split is decoded once into one uint8 tensor ``[num_images, H, W, C]`` (records are
class-contiguous, so a class is an ``(offset, count)`` range of it); an episode is then a few
stateless random ops and one ``tf.gather``. Nothing holds a file per class, nothing runs Python
per episode, and every shape is static, so the same pipeline feeds XLA on GPU and TPU.
``decode="per_episode"`` keeps only the encoded bytes in memory and decodes the episode's
images in the graph instead, for splits whose decoded pixels would not fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from pipeline import records, storage, streams
from pipeline.errors import DataError

DECODE_MODES = ("memory", "per_episode")
RNG = streams.RNG


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  n_way: int
  k_shot: int
  k_query: int
  meta_batch_size: int

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < 1:
        raise DataError(f"{field.name}={value!r}: must be a positive integer")


@dataclasses.dataclass(frozen=True)
class ClassIndexedImages:
  """One split in memory: images (uint8 pixels or encoded bytes) and each class's range."""
  images: tf.Tensor  # uint8 [M, H, W, C], or string [M] when decode="per_episode"
  offsets: tf.Tensor  # int64 [num_classes]
  counts: tf.Tensor  # int32 [num_classes]
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  split: str
  decoded: bool

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def read_manifest(records_dir: str | os.PathLike) -> dict:
  path = storage.join(records_dir, records.MANIFEST_NAME)
  if not storage.is_file(path):
    raise DataError(f"{path}: no manifest; build the records with tools/build_tfrecords.py "
                    f"(the manifest is written last: an interrupted build leaves none)")
  try:
    manifest = json.loads(storage.read_text(path))
  except (OSError, json.JSONDecodeError, tf.errors.OpError) as e:
    raise DataError(f"{path}: unreadable manifest ({e})") from e
  if manifest.get("schema_version") != records.SCHEMA_VERSION:
    raise DataError(f"{path}: schema_version {manifest.get('schema_version')!r}, this code "
                    f"reads {records.SCHEMA_VERSION}; rebuild the records")
  return manifest


_CACHE: dict[tuple, ClassIndexedImages] = {}


def verify_split(records_dir: str | os.PathLike, split: str, *, sha256: bool = False) -> None:
  """Checks a split's shards against the manifest before a run relies on them: each file is
  there and reads to its recorded number of records (a truncated shard fails here, named);
  with ``sha256``, its bytes hash to the recorded digest."""
  records_dir = storage.canonical(records_dir)
  manifest = read_manifest(records_dir)
  if split not in manifest["splits"]:
    raise DataError(f"{storage.join(records_dir, records.MANIFEST_NAME)}: no split {split!r} "
                    f"(has {', '.join(manifest['splits'])})")
  for shard in manifest["splits"][split]["shards"]:
    path = storage.join(records_dir, shard["file"])
    if not storage.is_file(path):
      raise DataError(f"{path}: shard of split {split!r} listed in the manifest is missing")
    if sha256:
      digest = hashlib.sha256()
      with tf.io.gfile.GFile(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      if digest.hexdigest() != shard["sha256"]:
        raise DataError(f"{path}: SHA-256 differs from the manifest's (the file changed or is "
                        f"corrupt); rebuild the records")
    try:
      count = int(tf.data.TFRecordDataset(str(path)).reduce(
          np.int64(0), lambda n, _: n + 1).numpy())
    except tf.errors.OpError as e:
      raise DataError(f"{path}: truncated or corrupt ({e.message.splitlines()[0]}); rebuild "
                      f"the records") from None
    if count != shard["num_records"]:
      raise DataError(f"{path}: {count} records, the manifest says {shard['num_records']}; "
                      f"rebuild the records")


def load_split(records_dir: str | os.PathLike, split: str, *,
               decode: str = "memory") -> ClassIndexedImages:
  """Reads a split's shards once, checks them against the manifest and keeps them in memory."""
  if decode not in DECODE_MODES:
    raise DataError(f"decode={decode!r}: must be one of {DECODE_MODES}")
  records_dir = storage.canonical(records_dir)
  manifest_path = storage.join(records_dir, records.MANIFEST_NAME)
  key = (records_dir, split, decode, storage.modified_ns(manifest_path))
  if key in _CACHE:
    return _CACHE[key]
  manifest = read_manifest(records_dir)
  if split not in manifest["splits"]:
    raise DataError(f"{manifest_path}: no split {split!r} (has {', '.join(manifest['splits'])})")
  info = manifest["splits"][split]
  shape = tuple(manifest["image_shape"])
  shards = [s["file"] for s in info["shards"]]
  for shard in shards:
    if not storage.is_file(storage.join(records_dir, shard)):
      raise DataError(f"{storage.join(records_dir, shard)}: shard listed in the manifest is "
                      f"missing")
  # Where each class starts in the concatenation of the shards, read in manifest order.
  shard_base, base = {}, 0
  for s in info["shards"]:
    shard_base[s["file"]], base = base, base + s["num_records"]
  classes = sorted(info["classes"], key=lambda c: c["label"])
  offsets = np.array([shard_base[c["shard"]] + c["offset"] for c in classes], np.int64)
  counts = np.array([c["count"] for c in classes], np.int32)

  def parse(serialized):
    example = records.parse(serialized)
    image = example["image"]
    if decode == "memory":
      image = tf.ensure_shape(
          tf.io.decode_image(image, channels=shape[2], expand_animations=False), shape)
    return image, example["label"]

  files = [storage.join(records_dir, s) for s in shards]
  ds = tf.data.TFRecordDataset(files, buffer_size=8 << 20)
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  try:
    images, labels = ds.batch(max(base, 1) + 1).get_single_element()
  except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
    raise DataError(f"{records_dir} ({split}): a record could not be read or decoded to "
                    f"{list(shape)}: {e.message.splitlines()[0]}") from e
  _check_labels(labels.numpy(), classes, info["shards"], records_dir)
  loaded = ClassIndexedImages(
      images=images, offsets=tf.constant(offsets), counts=tf.constant(counts),
      image_shape=shape, class_names=tuple(c["name"] for c in classes), split=split,
      decoded=decode == "memory")
  _CACHE[key] = loaded
  return loaded


def _check_labels(labels: np.ndarray, classes: list[dict], shards: list[dict],
                  records_dir: str) -> None:
  """Fails naming the class and shard whose records disagree with the manifest."""
  expected = sum(c["count"] for c in classes)
  position = 0
  for s in shards:
    in_shard = sorted((c for c in classes if c["shard"] == s["file"]), key=lambda c: c["offset"])
    for c in in_shard:
      got = labels[position + c["offset"]: position + c["offset"] + c["count"]]
      if len(got) < c["count"] or np.any(got != c["label"]):
        found = int(np.sum(labels == c["label"]))
        raise DataError(f"{storage.join(records_dir, s['file'])}: class {c['name']} (label {c['label']}) has "
                        f"{found} records, the manifest promises {c['count']}")
    position += s["num_records"]
  if len(labels) != expected:
    raise DataError(f"{records_dir}: {len(labels)} records in the shards, the manifest "
                    f"promises {expected}")


def _episode_fn(data: ClassIndexedImages, spec: EpisodeSpec):
  n, k, q = spec.n_way, spec.k_shot, spec.k_query
  max_count = int(np.max(data.counts.numpy()))  # static: also when traced on the device
  h, w, c = data.image_shape

  def episode(seed):
    # streams.RNG and streams.uniform: the same numbers under XLA (TPU, --sampler=device) as
    # in the tf.data path.
    class_seed, example_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2, alg=RNG))
    # The top-n of iid uniforms is a uniformly random n-subset in uniformly random order, so
    # label i goes to a random class: classes without replacement, labels permuted.
    classes = tf.math.top_k(
        streams.uniform([data.num_classes], class_seed), n).indices
    counts = tf.gather(data.counts, classes)
    noise = streams.uniform([n, max_count], example_seed)
    noise = tf.where(tf.range(max_count)[None, :] < counts[:, None], noise, -1.0)
    picks = tf.math.top_k(noise, k + q).indices  # distinct examples within each class
    index = tf.gather(data.offsets, classes)[:, None] + tf.cast(picks, tf.int64)
    images = tf.gather(data.images, index)  # [n, k+q, ...]
    if not data.decoded:
      flat = tf.reshape(images, [-1])
      images = tf.map_fn(
          lambda b: tf.ensure_shape(tf.io.decode_image(b, channels=c, expand_animations=False),
                                    [h, w, c]),
          flat, fn_output_signature=tf.TensorSpec([h, w, c], tf.uint8))
      images = tf.reshape(images, [n, k + q, h, w, c])
    labels = tf.range(n, dtype=tf.int32)[:, None]
    return {
        "support_images": tf.reshape(images[:, :k], [n * k, h, w, c]),
        "support_labels": tf.reshape(tf.tile(labels, [1, k]), [n * k]),
        "query_images": tf.reshape(images[:, k:], [n * q, h, w, c]),
        "query_labels": tf.reshape(tf.tile(labels, [1, q]), [n * q]),
    }

  return episode


def _to_float(batch):
  """uint8 -> float32 in [0, 1], once per meta-batch rather than per image."""
  out = dict(batch)
  for name in ("support_images", "query_images"):
    out[name] = tf.cast(batch[name], tf.float32) * (1.0 / 255.0)
  return out


def _validate(data: ClassIndexedImages, spec: EpisodeSpec) -> None:
  check_episodes_fit(data.split, list(zip(data.class_names, data.counts.numpy().tolist())),
                     spec.n_way, spec.k_shot, spec.k_query)


def check_episodes_fit(split: str, class_counts: list[tuple[str, int]], n_way: int,
                       k_shot: int, k_query: int, query_flag: str = "k_query") -> None:
  """The one check that a split can hold N-way episodes of K + Q images per class; used on a
  loaded split and, at start-up, on the manifest's counts."""
  if n_way > len(class_counts):
    raise DataError(f"--n_way={n_way}: split {split!r} has only {len(class_counts)} classes")
  name, count = min(class_counts, key=lambda c: c[1])
  if count < k_shot + k_query:
    raise DataError(f"--k_shot + --{query_flag} = {k_shot + k_query}: class {name} of split "
                    f"{split!r} has only {count} images")


def meta_batches(data: ClassIndexedImages, spec: EpisodeSpec, *, seed: int,
                 start_step: int = 0, num_steps: int | None = None,
                 sharding: streams.Sharding = streams.Sharding()) -> tf.data.Dataset:
  """Training meta-batches: element ``s`` is a pure function of ``(seed, start_step + s)``.

  Each element is a dict of ``support_images [b, N*K, H, W, C] float32``,
  ``support_labels [b, N*K] int32``, ``query_images [b, N*Q, H, W, C]``,
  ``query_labels [b, N*Q]`` and ``episode_id [b] int64``, where ``b`` is the meta-batch size
  divided by the number of replicas in ``sharding``. Support and query are class-major:
  example ``i`` of the support set has label ``i // K``.
  """
  _validate(data, spec)
  return streams.training_stream(_episode_fn(data, spec), seed=seed,
                                 meta_batch_size=spec.meta_batch_size, start_step=start_step,
                                 num_steps=num_steps, sharding=sharding, finalize=_to_float,
                                 stream=f"train:{data.split}")


def replica_meta_batch(data: ClassIndexedImages, spec: EpisodeSpec, *, seed: int,
                       step: tf.Tensor, replica: tf.Tensor | int, replicas: int) -> dict:
  """In graph code, the meta-batch :func:`meta_batches` yields to ``replica`` at ``step``.

  The same episode ids (``step * B + replica * B/R ..``), seeds and episode function as the
  tf.data path, so the same episodes bit for bit; meant to run inside the compiled training
  step with ``data.images`` already on the device (``--sampler=device``), so that no input
  crosses from the host per step.
  """
  if not data.decoded:
    raise DataError("the on-device sampler needs decoded images (decode='memory')")
  _validate(data, spec)
  per_replica = streams.check_divisible(spec.meta_batch_size, replicas) // replicas
  episode = _episode_fn(data, spec)
  base = streams.stream_seed(seed, f"train:{data.split}")
  first = (tf.cast(step, tf.int64) * spec.meta_batch_size
           + tf.cast(replica, tf.int64) * per_replica)
  ids = first + tf.range(per_replica, dtype=tf.int64)
  h, w, c = data.image_shape
  n, k, q = spec.n_way, spec.k_shot, spec.k_query
  signature = {"support_images": tf.TensorSpec([n * k, h, w, c], tf.uint8),
               "support_labels": tf.TensorSpec([n * k], tf.int32),
               "query_images": tf.TensorSpec([n * q, h, w, c], tf.uint8),
               "query_labels": tf.TensorSpec([n * q], tf.int32)}
  batch = tf.map_fn(lambda i: episode(streams.episode_seed(base, i)), ids,
                    fn_output_signature=signature)
  return _to_float(dict(batch, episode_id=ids))


def evaluation_batches(data: ClassIndexedImages, spec: EpisodeSpec, *, seed: int,
                       num_episodes: int,
                       sharding: streams.Sharding = streams.Sharding()) -> tf.data.Dataset:
  """Fixed evaluation episodes ``0..num_episodes-1`` (episode i depends on seed and i only),
  batched by ``spec.meta_batch_size`` with a boolean ``valid`` mask on the padded tail."""
  _validate(data, spec)
  return streams.evaluation_stream(_episode_fn(data, spec), seed=seed,
                                   num_episodes=num_episodes, batch_size=spec.meta_batch_size,
                                   stream=f"eval:{data.split}", sharding=sharding,
                                   finalize=_to_float)
