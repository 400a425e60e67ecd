"""Vectorized, seeded rollouts of many tasks at once, in-process or across worker processes.

Environments are built by name inside the workers (the locomotion classes are not picklable
by reference, and this keeps the protocol to arrays and task dicts). Every environment ``e``
is reset with its own seed and every action is drawn on the driver from one seeded generator
over the whole batch, so the rollouts are identical whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from typing import Callable

import numpy as np

from rl import envs as rl_envs


@dataclasses.dataclass
class Rollouts:
  obs: np.ndarray  # [E, T, obs_dim] float32 (the observation each action was taken at)
  actions: np.ndarray  # [E, T, act_dim] float32 or [E, T] int64
  rewards: np.ndarray  # [E, T] float64, 0 after an episode ends
  mask: np.ndarray  # [E, T] float32, 1 while the episode is alive
  success: np.ndarray  # [E] float32: 1 if the environment reported success at any live step

  @property
  def returns(self) -> np.ndarray:
    """Undiscounted return of each episode ``[E]``."""
    return (self.rewards * self.mask).sum(axis=1)


def _worker(remote, env_name: str, count: int, env_kwargs: dict):
  envs = [rl_envs.make(env_name, **env_kwargs) for _ in range(count)]
  try:
    while True:
      cmd, payload = remote.recv()
      if cmd == "reset":
        obs = []
        for env, (task, seed) in zip(envs, payload):
          env.reset_task(task)
          obs.append(env.reset(seed=seed)[0])
        remote.send(np.stack(obs))
      elif cmd == "step":
        actions, active = payload
        remote.send(_step(envs, actions, active))
      elif cmd == "close":
        break
  finally:
    for env in envs:
      env.close()
    remote.close()


def _step(envs, actions, active):
  n = len(envs)
  obs = [None] * n
  rewards, done, success = np.zeros(n), np.zeros(n, bool), np.zeros(n, np.float32)
  for i, env in enumerate(envs):
    if active[i]:
      o, r, terminated, truncated, info = env.step(actions[i])
      obs[i], rewards[i], done[i] = o, r, terminated or truncated
      success[i] = info.get("success", 0.0)
  return obs, rewards, done, success


class VectorSampler:
  """``num_envs`` environments of ``env_name`` spread over ``num_workers`` processes (0: none)."""

  def __init__(self, env_name: str, num_envs: int, num_workers: int = 0,
               env_kwargs: dict | None = None):
    self.env_name, self.num_envs = env_name, num_envs
    env_kwargs = dict(env_kwargs or {})
    probe = rl_envs.make(env_name, **env_kwargs)
    self.discrete = hasattr(probe.action_space, "n")
    self.obs_dim = int(np.prod(probe.observation_space.shape))
    self.action_dim = int(probe.action_space.n if self.discrete else probe.action_space.shape[0])
    self.task_sampler = probe
    # Families that report success (Meta-World) get success rates beside the returns.
    self.reports_success = bool(getattr(probe, "reports_success", False))
    self.num_workers = max(0, min(num_workers, num_envs))
    if self.num_workers <= 1:
      self._envs = [rl_envs.make(env_name, **env_kwargs) for _ in range(num_envs)]
      self._remotes, self._slices = [], []
    else:
      ctx = mp.get_context("spawn")
      bounds = np.linspace(0, num_envs, self.num_workers + 1).astype(int)
      self._slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
      self._remotes, self._procs = [], []
      for s in self._slices:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, env_name, s.stop - s.start, env_kwargs), daemon=True)
        proc.start()
        child.close()
        self._remotes.append(parent)
        self._procs.append(proc)

  def sample_tasks(self, n: int, rng: np.random.Generator, split: str = "train") -> list[dict]:
    """``split`` matters to families with their own held-out task sets (Meta-World's test
    tasks); the others draw every split from one distribution, held out by seed."""
    if getattr(self.task_sampler, "has_splits", False):
      return self.task_sampler.sample_tasks(n, rng, split)
    return self.task_sampler.sample_tasks(n, rng)

  def _reset(self, tasks, seeds):
    pairs = list(zip(tasks, seeds))
    if not self._remotes:
      obs = []
      for env, (task, seed) in zip(self._envs, pairs):
        env.reset_task(task)
        obs.append(env.reset(seed=seed)[0])
      return np.stack(obs)
    for remote, s in zip(self._remotes, self._slices):
      remote.send(("reset", pairs[s]))
    return np.concatenate([remote.recv() for remote in self._remotes])

  def _step(self, actions, active):
    if not self._remotes:
      return _step(self._envs, actions, active)
    for remote, s in zip(self._remotes, self._slices):
      remote.send(("step", (actions[s], active[s])))
    obs, rewards, done, success = [], [], [], []
    for remote in self._remotes:
      o, r, d, s = remote.recv()
      obs += o
      rewards.append(r)
      done.append(d)
      success.append(s)
    return obs, np.concatenate(rewards), np.concatenate(done), np.concatenate(success)

  def rollouts(self, tasks: list[dict], act: Callable[[np.ndarray, np.random.Generator], np.ndarray],
               horizon: int, seed: int) -> Rollouts:
    """One episode per environment; env ``e`` runs ``tasks[e]``; ``act(obs [E, d], rng)``."""
    if len(tasks) != self.num_envs:
      raise ValueError(f"{len(tasks)} tasks for {self.num_envs} environments")
    seeds = np.random.SeedSequence(seed).generate_state(self.num_envs).tolist()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    obs = self._reset(tasks, seeds).reshape(self.num_envs, -1).astype(np.float32)
    E = self.num_envs
    all_obs = np.zeros((E, horizon, self.obs_dim), np.float32)
    all_actions = (np.zeros((E, horizon), np.int64) if self.discrete
                   else np.zeros((E, horizon, self.action_dim), np.float32))
    rewards = np.zeros((E, horizon))
    mask = np.zeros((E, horizon), np.float32)
    active = np.ones(E, bool)
    success = np.zeros(E, np.float32)
    for t in range(horizon):
      actions = act(obs, rng)
      all_obs[:, t], all_actions[:, t], mask[:, t] = obs, actions, active
      new_obs, r, done, succeeded = self._step(actions, active)
      rewards[:, t] = np.where(active, r, 0.0)
      success = np.maximum(success, np.where(active, succeeded, 0.0))
      for e in np.flatnonzero(active):
        obs[e] = np.asarray(new_obs[e], np.float32).reshape(-1)
      active = active & ~done
      if not active.any():
        break
    return Rollouts(all_obs, all_actions, rewards, mask, success)

  def close(self):
    for remote in self._remotes:
      try:
        remote.send(("close", None))
      except (BrokenPipeError, OSError):
        pass
    for proc in getattr(self, "_procs", []):
      proc.join(timeout=5)
    self._remotes = []
