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


def numpy_dropblock_mask(seeds: np.ndarray, size: int) -> np.ndarray:
  """The mask by enumeration: every seed at (i, j) zeroes rows i..i+size-1, cols j..j+size-1."""
  n, rows, cols, c = seeds.shape
  mask = np.ones([n, rows + size - 1, cols + size - 1, c])
  for e, i, j, k in zip(*np.nonzero(seeds)):
    mask[e, i:i + size, j:j + size, k] = 0.0
  return mask


def test_dropblock_zeros_exactly_the_squares_its_seeds_start():
  rng = np.random.default_rng(0)
  for size in (1, 3, 5):
    seeds = (rng.uniform(size=[2, 8 - size + 1, 7 - size + 1, 3]) < 0.05).astype(np.float32)
    got = models.dropblock_mask(tf.constant(seeds), size).numpy()
    np.testing.assert_array_equal(got, numpy_dropblock_mask(seeds, size), err_msg=f"{size}")


def test_dropblock_drops_its_expected_share_and_keeps_each_tasks_sum():
  """Kept share over many draws against its exact expectation: position (p, q) survives when
  none of the c(p, q) seed positions whose square covers it fires, (1 - gamma)^c. And the
  rescaling keeps the sum of each task's activations exactly (the tasks are channel groups)."""
  n, side, channels, groups, size, rate = 64, 10, 8, 2, 5, 0.1
  h = tf.ones([n, side, side, groups * channels])
  out = models.dropblock(h, rate, size, tf.constant([3, 4]), groups).numpy()
  gamma = models.dropblock_seeds_probability(rate, size, side, side)
  starts = side - size + 1
  cover = np.array([[min(p, starts - 1) - max(0, p - size + 1) + 1 for p in range(side)]])
  expected = float(np.mean((1 - gamma) ** (cover.T * cover)))  # rows x cols of seed positions
  kept = (out > 0).mean()
  # Draws of one channel are dependent within a map; 16 x 64 maps' shares are independent.
  share = (out > 0).reshape(n, side * side, -1).mean(axis=1)
  stderr = share.std() / np.sqrt(share.size)
  assert abs(kept - expected) < 5 * stderr and 0.85 < expected < 0.95
  for task in np.split(out, groups, axis=-1):
    assert task.sum() == pytest.approx(task.size, rel=1e-5)
  assert np.array_equal(out, models.dropblock(h, rate, size, tf.constant([3, 4]), groups).numpy())
  assert not np.array_equal(out, models.dropblock(h, rate, size, tf.constant([3, 5]),
                                                  groups).numpy())


def test_resnet12_noise_is_a_function_of_its_seed_off_at_rate_zero_and_compiles_for_xla():
  cfg = tiny_cfg()
  params = {k: tf.constant(v[None]) for k, v in models.init_params(cfg, 0).items()}
  x = tf.random.uniform([1, 6, 16, 16, 2], seed=2)
  plain = models.apply(cfg, params, x)
  at = lambda rate, seed: models.apply(cfg, params, x, models.ForwardContext(
      dropout=models.Dropout(tf.cast(rate, tf.float32), 2, tf.cast(seed, tf.int64))))
  np.testing.assert_allclose(at(0.0, [1, 2]).numpy(), plain.numpy(), rtol=1e-6, atol=1e-6)
  noisy = at(0.3, [1, 2]).numpy()
  assert np.abs(noisy - plain.numpy()).max() > 0.05
  np.testing.assert_array_equal(at(0.3, [1, 2]).numpy(), noisy)  # a function of the seed
  # Under XLA (as on TPU) it compiles, is off at rate 0 and a function of the seed too; XLA's
  # generator draws other numbers than TensorFlow's kernels from the same seed.
  compiled = tf.function(at, jit_compile=True)
  seed = tf.constant([1, 2], tf.int64)
  np.testing.assert_allclose(compiled(0.0, seed).numpy(), plain.numpy(), rtol=1e-3, atol=1e-3)
  np.testing.assert_array_equal(compiled(0.3, seed).numpy(), compiled(0.3, seed).numpy())
  assert np.abs(compiled(0.3, seed).numpy() - plain.numpy()).max() > 0.05
