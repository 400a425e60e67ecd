"""The built-in ResNet-12 (trainer/models.py, grouped-convolution layout): its layout and size,
and its second-order meta-gradient against finite differences."""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import tensorflow as tf

from test_maml import as_tensors, classification_batch, directional_fd
from trainer import maml, models

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
