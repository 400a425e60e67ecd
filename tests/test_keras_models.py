"""A user's Keras model run on explicit weights with a task axis (trainer/keras_models.py):
conv4 written in Keras gives the built-in conv4's logits and second-order meta-gradient for the
same weights; models that cannot be meta-trained are refused in one line."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import tensorflow as tf

from pipeline.errors import UsageError
from test_maml import classification_batch
from trainer import keras_models, models

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
""")


@pytest.fixture()
def user_file(tmp_path):
  path = tmp_path / "user_nets.py"
  path.write_text(CONV4_KERAS)
  return path


def builtin_names(i: int, kind: str) -> str:
  return {"kernel": f"conv{i}/kernel", "gamma": f"conv{i}/scale", "beta": f"conv{i}/offset"}[kind]


def as_keras(backbone, params: dict) -> dict:
  """The built-in conv4's weights under the Keras model's names."""
  out = {}
  for name in backbone.names:
    layer, kind = name.split("/")
    if layer == "head":
      out[name] = params[f"out/{kind}"]
    else:
      out[name] = params[builtin_names(int(layer[-1]), kind)]
  return out


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
  assert params["head/kernel"].shape == (8, 5) and np.abs(params["head/kernel"]).max() > 0


@pytest.mark.parametrize("spec, message", [
    ("{file}:wrong_width", "outputs (2, 4) for 2 images of (28, 28, 1); expected (2, 3) logits"),
    ("{file}:not_a_model", "returned str, not a keras.Model"),
    ("{file}:missing", "has no function missing"),
    ("no_such_module_here:make", "cannot import no_such_module_here"),
    ("{file}", "expected PATH_OR_MODULE:FUNCTION"),
    ("{dir}/absent.py:make", "no file"),
])
def test_a_model_that_cannot_be_meta_trained_is_refused_in_one_line(user_file, spec, message):
  spec = spec.format(file=user_file, dir=user_file.parent)
  with pytest.raises(UsageError) as error:
    keras_models.build(spec, (28, 28, 1), 3)
  assert message in str(error.value) and "\n" not in str(error.value)
  assert str(error.value).startswith(f"--model=keras:{spec}: ")
