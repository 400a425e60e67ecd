"""Task families as plugins of a thin trainer: what the loop needs of a task and a learner.

Each family (few-shot images, sinusoid regression, meta-RL) is registered here by name only:
the modules that define its flags (each through a :class:`trainer.flag_groups.FlagGroup`,
which also says which of them may change on resume) and one factory,
``build(values, strategy) -> Built``, both as strings, so that choosing a family imports only
its own code (RL's gymnasium/MuJoCo extra stays optional) and the runner imports no family.
``trainer/loop.py`` programs against :class:`Task` and :class:`Learner` only, as Orbit keeps its
runner apart from the task.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import tensorflow as tf

from pipeline.errors import UsageError


@dataclasses.dataclass
class TrainData:
  """Where a learner's training batches come from: exactly one of

  - ``batches``: an iterator of (distributed) batches fetched from the host each step;
  - ``sample``: ``sample(step) -> batch``, called inside each replica's compiled step (the
    device sampler: the data already sits on the device and no input crosses per step).
  """
  batches: Iterator | None = None
  sample: Callable[[tf.Tensor], Any] | None = None

  def __post_init__(self):
    if (self.batches is None) == (self.sample is None):
      raise ValueError("TrainData needs exactly one of batches and sample")


class Task(Protocol):
  """Where batches come from, and how results are judged."""
  metric: str  # "accuracy", "mse", "return"
  higher_is_better: bool
  splits: tuple[str, ...]  # evaluation splits
  # Few evaluation tasks (RL's 40): intervals from Student's t instead of the normal.
  small_sample: bool

  def check_data(self, splits: list[str], sha256: bool) -> None:
    """Raises DataError (one line) if the data of ``splits`` cannot be read whole."""

  def train_data(self, strategy: tf.distribute.Strategy, start_step: int) -> TrainData:
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

  def train_loop(self, data: TrainData, num_steps) -> dict[str, float]:
    """``num_steps`` meta-steps; the means over them of the metrics the learner chooses,
    headline first (the progress line shows the first two)."""

  def evaluate(self, data) -> tuple[np.ndarray | None, np.ndarray]:
    """Per-task loss (None if the family has none) and metric after 0..S inner steps,
    ``[S+1, tasks]`` each."""

  def eval_variant(self) -> tuple[str, dict]:
    """How this evaluation differs from the training protocol: a suffix for the report's file
    name ("" for none) and the fields the report records about it."""


@dataclasses.dataclass
class Built:
  task: Task
  learner: Learner
  jit_compile: bool
  record: dict[str, Any]  # what the family resolved, for config.json beside every flag


def _load(spec: str):
  module, name = spec.split(":")
  return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  datasets: tuple[str, ...]  # values of --dataset it serves; "x:*" serves every "x:..."
  flag_groups: tuple[str, ...]  # "module:GROUP" of each FlagGroup it reads
  builder: str  # "module:function" of build(values, strategy) -> Built
  # "module:function" of fixed_on_resume(stored_flags, training) -> runner flags to keep
  resume_rules: str = ""

  def serves(self, dataset: str) -> bool:
    return any(dataset == d or (d.endswith(":*") and dataset.startswith(d[:-1]))
               for d in self.datasets)

  def groups(self) -> list:
    return [_load(spec) for spec in self.flag_groups]

  def flag_names(self) -> list[str]:
    return [name for group in self.groups() for name in group.names]

  def may_change(self) -> frozenset[str]:
    return frozenset().union(*(group.may_change for group in self.groups()))

  def fixed_on_resume(self, stored_flags: dict, training: bool) -> frozenset[str]:
    return _load(self.resume_rules)(stored_flags, training) if self.resume_rules else frozenset()

  def build(self, values: dict, strategy: tf.distribute.Strategy) -> Built:
    return _load(self.builder)(values, strategy)


FAMILIES = (
    # Records built by tools/build_tfrecords.py: --dataset names what the manifest says.
    Family("images", ("omniglot", "miniimagenet", "folder", "cifarfs", "fc100", "tfds:*"),
           ("trainer.meta_flags:META", "trainer.supervised_config:SUPERVISED",
            "trainer.supervised_config:IMAGES", "trainer.pretrain_config:PRETRAIN"),
           "trainer.supervised:build_images", "trainer.supervised_config:fixed_on_resume"),
    Family("sinusoid", ("sinusoid",),
           ("trainer.meta_flags:META", "trainer.supervised_config:SUPERVISED"),
           "trainer.supervised:build_sinusoid", "trainer.supervised_config:fixed_on_resume"),
    Family("rl", ("rl",), ("trainer.meta_flags:META", "rl.config:RL"), "rl.family:build"),
)


@functools.cache
def define_flags() -> None:
  """Imports every family's flag modules (light: absl, TensorFlow, the family's configs), so
  that a command line may name any flag and ``--helpfull`` lists them all."""
  for family in FAMILIES:
    family.groups()


def family_of(dataset: str) -> Family:
  for family in FAMILIES:
    if family.serves(dataset):
      return family
  raise UsageError(f"--dataset={dataset}: no task family serves it")


def refuse_inapplicable(family: Family, given: set[str], runner_flags: Iterable[str]) -> None:
  """A flag given (command line or flagfile) that this family would ignore: one line."""
  extra = sorted(given - set(runner_flags) - set(family.flag_names()))
  if extra:
    raise UsageError(f"{', '.join('--' + f for f in extra)} do(es) not apply to "
                     f"--dataset={'/'.join(family.datasets)} and would be ignored; remove "
                     f"{'it' if len(extra) == 1 else 'them'}")
