"""MAML-RL: task definitions, sampler, returns, conjugate gradient, TRPO and a short training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import tensorflow as tf

from rl import envs, learner, maml_rl, policies, returns
from rl import config as rl_config
from rl import family as rl_family
from trainer import config, maml
from rl.sampler import VectorSampler

REPO = Path(__file__).resolve().parents[1]


# --- environments ------------------------------------------------------------------------------


def test_navigation_reward_clipping_termination_and_goals():
  env = envs.Navigation2D()
  goals = np.array([t["goal"] for t in env.sample_tasks(2000, np.random.default_rng(0))])
  assert goals.min() >= -0.5 and goals.max() <= 0.5 and abs(goals.mean()) < 0.02
  env.reset_task({"goal": [0.05, -0.15]})
  obs, _ = env.reset(seed=0)
  np.testing.assert_array_equal(obs, [0, 0])
  # Actions in [-1, 1] are scaled to [-0.1, 0.1] and clipped (rllab's normalize wrapper).
  obs, reward, done, _, _ = env.step(np.array([3.0, -0.5]))  # x: 0.3, clipped to 0.1
  np.testing.assert_allclose(obs, [0.1, -0.05])
  # Minus the distance, as the original code's point environment (Table 4's numbers).
  assert reward == pytest.approx(-np.hypot(0.1 - 0.05, -0.05 + 0.15))
  assert not done
  _, reward, done, _, _ = env.step(np.array([-0.5, -0.95]))  # now 0.005 from the goal
  assert done and reward == pytest.approx(-0.005, abs=1e-12)
  raw = envs.Navigation2D(raw_actions=True)
  raw.reset_task({"goal": [0.05, -0.15]})
  raw.reset(seed=0)
  np.testing.assert_allclose(raw.action_space.high, [0.1, 0.1])
  np.testing.assert_allclose(raw.step(np.array([1.0, -0.05]))[0], [0.1, -0.05])


def test_navigation_squared_reward_is_an_option_of_the_registered_id():
  env = gym.make("maml/2DNavigation-v0", reward="squared").unwrapped
  env.reset_task({"goal": [0.05, -0.15]})
  env.reset(seed=0)
  _, reward, _, _, _ = env.step(np.array([1.0, -0.5]))
  assert reward == pytest.approx(-((0.1 - 0.05) ** 2 + (-0.05 + 0.15) ** 2))
  with pytest.raises(ValueError, match="reward='cubed'"):
    envs.make("2DNavigation-v0", reward="cubed")
  with pytest.raises(ValueError, match="not accepted by 2DNavigation-v0"):
    envs.make("2DNavigation-v0", speed=2)


def test_ant_goal_observes_the_torso_position():
  env = envs.make("AntGoal-v5")
  env.reset_task({"goal": [1.0, -2.0]})
  obs, _ = env.reset(seed=0)
  rng = np.random.default_rng(0)
  for _ in range(20):
    obs, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape))
  np.testing.assert_allclose(obs[:2], env.data.qpos[:2], atol=1e-6)  # the free joint's x, y
  np.testing.assert_allclose(obs[:2], env.data.body(1).xpos[:2], atol=1e-2)  # = the torso's
  assert np.abs(obs[:2]).max() > 0.05  # it moved: these are positions, not a constant
  assert obs.shape[0] == envs.make("AntVel-v5").observation_space.shape[0] + 2
  env.close()


def test_bandit_pays_bernoulli_rewards_of_the_task_means():
  env = envs.BernoulliBandit(5)
  env.reset_task({"means": [0.1, 0.9, 0.5, 0.0, 1.0]})
  env.reset(seed=1)
  pulls = {a: np.mean([env.step(a)[1] for _ in range(2000)]) for a in range(5)}
  assert pulls[3] == 0.0 and pulls[4] == 1.0
  assert abs(pulls[0] - 0.1) < 0.03 and abs(pulls[1] - 0.9) < 0.03


def test_tabular_mdp_follows_its_tables():
  env = envs.TabularMDP(4, 2)
  task = env.sample_tasks(1, np.random.default_rng(0))[0]
  np.testing.assert_allclose(np.asarray(task["transitions"]).sum(-1), 1.0)
  env.reset_task(task)
  obs, _ = env.reset(seed=0)
  assert obs.tolist() == [1, 0, 0, 0]
  _, reward, _, _, _ = env.step(1)
  assert reward == task["rewards"][0][1]


# Rewards recomputed from the MuJoCo state with the documented weights (rllab's tasks on
# gymnasium's v5 robots), not from the environment's own reward terms: the forward speed from
# positions before and after the step, control cost c * |a|^2 (0.05 HalfCheetah as in rllab,
# 0.5 Ant), Ant's contact cost 5e-4 * |clip(cfrc_ext, -1, 1)|^2 and survival bonus 1 while
# the torso's height is in [0.2, 1].
def _cheetah(progress):
  return lambda s: progress(s) - 0.05 * s["action_sq"]


def _ant(progress):
  return lambda s: (progress(s) + (1.0 if 0.2 <= s["z"] <= 1.0 else 0.0)
                    - 0.5 * s["action_sq"] - 5e-4 * s["contact_sq"])


@pytest.mark.parametrize("name,task,expected", [
    ("HalfCheetahVel-v5", {"velocity": 1.5}, _cheetah(lambda s: -abs(s["vx"] - 1.5))),
    ("HalfCheetahDir-v5", {"direction": -1.0}, _cheetah(lambda s: -s["vx"])),
    ("AntVel-v5", {"velocity": 2.0}, _ant(lambda s: -abs(s["vx"] - 2.0))),
    ("AntDir-v5", {"direction": 1.0}, _ant(lambda s: s["vx"])),
    ("AntGoal-v5", {"goal": [1.0, -2.0]},
     _ant(lambda s: -(abs(s["xy"][0] - 1.0) + abs(s["xy"][1] + 2.0)))),
])
def test_mujoco_tasks_reset_step_and_pay_their_reward(name, task, expected):
  env = envs.make(name)
  env.reset_task(task)
  env.reset(seed=0)
  rng = np.random.default_rng(0)
  ant = name.startswith("Ant")
  for _ in range(5):
    action = rng.uniform(-1.2, 1.2, env.action_space.shape)  # beyond the box: clipped first
    before = env.data.body(1).xpos.copy() if ant else env.data.qpos.copy()
    obs, reward, terminated, truncated, info = env.step(action)
    assert obs.shape == env.observation_space.shape and np.all(np.isfinite(obs))
    after = env.data.body(1).xpos.copy() if ant else env.data.qpos.copy()
    clipped = np.clip(action, env.action_space.low, env.action_space.high)
    state = {"vx": (after[0] - before[0]) / env.dt, "xy": env.data.body(1).xpos[:2],
             "z": env.data.qpos[2], "action_sq": float(np.sum(clipped ** 2)),
             "contact_sq": float(np.sum(np.clip(env.data.cfrc_ext, -1.0, 1.0) ** 2))}
    assert reward == pytest.approx(expected(state), abs=1e-9)
  env.close()


def test_task_distributions_match_the_paper():
  rng = np.random.default_rng(0)
  vel = [t["velocity"] for t in envs.make("HalfCheetahVel-v5").sample_tasks(500, rng)]
  assert 0 <= min(vel) and max(vel) <= 2 and abs(np.mean(vel) - 1) < 0.1
  ant = [t["velocity"] for t in envs.make("AntVel-v5").sample_tasks(500, rng)]
  assert 0 <= min(ant) and max(ant) <= 3
  dirs = {t["direction"] for t in envs.make("HalfCheetahDir-v5").sample_tasks(50, rng)}
  assert dirs == {-1.0, 1.0}
  goals = np.array([t["goal"] for t in envs.make("AntGoal-v5").sample_tasks(500, rng)])
  assert np.linalg.norm(goals, axis=1).max() <= 3.0


def test_task_families_are_registered_with_gymnasium():
  env = gym.make("maml/2DNavigation-v0")
  assert env.spec.max_episode_steps == 100
  assert gym.spec("maml/HalfCheetahDir-v5").max_episode_steps == 200


# --- sampler and returns -------------------------------------------------------------------------


def goal_seeking(obs, rng):
  del rng
  return np.clip(np.array([0.3, 0.3]) - obs, -0.1, 0.1) * 10  # commands in [-1, 1]


def test_sampler_masks_episodes_that_end_early():
  sampler = VectorSampler("2DNavigation-v0", 3)
  tasks = [{"goal": [0.3, 0.3]}, {"goal": [0.0, 0.05]}, {"goal": [-0.5, 0.5]}]
  out = sampler.rollouts(tasks, goal_seeking, horizon=20, seed=0)
  lengths = out.mask.sum(axis=1)
  assert lengths[0] == 3  # three steps of 0.1 reach (0.3, 0.3)
  assert np.all(out.mask[0, 3:] == 0) and np.all(out.rewards[0, 3:] == 0)
  assert lengths[2] == 20


@pytest.mark.parametrize("name", ["2DNavigation-v0", "HalfCheetahVel-v5"])
def test_rollouts_do_not_depend_on_the_number_of_workers(name):
  results = []
  for workers in (0, 2):
    sampler = VectorSampler(name, 6, workers)
    tasks = sampler.sample_tasks(6, np.random.default_rng(1))
    act = lambda obs, rng: rng.normal(0, 0.5, (obs.shape[0], sampler.action_dim))
    results.append(sampler.rollouts(tasks, act, horizon=30, seed=7))
    sampler.close()
  for field in ("obs", "actions", "rewards", "mask"):
    np.testing.assert_array_equal(getattr(results[0], field), getattr(results[1], field))


class _SucceedsAt(envs.TaskEnv, gym.Env):
  """Reports success at step ``at`` only; the episode ends after step ``end``."""
  reports_success = True
  observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
  action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

  def sample_tasks(self, n, rng):
    return [{"at": 0, "end": 0}] * n

  def reset_task(self, task):
    self.task = task

  def reset(self, *, seed=None, options=None):
    self.t = 0
    return np.zeros(1, np.float32), {}

  def step(self, action):
    self.t += 1
    done = self.t >= self.task["end"]
    return (np.zeros(1, np.float32), 0.0, done, False,
            {"success": float(self.t == self.task["at"])})


def test_an_episode_succeeds_if_success_is_reported_at_any_of_its_live_steps(monkeypatch):
  monkeypatch.setitem(envs.ENVS, "SucceedsAt-v0", (_SucceedsAt, 10))
  sampler = VectorSampler("SucceedsAt-v0", 4)
  tasks = [{"at": 3, "end": 10}, {"at": 9, "end": 5}, {"at": 10, "end": 10},
           {"at": 11, "end": 20}]  # the second ends before its success; the last is too late
  out = sampler.rollouts(tasks, lambda obs, rng: np.zeros((4, 1)), 10, seed=0)
  assert sampler.reports_success
  np.testing.assert_array_equal(out.success, [1.0, 0.0, 1.0, 0.0])
  assert not VectorSampler("2DNavigation-v0", 2).reports_success


def test_gae_matches_a_hand_computation():
  rewards = np.array([[1.0, 2.0, 3.0, 0.0]])
  values = np.array([[0.5, 1.0, 1.5, 0.0]])
  mask = np.array([[1.0, 1.0, 1.0, 0.0]])  # the episode ended after step 3
  gamma, lam = 0.9, 0.8
  d2 = 3.0 - 1.5  # no value after the end
  d1 = 2.0 + gamma * 1.5 - 1.0
  d0 = 1.0 + gamma * 1.0 - 0.5
  expected = [d0 + gamma * lam * (d1 + gamma * lam * d2), d1 + gamma * lam * d2, d2, 0.0]
  np.testing.assert_allclose(returns.gae(rewards, values, mask, gamma, lam)[0], expected)
  np.testing.assert_allclose(returns.discounted_returns(rewards, mask, 0.5)[0],
                             [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 0])


def test_linear_baseline_fits_live_steps_and_ignores_dead_ones():
  rng = np.random.default_rng(0)
  E, T = 6, 12
  obs = rng.normal(size=(E, T, 2))
  mask = np.ones((E, T))
  mask[2, 4:] = 0.0  # early terminations, with garbage beyond them
  mask[5, 1:] = 0.0
  obs[mask == 0] = 1e30
  feats = returns.baseline_features(obs, mask)
  true_coef = rng.normal(size=feats.shape[-1])
  target = (feats @ true_coef) * mask
  values = returns.fit_linear_baseline(obs, target, mask, reg=1e-10)
  assert np.all(np.isfinite(values))
  np.testing.assert_allclose(values[mask > 0], target[mask > 0], atol=1e-4)
  assert np.all(values[mask == 0] == 0)


# --- conjugate gradient and TRPO ---------------------------------------------------------------


def test_conjugate_gradient_solves_a_random_spd_system():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(12, 12))
  A = tf.constant(q @ q.T + 12 * np.eye(12))
  b = {"x": tf.constant(rng.normal(size=(3, 4)))}
  matvec = lambda v: {"x": tf.reshape(A @ tf.reshape(v["x"], [12, 1]), [3, 4])}
  x = maml_rl.conjugate_gradient(matvec, b, iters=12, tol=1e-24)
  np.testing.assert_allclose(np.linalg.solve(A.numpy(), b["x"].numpy().reshape(-1)),
                             x["x"].numpy().reshape(-1), rtol=1e-8)


def nav_batches(params, cfg, tasks, R=8, T=30, seed=0):
  sampler = VectorSampler("2DNavigation-v0", len(tasks) * R)
  env_tasks = [tasks[e // R] for e in range(len(tasks) * R)]
  M = len(tasks)

  def to_batch(fast, s):
    act = lambda obs, rng: policies.sample_actions(cfg, fast, obs.reshape(M, R, -1), rng).reshape(M * R, -1)
    out = sampler.rollouts(env_tasks, act, T, s)
    adv = np.zeros_like(out.rewards)
    for m in range(M):
      rows = slice(m * R, (m + 1) * R)
      rets = returns.discounted_returns(out.rewards[rows], out.mask[rows], 0.99)
      vals = returns.fit_linear_baseline(out.obs[rows], rets, out.mask[rows])
      adv[rows] = returns.gae(out.rewards[rows], vals, out.mask[rows], 0.99, 1.0)
    shape = lambda x: x.reshape((M, R * T) + x.shape[2:])
    return {"obs": tf.constant(shape(out.obs)), "actions": tf.constant(shape(out.actions)),
            "advantages": tf.constant(shape(adv), tf.float32),
            "mask": tf.constant(shape(out.mask))}

  tiled = {k: np.broadcast_to(v[None], (M,) + v.shape) for k, v in params.items()}
  pre = to_batch(tiled, seed)
  fast = maml_rl.adapt(cfg, {k: tf.constant(v) for k, v in params.items()}, [pre], 0.1, True)
  post = to_batch({k: v.numpy() for k, v in fast.items()}, seed + 1)
  return pre, post


def test_meta_gradient_through_the_inner_step_matches_finite_differences():
  """MAML-RL's outer gradient, differentiated through the inner policy-gradient step (second
  order), against central differences in float64."""
  cfg = policies.PolicyConfig("gaussian", 2, 2, (8,))
  params = policies.init_params(cfg, 0)
  # Non-zero biases: episodes start at the origin, where zero biases would put every ReLU
  # exactly at its kink, and differences across a kink are not derivatives.
  noise = np.random.default_rng(5)
  params = {k: v + (noise.normal(0, 0.3, v.shape).astype(v.dtype) if k.endswith("bias") else 0)
            for k, v in params.items()}
  tasks = envs.Navigation2D().sample_tasks(2, np.random.default_rng(0))
  pre, post = nav_batches(params, cfg, tasks, R=4, T=10)
  f64 = lambda batch: {k: tf.cast(v, tf.float64) if v.dtype.is_floating else v
                       for k, v in batch.items()}
  pre, post = f64(pre), f64(post)
  p64 = {k: tf.constant(v, tf.float64) for k, v in params.items()}
  old_logp, old_dist = maml_rl.TRPOStep(cfg, maml_rl.TRPOConfig(), 0.1, False).old_policy(
      p64, [pre], post)
  old_logp = tf.stop_gradient(old_logp) + 0.05  # ratio != 1, so the surrogate is not trivial
  objective = lambda p: maml_rl.surrogate_and_kl(cfg, p, [pre], post, old_logp, old_dist,
                                                 0.1, False)[0]
  with tf.GradientTape() as tape:
    tape.watch(list(p64.values()))
    value = objective(p64)
  grads = tape.gradient(value, p64)
  rng = np.random.default_rng(3)
  for _ in range(3):
    direction = {k: tf.constant(rng.normal(size=v.shape), tf.float64) for k, v in p64.items()}
    analytic = sum(float(tf.reduce_sum(grads[k] * direction[k])) for k in p64)
    eps = 1e-6
    shifted = lambda sign: objective({k: p64[k] + sign * eps * direction[k] for k in p64})
    numeric = (float(shifted(1)) - float(shifted(-1))) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_evaluation_takes_steps_after_the_first_at_the_scaled_rate():
  """The original's RL test protocol: the first step at the inner rate, later ones at half."""
  cfg = policies.PolicyConfig("gaussian", 2, 2, (8,))
  params = policies.init_params(cfg, 0)
  tasks = envs.Navigation2D().sample_tasks(2, np.random.default_rng(0))
  first, second = nav_batches(params, cfg, tasks, R=4, T=10)
  tf_params = {k: tf.constant(v) for k, v in params.items()}
  got = maml_rl.adapt(cfg, tf_params, [first, second], 0.3, True, later_lr_scale=0.5)
  after_one = maml_rl.adapt(cfg, tf_params, [first], 0.3, True)
  with tf.GradientTape() as tape:
    tape.watch(list(after_one.values()))
    loss = tf.reduce_sum(maml_rl.inner_losses(cfg, after_one, second))
  grads = tape.gradient(loss, after_one)
  for k in params:
    np.testing.assert_allclose(got[k].numpy(), (after_one[k] - 0.15 * grads[k]).numpy(),
                               rtol=1e-5, atol=1e-6, err_msg=k)
  unscaled = maml_rl.adapt(cfg, tf_params, [first, second], 0.3, True)
  assert not np.allclose(unscaled["out/kernel"].numpy(), got["out/kernel"].numpy())


