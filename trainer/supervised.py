"""The supervised task families: few-shot image classification and sinusoid regression.

Both meta-learn with :class:`trainer.learner.MetaLearner`; they differ in their task (records
on disk, or generated sines) and their model. Registered in :mod:`trainer.family`; their flags
and configs are in :mod:`trainer.supervised_config`.
"""

from __future__ import annotations

import dataclasses
import sys

import tensorflow as tf
from absl import logging

from pipeline import paths, streams
from pipeline.errors import DataError, UsageError
from trainer import config, distribute, family, init_from, learner, meta_flags, models
from trainer import memory_plan, pretrain, pretrain_config, tasks
from trainer import supervised_config as sc


def image_task(values: dict) -> tasks.FewShotClassification:
  """The few-shot task of the flags' records folder (checked against --dataset)."""
  data_dir = values["data_dir"] or str(paths.default_records_dir(values["dataset"]))
  ep = sc.episodes(values)
  task = tasks.FewShotClassification(
      data_dir, values["n_way"], ep.k_shot, ep.k_query, ep.eval_k_query, ep.meta_batch_size,
      ep.eval_batch_size, values["seed"], values["sampler"], values["verify_records"])
  if task.manifest["dataset"] != values["dataset"]:
    raise DataError(f"--data_dir={data_dir} holds {task.manifest['dataset']!r} records, "
                    f"not --dataset={values['dataset']}")
  return task


def build_images(values: dict, strategy: tf.distribute.Strategy) -> family.Built:
  pretrain_config.refuse_unless_pretraining(values)
  task = image_task(values)
  if values["mode"] == "pretrain":
    _check_init_from(values)
    jit = _jit(values, sc.model_config(values, task.image_shape).kind)
    return pretrain.build(values, strategy, task, jit)
  return _build(values, strategy, task, task.image_shape, task.manifest)


def _check_init_from(values: dict) -> None:
  if values["init_from"]:  # refused now, not after the data checks; a resumed run skips it
    init_from.check(values["init_from"], config.run_config(values, sys.argv).model_dir)


def _jit(values: dict, kind: str) -> bool:
  return {"true": True, "false": False}.get(values["jit_compile"],
                                            distribute.default_jit_compile(kind))


def build_sinusoid(values: dict, strategy: tf.distribute.Strategy) -> family.Built:
  if values["mode"] == "pretrain":
    raise UsageError("--mode=pretrain: pretrains image backbones; sinusoid has no classes")
  ep = sc.episodes(values)
  task = tasks.SinusoidRegression(ep.k_shot, ep.k_query, ep.eval_k_query, ep.meta_batch_size,
                                  ep.eval_batch_size, values["seed"])
  return _build(values, strategy, task, None, None)


def _build(values: dict, strategy, task, image_shape, manifest) -> family.Built:
  ep = sc.episodes(values)
  replicas = strategy.num_replicas_in_sync
  streams.check_divisible(ep.meta_batch_size, replicas, "--meta_batch_size")
  streams.check_divisible(ep.eval_batch_size, replicas, "--eval_batch_size")
  model = sc.model_config(values, image_shape)
  meta = sc.meta_config(values)
  if (meta.compute_dtype == "float16" and model.kind in models.CONV_KINDS
      and not tf.config.list_logical_devices("GPU")):
    raise UsageError("--compute_dtype=float16: TensorFlow has no float16 gradients of grouped "
                     "convolutions on CPU (cuDNN has them on GPU); use bfloat16 or float32 here")
  if model.kind == "keras" and meta.compute_dtype != "float32":
    raise UsageError(f"--compute_dtype={meta.compute_dtype}: not yet for --model=keras:... "
                     f"(build the model under a Keras mixed-precision policy instead)")
  _check_init_from(values)
  jit = _jit(values, model.kind)
  record = sc.record_parts(values, model, meta, manifest)
  task_chunk = values["task_chunk"]
  if values["memory_budget"] and values["mode"] != "eval":
    task_chunk, meta, record["memory_plan"] = _plan_memory(values, image_shape, meta,
                                                           ep.meta_batch_size // replicas)
  meta_learner = learner.MetaLearner(
      strategy, model, meta, sc.adam_config(values), seed=values["seed"],
      meta_batch_size=ep.meta_batch_size,
      eval_inner_steps=meta_flags.eval_inner_steps(values), jit_compile=jit,
      eval_batch_size=ep.eval_batch_size,
      eval_running_stats=values["eval_norm_stats"] == "running",
      task_chunk=task_chunk, body_from=values["init_from"],
      eval_measured_steps=sc.eval_measured_steps(values))
  return family.Built(task, meta_learner, jit, record)


def _plan_memory(values: dict, image_shape, meta, per_replica: int):
  """--memory_budget: (task chunk, meta config with remat, what config.json keeps)."""
  if values["task_chunk"] or values["remat"]:
    raise UsageError("--memory_budget chooses --task_chunk and --remat itself; give either "
                     "the budget or them")
  budget = memory_plan.parse_size(values["memory_budget"])
  plan = memory_plan.choose(values, list(image_shape) if image_shape else None, per_replica,
                            budget)
  logging.info("%s", memory_plan.explain(plan, budget))
  return (plan.chosen.task_chunk, dataclasses.replace(meta, remat=plan.chosen.remat),
          plan.record(budget))
