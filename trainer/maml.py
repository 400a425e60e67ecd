"""MAML's inner and outer computations as pure functions of tensors.

Nothing here touches variables, so the same functions run eagerly (the tests' reference),
inside ``tf.function`` and under ``jit_compile``, per replica of any ``tf.distribute`` strategy.

The inner loop adapts all tasks at once: parameters are tiled to ``[B, ...]`` and the sum of the
tasks' support losses is differentiated, which yields each task's own gradient because task
``b``'s loss depends only on copy ``b``. Second order comes from recording that gradient
computation on the outer tape; ``first_order`` stops it.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from trainer import models


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  inner_steps: int = 1
  inner_lr: float = 0.4
  first_order: bool = False
  learn_inner_lr: bool = False  # Meta-SGD: one meta-learned rate per parameter entry
  loss: str = "softmax"  # "softmax" (classification) or "mse" (regression)


def task_losses(cfg: models.ModelConfig, meta: MetaConfig, params: dict, x: tf.Tensor,
                y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Per-task mean loss ``[B]`` and per-task metric ``[B]`` (accuracy, or MSE for regression)."""
  out = models.apply(cfg, params, x)
  if meta.loss == "mse":
    mse = tf.reduce_mean(tf.square(out - y), axis=[1, 2])
    return mse, mse
  losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
  correct = tf.cast(tf.equal(tf.argmax(out, axis=-1, output_type=y.dtype), y), tf.float32)
  return tf.reduce_mean(losses, axis=1), tf.reduce_mean(correct, axis=1)


def tile(params: dict, tasks: int) -> dict:
  return {k: tf.tile(v[None], [tasks] + [1] * v.shape.rank) for k, v in params.items()}


def inner_update(cfg, meta, fast: dict, lrs: dict, x, y):
  """One adaptation step of every task; returns (new fast params, support loss, metric)."""
  with tf.GradientTape() as tape:
    tape.watch(list(fast.values()))
    losses, metric = task_losses(cfg, meta, fast, x, y)
    total = tf.reduce_sum(losses)
  grads = tape.gradient(total, fast)
  if meta.first_order:
    grads = {k: tf.stop_gradient(g) for k, g in grads.items()}
  new = {k: fast[k] - lrs[k][None] * grads[k] for k in fast}
  return new, losses, metric


def learning_rates(meta: MetaConfig, params: dict, lrs: dict | None) -> dict:
  if meta.learn_inner_lr:
    return lrs
  return {k: tf.constant(meta.inner_lr, v.dtype) for k, v in params.items()}


def meta_loss(cfg, meta, params: dict, lrs: dict | None, batch: dict, global_batch: int):
  """This replica's share of the meta-objective: sum of its tasks' query losses / global B.

  ``batch`` holds ``support_x [B, n, ...]``, ``support_y``, ``query_x``, ``query_y``. Returns the
  scalar and metric sums (divide by ``global_batch`` after summing over replicas).
  """
  tasks = batch["support_x"].shape[0]
  rates = learning_rates(meta, params, lrs)
  fast = tile(params, tasks)
  support_loss = support_metric = None
  for _ in range(meta.inner_steps):
    fast, losses, metric = inner_update(cfg, meta, fast, rates, batch["support_x"],
                                        batch["support_y"])
    if support_loss is None:
      support_loss, support_metric = losses, metric  # before adaptation, for free
  query_loss, query_metric = task_losses(cfg, meta, fast, batch["query_x"], batch["query_y"])
  objective = tf.reduce_sum(query_loss) / global_batch
  sums = {"support_loss_pre": tf.reduce_sum(support_loss),
          "support_metric_pre": tf.reduce_sum(support_metric),
          "query_loss_post": tf.reduce_sum(query_loss),
          "query_metric_post": tf.reduce_sum(query_metric)}
  return objective, sums


def meta_gradients(cfg, meta, params: dict, lrs: dict | None, batch: dict, global_batch: int):
  """Gradients of :func:`meta_loss` w.r.t. params (and rates when learned), plus metric sums."""
  watched = dict(params)
  if meta.learn_inner_lr:
    watched.update({f"lr/{k}": v for k, v in lrs.items()})
  with tf.GradientTape() as tape:
    tape.watch(list(watched.values()))
    p = {k: watched[k] for k in params}
    r = {k: watched[f"lr/{k}"] for k in params} if meta.learn_inner_lr else None
    objective, sums = meta_loss(cfg, meta, p, r, batch, global_batch)
  grads = tape.gradient(objective, watched)
  return grads, sums


def evaluate(cfg, meta, params: dict, lrs: dict | None, batch: dict, steps: int):
  """Query loss and metric of each task after 0..steps adaptation steps: two ``[steps+1, B]``."""
  tasks = batch["support_x"].shape[0]
  rates = learning_rates(meta, params, lrs)
  fast = tile(params, tasks)
  no_grad_meta = dataclasses.replace(meta, first_order=True)
  losses, metrics = [], []
  for step in range(steps + 1):
    loss, metric = task_losses(cfg, meta, fast, batch["query_x"], batch["query_y"])
    losses.append(loss)
    metrics.append(metric)
    if step < steps:
      fast, _, _ = inner_update(cfg, no_grad_meta, fast, rates, batch["support_x"],
                                batch["support_y"])
  return tf.stack(losses), tf.stack(metrics)
