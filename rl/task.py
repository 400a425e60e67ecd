"""MAML-RL as a trainer task: seeded task streams for training, fixed task sets for evaluation."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from rl.sampler import VectorSampler
from trainer.family import TrainData


@dataclasses.dataclass
class MetaRLTask:
  sampler: VectorSampler
  meta_batch_size: int
  seed: int
  metric = "return"
  higher_is_better = True
  splits = ("val", "test")  # held-out task streams (any name would hash to one: refuse typos)
  small_sample = True  # evaluated on tens of tasks: Student's t interval, not 1.96

  def check_data(self, splits: list[str]) -> None:
    del splits  # tasks are drawn from the environment family: nothing to read

  def train_data(self, strategy, start_step: int) -> TrainData:
    """Task lists for the host-side sampler (rollouts are Python), not tf.data."""
    del strategy  # one device: RL meta-training refuses more replicas
    return TrainData(batches=self.train_dataset(None, start_step))

  def eval_data(self, strategy, split: str, episodes: int):
    del strategy
    return self.eval_dataset(split, episodes, None)

  def _tasks(self, *key, split: str = "train") -> tuple[list[dict], int]:
    seq = np.random.SeedSequence([self.seed, *key])
    rng = np.random.default_rng(seq)
    return (self.sampler.sample_tasks(self.meta_batch_size, rng, split),
            int(seq.generate_state(1)[0]))

  def train_dataset(self, sharding, start_step: int):
    """Meta-iteration ``s`` gets tasks and rollout seeds that depend on (seed, s) only."""
    del sharding
    step = start_step
    while True:
      yield self._tasks(0, step)
      step += 1

  def eval_dataset(self, split: str, num_tasks: int, sharding) -> list:
    """Fixed batches of held-out tasks; the learner keeps the first ``num_tasks`` results."""
    del sharding
    code = zlib.crc32(split.encode())
    batches = -(-num_tasks // self.meta_batch_size)
    out = []
    for b in range(batches):
      tasks, seed = self._tasks(1, code, b, split=split)
      out.append((tasks, seed, min(self.meta_batch_size, num_tasks - b * self.meta_batch_size)))
    return out
