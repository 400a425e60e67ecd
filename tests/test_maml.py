"""The meta-gradient against finite differences and against an independent eager reference."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import tensorflow as tf

from numerics import assert_close_f32
from trainer import maml, models


def as_tensors(params, dtype=tf.float32):
  return {k: tf.constant(v, dtype) for k, v in params.items()}


def regression_batch(tasks=3, n=6, q=5, seed=0, dtype=tf.float64):
  rng = np.random.default_rng(seed)
  amp, phase = rng.uniform(0.5, 2, (tasks, 1, 1)), rng.uniform(0, 3, (tasks, 1, 1))
  xs, xq = rng.uniform(-3, 3, (tasks, n, 1)), rng.uniform(-3, 3, (tasks, q, 1))
  return {"support_x": tf.constant(xs, dtype), "support_y": tf.constant(amp * np.sin(xs - phase), dtype),
          "query_x": tf.constant(xq, dtype), "query_y": tf.constant(amp * np.sin(xq - phase), dtype)}


def classification_batch(cfg, tasks=2, n_way=3, k=2, q=3, seed=0, dtype=tf.float32):
  rng = np.random.default_rng(seed)
  shape = cfg.input_shape
  return {"support_x": tf.constant(rng.uniform(0, 1, (tasks, n_way * k) + shape), dtype),
          "support_y": tf.constant(np.tile(np.repeat(np.arange(n_way), k), (tasks, 1)), tf.int32),
          "query_x": tf.constant(rng.uniform(0, 1, (tasks, n_way * q) + shape), dtype),
          "query_y": tf.constant(np.tile(np.repeat(np.arange(n_way), q), (tasks, 1)), tf.int32)}


def directional_fd(fn, params, direction, eps=1e-7):
  plus = {k: params[k] + eps * direction[k] for k in params}
  minus = {k: params[k] - eps * direction[k] for k in params}
  return (float(fn(plus)) - float(fn(minus))) / (2 * eps)


@pytest.mark.parametrize("norm,steps", [("none", 1), ("none", 3), ("batch_norm", 2),
                                        ("layer_norm", 2)])
def test_second_order_meta_gradient_matches_finite_differences(norm, steps):
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(16, 16), norm=norm)
  meta = maml.MetaConfig(inner_steps=steps, inner_lr=0.05, loss="mse")
  params = as_tensors(models.init_params(cfg, 1), tf.float64)
  batch = regression_batch()
  grads, _ = maml.meta_gradients(cfg, meta, params, None, batch, global_batch=3)
  objective = lambda p: maml.meta_loss(cfg, meta, p, None, batch, 3)[0]
  rng = np.random.default_rng(0)
  for _ in range(3):
    direction = {k: tf.constant(rng.normal(size=v.shape), tf.float64) for k, v in params.items()}
    analytic = sum(float(tf.reduce_sum(grads[k] * direction[k])) for k in params)
    numeric = directional_fd(objective, params, direction)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_first_order_drops_exactly_the_second_order_term():
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(16,), norm="none")
  meta = maml.MetaConfig(inner_steps=1, inner_lr=0.05, loss="mse", first_order=True)
  params = as_tensors(models.init_params(cfg, 2), tf.float64)
  batch = regression_batch(tasks=2)
  grads, _ = maml.meta_gradients(cfg, meta, params, None, batch, global_batch=2)
  # Reference, task by task: adapt with a plain gradient step, then take the query gradient
  # with respect to the adapted weights; FO-MAML's meta-gradient is their mean.
  expected = {k: 0.0 for k in params}
  for b in range(2):
    one = {k: v[b:b + 1] for k, v in batch.items()}
    p1 = maml.tile(params, 1)
    with tf.GradientTape() as tape:
      tape.watch(p1)
      loss = tf.reduce_sum(maml.task_losses(cfg, meta, p1, one["support_x"], one["support_y"])[0])
    g = tape.gradient(loss, p1)
    adapted = {k: tf.constant((p1[k] - 0.05 * g[k]).numpy()) for k in p1}
    with tf.GradientTape() as tape:
      tape.watch(adapted)
      q = tf.reduce_sum(maml.task_losses(cfg, meta, adapted, one["query_x"], one["query_y"])[0])
    gq = tape.gradient(q, adapted)
    for k in params:
      expected[k] = expected[k] + gq[k][0].numpy() / 2
  for k in params:
    np.testing.assert_allclose(grads[k].numpy(), expected[k], rtol=1e-10, atol=1e-12)
  second, _ = maml.meta_gradients(cfg, dataclasses.replace(meta, first_order=False), params,
                                  None, batch, global_batch=2)
  assert any(not np.allclose(second[k], grads[k]) for k in params)


# --- an independent eager reference: per-task loop, plain convolutions, unfused batch norm ----


def reference_forward(cfg, p, x):
  """One task, weights without a task axis; written from the paper, not from trainer.models."""
  h = x
  for i in range(4):
    stride = 2 if cfg.downsample == "stride" else 1
    h = tf.nn.conv2d(h, p[f"conv{i}/kernel"], strides=stride, padding="SAME")
    mean = tf.reduce_mean(h, [0, 1, 2])
    var = tf.reduce_mean(tf.square(h - mean), [0, 1, 2])  # not tf.nn.moments: see models
    h = (h - mean) / tf.sqrt(var + models.EPSILON) * p[f"conv{i}/scale"] + p[f"conv{i}/offset"]
    h = tf.nn.relu(h)
    if cfg.downsample == "maxpool":
      h = tf.nn.max_pool2d(h, 2, 2, "VALID")
  h = tf.reduce_mean(h, [1, 2]) if cfg.features == "mean" else tf.reshape(h, [h.shape[0], -1])
  return h @ p["out/kernel"] + p["out/bias"]


def reference_meta_gradient(cfg, params, batch, steps, lr, first_order=False, step_weights=None):
  """The meta-gradient task by task. ``lr``: one rate, or per-step rates per parameter (MAML++'s
  LSLR: ``{name: [steps]}``, whose gradients are returned too as ``lr/<name>``);
  ``step_weights``: the query loss after each step weighted (MAML++'s MSL), else the last's."""
  tasks = batch["support_x"].shape[0]
  rates = lr if isinstance(lr, dict) else {}
  watched = {**params, **{f"lr/{k}": v for k, v in rates.items()}}
  weights = [0.0] * (steps - 1) + [1.0] if step_weights is None else list(step_weights)
  total = {k: tf.zeros_like(v) for k, v in watched.items()}
  for b in range(tasks):
    with tf.GradientTape() as outer:
      outer.watch(watched)
      fast = dict(params)
      query = 0.0
      for step in range(steps):
        with tf.GradientTape() as inner:
          inner.watch(fast)
          loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
              batch["support_y"][b], reference_forward(cfg, fast, batch["support_x"][b])))
        g = inner.gradient(loss, fast)
        if first_order:
          g = {k: tf.stop_gradient(v) for k, v in g.items()}
        fast = {k: fast[k] - (rates[k][step] if rates else lr) * g[k] for k in fast}
        if weights[step]:
          query += weights[step] * tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
              batch["query_y"][b], reference_forward(cfg, fast, batch["query_x"][b])))
    g = outer.gradient(query, watched)
    total = {k: total[k] + g[k] / tasks for k in watched}
  return total


@pytest.mark.parametrize("downsample,features,steps", [("stride", "mean", 1),
                                                       ("maxpool", "flatten", 2)])
def test_compiled_batched_step_equals_eager_per_task_reference(downsample, features, steps):
  side = 28 if downsample == "stride" else 20
  cfg = models.ModelConfig("conv4", (side, side, 2), 3, num_filters=8, downsample=downsample,
                           features=features)
  meta = maml.MetaConfig(inner_steps=steps, inner_lr=0.1)
  params = as_tensors(models.init_params(cfg, 3))
  batch = classification_batch(cfg, tasks=3)
  compiled = tf.function(functools.partial(maml.meta_gradients, cfg, meta, global_batch=3))
  grads, _ = compiled(params, None, batch)
  expected = reference_meta_gradient(cfg, params, batch, steps, 0.1)
  for k in params:
    scale = float(tf.reduce_max(tf.abs(expected[k]))) + 1e-6
    np.testing.assert_allclose(grads[k].numpy() / scale, expected[k].numpy() / scale, atol=2e-4,
                               err_msg=k)


def test_learned_inner_rates_receive_the_right_gradient():
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(8,), norm="none")
  meta = maml.MetaConfig(inner_steps=1, inner_lr=0.05, loss="mse", learn_inner_lr=True)
  params = as_tensors(models.init_params(cfg, 4), tf.float64)
  lrs = {k: tf.fill(v.shape, tf.constant(0.05, tf.float64)) for k, v in params.items()}
  batch = regression_batch(tasks=2)
  grads, _ = maml.meta_gradients(cfg, meta, params, lrs, batch, global_batch=2)
  assert set(grads) == set(params) | {f"lr/{k}" for k in params}
  assert all(float(tf.reduce_sum(tf.abs(grads[f"lr/{k}"]))) > 0 for k in params)
  objective = lambda r: maml.meta_loss(cfg, meta, params, r, batch, 2)[0]
  direction = {k: tf.ones_like(v) for k, v in lrs.items()}
  analytic = sum(float(tf.reduce_sum(grads[f"lr/{k}"])) for k in params)
  assert analytic == pytest.approx(directional_fd(objective, lrs, direction), rel=1e-6)


def test_evaluation_reports_every_step_starting_unadapted():
  cfg = models.ModelConfig("conv4", (28, 28, 1), 3, num_filters=8)
  meta = maml.MetaConfig(inner_steps=1, inner_lr=0.4)
  params = as_tensors(models.init_params(cfg, 5))
  batch = classification_batch(cfg, tasks=2, k=1, q=2)
  losses, metrics = maml.evaluate(cfg, meta, params, None, batch, steps=3)
  assert losses.shape == (4, 2) and metrics.shape == (4, 2)
  loss0, acc0 = maml.task_losses(cfg, meta, maml.tile(params, 2), batch["query_x"], batch["query_y"])
  np.testing.assert_allclose(losses[0], loss0, rtol=1e-6)
  np.testing.assert_allclose(metrics[0], acc0)


def test_evaluation_steps_lower_the_loss_of_the_examples_adapted_on():
  """Small gradient steps on the support set must lower each task's loss on that same set."""
  cfg = models.ModelConfig("conv4", (28, 28, 1), 3, num_filters=8)
  meta = maml.MetaConfig(inner_steps=1, inner_lr=0.05)
  params = as_tensors(models.init_params(cfg, 5))
  batch = classification_batch(cfg, tasks=2, k=2, q=2)
  batch = dict(batch, query_x=batch["support_x"], query_y=batch["support_y"])
  losses, _ = maml.evaluate(cfg, meta, params, None, batch, steps=3)
  losses = losses.numpy()
  assert np.all(np.diff(losses, axis=0) < 0), losses


def test_evaluation_measuring_some_steps_returns_exactly_those_rows_of_every_step():
  """--eval_measured_steps: the query is evaluated only at the chosen step counts, and the
  adaptation between them is the same, so those rows equal the full evaluation's."""
  cfg = models.ModelConfig("conv4", (28, 28, 1), 3, num_filters=8)
  meta = maml.MetaConfig(inner_steps=1, inner_lr=0.4)
  params = as_tensors(models.init_params(cfg, 5))
  batch = classification_batch(cfg, tasks=2, k=1, q=2)
  every_loss, every_metric = maml.evaluate(cfg, meta, params, None, batch, steps=4)
  losses, metrics = maml.evaluate(cfg, meta, params, None, batch, steps=4, measured=(0, 2, 4))
  assert losses.shape == (3, 2) and metrics.shape == (3, 2)
  np.testing.assert_allclose(losses, tf.gather(every_loss, [0, 2, 4]), rtol=1e-6)
  np.testing.assert_allclose(metrics, tf.gather(every_metric, [0, 2, 4]))
  assert not np.allclose(losses[0], losses[2])  # the rows are different steps' results


@pytest.mark.numerics
def test_conv4_meta_step_under_xla_equals_the_graph_step():
  """jit_compile=True is the GPU/TPU default: on tiny shapes its meta-gradient equals the
  graph step's (the CPU default)."""
  cfg = models.ModelConfig("conv4", (8, 8, 1), 2, num_filters=4)
  meta = maml.MetaConfig(inner_steps=2, inner_lr=0.1)
  params = as_tensors(models.init_params(cfg, 2))
  batch = classification_batch(cfg, tasks=2, n_way=2, k=1, q=2)
  step = functools.partial(maml.meta_gradients, cfg, meta, global_batch=2)
  graph, _ = tf.function(step)(params, None, batch)
  xla, _ = tf.function(step, jit_compile=True)(params, None, batch)
  for k in params:
    # float32 sums reordered by XLA: differences ~1e-5 measured; a wrong term is O(0.1).
    np.testing.assert_allclose(xla[k], graph[k], rtol=2e-3, atol=1e-4, err_msg=k)


def test_adam_with_clipping_matches_tensorflows_v1_adam_on_clipped_gradients():
  """The original code's meta-optimizer: tf.compat.v1.train.AdamOptimizer after
  tf.clip_by_value of each gradient (MiniImagenet's clip 10)."""
  from trainer import optim
  rng = np.random.default_rng(0)
  init = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
  ours = {k: tf.Variable(v) for k, v in init.items()}
  ref = {k: tf.Variable(v) for k, v in init.items()}
  adam = optim.Adam(optim.AdamConfig(learning_rate=0.01, clip_value=10.0), ours)
  reference = tf.compat.v1.train.AdamOptimizer(0.01, epsilon=1e-8)
  for _ in range(5):
    grads = {k: tf.constant(rng.normal(scale=20.0, size=v.shape), tf.float32) for k, v in init.items()}
    adam.apply(ours, grads)
    reference.apply_gradients([(tf.clip_by_value(grads[k], -10.0, 10.0), ref[k]) for k in ref])
  for k in init:
    np.testing.assert_allclose(ours[k].numpy(), ref[k].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours[k].numpy(), init[k])


def test_grouped_convolution_one_group_at_a_time_equals_the_grouped_kernel(monkeypatch):
  """The path taken where TensorFlow cannot differentiate grouped convolutions (oneDNN off):
  the same outputs, gradients and second-order gradients as the one grouped kernel."""
  if not models.native_grouped_convolutions():
    pytest.skip("this TensorFlow has no differentiable grouped convolution to compare with")
  x = tf.random.stateless_normal([5, 8, 8, 3 * 4], seed=[1, 2])
  kernel = tf.random.stateless_normal([3, 3, 4, 3 * 6], seed=[3, 4])

  def outputs(native):
    monkeypatch.setattr(models, "native_grouped_convolutions", lambda dtype: native)
    with tf.GradientTape() as outer:
      outer.watch(kernel)
      with tf.GradientTape() as inner:
        inner.watch([x, kernel])
        y = models.grouped_conv2d(x, kernel, groups=3, stride=2)
        loss = tf.reduce_sum(tf.sin(y))
      dx, dk = inner.gradient(loss, [x, kernel])
      curvature = tf.reduce_sum(dx ** 2) + tf.reduce_sum(dk ** 2)
    return y, dx, dk, outer.gradient(curvature, kernel)

  # Sums of 3*3*4 = 36 terms (forward), 5*4*4 = 80 (filter gradient), through 3 passes.
  for name, a, b in zip(("y", "dx", "dk", "d2k"), outputs(False), outputs(True)):
    assert_close_f32(a, b, reduction_length=80, stages=3, err_msg=name)
