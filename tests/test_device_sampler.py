"""--sampler=device: episodes drawn inside the compiled step are the tf.data sampler's, bit for
bit, under one device and two replicas; training and resumption follow them exactly."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from helpers import SINUSOID, TWO_CPUS, error_line, mirrored_over_two_cpus, trainer
from pipeline import episodes
from trainer import learner, maml, models, optim, tasks


@pytest.mark.slow
def test_device_episodes_equal_the_tf_data_ones_and_train_and_resume_identically(
    small_omniglot, tmp_path):
  make_task = lambda sampler: tasks.FewShotClassification(
      str(small_omniglot), n_way=3, k_shot=1, k_query=2, eval_k_query=2,
      meta_batch_size=4, eval_batch_size=4, seed=7, sampler=sampler)
  host_task, device_task = make_task("host"), make_task("device")
  cfg = models.ModelConfig("conv4", host_task.image_shape, 3, num_filters=4)
  meta = maml.MetaConfig(1, 0.4)

  def make_learner(strategy):
    return learner.MetaLearner(strategy, cfg, meta, optim.AdamConfig(1e-2), seed=0,
                               meta_batch_size=4, eval_inner_steps=1, jit_compile=False)

  for strategy in (tf.distribute.OneDeviceStrategy(TWO_CPUS[0]),
                   mirrored_over_two_cpus()):
    replicas = strategy.num_replicas_in_sync
    # 1. The episodes, per replica, for steps 0..3 and again from step 2 (a resume).
    on_device = device_task.train_data(strategy, 0)
    draw = tf.function(lambda s: strategy.run(lambda: on_device.sample(s)))
    for start in (0, 2):
      host = host_task.train_data(strategy, start).batches
      for step in range(start, 4):
        expected = strategy.experimental_local_results(next(host))
        got = strategy.experimental_local_results(draw(tf.constant(step, tf.int64)))
        assert len(got) == replicas
        for e, g in zip(expected, got):
          for k in e:
            np.testing.assert_array_equal(g[k].numpy(), e[k].numpy(), err_msg=f"{k} {step}")
    if replicas == 1:  # TPUs compile the whole step: the sampler must compile under XLA
      data = episodes.load_split(str(small_omniglot), "train")
      spec = episodes.EpisodeSpec(3, 1, 2, 4)
      xla = tf.function(lambda s: episodes.replica_meta_batch(
          data, spec, seed=7, step=s, replica=0, replicas=1), jit_compile=True)
      expected = next(host_task.train_data(strategy, 3).batches)
      got = xla(tf.constant(3, tf.int64))
      for k in ("support_images", "query_images", "support_labels", "episode_id"):
        np.testing.assert_array_equal(
            got[k].numpy(), expected[k.replace("images", "x").replace("labels", "y")].numpy(),
            err_msg=f"xla {k}")
    # 2. Three training steps fed either way: the same weights (the same kernels on the same
    # episodes; the step is traced once per feeding, so grappler may fuse it otherwise).
    results = []
    for task in (host_task, device_task):
      l = make_learner(strategy)
      l.train_loop(task.train_data(strategy, 0), tf.constant(3))
      results.append({k: v.numpy() for k, v in l.params.items()})
    for k in results[0]:
      np.testing.assert_allclose(results[1][k], results[0][k], rtol=1e-6, atol=1e-7, err_msg=k)
    # 3. Two steps, a checkpoint, a new learner restoring it and one more step: the same as
    # three steps straight (the step counter alone chooses the episodes).
    first = make_learner(strategy)
    first.train_loop(device_task.train_data(strategy, 0), tf.constant(2))
    path = tf.train.Checkpoint(**first.checkpoint_items()).save(
        str(tmp_path / f"ckpt{replicas}"))
    resumed = make_learner(strategy)
    tf.train.Checkpoint(**resumed.checkpoint_items()).restore(path)
    resumed.train_loop(device_task.train_data(strategy, 2), tf.constant(1))
    for k in results[1]:
      np.testing.assert_allclose(resumed.params[k].numpy(), results[1][k], rtol=1e-6,
                                 atol=1e-7, err_msg=f"resumed {k}")


@pytest.mark.slow
def test_the_trainer_runs_with_device_episodes_and_refuses_them_for_sinusoid(
    small_omniglot, tmp_path):
  result = trainer("--dataset=omniglot", f"--data_dir={small_omniglot}", "--sampler=device",
                   "--n_way=3", "--k_shot=1", "--k_query=2", "--eval_k_query=2",
                   "--meta_batch_size=2", "--num_filters=4", "--num_iterations=3",
                   "--eval_every=0", "--eval_episodes=4", f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "run" / "eval_test.json").exists()
  refused = trainer(*SINUSOID, "--sampler=device", f"--model_dir={tmp_path / 'sine'}")
  assert "--sampler do(es) not apply to --dataset=sinusoid" in error_line(refused.stderr)
