"""Fidelity options and MAML++ / ANIL: each changes what it should and nothing else."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import tensorflow as tf

from helpers import TWO_CPUS, mirrored_over_two_cpus
from numerics import assert_close_f32
from test_maml import (as_tensors, classification_batch, directional_fd, reference_meta_gradient,
                       regression_batch)
from trainer import maml, models, optim
from trainer.family import TrainData


def grads_close(a, b, keys, rtol=1e-9, atol=1e-12):
  for k in keys:
    np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=rtol, atol=atol, err_msg=k)


def mlp(norm="batch_norm", **kwargs):
  return models.ModelConfig("mlp", (1,), 1, hidden_sizes=(12, 12), norm=norm, **kwargs)


# --- the original code's settings --------------------------------------------------------------


def test_original_reduction_is_n_times_the_inner_rate_and_scales_the_meta_loss():
  cfg = models.ModelConfig("conv4", (12, 12, 1), 3, num_filters=4)
  params = as_tensors(models.init_params(cfg, 0), tf.float32)
  batch = classification_batch(cfg, tasks=2, n_way=3, k=2, q=4)
  original = maml.MetaConfig(inner_steps=2, inner_lr=0.1, loss_reduction="original")
  mean = maml.MetaConfig(inner_steps=2, inner_lr=0.1 * 3)  # N x the rate, on the mean loss
  g_orig, s_orig = maml.meta_gradients(cfg, original, params, None, batch, global_batch=2)
  g_mean, s_mean = maml.meta_gradients(cfg, mean, params, None, batch, global_batch=2)
  query_factor = 3 * 4 / 2  # N*Q query examples, each loss divided by K
  for k in params:
    scale = float(tf.reduce_max(tf.abs(g_mean[k]))) + 1e-8
    np.testing.assert_allclose(g_orig[k] / scale, g_mean[k] * query_factor / scale, atol=2e-5,
                               err_msg=k)
  assert float(s_orig["query_loss_post"]) == pytest.approx(float(s_mean["query_loss_post"]),
                                                           rel=1e-5)  # logs stay means


def test_original_reduction_leaves_regression_a_mean():
  cfg = mlp("none")
  params = as_tensors(models.init_params(cfg, 1), tf.float64)
  batch = regression_batch()
  a, _ = maml.meta_gradients(cfg, maml.MetaConfig(1, 0.05, loss="mse"), params, None, batch, 3)
  b, _ = maml.meta_gradients(cfg, maml.MetaConfig(1, 0.05, loss="mse", loss_reduction="original"),
                             params, None, batch, 3)
  grads_close(a, b, params)


def test_offset_only_norm_equals_a_unit_scale_and_has_no_scale_parameter():
  with_scale = models.ModelConfig("conv4", (12, 12, 1), 3, num_filters=4)
  offset_only = dataclasses.replace(with_scale, norm_scale=False)
  p = models.init_params(with_scale, 0)
  q = models.init_params(offset_only, 0)
  assert not [k for k in q if k.endswith("/scale")] and len(p) - len(q) == 4
  x = tf.constant(np.random.default_rng(0).uniform(size=(2, 6, 12, 12, 1)), tf.float32)
  np.testing.assert_allclose(models.apply(with_scale, maml.tile(as_tensors(p), 2), x),
                             models.apply(offset_only, maml.tile(as_tensors(q), 2), x), rtol=1e-6)


def test_normal_head_initialisation_is_unit_variance():
  cfg = models.ModelConfig("conv4", (28, 28, 1), 20, num_filters=64, head_init="normal")
  kernel = models.init_params(cfg, 0)["out/kernel"]
  assert kernel.shape == (64, 20) and abs(kernel.std() - 1.0) < 0.05
  glorot = models.init_params(dataclasses.replace(cfg, head_init="glorot"), 0)["out/kernel"]
  assert glorot.std() < 0.2


@pytest.mark.parametrize("adapt,changed", [
    ("all", {"dense0/kernel", "dense0/scale", "dense0/offset", "out/kernel"}),
    ("no_norm", {"dense0/kernel", "out/kernel"}),
    ("head", {"out/kernel", "out/bias"})])
def test_inner_loop_adapts_exactly_the_chosen_parameters(adapt, changed):
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(8,))
  meta = maml.MetaConfig(1, 0.1, loss="mse", inner_adapt=adapt)
  params = as_tensors(models.init_params(cfg, 0), tf.float64)
  params["dense0/scale"] += 0.3  # away from the symmetric point, so every gradient is non-zero
  batch = regression_batch(tasks=2)
  fast = maml.tile(params, 2)
  new, _, _ = maml.inner_update(cfg, meta, fast, maml.step_rates(meta, params, None, 0),
                                batch["support_x"], batch["support_y"], first_order=True)
  moved = {k for k in params if not np.array_equal(new[k].numpy(), fast[k].numpy())}
  assert changed <= moved and moved <= changed | {"dense0/offset", "out/bias"}
  if adapt != "all":
    assert not moved & {"dense0/scale", "dense0/offset"}
  if adapt == "head":
    assert moved == {"out/kernel", "out/bias"}


# --- MAML++ --------------------------------------------------------------------------------------


def test_per_step_rates_all_equal_reproduce_plain_maml():
  cfg = mlp()
  plain = maml.MetaConfig(3, 0.05, loss="mse")
  lslr = dataclasses.replace(plain, per_step_inner_lr=True)
  params = as_tensors(models.init_params(cfg, 2), tf.float64)
  shapes = maml.learned_rate_shapes(lslr, params)
  assert set(shapes) == set(params) and all(s == (3,) for s in shapes.values())
  lrs = {k: tf.fill(s, tf.constant(0.05, tf.float64)) for k, s in shapes.items()}
  batch = regression_batch()
  g_plain, _ = maml.meta_gradients(cfg, plain, params, None, batch, 3)
  g_lslr, _ = maml.meta_gradients(cfg, lslr, params, lrs, batch, 3)
  grads_close(g_plain, g_lslr, params)
  assert all(float(tf.reduce_sum(tf.abs(g_lslr[f"lr/{k}"]))) > 0 for k in params)


def test_per_step_rates_and_multi_step_loss_equal_an_independent_reference():
  """LSLR rates that differ by layer and step, and MSL weights mid-anneal, against the eager
  per-task reference of test_maml (plain convolutions, unfused batch norm, written from the
  papers): the weights' and the rates' meta-gradients."""
  cfg = models.ModelConfig("conv4", (20, 20, 1), 3, num_filters=8, downsample="maxpool",
                           features="flatten")
  meta = maml.MetaConfig(3, 0.1, per_step_inner_lr=True, msl_iterations=10)
  params = as_tensors(models.init_params(cfg, 5))
  rng = np.random.default_rng(1)
  lrs = {k: tf.constant(rng.uniform(0.02, 0.2, s), tf.float32)
         for k, s in maml.learned_rate_shapes(meta, params).items()}
  batch = classification_batch(cfg, tasks=3)
  iteration = tf.constant(4, tf.int64)
  weights = maml.msl_weights(meta, iteration).numpy()
  assert 0 < weights[0] < weights[-1] < 1  # mid-anneal: every step's loss counts
  grads, _ = tf.function(lambda: maml.meta_gradients(cfg, meta, params, lrs, batch, 3,
                                                     iteration=iteration))()
  expected = reference_meta_gradient(cfg, params, batch, 3, lrs, step_weights=weights)
  assert set(grads) == set(expected) and any(k.startswith("lr/") for k in expected)
  for k in expected:  # the tolerance of test_compiled_batched_step_equals_eager_per_task_reference
    scale = float(tf.reduce_max(tf.abs(expected[k]))) + 1e-6
    np.testing.assert_allclose(grads[k].numpy() / scale, expected[k].numpy() / scale, atol=2e-4,
                               err_msg=k)


def test_per_step_rates_use_their_own_step():
  cfg = mlp("none")
  meta = maml.MetaConfig(2, 0.05, loss="mse", per_step_inner_lr=True)
  params = as_tensors(models.init_params(cfg, 3), tf.float64)
  batch = regression_batch()
  lrs = {k: tf.constant([0.05, 0.0], tf.float64) for k in params}  # second step does nothing
  one_step = dataclasses.replace(meta, inner_steps=1, per_step_inner_lr=False)
  a, _ = maml.meta_loss(cfg, meta, params, lrs, batch, 3)
  b, _ = maml.meta_loss(cfg, one_step, params, None, batch, 3)
  assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_multi_step_loss_weights_anneal_from_uniform_to_the_last_step():
  meta = maml.MetaConfig(inner_steps=5, msl_iterations=100)
  w0 = maml.msl_weights(meta, 0).numpy()
  np.testing.assert_allclose(w0, np.full(5, 0.2), rtol=1e-6)
  mid = maml.msl_weights(meta, 50).numpy()
  assert mid[:4].max() < 0.2 and mid[4] > 0.2 and mid.sum() == pytest.approx(1.0)
  end = maml.msl_weights(meta, 99).numpy()
  assert end[:4].min() >= 0.03 / 5 - 1e-7 and end.sum() == pytest.approx(1.0)
  np.testing.assert_array_equal(maml.msl_weights(meta, 100).numpy(), [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(maml.msl_weights(dataclasses.replace(meta, msl_iterations=0), 0),
                                [0, 0, 0, 0, 1])


def test_multi_step_loss_with_all_weight_on_the_last_step_is_plain_maml():
  cfg = mlp()
  meta = maml.MetaConfig(3, 0.05, loss="mse")
  params = as_tensors(models.init_params(cfg, 4), tf.float64)
  batch = regression_batch()
  plain, _ = maml.meta_loss(cfg, meta, params, None, batch, 3)
  last = tf.constant([0.0, 0.0, 1.0], tf.float64)
  weighted, _ = maml.meta_loss(cfg, meta, params, None, batch, 3, step_weights=last)
  assert float(weighted) == pytest.approx(float(plain), rel=1e-12)
  first = tf.constant([1.0, 0.0, 0.0], tf.float64)
  one_step, _ = maml.meta_loss(cfg, dataclasses.replace(meta, inner_steps=1), params, None,
                               batch, 3)
  assert float(maml.meta_loss(cfg, meta, params, None, batch, 3, step_weights=first)[0]) == \
      pytest.approx(float(one_step), rel=1e-12)


def test_per_step_norm_parameters_all_equal_reproduce_shared_ones():
  shared = mlp()
  per_step = dataclasses.replace(shared, param_slots=3)
  meta = maml.MetaConfig(2, 0.05, loss="mse", inner_adapt="no_norm")
  p_shared = as_tensors(models.init_params(shared, 5), tf.float64)
  p_shared = {k: v + 0.1 if models.is_norm_param(k) else v for k, v in p_shared.items()}
  p_step = {k: tf.tile(v[None], [3, 1]) if models.is_norm_param(k) else v
            for k, v in p_shared.items()}
  batch = regression_batch()
  a, _ = maml.meta_gradients(shared, meta, p_shared, None, batch, 3)
  b, _ = maml.meta_gradients(per_step, meta, p_step, None, batch, 3)
  for k in p_shared:
    expected = a[k].numpy()
    got = b[k].numpy().sum(axis=0) if models.is_norm_param(k) else b[k].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12, err_msg=k)
  # Slot s gets gradient only through forward passes after s updates: all three are used.
  assert all(np.abs(b["dense0/offset"].numpy()[s]).sum() > 0 for s in range(3))


@pytest.mark.numerics
def test_per_step_statistics_used_at_step_s_are_step_s_s():
  cfg = models.ModelConfig("conv4", (12, 12, 1), 3, num_filters=4, stat_slots=3)
  meta = maml.MetaConfig(2, 0.1)
  params = as_tensors(models.init_params(cfg, 6))
  batch = classification_batch(cfg, tasks=2, k=1, q=2)
  rng = np.random.default_rng(0)
  stats = {k: tf.constant(rng.uniform(0.5, 1.5, v.shape) if k.endswith("variance")
                         else rng.uniform(-0.1, 0.1, v.shape), tf.float32)
           for k, v in models.init_stats(cfg).items()}
  losses, _ = maml.evaluate(cfg, meta, params, None, batch, steps=2, stats=stats)
  for s in range(3):
    only_s = {k: tf.tile(v[s:s + 1], [3, 1]) for k, v in stats.items()}
    other = {k: tf.tile(v[(s + 1) % 3:(s + 1) % 3 + 1], [3, 1]) for k, v in stats.items()}
    ls, _ = maml.evaluate(cfg, meta, params, None, batch, steps=s, stats=only_s)
    lo, _ = maml.evaluate(cfg, meta, params, None, batch, steps=s, stats=other)
    if s == 0:  # no adaptation yet: the query pass is normalised with slot 0 alone
      np.testing.assert_allclose(losses[0], ls[0], rtol=1e-5)
    assert not np.allclose(losses[s], lo[s], rtol=1e-4)
  # Each prediction is per example: the same query image gives the same output in any batch.
  x = batch["query_x"]
  full = models.apply(cfg, maml.tile(params, 2), x, models.ForwardContext(stats=stats))
  alone = models.apply(cfg, maml.tile(params, 2), x[:, :1], models.ForwardContext(stats=stats))
  # oneDNN may pick another kernel for another batch size (another summation order): the
  # tolerance is float32's for 4 layers of 3x3x4-term sums (tests/numerics.py).
  assert_close_f32(full[:, :1], alone, reduction_length=36, stages=4)


@pytest.mark.numerics
def test_running_statistics_equal_to_the_batch_s_reproduce_batch_normalisation():
  cfg = models.ModelConfig("conv4", (12, 12, 1), 3, num_filters=4, stat_slots=1)
  params = maml.tile(as_tensors(models.init_params(cfg, 7)), 1)
  x = tf.constant(np.random.default_rng(1).uniform(size=(1, 6, 12, 12, 1)), tf.float32)
  ctx = models.ForwardContext(moments={})
  batch_out = models.apply(cfg, params, x, ctx)
  assert set(ctx.moments) == {f"conv{i}/{s}" for i in range(4) for s in ("mean", "variance")}
  # The first layer's moments, computed independently; the recorded variance is
  # Bessel-corrected, as running averages want.
  h = tf.nn.conv2d(tf.reshape(x, [6, 12, 12, 1]), params["conv0/kernel"][0], 2, "SAME")
  sizes = [6 * 6 * 6, 6 * 3 * 3, 6 * 2 * 2, 6 * 1 * 1]  # examples x positions, per layer
  # Two reductions of the same 216 terms in their own orders (tests/numerics.py); a wrong
  # axis or a missing Bessel factor is off by O(1e-3) relative or more.
  assert_close_f32(ctx.moments["conv0/mean"], tf.reduce_mean(h, [0, 1, 2]), reduction_length=216)
  assert_close_f32(ctx.moments["conv0/variance"] * (sizes[0] - 1) / sizes[0],
                   tf.math.reduce_variance(h, [0, 1, 2]), reduction_length=216, stages=2)
  # Every layer's own batch moments fed back as running statistics give batch norm's output.
  exact = {}
  for i, size in enumerate(sizes):
    exact[f"conv{i}/mean"] = ctx.moments[f"conv{i}/mean"][None]
    exact[f"conv{i}/variance"] = ctx.moments[f"conv{i}/variance"][None] * (size - 1) / size
  out = models.apply(cfg, params, x, models.ForwardContext(stats=exact))
  np.testing.assert_allclose(out, batch_out, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("options", [
    dict(per_step_inner_lr=True, inner_adapt="no_norm"),
    dict(per_step_inner_lr=True, msl=True, param_slots=4),
    dict(loss_reduction="original", inner_adapt="head", msl=True)])
def test_second_order_gradients_of_the_new_paths_match_finite_differences(options):
  options = dict(options)
  msl = options.pop("msl", False)
  slots = options.pop("param_slots", 0)
  cfg = models.ModelConfig("mlp", (2,), 3, hidden_sizes=(8, 8), norm="batch_norm",
                           param_slots=slots)
  meta = maml.MetaConfig(inner_steps=3, inner_lr=0.3, **options)
  params = as_tensors(models.init_params(cfg, 8), tf.float64)
  rng = np.random.default_rng(1)
  params = {k: v + tf.constant(rng.normal(0, 0.1, v.shape), tf.float64) for k, v in params.items()}
  shapes = maml.learned_rate_shapes(meta, params)
  lrs = {k: tf.constant(rng.uniform(0.1, 0.5, s), tf.float64) for k, s in shapes.items()} or None
  batch = {"support_x": tf.constant(rng.normal(size=(2, 6, 2)), tf.float64),
           "support_y": tf.constant(np.tile([0, 1, 2, 0, 1, 2], (2, 1)), tf.int32),
           "query_x": tf.constant(rng.normal(size=(2, 9, 2)), tf.float64),
           "query_y": tf.constant(np.tile(np.arange(9) % 3, (2, 1)), tf.int32)}
  weights = tf.constant([0.2, 0.3, 0.5], tf.float64) if msl else None

  def objective(point):
    p = {k: point[k] for k in params}
    r = {k: point[f"lr/{k}"] for k in shapes} if lrs else None
    return maml.meta_loss(cfg, meta, p, r, batch, 2, step_weights=weights)[0]

  point = dict(params, **{f"lr/{k}": v for k, v in (lrs or {}).items()})
  with tf.GradientTape() as tape:
    tape.watch(point)
    value = objective(point)
  grads = tape.gradient(value, point)
  for _ in range(2):
    direction = {k: tf.constant(rng.normal(size=v.shape), tf.float64) for k, v in point.items()}
    analytic = sum(float(tf.reduce_sum(grads[k] * direction[k])) for k in point
                   if grads[k] is not None)
    assert analytic == pytest.approx(directional_fd(objective, point, direction, eps=1e-6),
                                     rel=1e-5, abs=1e-9)


def test_meta_gradients_with_msl_follow_the_iteration():
  cfg = mlp()
  meta = maml.MetaConfig(2, 0.05, loss="mse", msl_iterations=10)
  params = as_tensors(models.init_params(cfg, 9), tf.float64)
  batch = regression_batch()
  late, _ = maml.meta_gradients(cfg, meta, params, None, batch, 3, iteration=tf.constant(10))
  plain, _ = maml.meta_gradients(cfg, dataclasses.replace(meta, msl_iterations=0), params, None,
                                 batch, 3)
  grads_close(late, plain, params, rtol=1e-6)
  early, _ = maml.meta_gradients(cfg, meta, params, None, batch, 3, iteration=tf.constant(0))
  assert any(not np.allclose(early[k], plain[k]) for k in params)


def test_cosine_meta_learning_rate_runs_from_base_to_minimum():
  cfg = optim.AdamConfig(1e-3, schedule="cosine", min_learning_rate=1e-5, decay_steps=100)
  assert float(cfg.rate(0)) == pytest.approx(1e-3)
  assert float(cfg.rate(50)) == pytest.approx((1e-3 + 1e-5) / 2)
  assert float(cfg.rate(100)) == pytest.approx(1e-5)
  assert float(cfg.rate(1000)) == pytest.approx(1e-5)
  assert float(optim.AdamConfig(1e-3).rate(50)) == pytest.approx(1e-3)


# --- through the learner and the trainer ---------------------------------------------------------

# Graph mode (not the MLP's XLA default on CPU): this pins exact resumption, and XLA's compiles
# made up a third of each run's time.
MAMLPP_SINUSOID = ["--dataset=sinusoid", "--model=mlp", "--norm=batch_norm", "--k_shot=5",
                   "--k_query=5", "--meta_batch_size=4", "--inner_lr=0.01", "--inner_steps=2",
                   "--eval_inner_steps=3", "--per_step_inner_lr", "--per_step_bn_params",
                   "--bn_running_stats=per_step", "--inner_adapt=no_norm", "--msl_iterations=4",
                   "--first_order_iterations=2", "--log_every=1", "--eval_every=0",
                   "--val_episodes=8", "--eval_episodes=8", "--steps_per_loop=1",
                   "--deterministic", "--mode=train", "--jit_compile=false"]


@pytest.mark.slow
def test_resume_across_the_derivative_order_switch_is_exact(tmp_path):
  from helpers import trainer
  straight = trainer(*MAMLPP_SINUSOID, "--num_iterations=6", f"--model_dir={tmp_path / 'a'}")
  assert straight.returncode == 0, straight.stderr[-2000:]
  first = trainer(*MAMLPP_SINUSOID, "--num_iterations=1", f"--model_dir={tmp_path / 'b'}")
  assert first.returncode == 0, first.stderr[-2000:]
  second = trainer(*MAMLPP_SINUSOID, "--num_iterations=6", f"--model_dir={tmp_path / 'b'}")
  assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-2000:]
  a = tf.train.load_checkpoint(str(tmp_path / "a" / "ckpt"))
  b = tf.train.load_checkpoint(str(tmp_path / "b" / "ckpt"))
  names = [k for k in a.get_variable_to_shape_map() if k.split("/")[0] in
           ("params", "inner_lrs", "stats")]
  assert any(k.startswith("stats/") for k in names) and any(k.startswith("inner_lrs/")
                                                            for k in names)
  for k in names:
    np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)
  means = [k for k in names if k.startswith("stats/") and "mean" in k]
  assert means and all(np.abs(a.get_tensor(k)).max() > 0 for k in means)  # tracked, not initial


def _learner(meta, cfg, strategy=None, batch=4):
  from trainer import learner
  strategy = strategy or tf.distribute.OneDeviceStrategy("/cpu:0")
  return learner.MetaLearner(strategy, cfg, meta, optim.AdamConfig(1e-2), seed=0,
                             meta_batch_size=batch, eval_inner_steps=2, jit_compile=False)


def test_derivative_order_annealing_switches_at_the_given_iteration():
  from pipeline import streams
  from trainer import tasks
  task = tasks.SinusoidRegression(5, 5, 5, 4, 4, seed=0)
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(16,), norm="batch_norm")
  base = maml.MetaConfig(2, 0.05, loss="mse")
  runs = {}
  for name, meta in {"fo": dataclasses.replace(base, first_order=True), "so": base,
                     "doa": dataclasses.replace(base, first_order_iterations=1)}.items():
    l = _learner(meta, cfg)
    it = TrainData(batches=iter(task.train_dataset(streams.Sharding(), 0)))
    l.train_loop(it, tf.constant(1))
    one = {k: v.numpy() for k, v in l.params.items()}
    l.train_loop(it, tf.constant(1))
    runs[name] = one, {k: v.numpy() for k, v in l.params.items()}
  # Step 1 of the annealed run is first order. The two learners trace different graphs (the
  # annealed one holds both orders), which grappler may fuse otherwise, so they agree to
  # float32 rounding (tests/numerics.py: 16-wide sums, 2 inner steps, one Adam step), not bit
  # for bit (seen to differ under a loaded machine); second order differs by O(1e-2) or more.
  for k in runs["fo"][0]:
    assert_close_f32(runs["doa"][0][k], runs["fo"][0][k], reduction_length=16, stages=3,
                     err_msg=k)
  assert any(not np.allclose(runs["doa"][1][k], runs["fo"][1][k], rtol=1e-6, atol=1e-8)
             for k in runs["fo"][1])
  assert any(not np.allclose(runs["doa"][0][k], runs["so"][0][k], rtol=1e-6, atol=1e-8)
             for k in runs["so"][0])


@pytest.mark.numerics
@pytest.mark.slow
def test_mamlpp_step_under_mirrored_equals_one_device():
  from pipeline import streams
  from trainer import learner, tasks
  task = tasks.SinusoidRegression(5, 5, 5, 8, 8, seed=0)
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(16, 16), param_slots=3, stat_slots=3)
  meta = maml.MetaConfig(2, 0.05, loss="mse", per_step_inner_lr=True, msl_iterations=5,
                         inner_adapt="no_norm", first_order_iterations=1)

  def run(strategy):
    # Adam's epsilon 1: see test_mirrored_over_two_devices_equals_one_device.
    l = learner.MetaLearner(strategy, cfg, meta, optim.AdamConfig(1e-2, epsilon=1.0,
                            schedule="cosine", decay_steps=10), seed=0, meta_batch_size=8,
                            eval_inner_steps=2, jit_compile=False, eval_running_stats=True)
    ds = strategy.distribute_datasets_from_function(
        lambda ctx: task.train_dataset(streams.Sharding.from_input_context(ctx), 0))
    l.train_loop(TrainData(batches=iter(ds)), tf.constant(3))
    state = dict(l.params, **{"lr/" + k: v for k, v in l.inner_lrs.items()},
                 **{"stats/" + k: v for k, v in l.stats.items()})
    ev = strategy.distribute_datasets_from_function(
        lambda ctx: task.eval_dataset("val", 16, streams.Sharding.from_input_context(ctx)))
    return {k: v.numpy() for k, v in state.items()}, l.evaluate(ev)[0]

  p1, e1 = run(tf.distribute.OneDeviceStrategy(TWO_CPUS[0]))
  p2, e2 = run(mirrored_over_two_cpus())
  # The replicas' sums run in another order (tests/numerics.py): sums of up to 16 terms (the
  # hidden width), through 3 meta-steps of 3 forward and backward passes each.
  close = functools.partial(assert_close_f32, reduction_length=16, stages=3 * 3 * 2)
  for k in p1:
    close(p2[k], p1[k], err_msg=k)
  close(e2, e1, err_msg="losses")
  assert np.abs(p1["stats/dense0/mean"]).max() > 0


def test_anil_features_computed_once_give_the_same_meta_gradient(monkeypatch):
  cfg = models.ModelConfig("conv4", (12, 12, 1), 3, num_filters=4, norm_scale=False)
  meta = maml.MetaConfig(3, 0.2, inner_adapt="head", loss_reduction="original")
  assert maml.body_is_fixed(cfg, meta)
  params = as_tensors(models.init_params(cfg, 10))  # float32: fused batch norm
  batch = classification_batch(cfg, tasks=2, k=2, q=2)
  cached, _ = maml.meta_gradients(cfg, meta, params, None, batch, 2)
  cached_eval = maml.evaluate(cfg, meta, params, None, batch, steps=4)
  monkeypatch.setattr(maml, "body_is_fixed", lambda *_: False)  # the generic path
  generic, _ = maml.meta_gradients(cfg, meta, params, None, batch, 2)
  grads_close(cached, generic, params, rtol=1e-4, atol=1e-6)
  for a, b in zip(cached_eval, maml.evaluate(cfg, meta, params, None, batch, steps=4)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert float(tf.reduce_sum(tf.abs(cached["conv0/kernel"]))) > 0  # the body is meta-learned


# --- UNICORN-MAML's shared head ------------------------------------------------------------------


def shared_head_setup(**meta_options):
  cfg = models.ModelConfig("conv4", (12, 12, 1), 3, num_filters=4, shared_head=True)
  params = as_tensors(models.init_params(cfg, 0), tf.float64)
  meta = maml.MetaConfig(inner_steps=2, inner_lr=0.3, **meta_options)
  return cfg, params, meta, classification_batch(cfg, tasks=2, dtype=tf.float64)


@pytest.mark.parametrize("options", [{}, {"inner_adapt": "head"}, {"learn_inner_lr": True}],
                         ids=["maml", "anil", "meta_sgd"])
def test_a_shared_head_is_an_ordinary_head_with_every_column_the_shared_vector(options):
  cfg, params, meta, batch = shared_head_setup(**options)
  assert params["out/kernel"].shape == (4, 1) and params["out/bias"].shape == (1,)
  full_cfg = dataclasses.replace(cfg, shared_head=False)
  full = dict(params, **models.expand_head(cfg, params))
  assert full["out/kernel"].shape == (4, 3)
  lrs = full_lrs = None
  if meta.learn_inner_lr:
    lrs = {k: tf.constant(np.full(s, 0.3), tf.float64)
           for k, s in maml.learned_rate_shapes(meta, params).items()}
    full_lrs = dict(lrs, **models.expand_head(cfg, {"out/kernel": lrs["out/kernel"],
                                                    "out/bias": lrs["out/bias"]}))
  g_shared, s_shared = maml.meta_gradients(cfg, meta, params, lrs, batch, global_batch=2)
  g_full, s_full = maml.meta_gradients(full_cfg, meta, full, full_lrs, batch, global_batch=2)
  for k in s_full:
    np.testing.assert_allclose(float(s_shared[k]), float(s_full[k]), rtol=1e-12, err_msg=k)
  # The chain rule through the copy: the shared vector's gradient (and its Meta-SGD rates') is
  # the sum of the columns'.
  assert sorted(g_shared) == sorted(g_full) and len(g_shared) > len(params) * bool(lrs)
  for k in g_shared:
    expected = g_full[k]
    if k.startswith(("out/", "lr/out/")):
      expected = tf.reshape(tf.reduce_sum(expected, axis=-1), g_shared[k].shape)
    np.testing.assert_allclose(g_shared[k].numpy(), expected.numpy(), rtol=1e-9, atol=1e-12,
                               err_msg=k)


def permute_labels(batch: dict, order: list[int]) -> dict:
  relabel = tf.constant(order, tf.int32)
  return dict(batch, support_y=tf.gather(relabel, batch["support_y"]),
              query_y=tf.gather(relabel, batch["query_y"]))


def test_a_shared_head_makes_the_result_independent_of_the_label_order():
  cfg, params, meta, batch = shared_head_setup()
  shuffled = permute_labels(batch, [2, 0, 1])
  grads = lambda c, p, b: maml.meta_gradients(c, meta, p, None, b, global_batch=2)
  (g, s), (g_perm, s_perm) = grads(cfg, params, batch), grads(cfg, params, shuffled)
  for k in s:
    np.testing.assert_allclose(float(s_perm[k]), float(s[k]), rtol=1e-10, err_msg=k)
  for k in params:
    np.testing.assert_allclose(g_perm[k].numpy(), g[k].numpy(), rtol=1e-8, atol=1e-12, err_msg=k)
  losses, _ = maml.evaluate(cfg, meta, params, None, shuffled, steps=3)
  np.testing.assert_allclose(losses.numpy(), maml.evaluate(cfg, meta, params, None, batch,
                                                           steps=3)[0].numpy(), rtol=1e-10)
  # An ordinary head is not: the same check fails without the shared vector.
  plain = dataclasses.replace(cfg, shared_head=False)
  plain_params = as_tensors(models.init_params(plain, 0), tf.float64)
  loss = lambda b: float(grads(plain, plain_params, b)[1]["query_loss_post"])
  assert abs(loss(batch) - loss(shuffled)) > 1e-6
