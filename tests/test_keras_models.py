"""A user's Keras model run on explicit weights with a task axis (trainer/keras_models.py):
conv4 written in Keras gives the built-in conv4's logits and second-order meta-gradient for the
same weights; models that cannot be meta-trained are refused in one line."""

from __future__ import annotations

import dataclasses
import functools
import runpy
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from helpers import TWO_CPUS, error_line, mirrored_over_two_cpus, trainer
from numerics import assert_close_f32
from pipeline.errors import UsageError
from test_maml import classification_batch
from trainer import keras_maml, keras_models, learner, maml, models, optim

CONV4_KERAS = textwrap.dedent("""
    import keras
    from trainer import models

    def conv4(input_shape, n_way):
      # The paper's conv4 (trainer.models, downsample=stride, features=mean) as Keras layers.
      inputs = keras.Input(input_shape)
      h = inputs
      for i in range(4):
        h = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False,
                                name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(epsilon=models.EPSILON, name=f"norm{i}")(h)
        h = keras.layers.ReLU()(h)
      h = keras.layers.GlobalAveragePooling2D()(h)
      return keras.Model(inputs, keras.layers.Dense(n_way, name="head")(h))

    def wrong_width(input_shape, n_way):
      inputs = keras.Input(input_shape)
      return keras.Model(inputs, keras.layers.Dense(n_way + 1)(keras.layers.Flatten()(inputs)))

    def not_a_model(input_shape, n_way):
      return "conv4"

    def with_dropout(input_shape, n_way):
      inputs = keras.Input(input_shape)
      h = keras.layers.Dropout(0.1, name="drop")(keras.layers.Flatten()(inputs))
      return keras.Model(inputs, keras.layers.Dense(n_way)(h))

    def with_frozen_layer(input_shape, n_way):
      inputs = keras.Input(input_shape)
      frozen = keras.layers.Dense(4, name="frozen", trainable=False)
      h = frozen(keras.layers.Flatten()(inputs))
      return keras.Model(inputs, keras.layers.Dense(n_way)(h))
""")


@pytest.fixture()
def user_file(tmp_path):
  path = tmp_path / "user_nets.py"
  path.write_text(CONV4_KERAS)
  return path


def builtin_name_of(backbone) -> dict:
  """Keras conv4's positional names -> the built-in conv4's (conv i is layer 2i, its batch norm
  2i + 1, the head out/)."""
  names = {}
  for name in backbone.names:
    layer, kind = name.split("/")
    names[name] = name if layer == "out" else f"conv{int(layer.split('_')[0]) // 2}/{kind}"
  return names


def as_keras(backbone, params: dict) -> dict:
  """The built-in conv4's weights (or gradients) under the Keras conv4's names."""
  return {k: params[b] for k, b in builtin_name_of(backbone).items()}


def one_step_meta_gradient(apply_fn, params, batch, lr=0.4):
  """Second-order MAML meta-gradient of one inner step, written here for both models."""
  loss = lambda p, x, y: tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(y, apply_fn(p, x)))
  with tf.GradientTape() as outer:
    outer.watch(params)
    with tf.GradientTape() as inner:
      inner.watch(params)
      support = loss(params, batch["support_x"], batch["support_y"])
    grads = inner.gradient(support, params)
    fast = {k: params[k] - lr * grads[k] for k in params}
    query = loss(fast, batch["query_x"], batch["query_y"])
  return outer.gradient(query, params)


def test_conv4_in_keras_equals_the_builtin_conv4(user_file):
  cfg = models.ModelConfig("conv4", (28, 28, 1), 3, num_filters=8)
  backbone = keras_models.build(f"{user_file}:conv4", cfg.input_shape, 3)
  assert len(backbone.names) == 4 * 3 + 2
  tasks = 2
  builtin = {k: tf.constant(np.stack([v] * tasks)) for k, v in models.init_params(cfg, 0).items()}
  # Per-task weights that differ, as after inner steps.
  builtin = {k: v * tf.reshape(tf.constant([1.0, 0.9]), [tasks] + [1] * (v.shape.rank - 1))
             for k, v in builtin.items()}
  keras_params = as_keras(backbone, builtin)
  batch = classification_batch(cfg, tasks=tasks)
  expected = models.apply(cfg, builtin, batch["query_x"])
  got = tf.function(backbone.apply)(keras_params, batch["query_x"])
  assert got.shape == (tasks, 9, 3)
  np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
  g_builtin = one_step_meta_gradient(lambda p, x: models.apply(cfg, p, x), builtin, batch)
  g_keras = one_step_meta_gradient(backbone.apply, keras_params, batch)
  for name, g in as_keras(backbone, g_builtin).items():
    scale = float(tf.reduce_max(tf.abs(g))) + 1e-6
    assert scale > 1e-5, name  # every weight receives a meta-gradient
    # Two implementations (grouped vs per-task convolutions, fused vs Keras batch norm): the
    # tolerance of test_maml's independent per-task reference.
    np.testing.assert_allclose(g_keras[name].numpy() / scale, g.numpy() / scale, atol=2e-4,
                               err_msg=name)


