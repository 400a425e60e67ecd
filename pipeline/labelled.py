"""Labelled mini-batches of one split, for supervised pretraining of a backbone (``--mode=pretrain``).

The same stateless design as the episode sampler (:mod:`pipeline.streams`): example slot ``g``
of the run (slot ``step * B + j`` of a global batch of ``B``) is image ``perm_e[g mod M]`` of
epoch ``e = g div M``, where ``perm_e`` is a permutation of the split's ``M`` images drawn from
``(seed, e)`` alone; its augmentation is drawn from ``(seed, g)``. So every image is seen once
per epoch, a run resumed at step ``s`` sees exactly the batches an uninterrupted run sees, and
replica ``r`` of ``R`` takes the slots ``step * B + r * B/R ..`` (the replicas together see the
one-device batch).

Augmentations (``augment="standard"``, as supervised few-shot pretraining uses them): a random
crop of the image zero-padded by 1/10.5 of its side (8 pixels at 84), a horizontal flip, and
colour jitter (brightness, contrast and, for colour images, saturation, each by a factor in
[0.6, 1.4]), clipped to [0, 1].
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline import streams
from pipeline.episodes import ClassIndexedImages
from pipeline.errors import DataError

AUGMENTS = ("standard", "none")
JITTER = 0.4  # colour-jitter strength: factors in [1 - JITTER, 1 + JITTER]


def class_of_image(data: ClassIndexedImages) -> np.ndarray:
  """The class index of every image of the split, ``int32 [M]`` (classes are ranges)."""
  total = int(data.images.shape[0])
  labels = np.full([total], -1, np.int32)
  for c, (offset, count) in enumerate(zip(data.offsets.numpy(), data.counts.numpy())):
    labels[offset:offset + count] = c
  if (labels < 0).any():
    raise DataError(f"split {data.split!r}: {int((labels < 0).sum())} images belong to no class")
  return labels


def permutation(base: tf.Tensor, epoch: tf.Tensor, size: int) -> tf.Tensor:
  """Epoch ``epoch``'s order of ``size`` images (a stable argsort of stateless uniforms)."""
  seed = streams.episode_seed(base, epoch)
  return tf.argsort(streams.uniform([size], seed), stable=True)


def augment(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """One ``float32 [H, W, C]`` image in [0, 1], augmented by draws of ``seed`` alone."""
  h, w, c = image.shape
  crop, flip, jitter = tf.unstack(tf.random.experimental.stateless_split(seed, 3, alg=streams.RNG))
  pad = max(1, round(h / 10.5))
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  image = tf.image.stateless_random_crop(padded, [h, w, c], seed=crop)
  image = tf.image.stateless_random_flip_left_right(image, seed=flip)
  factors = 1.0 - JITTER + 2.0 * JITTER * streams.uniform([3], jitter)
  image = image * factors[0]  # brightness
  mean = tf.reduce_mean(image, axis=[0, 1, 2], keepdims=True)
  image = (image - mean) * factors[1] + mean  # contrast
  if c == 3:
    image = tf.image.adjust_saturation(image, factors[2])
  return tf.clip_by_value(image, 0.0, 1.0)


def batches(data: ClassIndexedImages, *, batch_size: int, seed: int, augmentation: str,
            start_step: int = 0, num_steps: int | None = None,
            sharding: streams.Sharding = streams.Sharding()) -> tf.data.Dataset:
  """Step ``start_step + s``'s share of this pipeline's replicas: dicts of ``images
  float32 [b, H, W, C]`` in [0, 1], ``labels int32 [b]`` (the split's class indices),
  ``index [b]`` (the images' positions in the split) and ``slot int64 [b]``, where ``b = batch_size / replicas``."""
  if augmentation not in AUGMENTS:
    raise ValueError(f"augmentation={augmentation!r}: must be one of {AUGMENTS}")
  if not data.decoded:
    raise DataError("pretraining batches need the split's images decoded in memory")
  total = int(data.images.shape[0])
  if batch_size > total:
    raise DataError(f"--pretrain_batch_size={batch_size}: split {data.split!r} has only "
                    f"{total} images")
  labels = tf.constant(class_of_image(data))
  order_base = streams.stream_seed(seed, f"pretrain-order:{data.split}")
  augment_base = streams.stream_seed(seed, f"pretrain-augment:{data.split}")
  ids, per_replica = streams.training_ids(start_step, batch_size, sharding, num_steps)

  def pick(slots):
    # A replica's slots are consecutive and fewer than M: at most two epochs meet in them.
    epoch, position = slots // total, slots % total
    first = permutation(order_base, epoch[0], total)
    second = permutation(order_base, epoch[0] + 1, total)
    index = tf.where(epoch == epoch[0], tf.gather(first, position), tf.gather(second, position))
    images = tf.cast(tf.gather(data.images, index), tf.float32) * (1.0 / 255.0)
    if augmentation == "standard":
      images = tf.map_fn(lambda a: augment(a[0], streams.episode_seed(augment_base, a[1])),
                         (images, slots), fn_output_signature=tf.float32)
    return {"images": images, "labels": tf.gather(labels, index), "index": index,
            "slot": slots}

  ds = ids.batch(per_replica, drop_remainder=True)
  return ds.map(pick, num_parallel_calls=streams.AUTOTUNE, deterministic=True).prefetch(
      streams.AUTOTUNE)
