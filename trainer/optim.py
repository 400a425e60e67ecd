"""Adam (meta-training) and SGD with momentum (pretraining) on explicit variables, applied in
replica context after the gradient all-reduce.

Written out rather than borrowed from Keras so that its state lives in plain variables with
``ONLY_FIRST_REPLICA`` aggregation: every replica holds the same reduced gradient, so the
update is identical everywhere and works the same under Mirrored, MultiWorker and TPU
strategies, inside a ``tf.function`` and next to an XLA-compiled gradient function.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

ONLY_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


@dataclasses.dataclass(frozen=True)
class AdamConfig:
  learning_rate: float = 1e-3
  beta1: float = 0.9
  beta2: float = 0.999
  epsilon: float = 1e-8  # tf.compat.v1.train.AdamOptimizer's, as the original MAML used
  clip_value: float = 0.0  # element-wise clipping of the meta-gradient to [-c, c]; 0 = off
  # "constant", or "cosine": MAML++'s annealing from learning_rate to min_learning_rate over
  # decay_steps iterations (per iteration here, per epoch of 500 there).
  schedule: str = "constant"
  min_learning_rate: float = 0.0
  decay_steps: int = 0

  def __post_init__(self):
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"schedule={self.schedule!r}: must be constant or cosine")
    if self.schedule == "cosine" and self.decay_steps < 1:
      raise ValueError("a cosine schedule needs decay_steps >= 1")

  def rate(self, iteration: tf.Tensor) -> tf.Tensor:
    """The learning rate of the update made at ``iteration`` (0-based)."""
    if self.schedule == "constant":
      return tf.constant(self.learning_rate, tf.float32)
    progress = tf.minimum(tf.cast(iteration, tf.float32) / self.decay_steps, 1.0)
    return self.min_learning_rate + 0.5 * (self.learning_rate - self.min_learning_rate) * (
        1.0 + tf.cos(math.pi * progress))


class Adam:
  def __init__(self, cfg: AdamConfig, variables: dict[str, tf.Variable]):
    self.cfg = cfg
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=ONLY_FIRST,
                                  name="adam/iterations")
    self.m = {k: tf.Variable(tf.zeros_like(v), trainable=False, aggregation=ONLY_FIRST,
                             name=f"adam/m/{k}") for k, v in variables.items()}
    self.v = {k: tf.Variable(tf.zeros_like(v), trainable=False, aggregation=ONLY_FIRST,
                             name=f"adam/v/{k}") for k, v in variables.items()}

  def apply(self, variables: dict[str, tf.Variable], grads: dict[str, tf.Tensor]) -> None:
    cfg = self.cfg
    t = tf.cast(self.iterations + 1, tf.float32)
    rate = cfg.rate(self.iterations) * tf.sqrt(1.0 - cfg.beta2 ** t) / (1.0 - cfg.beta1 ** t)
    for k, var in variables.items():
      g = grads[k]
      if cfg.clip_value > 0:
        g = tf.clip_by_value(g, -cfg.clip_value, cfg.clip_value)
      m = self.m[k].assign(cfg.beta1 * self.m[k] + (1.0 - cfg.beta1) * g)
      v = self.v[k].assign(cfg.beta2 * self.v[k] + (1.0 - cfg.beta2) * tf.square(g))
      var.assign_sub(rate * m / (tf.sqrt(v) + cfg.epsilon))
    self.iterations.assign_add(1)

  def state(self) -> dict:
    return {"iterations": self.iterations, "m": self.m, "v": self.v}


@dataclasses.dataclass(frozen=True)
class SGDConfig:
  """SGD with (Nesterov) momentum, L2 weight decay on kernels (PyTorch's
  ``SGD(weight_decay=...)`` convention: the gradient plus ``wd * w``) and a cosine schedule from
  ``learning_rate`` to 0 over ``decay_steps`` updates: supervised pretraining's optimiser."""
  learning_rate: float = 0.1
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 5e-4
  decay_steps: int = 1

  def __post_init__(self):
    if self.decay_steps < 1:
      raise ValueError("a cosine schedule needs decay_steps >= 1")

  def rate(self, iteration: tf.Tensor) -> tf.Tensor:
    progress = tf.minimum(tf.cast(iteration, tf.float32) / self.decay_steps, 1.0)
    return 0.5 * self.learning_rate * (1.0 + tf.cos(math.pi * progress))


def decays(name: str) -> bool:
  """Weight decay applies to kernels only (not to biases or norm scales and offsets)."""
  return name.endswith("/kernel")


class SGD:
  def __init__(self, cfg: SGDConfig, variables: dict[str, tf.Variable]):
    self.cfg = cfg
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=ONLY_FIRST,
                                  name="sgd/iterations")
    self.velocity = {k: tf.Variable(tf.zeros_like(v), trainable=False, aggregation=ONLY_FIRST,
                                    name=f"sgd/velocity/{k}") for k, v in variables.items()}

  def apply(self, variables: dict[str, tf.Variable], grads: dict[str, tf.Tensor]) -> None:
    cfg = self.cfg
    rate = cfg.rate(self.iterations)
    for k, var in variables.items():
      g = grads[k] + cfg.weight_decay * var if decays(k) else grads[k]
      v = self.velocity[k].assign(cfg.momentum * self.velocity[k] + g)
      var.assign_sub(tf.cast(rate, var.dtype) * (g + cfg.momentum * v if cfg.nesterov else v))
    self.iterations.assign_add(1)

  def state(self) -> dict:
    return {"iterations": self.iterations, "velocity": self.velocity}