def test_initial_weights_are_the_models_own(user_file):
  backbone = keras_models.build(f"{user_file}:conv4", (28, 28, 1), 5)
  params = backbone.init_params()
  assert list(params) == list(backbone.names)
  assert params["out/kernel"].shape == (8, 5) and np.abs(params["out/kernel"]).max() > 0
  assert list(params)[:3] == ["00_conv2d/kernel", "01_batch_normalization/scale",
                              "01_batch_normalization/offset"]


def test_weight_names_and_initial_values_do_not_depend_on_earlier_builds(user_file):
  """Keras numbers automatic layer names by the layers built before; checkpoints need names
  that are the same in every process, and initial weights that depend on the seed alone."""
  spec = f"{user_file}:conv4"
  first = keras_models.init_params(spec, (28, 28, 1), 5, seed=3)
  keras_models.build(spec, (28, 28, 1), 5)  # more layers built in this process
  again = keras_models.init_params(spec, (28, 28, 1), 5, seed=3)
  other = keras_models.init_params(spec, (28, 28, 1), 5, seed=4)
  assert list(first) == list(again)
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])
  assert not np.array_equal(first["00_conv2d/kernel"], other["00_conv2d/kernel"])


@pytest.mark.parametrize("options", [
    dict(inner_steps=2, inner_lr=0.3),
    dict(inner_steps=2, per_step_inner_lr=True, msl_iterations=10),
    dict(inner_steps=2, inner_adapt="head"),
    dict(inner_steps=1, inner_adapt="no_norm", learn_inner_lr=True),
], ids=["maml", "lslr_msl", "anil", "metasgd_no_norm"])
def test_the_learner_meta_trains_a_keras_model_as_the_builtin_one(user_file, options):
  """trainer.maml's meta-gradient for model kind keras (the Keras conv4) equals the one for the
  built-in conv4 with the same weights, rates and options: the learner treats both alike
  (ANIL's head is the layer named head; no_norm finds the batch norms' scale and offset)."""
  meta = maml.MetaConfig(**options)
  builtin_cfg = models.ModelConfig("conv4", (28, 28, 1), 3, num_filters=8)
  keras_cfg = models.ModelConfig("keras", (28, 28, 1), 3, keras=f"{user_file}:conv4")
  keras_init = models.init_params(keras_cfg, 0)
  backbone = keras_models.backbone(keras_cfg.keras, keras_cfg.input_shape, 3)
  builtin = {k: tf.constant(v) for k, v in models.init_params(builtin_cfg, 1).items()}
  params = as_keras(backbone, builtin)
  assert sorted(params) == sorted(keras_init)
  to_builtin = builtin_name_of(backbone)
  shapes = maml.learned_rate_shapes(meta, builtin)
  # Distinct rates per weight, the same weight's under both names.
  lrs_builtin = {k: tf.constant(np.full(shape, 0.3 + 0.05 * i, np.float32))
                 for i, (k, shape) in enumerate(sorted(shapes.items()))} or None
  lrs_keras = {k: lrs_builtin[to_builtin[k]] for k in params
               if to_builtin[k] in shapes} if lrs_builtin else None
  batch = classification_batch(builtin_cfg, tasks=2)
  grads = lambda cfg, p, lrs: maml.meta_gradients(cfg, meta, p, lrs, batch, 2,
                                                  iteration=tf.constant(3))[0]
  g_builtin = grads(builtin_cfg, builtin, lrs_builtin)
  g_keras = grads(keras_cfg, params, lrs_keras)
  assert sorted(g_keras) == sorted(list(params) + [f"lr/{k}" for k in lrs_keras or {}])
  for k in lrs_keras or {}:
    g_builtin[f"lr/{k}"] = g_builtin[f"lr/{to_builtin[k]}"]
  expected = dict(as_keras(backbone, g_builtin),
                  **{f"lr/{k}": g_builtin[f"lr/{k}"] for k in lrs_keras or {}})
  for name in expected:
    scale = float(tf.reduce_max(tf.abs(expected[name]))) + 1e-6
    assert scale > 1e-5, name
    np.testing.assert_allclose(g_keras[name].numpy() / scale, expected[name].numpy() / scale,
                               atol=2e-4, err_msg=name)


