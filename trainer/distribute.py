"""Choosing the tf.distribute strategy, and the device facts that pick defaults."""

from __future__ import annotations

import os

import tensorflow as tf

from pipeline.errors import UsageError, first_line

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


class MissingDeviceError(UsageError):
  """The strategy asked for needs devices this TensorFlow does not see; says how to get them."""


def _tpu_resolver(tpu: str):
  """The TPU cluster resolver, or one line on what is missing (no TPU, or a non-TPU build)."""
  build = f"TensorFlow {tf.__version__}"
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError) as e:
    reason = first_line(e)
    raise MissingDeviceError(
        f"--strategy=tpu{' --tpu=' + tpu if tpu else ''}: no TPU reachable from {build} "
        f"({reason}); on a Cloud TPU VM install TensorFlow's TPU build with make install "
        f"TF=tpu (pip install -e .[tpu]: tensorflow-tpu 2.20 and libtpu) and pass --tpu=local")
  return resolver


def make_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
  """``auto``: MirroredStrategy over several GPUs, one device otherwise."""
  if name == "tpu":
    return tf.distribute.TPUStrategy(_tpu_resolver(tpu))
  if name == "multi_worker":
    if "TF_CONFIG" not in os.environ:
      raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                       "(cluster spec and this worker's task)")
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices("GPU")
  if name == "mirrored" and not gpus:
    cuda = "built with CUDA" if tf.test.is_built_with_cuda() else "a build without CUDA"
    raise MissingDeviceError(
        f"--strategy=mirrored: no GPU visible to TensorFlow {tf.__version__} ({cuda}); on a "
        f"multi-GPU host install the GPU build with make install TF=gpu (pip install -e .[gpu]: "
        f"TensorFlow with CUDA's libraries) and check nvidia-smi; on one device use "
        f"--strategy=auto")
  if name == "mirrored" or (name == "auto" and len(gpus) > 1):
    return tf.distribute.MirroredStrategy()
  if name in ("one_device", "auto"):
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  raise ValueError(f"--strategy={name!r}: must be one of {STRATEGIES}")


def has_accelerator() -> bool:
  return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def default_jit_compile(model_kind: str) -> bool:
  """XLA where it measured faster: always on GPU/TPU; on CPU only for MLPs.

  bench/bench_meta_step.py on 2 CPU cores: sinusoid MLP 3.0 ms/step with XLA vs 4.9 ms
  without; Omniglot conv4 36 s vs 0.45 s (XLA's CPU convolution gradients are slow).
  """
  return has_accelerator() or model_kind == "mlp"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """The worker that writes checkpoints, summaries and reports (always true outside MWMS)."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  resolver = strategy.cluster_resolver
  if resolver.task_type in (None, "chief"):
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief
