"""Meta-World task families (rl/metaworld_tasks.py). Meta-World lives in its own virtualenv
(``make install RL=metaworld``: it pins MuJoCo 3.3.0); in the main one these tests skip, except
the refusal that a user without it sees."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import trainer
from trainer import config

HAS_METAWORLD = importlib.util.find_spec("metaworld") is not None
needs_metaworld = pytest.mark.skipif(not HAS_METAWORLD, reason="Meta-World is installed only in "
                                     "its own virtualenv (make install RL=metaworld)")


@pytest.mark.skipif(HAS_METAWORLD, reason="checks the refusal where Meta-World is missing")
def test_a_metaworld_family_without_the_package_is_refused_in_one_line():
  from pipeline.errors import UsageError
  from rl import family as rl_family

  values = dict(config.default_values(), dataset="rl", env="ML1-reach-v3", meta_batch_size=2,
                rollouts_per_task=2)
  with pytest.raises(UsageError, match=r"^--env=ML1-reach-v3: Meta-World is not installed: .*"
                                       r"make install RL=metaworld"):
    rl_family.build(values, tf.distribute.get_strategy())


@needs_metaworld
def test_ml1_tasks_are_the_benchmarks_own_train_and_held_out_test_goals():
  import pickle

  from rl import metaworld_tasks

  env = metaworld_tasks.MetaWorldTasks("ML1", "reach-v3")
  bench = metaworld_tasks.benchmark("ML1", "reach-v3")
  rng = np.random.default_rng(0)
  train = env.sample_tasks(50, rng, "train")
  assert sorted(t["index"] for t in train) == list(range(50))  # no repeats while n allows
  goal = lambda tasks, i: pickle.loads(tasks[i].data)["rand_vec"]
  for task in env.sample_tasks(3, rng, "test"):
    env.reset_task(task)
    env.reset(seed=0)
    np.testing.assert_array_equal(env._env._last_rand_vec, goal(bench.test_tasks, task["index"]))
  train_goals = {tuple(goal(bench.train_tasks, i)) for i in range(50)}
  assert not train_goals & {tuple(goal(bench.test_tasks, i)) for i in range(50)}
  assert {t["split"] for t in env.sample_tasks(5, rng, "val")} == {"test"}
  obs, _ = env.reset(seed=1)
  assert obs.shape == (39,) and not obs[36:].any()  # the goal is hidden (ML benchmarks)


@needs_metaworld
def test_success_is_meta_worlds_own_expert_policy_succeeds_random_actions_do_not():
  """Through the sampler: Meta-World's scripted reach policy, told the hidden goal, succeeds
  on every task; random actions on almost none."""
  from metaworld.policies import SawyerReachV3Policy

  from rl.sampler import VectorSampler

  sampler = VectorSampler("ML1-reach-v3", 4)
  assert sampler.reports_success
  tasks = sampler.sample_tasks(4, np.random.default_rng(0), "test")
  random = sampler.rollouts(tasks, lambda obs, rng: rng.uniform(-1, 1, (4, 4)), 100, seed=0)
  assert random.success.sum() <= 1
  expert = SawyerReachV3Policy()

  def scripted(obs, rng):
    del rng
    told = obs.astype(np.float64)
    told[:, 36:39] = [env._env._target_pos for env in sampler._envs]  # the hidden goal
    return np.stack([expert.get_action(o) for o in told])

  out = sampler.rollouts(tasks, scripted, 200, seed=0)
  np.testing.assert_array_equal(out.success, np.ones(4))
  assert out.mask.sum() == 4 * 200  # success does not end an episode


@needs_metaworld
def test_a_short_ml1_run_reports_success_rates_by_inner_steps(tmp_path):
  """(Not marked slow, 15 s: CI runs Meta-World in its TF 2.20 part, on the quick tests.)"""
  run = tmp_path / "run"
  result = trainer("--dataset=rl", "--env=ML1-reach-v3", "--meta_batch_size=2",
                   "--rollouts_per_task=2", "--horizon=20", "--hidden_sizes=16",
                   "--num_iterations=2", "--eval_every=1", "--val_episodes=2",
                   "--eval_episodes=4", "--eval_inner_steps=2", "--log_every=1",
                   "--steps_per_loop=1", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((run / "eval_test.json").read_text())
  rates = report["success_rate_by_inner_steps"]
  assert list(rates) == ["0", "1", "2"] and report["episodes"] == 4
  assert all(0.0 <= r["mean"] <= 1.0 for r in rates.values())
  lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert any("train/success_post" in line for line in lines)
  assert any("val/success_rate_after_2_steps" in line for line in lines)
  assert "success rate 0 steps" in result.stdout


@needs_metaworld
def test_every_metaworld_config_builds_its_sampler_and_learner():
  """What test_trainer's every-config check skips without Meta-World, here where it is."""
  import subprocess
  import sys
  import textwrap

  from helpers import REPO

  script = textwrap.dedent("""
      import sys
      import tensorflow as tf
      from absl import flags
      from trainer import config, family
      from rl import envs
      for name in sys.argv[1:]:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["x", f"--flagfile=configs/{name}"])
        values = config.flag_values()
        assert values["env"] in envs.METAWORLD_FAMILIES, name
        values.update(meta_batch_size=2, rollouts_per_task=1, eval_rollouts_per_task=None)
        built = family.family_of("rl").build(values, tf.distribute.get_strategy())
        print(name, values["env"], built.learner.sampler.obs_dim, built.learner.sampler.action_dim,
              built.learner.cfg.horizon, built.learner.cfg.outer_optimizer, flush=True)
  """)
  names = sorted(p.name for p in (REPO / "configs").glob("*metaworld*.cfg"))
  assert len(names) == 4
  result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
  assert rows["metaworld_ml10.cfg"] == ["ML10", "39", "4", "150", "trpo"]
  assert rows["promp_metaworld_ml1_reach.cfg"] == ["ML1-reach-v3", "39", "4", "150", "promp"]
  assert set(rows) == set(names)
