"""Deterministic streams of episode ids, shared by every task sampler.

Each episode is a pure function of ``(seed, stream, episode_id)``: samplers derive all their
randomness from :func:`episode_seed` with stateless ops. What differs between training and
evaluation is only which ids a stream visits:

* training, meta-batch ``step`` of global size ``B``: ids ``step*B .. step*B+B-1``. A run
  resumed at step ``s`` therefore sees exactly the episodes an uninterrupted run sees, and a
  replica ``r`` of ``R`` takes ids ``step*B + r*(B/R) ..`` so the replicas together see the
  single-device meta-batch.
* evaluation: ids ``0 .. num_episodes-1``, batched; the last batch is padded with further ids
  and marked ``valid=False`` so every batch keeps the same shape.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import tensorflow as tf

from pipeline.errors import UsageError

AUTOTUNE = tf.data.AUTOTUNE
# The stateless RNG of every sampler, named so that XLA draws the same numbers as the CPU/GPU
# kernels (its "auto_select" is ThreeFry, theirs Philox).
RNG = "philox"


@dataclasses.dataclass(frozen=True)
class Sharding:
  """Which replicas one input pipeline feeds, as ``tf.distribute.InputContext`` describes it.

  Pipeline ``p`` of ``P`` feeds replicas ``p*L .. p*L+L-1`` (``L = replicas_per_pipeline``);
  its batches come in replica order within each step, the order in which tf.distribute hands
  a pipeline's consecutive elements to its local replicas.
  """
  num_pipelines: int = 1
  pipeline_id: int = 0
  replicas_per_pipeline: int = 1

  @property
  def num_replicas(self) -> int:
    return self.num_pipelines * self.replicas_per_pipeline

  @classmethod
  def from_input_context(cls, ctx: tf.distribute.InputContext) -> "Sharding":
    return cls(ctx.num_input_pipelines, ctx.input_pipeline_id,
               ctx.num_replicas_in_sync // ctx.num_input_pipelines)

  def per_replica(self, global_batch: int) -> int:
    return check_divisible(global_batch, self.num_replicas) // self.num_replicas


def check_divisible(global_batch: int, replicas: int, name: str = "meta_batch_size") -> int:
  """A global batch of tasks must split evenly over the replicas (static shapes per replica)."""
  if global_batch % replicas:
    raise UsageError(f"{name}={global_batch} is not divisible by the {replicas} replicas in "
                    f"sync")
  return global_batch


def stream_seed(seed: int, stream: str) -> tf.Tensor:
  """A [2] int64 seed for a named stream ("train", "val", "test", ...) of a run seed."""
  return tf.constant([seed, zlib.crc32(stream.encode()) & 0x7FFFFFFF], tf.int64)


def uniform(shape, seed: tf.Tensor) -> tf.Tensor:
  """``tf.random.stateless_uniform(shape, seed, alg="philox")`` in [0, 1), bit for bit, also
  under XLA: XLA draws the same Philox bits as the CPU/GPU kernels but turns them into floats
  differently, so the kernel's conversion (23 random mantissa bits in [1, 2), minus 1) is
  applied here to the bits."""
  bits = tf.random.stateless_uniform(shape, seed=seed, alg=RNG, minval=None, maxval=None,
                                     dtype=tf.uint32)
  return tf.bitcast((bits & 0x7FFFFF) | 0x3F800000, tf.float32) - 1.0


def episode_seed(base: tf.Tensor, episode_id: tf.Tensor) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(base, tf.cast(episode_id, tf.int64), alg=RNG)


def _batched(ids: tf.data.Dataset, episode_fn: Callable, base: tf.Tensor, per_replica: int,
             finalize: Callable | None) -> tf.data.Dataset:
  ds = ids.map(lambda i: dict(episode_fn(episode_seed(base, i)), episode_id=i),
               num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(per_replica, drop_remainder=True)
  if finalize is not None:
    ds = ds.map(finalize, num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.prefetch(AUTOTUNE)


def _episode_ids(first_slot: int, stop_slot: int, global_batch: int,
                 sharding: Sharding) -> tuple[tf.data.Dataset, int]:
  """Episode ids for slots ``[first_slot, stop_slot)``; slot = step * L + local replica."""
  b = sharding.per_replica(global_batch)
  L = sharding.replicas_per_pipeline
  first_replica = sharding.pipeline_id * L

  def ids_of_slot(slot):
    start = (slot // L) * global_batch + (first_replica + slot % L) * b
    return tf.data.Dataset.range(start, start + b)

  return tf.data.Dataset.range(first_slot, stop_slot).flat_map(ids_of_slot), b


def training_ids(start_step: int, global_batch: int, sharding: Sharding = Sharding(),
                 num_steps: int | None = None) -> tuple[tf.data.Dataset, int]:
  """The ids of training steps ``start_step, ...`` this pipeline's replicas take, in order
  (``per_replica`` consecutive ids per replica and step), and ``per_replica``."""
  L = sharding.replicas_per_pipeline
  stop = tf.int64.max if num_steps is None else (start_step + num_steps) * L
  return _episode_ids(start_step * L, stop, global_batch, sharding)


def training_stream(episode_fn: Callable, *, seed: int, meta_batch_size: int,
                    start_step: int = 0, num_steps: int | None = None,
                    sharding: Sharding = Sharding(), finalize: Callable | None = None,
                    stream: str = "train") -> tf.data.Dataset:
  """Meta-batches for steps ``start_step, start_step+1, ...`` (forever if ``num_steps`` is None)."""
  ids, b = training_ids(start_step, meta_batch_size, sharding, num_steps)
  return _batched(ids, episode_fn, stream_seed(seed, stream), b, finalize)


def evaluation_stream(episode_fn: Callable, *, seed: int, num_episodes: int, batch_size: int,
                      stream: str, sharding: Sharding = Sharding(),
                      finalize: Callable | None = None) -> tf.data.Dataset:
  """Episodes ``0 .. num_episodes-1`` in fixed-shape batches, with a ``valid`` mask."""
  if num_episodes < 1:
    raise ValueError(f"num_episodes={num_episodes}: must be positive")
  num_batches = -(-num_episodes // batch_size)
  ids, b = _episode_ids(0, num_batches * sharding.replicas_per_pipeline, batch_size, sharding)

  def mark(batch):
    batch = finalize(batch) if finalize is not None else batch
    return dict(batch, valid=batch["episode_id"] < num_episodes)

  return _batched(ids, episode_fn, stream_seed(seed, stream), b, mark)
