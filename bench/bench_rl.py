#!/usr/bin/env python
"""MAML-RL benchmark, one JSON object per line: sampler steps/s and seconds per meta-iteration.

  python bench/bench_rl.py
  python bench/bench_rl.py --envs=2DNavigation-v0 --workers=0,2 --iterations=3
"""

from __future__ import annotations

import json
import os
import platform
import time

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("envs", ["2DNavigation-v0", "HalfCheetahDir-v5"], "Task families.")
flags.DEFINE_list("workers", ["1", "2"], "Worker process counts for the sampler (1 = in-process).")
flags.DEFINE_integer("num_envs", 200, "Environments sampled at once.")
flags.DEFINE_integer("iterations", 2, "Meta-iterations to time (paper settings for 2D nav).")

MACHINE = f"CPU {platform.machine()} x{os.cpu_count()}"


def main(_):
  import tensorflow as tf
  from rl import envs, learner, policies, task
  from rl import config as rl_config
  from trainer import config
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
                        "num_envs": FLAGS.num_envs, "env_steps_per_s": round(out.mask.sum() / elapsed),
                        "includes": "policy forward pass", "machine": MACHINE}), flush=True)
  name = "2DNavigation-v0"
  sampler = VectorSampler(name, 20 * 20)
  values = dict(config.default_values(), env=name, meta_batch_size=20, rollouts_per_task=20)
  cfg = rl_config.rl_config(values, horizon=100)
  policy = policies.PolicyConfig("gaussian", sampler.obs_dim, sampler.action_dim)
  meta = learner.RLMetaLearner(tf.distribute.get_strategy(), cfg, policy, sampler, seed=0)
  stream = task.MetaRLTask(sampler, 20, 0).train_data(None, 0)
  meta.train_loop(stream, 1)  # traces the TF functions
  times = []
  for _ in range(FLAGS.iterations):
    start = time.perf_counter()
    meta.train_loop(stream, 1)
    times.append(time.perf_counter() - start)
  print(json.dumps({"bench": "meta_iteration", "env": name, "meta_batch_size": 20,
                    "rollouts_per_task": 20, "outer": "trpo",
                    "seconds_per_iteration": round(float(np.median(times)), 2),
                    "machine": MACHINE}), flush=True)


if __name__ == "__main__":
  app.run(main)
