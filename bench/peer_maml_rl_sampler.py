#!/usr/bin/env python
"""The sampler yardstick of issue 25: pytorch-maml-rl's sampler on 2D navigation, measured as
bench/bench_rl.py measures ours (env steps per second, the policy's forward pass included).

Not part of the toolkit and not run by the tests: it needs pytorch-maml-rl's code (github
tristandeleu/pytorch-maml-rl, commit 21d4ba1), PyTorch, gym 0.17 and numpy 1 (its vector env
uses ``np.float_``), none of which this project depends on. Its MuJoCo tasks need mujoco-py
and MuJoCo 2 binaries, so only 2D navigation (pure numpy) runs here.

  python3.11 -m venv /tmp/venv-pmrl
  /tmp/venv-pmrl/bin/pip install torch==2.13.0 gym==0.17.3 'numpy<2'
  /tmp/venv-pmrl/bin/python bench/peer_maml_rl_sampler.py --peer_dir=/path/to/pytorch-maml-rl

One row, one JSON line: ``in-process``, its ``SamplerWorker.sample_trajectories`` (gym's
vector env over ``--num_envs`` environments of one task, its ``NormalMLPPolicy`` 64-64 tanh)
until every episode ends, called in this process, as bench_rl.py's in-process row runs ours
(median of ``--repeats`` after a warm-up). Its multi-process ``MultiTaskSampler`` is not
measured: on Python 3.11 with torch 2.13 its ``sample()`` waited forever here (no CPU used in
90 s), with one worker as with two.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time

MACHINE = f"CPU {platform.machine()} x{os.cpu_count()}"
ENV, ENV_KWARGS, HIDDEN = "2DNavigation-v0", {"low": -0.5, "high": 0.5}, (64, 64)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--peer_dir", required=True, help="a checkout of pytorch-maml-rl")
  parser.add_argument("--num_envs", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
  args = parser.parse_args()
  if not os.path.isdir(os.path.join(args.peer_dir, "maml_rl")):
    sys.exit(f"--peer_dir={args.peer_dir}: no maml_rl/ package there (a pytorch-maml-rl "
             "checkout is needed)")
  sys.path.insert(0, args.peer_dir)
  import gym
  import numpy as np
  import torch
  import maml_rl.envs  # noqa: F401  (registers 2DNavigation-v0)
  from maml_rl.baseline import LinearFeatureBaseline
  from maml_rl.samplers.multi_task_sampler import SamplerWorker
  from maml_rl.utils.helpers import get_input_size, get_policy_for_env

  env = gym.make(ENV, **ENV_KWARGS)
  policy = get_policy_for_env(env, hidden_sizes=HIDDEN, nonlinearity="tanh")
  baseline = LinearFeatureBaseline(get_input_size(env))
  base = {"bench": "sampler", "peer": "pytorch-maml-rl@21d4ba1", "env": ENV,
          "num_envs": args.num_envs, "includes": "policy forward pass",
          "torch": torch.__version__, "gym": gym.__version__, "machine": MACHINE}

  queue = multiprocessing.Queue()
  worker = SamplerWorker(0, ENV, ENV_KWARGS, args.num_envs, env.observation_space,
                         env.action_space, policy, baseline, 0, queue, queue, queue,
                         multiprocessing.Lock())  # never started: its methods run here
  rates = []
  for repeat in range(args.repeats + 1):
    worker.envs.reset_task(env.unwrapped.sample_tasks(1)[0])
    start, steps = time.perf_counter(), 0
    for _, _, _, batch_ids in worker.sample_trajectories():
      steps += len(batch_ids)
    if repeat:  # the first run warms up
      rates.append(steps / (time.perf_counter() - start))
  print(json.dumps({**base, "path": "in-process", "workers": 1,
                    "env_steps_per_s": round(float(np.median(rates)))}), flush=True)


if __name__ == "__main__":
  main()
