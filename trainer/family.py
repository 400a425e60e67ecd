"""Task families as plugins of a thin trainer: what the loop needs of a task and a learner.

Each family (few-shot images, sinusoid regression, meta-RL) registers one factory,
``build(values, strategy) -> Built``, named by ``"module:function"`` so that choosing a family
imports only its own code (RL's gymnasium/MuJoCo extra stays optional). ``trainer/loop.py``
programs against :class:`Task` and :class:`Learner` only, as Orbit keeps its runner apart from
the task. Each family also lists the flags it reads: a flag given for another family is refused
at start-up instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Iterable, Protocol

import numpy as np
import tensorflow as tf

from pipeline.errors import DataError


class Task(Protocol):
  """Where batches come from, and how results are judged."""
  metric: str  # "accuracy", "mse", "return"
  higher_is_better: bool
  splits: tuple[str, ...]  # evaluation splits

  def train_data(self, strategy: tf.distribute.Strategy, start_step: int) -> Iterable:
    """Training batches from meta-step ``start_step`` on, laid out for ``strategy``."""

  def eval_data(self, strategy: tf.distribute.Strategy, split: str, episodes: int) -> Iterable:
    """A fixed set of ``episodes`` evaluation tasks of ``split``."""


class Learner(Protocol):
  """The meta-learner's state and steps."""
  strategy: tf.distribute.Strategy

  @property
  def step(self) -> tf.Variable:
    """Meta-steps taken (checkpointed)."""

  def checkpoint_items(self) -> dict:
    """Everything a checkpoint must hold to resume exactly."""

  def train_loop(self, iterator, num_steps) -> dict:
    """``num_steps`` meta-steps; the four metric means over them."""

  def evaluate(self, data) -> tuple[np.ndarray | None, np.ndarray]:
    """Per-task loss (None if the family has none) and metric after 0..S inner steps,
    ``[S+1, tasks]`` each."""


@dataclasses.dataclass
class Built:
  task: Task
  learner: Learner
  jit_compile: bool
  record: dict[str, Any]  # resolved configs for config.json (model, meta, records' spec)


# Flags every family reads.
COMMON_FLAGS = frozenset({
    "dataset", "mode", "model_dir", "num_iterations", "eval_every", "val_episodes",
    "eval_episodes", "eval_split", "eval_checkpoint", "checkpoint_every", "log_every",
    "steps_per_loop", "seed", "strategy", "tpu", "deterministic", "debug", "meta_batch_size",
    "inner_steps", "eval_inner_steps", "inner_lr", "first_order", "meta_lr", "hidden_sizes"})
# Supervised meta-learning (trainer.learner.MetaLearner) on any task.
_SUPERVISED = frozenset({
    "k_shot", "k_query", "eval_k_query", "eval_batch_size", "model", "norm", "norm_scale",
    "head_init", "per_step_bn_params", "bn_running_stats", "eval_norm_stats", "learn_inner_lr",
    "per_step_inner_lr", "loss_reduction", "inner_adapt", "msl_iterations",
    "first_order_iterations", "meta_lr_schedule", "min_meta_lr", "clip_value", "jit_compile",
    "task_chunk", "compute_dtype", "remat"})
_IMAGES = _SUPERVISED | {"data_dir", "n_way", "num_filters", "downsample", "features",
                         "verify_records", "sampler"}
_RL = frozenset({"env", "env_kwargs", "rollouts_per_task", "horizon", "gamma", "gae_lambda",
                 "outer_optimizer", "max_kl", "cg_iters", "cg_damping", "ls_max_steps",
                 "ls_backtrack_ratio", "num_workers", "eval_rollouts_per_task",
                 "eval_later_lr_scale"})


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  datasets: tuple[str, ...]  # values of --dataset it serves; "x:*" serves every "x:..."
  flags: frozenset[str]  # flags it reads beyond COMMON_FLAGS
  builder: str  # "module:function" of build(values, strategy) -> Built

  def serves(self, dataset: str) -> bool:
    return any(dataset == d or (d.endswith(":*") and dataset.startswith(d[:-1]))
               for d in self.datasets)

  def build(self, values: dict, strategy: tf.distribute.Strategy) -> Built:
    module, function = self.builder.split(":")
    return getattr(importlib.import_module(module), function)(values, strategy)

  def inapplicable(self, given: set[str]) -> list[str]:
    """Flags given (command line or flagfile) that this family would ignore."""
    return sorted(given - COMMON_FLAGS - self.flags)


FAMILIES = (
    # Records built by tools/build_tfrecords.py: --dataset names what the manifest says.
    Family("images", ("omniglot", "miniimagenet", "folder", "cifarfs", "fc100", "tfds:*"),
           _IMAGES, "trainer.supervised:build_images"),
    Family("sinusoid", ("sinusoid",), _SUPERVISED, "trainer.supervised:build_sinusoid"),
    Family("rl", ("rl",), _RL, "rl.family:build"),
)


def family_of(dataset: str) -> Family:
  for family in FAMILIES:
    if family.serves(dataset):
      return family
  raise DataError(f"--dataset={dataset}: no task family serves it")


def refuse_inapplicable(family: Family, given: set[str]) -> None:
  extra = family.inapplicable(given)
  if extra:
    raise DataError(f"{', '.join('--' + f for f in extra)} do(es) not apply to "
                    f"--dataset={'/'.join(family.datasets)} and would be ignored; remove "
                    f"{'it' if len(extra) == 1 else 'them'}")
