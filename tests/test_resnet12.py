"""The built-in ResNet-12 (trainer/models.py, grouped-convolution layout): its layout and size,
its second-order meta-gradient against finite differences, and against the same network written
as a Keras model and run through the Keras path (trainer/keras_models.py): each an independent
reference for the other."""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from test_keras_models import one_step_meta_gradient
from test_maml import as_tensors, classification_batch, directional_fd
from trainer import keras_models, maml, models

TINY = (3, 4, 4, 5)  # block widths small enough for float64 finite differences


def tiny_cfg(norm="batch_norm", **kwargs):
  return models.ModelConfig("resnet12", (16, 16, 2), 3, widths=TINY, norm=norm, **kwargs)


def test_resnet12_has_the_published_layout_and_size():
  cfg = models.ModelConfig("resnet12", (84, 84, 3), 5)
  params = models.init_params(cfg, 0)
  kernels = [k for k in params if k.endswith("/kernel")]
  assert len(kernels) == 4 * 4 + 1  # 3 convs + shortcut per block, and the head
  assert params["block3/conv2/kernel"].shape == (3, 3, 640, 640)
  assert params["block0/shortcut/kernel"].shape == (1, 1, 3, 64)
  assert params["out/kernel"].shape == (640, 5)
  # MetaOptNet's ResNet-12 (no DropBlock weights): 12.4M parameters with batch-norm affines.
  assert sum(v.size for v in params.values()) == 12_427_525
  x = tf.random.uniform([2, 3, 84, 84, 3], seed=1)
  tiled = {k: tf.constant(np.stack([v] * 2)) for k, v in params.items()}
  assert models.features(cfg, tiled, x).shape == (2, 3, 640)  # 84 -> 42 -> 21 -> 10 -> 5, mean


@pytest.mark.parametrize("norm,steps", [("batch_norm", 1), ("batch_norm", 2), ("none", 2)])
def test_resnet12_second_order_meta_gradient_matches_finite_differences(norm, steps):
  cfg = tiny_cfg(norm)
  meta = maml.MetaConfig(inner_steps=steps, inner_lr=0.1)
  params = as_tensors(models.init_params(cfg, 3), tf.float64)
  batch = classification_batch(cfg, tasks=2, dtype=tf.float64)
  grads, _ = maml.meta_gradients(cfg, meta, params, None, batch, global_batch=2)
  objective = lambda p: maml.meta_loss(cfg, meta, p, None, batch, 2)[0]
  first_order = maml.meta_gradients(cfg, dataclasses.replace(meta, first_order=True), params,
                                    None, batch, global_batch=2)[0]
  rng = np.random.default_rng(0)
  for _ in range(3):
    direction = {k: tf.constant(rng.normal(size=v.shape), tf.float64) for k, v in params.items()}
    dot = lambda g: sum(float(tf.reduce_sum(g[k] * direction[k])) for k in params)
    # A small step: at 1e-7 some directions already cross a leaky-ReLU or max-pool kink.
    numeric = directional_fd(objective, params, direction, eps=2e-8)
    assert dot(grads) == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    # The second-order term is not negligible here, so the check could fail without it.
    assert abs(dot(first_order) - numeric) > 1e-3 * abs(numeric)


RESNET12_KERAS = textwrap.dedent("""
    import keras
    from trainer import models

    def resnet12(input_shape, n_way, widths=(3, 4, 4, 5), dtype="float64"):
      # TADAM / MetaOptNet's ResNet-12 as Keras layers, in float64 so that the two paths can be
      # compared far below float32's rounding.
      def conv_norm(x, name, size):
        x = keras.layers.Conv2D(width, size, padding="same", use_bias=False, dtype=dtype,
                                name=f"block{i}_{name}")(x)
        return keras.layers.BatchNormalization(epsilon=models.EPSILON, dtype=dtype,
                                               name=f"block{i}_{name}_norm")(x)
      leaky = lambda: keras.layers.LeakyReLU(negative_slope=models.LEAKY_SLOPE, dtype=dtype)
      inputs = keras.Input(input_shape, dtype=dtype)
      h = inputs
      for i, width in enumerate(widths):
        y = h
        for j in range(3):
          y = conv_norm(y, f"conv{j}", 3)
          y = leaky()(y) if j < 2 else y
        y = leaky()(keras.layers.Add(dtype=dtype)([y, conv_norm(h, "shortcut", 1)]))
        h = keras.layers.MaxPooling2D(2, 2, padding="valid", dtype=dtype)(y)
      h = keras.layers.GlobalAveragePooling2D(dtype=dtype)(h)
      return keras.Model(inputs, keras.layers.Dense(n_way, name="head", dtype=dtype)(h))
""")


def builtin_names(backbone) -> dict:
  """Keras ResNet-12's positional names -> the built-in's, read off the Keras layer names
  (``block{i}_{conv}``, ``block{i}_{conv}_norm``, ``head``)."""
  names = {}
  for name, v in zip(backbone.names, backbone.model.trainable_variables):
    layer, weight = v.path.split("/")
    if layer == "head":
      names[name] = f"out/{weight}"
    else:
      block, conv = layer.split("_")[:2]
      names[name] = f"{block}/{conv}/" + {"gamma": "scale", "beta": "offset"}.get(weight, weight)
  return names


@pytest.mark.slow
def test_resnet12_in_keras_gives_the_builtin_logits_and_meta_gradient(tmp_path):
  path = tmp_path / "keras_resnet12.py"
  path.write_text(RESNET12_KERAS)
  cfg = tiny_cfg()
  backbone = keras_models.build(f"{path}:resnet12", cfg.input_shape, cfg.num_outputs)
  names = builtin_names(backbone)
  builtin_params = models.init_params(cfg, 3)
  assert sorted(names.values()) == sorted(builtin_params)  # the same network, weight by weight
  tasks = 2
  scale = tf.constant([1.0, 0.9], tf.float64)  # per-task weights that differ, as after steps
  builtin = {k: tf.constant(np.stack([v] * tasks), tf.float64)
                * tf.reshape(scale, [tasks] + [1] * v.ndim) for k, v in builtin_params.items()}
  keras_params = {k: builtin[b] for k, b in names.items()}
  batch = classification_batch(cfg, tasks=tasks, dtype=tf.float64)
  expected = models.apply(cfg, builtin, batch["query_x"])
  got = tf.function(backbone.apply)(keras_params, batch["query_x"])
  np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)
  g_builtin = one_step_meta_gradient(lambda p, x: models.apply(cfg, p, x), builtin, batch)
  g_keras = one_step_meta_gradient(backbone.apply, keras_params, batch)
  for name, b in names.items():
    size = float(tf.reduce_max(tf.abs(g_builtin[b])))
    assert size > 1e-3, b  # every weight receives a meta-gradient
    # float64 through both (grouped vs per-task convolutions, two batch norms): far below the
    # size of a missing second-order term (half the gradient in conv4's first layer).
    np.testing.assert_allclose(g_keras[name].numpy() / size, g_builtin[b].numpy() / size,
                               atol=1e-9, err_msg=b)