def test_evaluation_rollouts_beyond_the_sampler_run_in_passes_of_the_right_tasks():
  """More episodes per task in evaluation than the sampler has room for: each episode still
  runs its own task (the reward is minus the distance to that task's goal) and policy."""
  values = dict(config.default_values(), env="2DNavigation-v0", meta_batch_size=4,
                rollouts_per_task=2, eval_rollouts_per_task=4, eval_inner_steps=1)
  sampler = VectorSampler("2DNavigation-v0", 8)
  cfg = rl_config.rl_config(values, horizon=5)
  policy = policies.PolicyConfig("gaussian", 2, 2, (8,))
  meta = learner.RLMetaLearner(tf.distribute.get_strategy(), cfg, policy, sampler, seed=0)
  tasks = envs.Navigation2D().sample_tasks(3, np.random.default_rng(1))  # 2 passes, 1 padded
  fast = meta._numpy_tiled(3)
  # Each task its own, noiseless policy; from the origin (zero hidden biases) its first
  # action is its output bias, scaled to the 0.1 speed limit.
  biases = np.array([[0.5, 0.0], [0.0, 0.5], [-0.5, 0.0]], np.float32)
  fast = dict(fast, **{"out/bias": biases, "log_std": np.full((3, 2), -20.0, np.float32)})
  out = meta._rollouts(tasks, fast, seed=3, R=4)
  assert out.obs.shape == (12, 5, 2)
  for e in range(12):
    goal = np.asarray(tasks[e // 4]["goal"])
    np.testing.assert_allclose(out.rewards[e, 0], -np.linalg.norm(out.obs[e, 1] - goal),
                               rtol=1e-5)
  np.testing.assert_allclose(out.obs[:, 1] - out.obs[:, 0], np.repeat(0.1 * biases, 4, axis=0),
                             atol=1e-6)
  _, rets = meta._adapt_and_roll(tasks, 3, 1, evaluation=True)
  assert [r.shape for r in rets] == [(3,), (3,)]


def test_evaluation_rollouts_that_do_not_divide_the_sampler_are_refused_by_name():
  from pipeline.errors import UsageError

  values = dict(config.default_values(), dataset="rl", env="2DNavigation-v0", meta_batch_size=4,
                rollouts_per_task=2, eval_rollouts_per_task=3)
  with pytest.raises(UsageError, match=r"--eval_rollouts_per_task=3 must divide .* = 8"):
    rl_family.build(values, tf.distribute.get_strategy())


def test_promp_settings_without_promp_are_refused_by_name():
  from pipeline.errors import UsageError

  values = dict(config.default_values(), dataset="rl", env="2DNavigation-v0", meta_batch_size=4,
                rollouts_per_task=2, clip_eps=0.2)
  with pytest.raises(UsageError, match=r"^--clip_eps=0.2: ProMP's settings, read only with "
                                       r"--outer_optimizer=promp \(this run: "
                                       r"--outer_optimizer=trpo\)$"):
    rl_family.build(values, tf.distribute.get_strategy())


def test_a_promp_meta_iteration_checkpoints_its_kl_weights_and_counts_one_iteration():
  """(With E-MAML's term, whose scores the learner puts in the post-update batch.)"""
  values = dict(config.default_values(), dataset="rl", env="2DNavigation-v0", meta_batch_size=2,
                rollouts_per_task=2, horizon=5, hidden_sizes="8", outer_optimizer="promp",
                inner_estimator="lvc", promp_steps=2, inner_kl_target=1e-6, emaml_weight=0.3)
  meta = rl_family.build(values, tf.distribute.get_strategy()).learner
  before = {k: v.numpy().copy() for k, v in meta.params.items()}
  metrics = meta.meta_iteration(envs.Navigation2D().sample_tasks(2, np.random.default_rng(0)), 7)
  assert int(meta.step) == 1 and int(meta.optimizer.iterations) == 2
  assert {"surrogate_after", "inner_kl", "inner_kl_coeff"} <= set(metrics)
  # The KL is far above the tiny target after two Adam steps: its weight doubled.
  assert metrics["inner_kl_coeff"] == pytest.approx(2 * 5e-4)
  items = meta.checkpoint_items()["optimizer"]
  assert set(items) == {"iterations", "adam", "inner_kl_coeff"}
  assert any(np.abs(v.numpy() - before[k]).max() > 0 for k, v in meta.params.items())


def test_emaml_weight_turns_the_trpo_direction_and_leaves_the_surrogate_value():
  """--emaml_weight adds E-MAML's term (exact by enumeration in test_rl_estimators.py) to the
  gradient TRPO follows; its value is zero, so the line search compares the same surrogate."""
  cfg = policies.PolicyConfig("gaussian", 2, 2, (16, 16))
  params = policies.init_params(cfg, 0)
  tasks = envs.Navigation2D().sample_tasks(3, np.random.default_rng(0))
  pre, post = nav_batches(params, cfg, tasks, T=30)
  post = dict(post, emaml_scores=tf.constant([1.0, -1.5, 0.5]))
  tf_params = {k: tf.constant(v) for k, v in params.items()}
  plain = maml_rl.TRPOStep(cfg, maml_rl.TRPOConfig(), 0.1, first_order=False, horizon=30)
  emaml = maml_rl.TRPOStep(cfg, maml_rl.TRPOConfig(), 0.1, first_order=False, horizon=30,
                           emaml_weight=0.5)
  old_logp, old_dist = plain.old_policy(tf_params, [pre], post)
  g0, s0, _ = plain.gradient(tf_params, [pre], post, old_logp, old_dist)
  g1, s1, _ = emaml.gradient(tf_params, [pre], post, old_logp, old_dist)
  assert float(s1) == pytest.approx(float(s0), rel=1e-6)
  # The difference is the term's gradient: -0.5 mean_m(score_m grad S_m), S_m the mean over
  # task m's 8 episodes of their summed log-probabilities.
  with tf.GradientTape() as tape:
    tape.watch(list(tf_params.values()))
    logp = policies.log_prob(cfg, maml.tile(tf_params, 3), pre["obs"], pre["actions"])
    term = -0.5 * tf.reduce_mean(post["emaml_scores"] * tf.reduce_sum(logp * pre["mask"], 1) / 8)
  expected = tape.gradient(term, tf_params)
  for k in params:
    np.testing.assert_allclose((g1[k] - g0[k]).numpy(), expected[k].numpy(), rtol=1e-4,
                               atol=1e-6, err_msg=k)
  assert max(float(tf.reduce_max(tf.abs(expected[k]))) for k in params) > 1e-2


def test_trpo_step_improves_the_surrogate_within_the_kl_bound():
  cfg = policies.PolicyConfig("gaussian", 2, 2, (16, 16))
  params = policies.init_params(cfg, 0)
  tasks = envs.Navigation2D().sample_tasks(3, np.random.default_rng(0))
  pre, post = nav_batches(params, cfg, tasks)
  trpo = maml_rl.TRPOStep(cfg, maml_rl.TRPOConfig(max_kl=0.01), 0.1, first_order=False)
  tf_params = {k: tf.constant(v) for k, v in params.items()}
  new, info = trpo(tf_params, [pre], post)
  assert info["accepted"] == 1.0
  assert info["surrogate_after"] < info["surrogate_before"]
  old_logp, old_dist = trpo.old_policy(tf_params, [pre], post)
  _, kl = maml_rl.surrogate_and_kl(cfg, new, [pre], post, old_logp, old_dist, 0.1, False)
  assert 0 < float(kl) <= 0.01
  assert float(kl) == pytest.approx(info["kl"], rel=1e-5)
  # Fisher-vector products are symmetric positive (semi)definite, as CG needs.
  rng = np.random.default_rng(1)
  u = {k: tf.constant(rng.normal(size=v.shape), tf.float32) for k, v in params.items()}
  v = {k: tf.constant(rng.normal(size=v.shape), tf.float32) for k, v in params.items()}
  fu = trpo.fisher_vector(tf_params, [pre], post, old_logp, old_dist, u)
  fv = trpo.fisher_vector(tf_params, [pre], post, old_logp, old_dist, v)
  assert float(maml_rl.dot(fu, v)) == pytest.approx(float(maml_rl.dot(fv, u)), rel=1e-3)
  assert float(maml_rl.dot(fu, u)) > 0


def test_compiled_natural_direction_equals_conjugate_gradient_on_separate_products():
  """TRPO's one-graph direction (one forward pass, every Fisher-vector product on one tape,
  the loop's exit masked) against the plain loop over separately computed products. Float64
  and a damping that keeps the system well conditioned: ten CG iterations on the undamped
  Fisher matrix amplify rounding (0.4% in float32, 1e-5 in float64), which would hide a real
  difference of either size."""
  cfg = policies.PolicyConfig("gaussian", 2, 2, (16, 16))
  params = policies.init_params(cfg, 0)
  tasks = envs.Navigation2D().sample_tasks(3, np.random.default_rng(0))
  as64 = lambda b: {k: tf.cast(v, tf.float64) for k, v in b.items()}
  pre, post = map(as64, nav_batches(params, cfg, tasks))
  tf_params = {k: tf.constant(v, tf.float64) for k, v in params.items()}
  for iters in (3, 10):
    trpo = maml_rl.TRPOStep(cfg, maml_rl.TRPOConfig(cg_iters=iters, cg_damping=0.1), 0.1,
                            first_order=False)
    old_logp, old_dist = trpo.old_policy(tf_params, [pre], post)
    grads, _, _ = trpo.gradient(tf_params, [pre], post, old_logp, old_dist)
    matvec = lambda v: trpo.fisher_vector(tf_params, [pre], post, old_logp, old_dist, v)
    expected = maml_rl.conjugate_gradient(matvec, grads, iters)
    direction, dfd = trpo.natural_direction(tf_params, [pre], post, old_logp, old_dist, grads)
    scale = max(float(tf.reduce_max(tf.abs(v))) for v in expected.values())
    for k in params:
      np.testing.assert_allclose(direction[k].numpy(), expected[k].numpy(), rtol=0,
                                 atol=1e-8 * scale, err_msg=(iters, k))
    assert float(dfd) == pytest.approx(float(maml_rl.dot(expected, matvec(expected))), rel=1e-8)


def test_masked_conjugate_gradient_stops_where_the_loop_breaks():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(4, 4))
  a = tf.constant(a @ a.T + 4 * np.eye(4))
  matvec = lambda v: {"x": tf.linalg.matvec(a, v["x"])}
  b = {"x": tf.constant(rng.normal(size=4))}
  for iters in (2, 4, 9):  # 4 iterations solve a 4 x 4 system; later ones must change nothing
    loop = maml_rl.conjugate_gradient(matvec, b, iters, tol=1e-20)["x"].numpy()
    masked = maml_rl.masked_conjugate_gradient(matvec, b, iters, tol=1e-20)["x"].numpy()
    np.testing.assert_allclose(masked, loop, rtol=1e-9, atol=1e-12, err_msg=iters)
  np.testing.assert_allclose(masked, np.linalg.solve(a.numpy(), b["x"].numpy()), rtol=1e-8)


def test_categorical_policy_log_probs_and_kl():
  cfg = policies.PolicyConfig("categorical", 1, 3, (4,))
  params = {k: tf.constant(v[None]) for k, v in policies.init_params(cfg, 0).items()}
  obs = tf.zeros([1, 2, 1])
  logits = policies.distribution(cfg, params, obs)["logits"]
  logp = policies.log_prob(cfg, params, obs, tf.constant([[0, 2]]))
  log_softmax = tf.nn.log_softmax(logits).numpy()[0]
  np.testing.assert_allclose(logp.numpy()[0], [log_softmax[0, 0], log_softmax[1, 2]], rtol=1e-6)
  other = {"logits": tf.constant([[[0.3, -1.0, 2.0], [1.0, 1.0, 0.0]]])}
  p, q = (tf.nn.softmax(d["logits"]).numpy() for d in (other, {"logits": logits}))
  expected = np.sum(p * (np.log(p) - np.log(q)), axis=-1)  # KL(other || policy)
  np.testing.assert_allclose(policies.kl(cfg, other, {"logits": logits}), expected, rtol=1e-5)


def test_gaussian_kl_matches_the_closed_form_of_different_gaussians():
  cfg = policies.PolicyConfig("gaussian", 2, 2, (4,))
  old = {"mean": tf.constant([[[0.5, -1.0]]]), "log_std": tf.constant([[[0.1, -0.7]]])}
  new = {"mean": tf.constant([[[-0.2, 0.4]]]), "log_std": tf.constant([[[-0.3, 0.2]]])}
  s0, s1 = np.exp([0.1, -0.7]), np.exp([-0.3, 0.2])
  m0, m1 = np.array([0.5, -1.0]), np.array([-0.2, 0.4])
  # KL(N0 || N1) per dimension: log(s1/s0) + (s0^2 + (m0-m1)^2) / (2 s1^2) - 1/2, summed.
  expected = np.sum(np.log(s1 / s0) + (s0**2 + (m0 - m1)**2) / (2 * s1**2) - 0.5)
  assert float(policies.kl(cfg, old, new)[0, 0]) == pytest.approx(expected, rel=1e-5)


# --- through the trainer -----------------------------------------------------------------------

NAV = ["--dataset=rl", "--env=2DNavigation-v0", "--meta_batch_size=10", "--rollouts_per_task=10",
       "--hidden_sizes=32,32", "--inner_lr=0.1", "--eval_inner_steps=2", "--eval_every=0",
       "--val_episodes=10", "--eval_episodes=25", "--log_every=1", "--steps_per_loop=1",
       "--horizon=50"]


def trainer(*args):
  return subprocess.run([sys.executable, "-m", "trainer.main", *args], capture_output=True,
                        text=True, cwd=REPO, timeout=900)


@pytest.mark.slow
def test_short_navigation_meta_training_makes_adaptation_pay(tmp_path):
  result = trainer(*NAV, "--num_iterations=15", "--checkpoint_every=5",
                   f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "run" / "eval_test.json").read_text())
  assert report["metric"] == "return" and list(report["by_inner_steps"]) == ["0", "1", "2"]
  assert report["episodes"] == 25  # tasks; the last batch of 10 is cut to 5
  pre, post = report["by_inner_steps"]["0"], report["by_inner_steps"]["2"]
  assert post["mean"] - post["ci95"] > pre["mean"] + pre["ci95"], report
  assert (report["rollouts_per_task"], report["later_lr_scale"]) == (10, 1.0)
  # The original's test protocol on the same run: its own report, the protocol recorded in it.
  again = trainer(*NAV, "--mode=eval", "--eval_rollouts_per_task=20", "--eval_later_lr_scale=0.5",
                  f"--model_dir={tmp_path / 'run'}")
  assert again.returncode == 0, again.stderr[-3000:]
  other = json.loads((tmp_path / "run" / "eval_test_rollouts20_laterlr0.5.json").read_text())
  assert (other["rollouts_per_task"], other["later_lr_scale"]) == (20, 0.5)
  assert other["by_inner_steps"]["0"]["mean"] != report["by_inner_steps"]["0"]["mean"]


@pytest.mark.slow
def test_rl_runs_resume_from_checkpoints_like_supervised_ones(tmp_path):
  common = [*NAV, "--checkpoint_every=2", "--mode=train", "--deterministic"]
  straight = trainer(*common, "--num_iterations=4", f"--model_dir={tmp_path / 'a'}")
  assert straight.returncode == 0, straight.stderr[-3000:]
  first = trainer(*common, "--num_iterations=2", f"--model_dir={tmp_path / 'b'}")
  second = trainer(*common, "--num_iterations=4", f"--model_dir={tmp_path / 'b'}")
  assert first.returncode == 0 and second.returncode == 0, second.stderr[-3000:]
  assert "resumed from" in second.stderr
  ra = tf.train.load_checkpoint(str(tmp_path / "a" / "ckpt"))
  rb = tf.train.load_checkpoint(str(tmp_path / "b" / "ckpt"))
  names = [n for n in ra.get_variable_to_shape_map() if n.startswith("params/")]
  assert names
  for n in names:
    np.testing.assert_allclose(ra.get_tensor(n), rb.get_tensor(n), rtol=1e-6, atol=1e-7,
                               err_msg=n)
