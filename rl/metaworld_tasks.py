"""Meta-World (Yu et al., CoRL 2019; Farama's ``metaworld`` package) as MAML-RL task families.

``ML1-<task>`` is one manipulation task with 50 training goal positions and 50 held-out test
goals; ``ML10`` has 10 training tasks and 5 held-out test tasks, 50 goal variations each. The
goal is not observed (the ML benchmarks' partial observability), so it must be found by
adapting. Tasks are the benchmark's own: training draws from ``train_tasks``; validation and
meta-test from ``test_tasks`` (Meta-World has no third set: a best-by-validation checkpoint is
therefore chosen on the test tasks, and ``--eval_checkpoint=latest`` is the clean figure).
An episode is a success when the environment reports success at any of its steps, as
Meta-World's own evaluation counts it.

``metaworld`` pins ``mujoco==3.3.0`` and the locomotion tasks' figures were measured with
3.14.0, whose dynamics differ (docs/rl.md): install it in its own environment
(``make install RL=metaworld``), where these families are available; elsewhere naming one is
refused in one line.
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np

from rl.envs import TaskEnv

BENCHMARK_SEED = 0  # the goal positions of every benchmark built here


class MetaWorldMissing(ImportError):
  pass


@functools.cache
def benchmark(name: str, env_name: str | None = None):
  """The benchmark's classes and task lists (built once per process: ML10 takes ~10 s)."""
  try:
    import metaworld  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise MetaWorldMissing(
        f"Meta-World is not installed: its families need `make install RL=metaworld` (their "
        f"own virtualenv, MuJoCo 3.3.0; docs/rl.md)") from None
  if name == "ML1":
    return metaworld.ML1(env_name, seed=BENCHMARK_SEED)
  if name == "ML10":
    return metaworld.ML10(seed=BENCHMARK_SEED)
  raise ValueError(f"unknown Meta-World benchmark {name!r}")


class MetaWorldTasks(TaskEnv, gym.Env):
  """One environment of a Meta-World benchmark; ``reset_task`` moves it to any of the
  benchmark's tasks (a new simulator only when the task's class changes, ML10's case)."""

  has_splits = True  # sample_tasks takes the split: train, or the held-out test tasks
  reports_success = True

  def __init__(self, name: str, env_name: str | None = None, task: dict | None = None):
    self._bench = benchmark(name, env_name)
    self._env, self._class = None, None
    first = {"split": "train", "index": 0}
    self.reset_task(task or first)
    self.observation_space = self._env.observation_space
    self.action_space = self._env.action_space

  def _tasks(self, split: str):
    return self._bench.train_tasks if split == "train" else self._bench.test_tasks

  def sample_tasks(self, n: int, rng: np.random.Generator, split: str = "train") -> list[dict]:
    """``n`` of the split's tasks, without repeats while ``n`` allows."""
    count = len(self._tasks(split))
    index = rng.permutation(count)[:n] if n <= count else rng.integers(0, count, n)
    return [{"split": "train" if split == "train" else "test", "index": int(i)} for i in index]

  def reset_task(self, task: dict) -> None:
    chosen = self._tasks(task["split"])[task["index"]]
    classes = self._bench.train_classes if task["split"] == "train" else self._bench.test_classes
    if chosen.env_name != self._class:
      if self._env is not None:
        self._env.close()
      self._env, self._class = classes[chosen.env_name](), chosen.env_name
    self._env.set_task(chosen)

  def reset(self, *, seed=None, options=None):
    obs, _ = self._env.reset(seed=seed)
    return obs.astype(np.float32), {}

  def step(self, action):
    obs, reward, terminated, truncated, info = self._env.step(
        np.clip(action, self.action_space.low, self.action_space.high))
    return (obs.astype(np.float32), float(reward), terminated, truncated,
            {"success": float(info["success"])})

  def close(self):
    if self._env is not None:
      self._env.close()
