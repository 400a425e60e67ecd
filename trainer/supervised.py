"""The supervised task families: few-shot image classification and sinusoid regression.

Both meta-learn with :class:`trainer.learner.MetaLearner`; they differ in their task (records
on disk, or generated sines) and their model. Registered in :mod:`trainer.family`.
"""

from __future__ import annotations

import tensorflow as tf

from pipeline import paths, streams
from pipeline.errors import DataError
from trainer import config, distribute, family, learner, tasks


def image_task(values: dict) -> tasks.FewShotClassification:
  """The few-shot task of the flags' records folder (checked against --dataset)."""
  data_dir = values["data_dir"] or str(paths.default_records_dir(values["dataset"]))
  task = tasks.FewShotClassification(
      data_dir, values["n_way"], values["k_shot"], values["k_query"],
      values["eval_k_query"] or values["k_query"], values["meta_batch_size"],
      values["eval_batch_size"] or values["meta_batch_size"], values["seed"],
      values["sampler"])
  if task.manifest["dataset"] != values["dataset"]:
    raise DataError(f"--data_dir={data_dir} holds {task.manifest['dataset']!r} records, "
                    f"not --dataset={values['dataset']}")
  return task


def build_images(values: dict, strategy: tf.distribute.Strategy) -> family.Built:
  return _build(values, strategy, image_task(values))


def build_sinusoid(values: dict, strategy: tf.distribute.Strategy) -> family.Built:
  task = tasks.SinusoidRegression(
      values["k_shot"], values["k_query"], values["eval_k_query"] or values["k_query"],
      values["meta_batch_size"], values["eval_batch_size"] or values["meta_batch_size"],
      values["seed"])
  return _build(values, strategy, task)


def _build(values: dict, strategy, task) -> family.Built:
  replicas = strategy.num_replicas_in_sync
  for name in ("meta_batch_size", "eval_batch_size"):
    streams.check_divisible(values[name] or values["meta_batch_size"], replicas, f"--{name}")
  model = config.model_config(values, getattr(task, "image_shape", None))
  meta = config.meta_config(values)
  if (meta.compute_dtype == "float16" and model.kind == "conv4"
      and not tf.config.list_logical_devices("GPU")):
    raise DataError("--compute_dtype=float16: TensorFlow has no float16 gradients of grouped "
                    "convolutions on CPU (cuDNN has them on GPU); use bfloat16 or float32 here")
  jit = {"true": True, "false": False}.get(values["jit_compile"],
                                           distribute.default_jit_compile(model.kind))
  meta_learner = learner.MetaLearner(
      strategy, model, meta, config.adam_config(values), seed=values["seed"],
      meta_batch_size=values["meta_batch_size"],
      eval_inner_steps=config.eval_inner_steps(values), jit_compile=jit,
      eval_batch_size=values["eval_batch_size"],
      eval_running_stats=values["eval_norm_stats"] == "running",
      task_chunk=values["task_chunk"])
  record = config.run_record(values, model, meta, getattr(task, "manifest", None))
  return family.Built(task, meta_learner, jit, record)