@pytest.mark.parametrize("spec, message", [
    ("{file}:wrong_width", "outputs (2, 4) for 2 images of (28, 28, 1); expected (2, 3) logits"),
    ("{file}:not_a_model", "returned str, not a keras.Model"),
    ("{file}:missing", "has no function missing"),
    ("no_such_module_here:make", "cannot import no_such_module_here"),
    ("{file}", "expected PATH_OR_MODULE:FUNCTION"),
    ("{dir}/absent.py:make", "no file"),
    ("{file}:with_dropout", "layer drop (Dropout) draws random numbers in training"),
    ("{file}:with_frozen_layer", "non-trainable weight frozen/kernel: frozen weights are not "
                                 "supported yet"),
])
def test_a_model_that_cannot_be_meta_trained_is_refused_in_one_line(user_file, spec, message):
  spec = spec.format(file=user_file, dir=user_file.parent)
  with pytest.raises(UsageError) as error:
    keras_models.build(spec, (28, 28, 1), 3)
  assert message in str(error.value) and "\n" not in str(error.value)
  assert str(error.value).startswith(f"--model=keras:{spec}: ")


def test_the_trainer_refuses_a_bad_keras_model_at_start_up_in_one_line(user_file, tmp_path,
                                                                       omniglot_records):
  result = trainer("--dataset=omniglot", f"--data_dir={omniglot_records}",
                   f"--model=keras:{user_file}:with_dropout", f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert error_line(result.stderr).endswith("layer drop (Dropout) draws random numbers in "
                                            "training, which the meta-step cannot replay per "
                                            "task (nor XLA compile); remove it")
  assert not (tmp_path / "run" / "ckpt").exists()
  result = trainer("--dataset=sinusoid", "--model=resnet", f"--model_dir={tmp_path / 'r2'}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "--model" in result.stderr and "keras:PATH_OR_MODULE:FUNCTION" in result.stderr


@pytest.mark.parametrize("first_order, adapt", [(False, "all"), (True, "all"), (False, "head")])
def test_the_python_api_takes_the_trainers_meta_gradient(user_file, first_order, adapt):
  """keras_maml.MAML(model) in a user's own tape gives trainer.maml's meta-gradient."""
  spec = f"{user_file}:conv4"
  cfg = models.ModelConfig("keras", (28, 28, 1), 3, keras=spec)
  params = {k: tf.constant(v) for k, v in models.init_params(cfg, 0).items()}
  model = keras_models.init_model(spec, (28, 28, 1), 3, seed=0)
  learner = keras_maml.MAML(model, inner_lr=0.3, first_order=first_order, adapt=adapt)
  batch = classification_batch(cfg, tasks=2)

  @tf.function  # a user's loop compiles its step (docs/examples/keras_maml.py); eager is 3x slower
  def api_gradient():
    with tf.GradientTape() as tape:
      fast = learner.adapt(batch["support_x"], batch["support_y"], steps=2)
      loss = learner.loss(fast, batch["query_x"], batch["query_y"])
    return tape.gradient(loss, model.trainable_variables)

  got = dict(zip(learner.backbone.names, api_gradient()))
  meta = maml.MetaConfig(inner_steps=2, inner_lr=0.3, first_order=first_order,
                         inner_adapt=adapt)
  expected, _ = tf.function(functools.partial(maml.meta_gradients, cfg, meta, global_batch=2))(
      params, None, batch)
  assert sorted(got) == sorted(expected)
  for name, g in expected.items():
    scale = float(tf.reduce_max(tf.abs(g))) + 1e-6
    assert scale > 1e-5, name
    np.testing.assert_allclose(got[name].numpy() / scale, g.numpy() / scale, atol=1e-4,
                               err_msg=name)


def test_the_python_example_meta_trains(capsys):
  runpy.run_path(str(Path(__file__).resolve().parents[1] / "docs/examples/keras_maml.py"))
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split(":")[0] for line in lines] == ["step 0", "step 1", "step 2"]
  losses = [float(line.rsplit(" ", 1)[1]) for line in lines]
  assert all(np.isfinite(losses)) and all(0.5 < x < 5 for x in losses)  # 5-way: about ln 5


@pytest.mark.numerics
def test_a_keras_model_meta_gradient_is_the_same_over_replicas_chunks_and_remat(user_file):
  """The learner's meta-gradient of a Keras model: two mirrored replicas, task chunks of 1 and
  recomputed inner steps give the all-tasks-on-one-device value (the same sums in other
  orders, within float32 rounding)."""
  cfg = models.ModelConfig("keras", (28, 28, 1), 3, keras=f"{user_file}:conv4")
  meta = maml.MetaConfig(inner_steps=2, inner_lr=0.3, per_step_inner_lr=True)
  batch = classification_batch(cfg, tasks=4)

  def meta_gradient(strategy, chunk, remat):
    l = learner.MetaLearner(strategy, cfg, dataclasses.replace(meta, remat=remat),
                            optim.AdamConfig(), seed=0, meta_batch_size=4, eval_inner_steps=1,
                            jit_compile=False, task_chunk=chunk)
    per = 4 // strategy.num_replicas_in_sync
    shares = strategy.experimental_distribute_values_from_function(
        lambda ctx: {k: v[ctx.replica_id_in_sync_group * per:][:per] for k, v in batch.items()})

    def replica(b):
      params, lrs = l._values()  # pylint: disable=protected-access
      out = l._meta_gradients((False, False), params, lrs,  # pylint: disable=protected-access
                              l._inputs(b, per), tf.constant(0, tf.int64))  # pylint: disable=protected-access
      return tf.distribute.get_replica_context().all_reduce("sum", out)

    grads, sums = strategy.experimental_local_results(
        tf.function(lambda b: strategy.run(replica, (b,)))(shares))[0]
    return {k: v.numpy() for k, v in {**grads, **sums}.items()}

  one = tf.distribute.OneDeviceStrategy(TWO_CPUS[0])
  expected = meta_gradient(one, 0, False)
  assert any(k.startswith("lr/") for k in expected)
  for strategy, chunk, remat in ((mirrored_over_two_cpus(), 0, False), (one, 1, False),
                                 (one, 0, True)):
    got = meta_gradient(strategy, chunk, remat)
    assert sorted(got) == sorted(expected)
    for k, value in expected.items():
      assert_close_f32(got[k], value, reduction_length=28 * 28 * 6, stages=3,
                       err_msg=f"{k} replicas={strategy.num_replicas_in_sync} chunk={chunk} "
                               f"remat={remat}")


@pytest.mark.parametrize("padding, stride", [("SAME", 1), ("VALID", 2)])
def test_per_task_convolutions_vectorize_as_one_grouped_convolution(padding, stride):
  """Under keras_models.grouped_task_convolutions, tf.vectorized_map converts a convolution with
  one filter per task (TensorFlow's own converter would fall back to a while loop, refused
  here by fallback_to_while_loop=False) and equals a Python loop over the tasks' ordinary
  convolutions, in value and in the second derivative MAML takes."""
  x = tf.random.stateless_normal([3, 4, 9, 9, 2], seed=[1, 2])
  w = tf.random.stateless_normal([3, 3, 3, 2, 5], seed=[3, 4])
  conv = lambda args: tf.nn.conv2d(args[0], args[1], stride, padding)
  loop = lambda: tf.stack([conv((x[i], w[i])) for i in range(3)])

  def grouped():
    with keras_models.grouped_task_convolutions():
      return tf.vectorized_map(conv, (x, w), fallback_to_while_loop=False)

  with pytest.raises(ValueError, match="loop invariant"):
    tf.vectorized_map(conv, (x, w), fallback_to_while_loop=False)

  def curvature(forward):  # d/dw |d/dw sum(sin(conv))|^2
    with tf.GradientTape() as outer:
      outer.watch(w)
      with tf.GradientTape() as inner:
        inner.watch(w)
        value = forward()
        total = tf.reduce_sum(tf.sin(value))
      g = inner.gradient(total, w)
      norm = tf.reduce_sum(g * g)
    return value, outer.gradient(norm, w)

  if not models.native_grouped_convolutions():
    pytest.skip("no differentiable grouped convolution in this TensorFlow (the while loop runs)")
  value, second = curvature(grouped)
  ref_value, ref_second = curvature(loop)
  np.testing.assert_allclose(value.numpy(), ref_value.numpy(), rtol=1e-5, atol=1e-5)
  scale = float(tf.reduce_max(tf.abs(ref_second)))
  np.testing.assert_allclose(second.numpy() / scale, ref_second.numpy() / scale, atol=1e-5)
