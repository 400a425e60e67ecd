#!/usr/bin/env python
"""MAML-RL benchmark, one JSON object per line: sampler env steps/s; TRPO's natural-gradient
direction computed two ways; where a meta-iteration's time goes (environment steps, policy
forward passes, baseline fits, inner steps, the outer update and, for TRPO, its natural-
gradient direction).

  python bench/bench_rl.py
  python bench/bench_rl.py --envs=2DNavigation-v0 --workers=1,2 --iterations=3 --outer=trpo,promp
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import platform
import time

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("envs", ["2DNavigation-v0", "HalfCheetahDir-v5", "AntDir-v5"],
                  "Task families of the sampler rows.")
flags.DEFINE_list("workers", ["1", "2"], "Worker process counts for the sampler (1 = in-process).")
flags.DEFINE_integer("num_envs", 200, "Environments sampled at once.")
flags.DEFINE_list("outer", ["trpo", "promp"], "Meta-updates of the meta-iteration rows.")
flags.DEFINE_integer("iterations", 2, "Meta-iterations timed per row (2D navigation, the "
                     "paper's 20 tasks x 20 episodes x 100 steps), after one that traces.")

MACHINE = f"CPU {platform.machine()} x{os.cpu_count()}"


class Clock:
  """Seconds spent inside wrapped functions, by part; nested parts are subtracted from the
  parts around them, so the parts add up to the wrapped time."""

  def __init__(self):
    self.total, self._stack = collections.defaultdict(float), []

  def wrap(self, part, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
      start = time.perf_counter()
      self._stack.append(0.0)
      try:
        return fn(*args, **kwargs)
      finally:
        inner = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.total[part] += elapsed - inner
        if self._stack:
          self._stack[-1] += elapsed
    return timed


@contextlib.contextmanager
def patched(obj, name, part, clock):
  original = getattr(obj, name)
  setattr(obj, name, clock.wrap(part, original))
  try:
    yield
  finally:
    setattr(obj, name, original)


def sampler_rows():
  from rl import envs, policies
  from rl.sampler import VectorSampler
  for name in FLAGS.envs:
    for workers in (int(w) for w in FLAGS.workers):
      sampler = VectorSampler(name, FLAGS.num_envs, workers if workers > 1 else 0)
      tasks = sampler.sample_tasks(FLAGS.num_envs, np.random.default_rng(0))
      cfg = policies.PolicyConfig("gaussian", sampler.obs_dim, sampler.action_dim)
      params = {k: np.broadcast_to(v[None], (FLAGS.num_envs,) + v.shape)
                for k, v in policies.init_params(cfg, 0).items()}
      act = lambda obs, rng: policies.sample_actions(cfg, params, obs[:, None], rng)[:, 0]
      start = time.perf_counter()
      out = sampler.rollouts(tasks, act, envs.horizon(name), seed=0)
      elapsed = time.perf_counter() - start
      sampler.close()
      print(json.dumps({"bench": "sampler", "env": name, "workers": workers,
                        "num_envs": FLAGS.num_envs,
                        "env_steps_per_s": round(out.mask.sum() / elapsed),
                        "includes": "policy forward pass", "machine": MACHINE}), flush=True)


def meta_iteration_rows():
  import tensorflow as tf
  from rl import learner, policies, returns, task
  from rl import config as rl_config
  from rl.sampler import VectorSampler
  from trainer import config
  name = "2DNavigation-v0"
  for outer in FLAGS.outer:
    sampler = VectorSampler(name, 20 * 20)
    values = dict(config.default_values(), env=name, meta_batch_size=20, rollouts_per_task=20,
                  outer_optimizer=outer, meta_lr=1e-3,  # ProMP's (configs/promp_2dnav.cfg)
                  inner_estimator="lvc" if outer == "promp" else "reinforce")
    cfg = rl_config.rl_config(values, horizon=100)
    policy = policies.PolicyConfig("gaussian", sampler.obs_dim, sampler.action_dim)
    meta = learner.RLMetaLearner(tf.distribute.get_strategy(), cfg, policy, sampler, seed=0)
    stream = task.MetaRLTask(sampler, 20, 0).train_data(None, 0)
    meta.train_loop(stream, 1)  # traces the TF functions
    clock = Clock()
    update = meta._promp if outer == "promp" else meta._trpo  # pylint: disable=protected-access
    with contextlib.ExitStack() as stack:
      for obj, attr, part in [(sampler, "rollouts", "environment"),
                              (policies, "sample_actions", "policy_forward"),
                              (returns, "fit_linear_baseline", "baseline_fit"),
                              (meta, "_batch", "advantages_and_tensors"),
                              (meta, "_adapt", "inner_steps"),
                              (type(update), "__call__", "outer_update"),
                              ] + ([(update, "natural_direction", "outer_natural_direction")]
                                   if outer == "trpo" else []):
        stack.enter_context(patched(obj, attr, part, clock))
      times = []
      for _ in range(FLAGS.iterations):
        start = time.perf_counter()
        meta.train_loop(stream, 1)
        times.append(time.perf_counter() - start)
    seconds = sum(times)
    parts = {k: round(v / FLAGS.iterations, 3) for k, v in sorted(clock.total.items())}
    parts["other"] = round((seconds - sum(clock.total.values())) / FLAGS.iterations, 3)
    sampler.close()
    print(json.dumps({"bench": "meta_iteration", "env": name, "meta_batch_size": 20,
                      "rollouts_per_task": 20, "outer": outer,
                      "seconds_per_iteration": round(float(np.median(times)), 2),
                      "seconds_by_part": parts, "machine": MACHINE}), flush=True)


def direction_rows():
  """TRPO's natural-gradient direction on one 2D-navigation batch, both ways side by side: the
  loop over separately compiled Fisher-vector products (before) and the one-graph
  ``TRPOStep.natural_direction`` (each product on one tape over one forward pass)."""
  import tensorflow as tf
  from rl import learner, maml_rl, policies, task
  from rl import config as rl_config
  from rl.sampler import VectorSampler
  from trainer import config
  name = "2DNavigation-v0"
  sampler = VectorSampler(name, 20 * 20)
  values = dict(config.default_values(), env=name, meta_batch_size=20, rollouts_per_task=20)
  cfg = rl_config.rl_config(values, horizon=100)
  policy = policies.PolicyConfig("gaussian", sampler.obs_dim, sampler.action_dim)
  meta = learner.RLMetaLearner(tf.distribute.get_strategy(), cfg, policy, sampler, seed=0)
  tasks, seed = next(task.MetaRLTask(sampler, 20, 0).train_data(None, 0).batches)
  batches, _ = meta._adapt_and_roll(tasks, seed, cfg.inner_steps)  # pylint: disable=protected-access
  pre, post = batches[:-1], batches[-1]
  trpo = meta._trpo  # pylint: disable=protected-access
  params = {k: tf.identity(v) for k, v in meta.params.items()}
  old_logp, old_dist = trpo.old_policy(params, pre, post)
  grads, _, _ = trpo.gradient(params, pre, post, old_logp, old_dist)
  matvec = lambda v: trpo.fisher_vector(params, pre, post, old_logp, old_dist, v)
  variants = {
      "separate_products": lambda: maml_rl.conjugate_gradient(matvec, grads, cfg.trpo.cg_iters),
      "one_graph": lambda: trpo.natural_direction(params, pre, post, old_logp, old_dist, grads)}
  for variant, fn in variants.items():
    fn()  # traces
    times = []
    for _ in range(max(FLAGS.iterations, 3)):
      start = time.perf_counter()
      tf.nest.map_structure(lambda t: t.numpy(), fn())
      times.append(time.perf_counter() - start)
    print(json.dumps({"bench": "trpo_direction", "env": name, "variant": variant,
                      "cg_iters": cfg.trpo.cg_iters,
                      "seconds": round(float(np.median(times)), 3), "machine": MACHINE}),
          flush=True)
  sampler.close()


def main(_):
  sampler_rows()
  direction_rows()
  meta_iteration_rows()


if __name__ == "__main__":
  app.run(main)
