"""The sinusoid regression tasks of the MAML paper (section 5.1), as a graph-mode stream.

Task: y = A sin(x - phi) with A ~ U[0.1, 5], phi ~ U[0, pi], inputs x ~ U[-5, 5]. Batches
follow the image sampler's layout and determinism (see :mod:`pipeline.streams`), with
``inputs``/``targets`` in place of ``images``/``labels``.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from pipeline import streams
from pipeline.errors import DataError


@dataclasses.dataclass(frozen=True)
class SinusoidSpec:
  k_shot: int = 10
  k_query: int = 10
  meta_batch_size: int = 25
  amplitude: tuple[float, float] = (0.1, 5.0)
  phase: tuple[float, float] = (0.0, math.pi)
  x_range: tuple[float, float] = (-5.0, 5.0)

  def __post_init__(self):
    for name in ("k_shot", "k_query", "meta_batch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise DataError(f"{name}={value!r}: must be a positive integer")
    for name in ("amplitude", "phase", "x_range"):
      lo, hi = getattr(self, name)
      if not lo < hi:
        raise DataError(f"{name}={lo, hi}: the lower bound must be below the upper")


def _episode_fn(spec: SinusoidSpec):
  def episode(seed):
    s = tf.random.experimental.stateless_split(seed, 3)
    amplitude = tf.random.stateless_uniform([], s[0], *spec.amplitude)
    phase = tf.random.stateless_uniform([], s[1], *spec.phase)
    x = tf.random.stateless_uniform([spec.k_shot + spec.k_query, 1], s[2], *spec.x_range)
    y = amplitude * tf.sin(x - phase)
    return {"support_inputs": x[:spec.k_shot], "support_targets": y[:spec.k_shot],
            "query_inputs": x[spec.k_shot:], "query_targets": y[spec.k_shot:],
            "amplitude": amplitude, "phase": phase}
  return episode


def meta_batches(spec: SinusoidSpec, *, seed: int, start_step: int = 0,
                 num_steps: int | None = None,
                 sharding: streams.Sharding = streams.Sharding()) -> tf.data.Dataset:
  """Training batches: ``support_inputs/targets [b, K, 1]``, ``query_inputs/targets [b, Q, 1]``,
  ``amplitude``, ``phase`` and ``episode_id`` ``[b]``; batch ``s`` depends on (seed, step)."""
  return streams.training_stream(_episode_fn(spec), seed=seed,
                                 meta_batch_size=spec.meta_batch_size, start_step=start_step,
                                 num_steps=num_steps, sharding=sharding, stream="train:sinusoid")


def evaluation_batches(spec: SinusoidSpec, *, seed: int, num_episodes: int,
                       sharding: streams.Sharding = streams.Sharding(),
                       stream: str = "eval:sinusoid") -> tf.data.Dataset:
  """Fixed tasks ``0..num_episodes-1`` of ``stream`` (use one stream per split), masked tail."""
  return streams.evaluation_stream(_episode_fn(spec), seed=seed, num_episodes=num_episodes,
                                   batch_size=spec.meta_batch_size, stream=stream,
                                   sharding=sharding)
