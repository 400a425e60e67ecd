"""What a CPU can test of the GPU/TPU paths: the XLA-compiled conv4 meta-step replicated over
two logical devices, and the one-line refusal of a strategy whose devices are not there."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf

from helpers import SINUSOID, TWO_CPUS, error_line, mirrored_over_two_cpus, trainer
from numerics import assert_close_f32
from trainer import learner, maml, models, optim, tasks


@pytest.mark.numerics
@pytest.mark.slow
def test_xla_conv4_meta_step_mirrored_over_two_devices_equals_one_device(small_omniglot):
  """The GPU/TPU configuration (jit_compile=True, replicas summing their meta-gradients) on
  two logical CPUs: three meta-steps give the one-device weights and metrics."""
  task = tasks.FewShotClassification(str(small_omniglot), n_way=3, k_shot=1, k_query=1,
                                     eval_k_query=1, meta_batch_size=4, eval_batch_size=4,
                                     seed=0)
  cfg = models.ModelConfig("conv4", task.image_shape, 3, num_filters=4, norm="batch_norm")
  meta = maml.MetaConfig(1, 0.4, loss="softmax")

  def run(strategy):
    l = learner.MetaLearner(strategy, cfg, meta, optim.AdamConfig(1e-2), seed=0,
                            meta_batch_size=4, eval_inner_steps=1, jit_compile=True)
    means = l.train_loop(task.train_data(strategy, 0), tf.constant(3))
    return {k: float(v) for k, v in means.items()}, {k: v.numpy() for k, v in l.params.items()}

  m1, p1 = run(tf.distribute.OneDeviceStrategy(TWO_CPUS[0]))
  m2, p2 = run(mirrored_over_two_cpus())
  # XLA's kernels and the replicas' sums add in another order (tests/numerics.py): sums of up
  # to 216 terms (batch norm's moments and the filter gradient of the first layer: 6 images x
  # 6x6 positions), through 3 meta-steps of 2 forward and backward passes each.
  close = functools.partial(assert_close_f32, reduction_length=216, stages=3 * 2 * 2)
  for k in m1:
    close(m2[k], m1[k], err_msg=k)
  for k in p1:
    close(p2[k], p1[k], err_msg=k)
  start = models.init_params(cfg, 0)
  kernels = [k for k in p1 if k.endswith("/kernel")]
  assert len(kernels) == 5, kernels
  assert all(np.abs(p1[k] - start[k]).max() > 1e-5 for k in kernels), "no update"


@pytest.mark.parametrize("strategy, expected", [
    ("tpu", "--strategy=tpu: no TPU reachable from TensorFlow"),
    ("mirrored", "--strategy=mirrored: no GPU visible to TensorFlow"),
])
def test_a_strategy_without_its_devices_is_one_line_saying_what_to_install(tmp_path, strategy,
                                                                           expected):
  result = trainer(*SINUSOID, f"--strategy={strategy}", "--num_iterations=1",
                   f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 1
  line = error_line(result.stderr)
  assert expected in line and f"make install TF={'tpu' if strategy == 'tpu' else 'gpu'}" in line
  assert not (tmp_path / "run" / "ckpt").exists()
