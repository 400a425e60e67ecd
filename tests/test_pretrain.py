"""``--mode=pretrain`` (trainer/pretrain.py, pipeline/labelled.py, optim.SGD): the labelled
batches' epochs, resumption and sharding; the augmentation; the nearest-centroid rule and SGD
against independent NumPy; a pretraining run whose body ``--init_from`` then takes; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from helpers import error_line, trainer
from pipeline import episodes, labelled, streams
from trainer import models, optim, pretrain
from trainer import pretrain_config as pc
from test_init_from import weights


def _indices(ds, steps: int) -> list[np.ndarray]:
  return [b["index"].numpy() for b in ds.take(steps)]


def test_each_image_comes_once_per_epoch_and_a_resumed_stream_is_the_same(small_omniglot):
  data = episodes.load_split(small_omniglot, "train")
  total = int(data.images.shape[0])
  batch = 5  # does not divide the split: epochs meet inside a batch
  steps = -(-3 * total // batch)
  seen = np.concatenate(_indices(labelled.batches(data, batch_size=batch, seed=3,
                                                  augmentation="none"), steps))
  for epoch in range(3):
    np.testing.assert_array_equal(np.sort(seen[epoch * total:(epoch + 1) * total]),
                                  np.arange(total))
  assert not np.array_equal(seen[:total], seen[total:2 * total])  # reshuffled each epoch
  resumed = np.concatenate(_indices(labelled.batches(data, batch_size=batch, seed=3,
                                                     augmentation="none", start_step=4), 5))
  np.testing.assert_array_equal(resumed, seen[4 * batch:9 * batch])
  # Two replicas (two pipelines of one replica each): together the one-device batch.
  halves = [_indices(labelled.batches(data, batch_size=6, seed=3, augmentation="none",
                                      sharding=streams.Sharding(2, p, 1)), 4) for p in range(2)]
  whole = _indices(labelled.batches(data, batch_size=6, seed=3, augmentation="none"), 4)
  for step in range(4):
    np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]),
                                  whole[step])


def test_batches_hold_the_images_and_labels_of_their_indices(small_omniglot):
  data = episodes.load_split(small_omniglot, "train")
  labels = labelled.class_of_image(data)
  b = next(iter(labelled.batches(data, batch_size=8, seed=0, augmentation="none")))
  index = b["index"].numpy()
  np.testing.assert_array_equal(b["labels"].numpy(), labels[index])
  np.testing.assert_allclose(b["images"].numpy(), data.images.numpy()[index] / 255.0, atol=1e-7)
  for c, (offset, count) in enumerate(zip(data.offsets.numpy(), data.counts.numpy())):
    assert (labels[offset:offset + count] == c).all()


def test_augmentation_is_a_function_of_its_seed_and_stays_in_range():
  image = tf.random.stateless_uniform([84, 84, 3], seed=[1, 2])
  one, again = (labelled.augment(image, tf.constant([4, 5], tf.int64)) for _ in range(2))
  other = labelled.augment(image, tf.constant([4, 6], tf.int64))
  np.testing.assert_array_equal(one.numpy(), again.numpy())
  assert not np.allclose(one.numpy(), other.numpy())
  assert one.shape == (84, 84, 3) and 0.0 <= one.numpy().min() and one.numpy().max() <= 1.0
  gray = labelled.augment(image[:28, :28, :1], tf.constant([4, 5], tf.int64))
  assert gray.shape == (28, 28, 1)


def test_nearest_centroid_equals_numpy():
  rng = np.random.default_rng(0)
  b, n_way, k, q, d = 3, 4, 2, 3, 5
  support = rng.normal(size=[b, n_way * k, d])
  query = rng.normal(size=[b, n_way * q, d])
  support_y = np.tile(np.repeat(np.arange(n_way), k), [b, 1])
  query_y = rng.integers(0, n_way, [b, n_way * q])
  loss, accuracy = pretrain.nearest_centroid(
      tf.constant(support), tf.constant(support_y, tf.int32), tf.constant(query),
      tf.constant(query_y, tf.int32), n_way)
  for e in range(b):
    centroids = np.stack([support[e][support_y[e] == c].mean(0) for c in range(n_way)])
    distances = ((query[e][:, None, :] - centroids[None]) ** 2).sum(-1)
    logits = -distances
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    np.testing.assert_allclose(loss[e], -log_p[np.arange(len(query_y[e])), query_y[e]].mean(),
                               rtol=1e-10)
    np.testing.assert_allclose(accuracy[e], (distances.argmin(1) == query_y[e]).mean())


def test_sgd_is_nesterov_momentum_with_kernel_weight_decay_on_a_cosine():
  cfg = optim.SGDConfig(learning_rate=0.5, momentum=0.9, weight_decay=0.1, decay_steps=4)
  init = {"a/kernel": np.array([1.0, -2.0]), "a/bias": np.array([0.5])}
  variables = {k: tf.Variable(v) for k, v in init.items()}
  sgd = optim.SGD(cfg, variables)
  w = {k: v.copy() for k, v in init.items()}
  velocity = {k: np.zeros_like(v) for k, v in init.items()}
  for t in range(5):  # the 5th update comes after the schedule's end: rate 0
    grads = {k: np.cos(t + np.arange(v.size)) for k, v in w.items()}
    sgd.apply(variables, {k: tf.constant(g) for k, g in grads.items()})
    rate = 0.5 * 0.5 * (1 + np.cos(np.pi * min(t / 4, 1.0)))
    for k in w:
      g = grads[k] + (0.1 * w[k] if k.endswith("/kernel") else 0.0)
      velocity[k] = 0.9 * velocity[k] + g
      w[k] = w[k] - rate * (g + 0.9 * velocity[k])
    for k in w:
      # float64 weights, the schedule in float32 (as in training): 1e-6.
      np.testing.assert_allclose(variables[k].numpy(), w[k], rtol=1e-6, err_msg=f"{k} at {t}")


PRETRAIN = ("--dataset=omniglot", "--n_way=3", "--k_shot=1", "--k_query=1",
            "--meta_batch_size=2", "--num_filters=8", "--log_every=4", "--eval_every=4",
            "--val_episodes=6", "--eval_episodes=6", "--checkpoint_every=4")


@pytest.fixture(scope="module")
def pretrained(small_omniglot, tmp_path_factory) -> Path:
  model_dir = tmp_path_factory.mktemp("pretrain") / "run"
  result = trainer(*PRETRAIN, f"--data_dir={small_omniglot}", f"--model_dir={model_dir}",
                   "--mode=pretrain", "--num_iterations=12", "--pretrain_batch_size=8",
                   "--pretrain_lr=0.05")
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


@pytest.mark.slow
def test_a_pretraining_run_trains_validates_tests_and_resumes(pretrained, small_omniglot):
  lines = [json.loads(l) for l in (pretrained / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/loss" in l]
  val = [l for l in lines if "val/accuracy" in l]
  assert [l["step"] for l in train] == [4, 8, 12] and [l["step"] for l in val] == [4, 8, 12]
  assert train[-1]["train/loss"] < train[0]["train/loss"]  # 16 classes of 3 images: it learns
  assert train[-1]["train/learning_rate"] < train[0]["train/learning_rate"]  # the cosine
  report = json.loads((pretrained / "eval_test.json").read_text())
  assert report["classifier"].startswith("nearest centroid") and report["episodes"] == 6
  record = json.loads((pretrained / "config.json").read_text())
  assert record["pretrain"]["classes"] == 16 and record["model"]["num_outputs"] == 16
  assert "meta" not in record
  # The same command on the finished run re-tests it (nothing more is trained).
  before = weights(pretrained)
  again = trainer(*PRETRAIN, f"--data_dir={small_omniglot}", f"--model_dir={pretrained}",
                  "--mode=pretrain", "--num_iterations=12", "--pretrain_batch_size=8",
                  "--pretrain_lr=0.05")
  assert again.returncode == 0, again.stderr[-3000:]
  after = weights(pretrained)
  assert all(np.array_equal(before[k], after[k]) for k in before)
  retested = json.loads((pretrained / "eval_test.json").read_text())
  assert retested["by_inner_steps"] == report["by_inner_steps"]


@pytest.mark.slow
def test_meta_training_from_a_pretraining_run_takes_its_body_and_its_own_head(
    pretrained, small_omniglot, tmp_path):
  started = tmp_path / "meta"
  result = trainer(*PRETRAIN, f"--data_dir={small_omniglot}", f"--model_dir={started}",
                   "--mode=train", "--num_iterations=4", "--meta_lr=0",
                   f"--init_from={pretrained}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "initialised 12 body weights from" in result.stderr
  got, source = weights(started), weights(pretrained, "best")
  assert got["out/kernel"].shape == (8, 3) and source["out/kernel"].shape == (8, 16)
  for name in got:
    if not name.startswith("out/"):
      np.testing.assert_array_equal(got[name], source[name], err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (("--mode=train", "--pretrain_lr=0.2"),
     "--pretrain_lr applies to --mode=pretrain only, not --mode=train; remove it"),
    (("--mode=pretrain", "--shared_head"), "--shared_head: a meta-training option"),
    (("--mode=pretrain", "--model=keras:x.py:f"), "--mode=pretrain trains the built-in models"),
    (("--mode=pretrain", "--pretrain_batch_size=1000"),
     "--pretrain_batch_size=1000: split 'train' has only 48 images"),
    (("--mode=pretrain", "--inner_lr=0.1", "--first_order"),
     "--inner_lr, --first_order: meta-learning, which --mode=pretrain does not do"),
    (("--mode=pretrain", "--pretrain_dropblock_rate=0.1"),
     "--pretrain_dropblock_rate=0.1: ResNet-12's regulariser (--model=resnet12), not "
     "--model=conv4's"),
], ids=["flag_of_another_mode", "shared_head", "keras", "batch_too_large", "meta_flags",
        "dropblock_of_conv4"])
def test_what_pretraining_cannot_do_is_refused_in_one_line(small_omniglot, tmp_path, args,
                                                           expected):
  result = trainer(*PRETRAIN, f"--data_dir={small_omniglot}", f"--model_dir={tmp_path / 'r'}",
                   "--num_iterations=4", *args)
  assert result.returncode != 0
  assert expected in error_line(result.stderr)


@pytest.mark.slow
def test_a_pretraining_run_is_neither_meta_trained_nor_exported(pretrained, small_omniglot,
                                                                tmp_path):
  result = trainer(*PRETRAIN, f"--data_dir={small_omniglot}", f"--model_dir={pretrained}",
                   "--mode=eval")
  assert "holds a pretraining run: continue it (or re-test it) with --mode=pretrain" in (
      error_line(result.stderr))
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  from helpers import REPO  # pylint: disable=import-outside-toplevel
  export = subprocess.run([sys.executable, "-m", "trainer.export", f"--model_dir={pretrained}",
                           f"--output={tmp_path / 'x'}"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
  assert "a pretraining run (--mode=pretrain), which adapts nothing" in error_line(
      export.stderr, "export: error:")


@pytest.mark.parametrize("kind", ["conv4", "resnet12_dropblock"])
def test_a_resumed_pretraining_learner_takes_the_same_steps(request, tmp_path, kind):
  """In process: 4 steps at once equal 2 steps, a checkpoint, a new learner and 2 more; with
  ResNet-12's DropBlock too (its noise is a function of the step, not of the process), on
  32-px CIFAR-FS records (12-px Omniglot is too small for ResNet-12's four poolings)."""
  data = (request.getfixturevalue("small_omniglot") if kind == "conv4" else
          request.getfixturevalue("cifar_records")["cifarfs"])
  task = pretrain.PretrainTask(
      pretrain.FewShotClassification(str(data), 3, 1, 1, 1, 2, 2, 0), 8, "standard")
  shape, classes = task.few_shot.image_shape, task.num_classes
  model = (models.ModelConfig("conv4", shape, classes, num_filters=4) if kind == "conv4" else
           models.ModelConfig("resnet12", shape, classes, widths=(3, 4, 4, 5)))
  noise = pc.DropBlockConfig(0.3, 2, warmup=2) if kind != "conv4" else pc.DropBlockConfig()
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  make = lambda dropblock=noise: pretrain.PretrainLearner(
      strategy, model, optim.SGDConfig(0.05, decay_steps=4), seed=0, batch_size=8, n_way=3,
      eval_batch_size=2, jit_compile=False, dropblock=dropblock)
  if noise.rate:  # the noise is there: without it the same steps go elsewhere
    quiet, noisy = make(pc.DropBlockConfig()), make()
    for learner in (quiet, noisy):
      learner.train_loop(task.train_data(strategy, 0), 2)
    assert any(not np.allclose(quiet.params[k].numpy(), noisy.params[k].numpy(), atol=1e-6)
               for k in quiet.params)
  whole = make()
  whole.train_loop(task.train_data(strategy, 0), 4)
  first = make()
  first.train_loop(task.train_data(strategy, 0), 2)
  path = tf.train.Checkpoint(**first.checkpoint_items()).write(str(tmp_path / "resume"))
  second = make()
  tf.train.Checkpoint(**second.checkpoint_items()).read(path).assert_consumed()
  assert int(second.step.numpy()) == 2
  second.train_loop(task.train_data(strategy, 2), 2)
  moved = 0
  for k, v in whole.params.items():
    np.testing.assert_allclose(second.params[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=k)
    moved += not np.allclose(v.numpy(), first.params[k].numpy())
  assert moved  # the last two steps changed the weights
