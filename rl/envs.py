"""MAML-RL task distributions as gymnasium environments (arXiv 1703.03400, section 5.3, A.2).

Each environment holds one task at a time: ``sample_tasks(n, rng)`` draws task descriptions
(plain dicts, picklable, so worker processes can receive them) and ``reset_task(task)`` makes
one current. The locomotion tasks subclass gymnasium's MuJoCo v5 environments and replace
only the reward (and, for Ant goal, put the torso's x, y back into the observation), so physics
and observations otherwise stay upstream's.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class TaskEnv:
  """The interface the sampler relies on."""

  def sample_tasks(self, n: int, rng: np.random.Generator) -> list[dict]:
    raise NotImplementedError

  def reset_task(self, task: dict) -> None:
    raise NotImplementedError


# --- 2D navigation -------------------------------------------------------------------------------


class Navigation2D(TaskEnv, gym.Env):
  """Point agent from the origin to a goal drawn uniformly in the unit square [-0.5, 0.5]^2.

  Observation: position. Action: a velocity command in [-1, 1]^2, scaled to [-0.1, 0.1] and
  clipped, as rllab's ``normalize`` wrapper does in the original code (``raw_actions=True``: the
  action is the velocity itself, clipped to [-0.1, 0.1]; a unit-variance Gaussian policy then
  saturates the clip and its noise stops reaching the trajectory). Reward: minus the distance
  to the goal after the move (``reward="distance"``, the original code's point environment,
  which produced the paper's Table 4), or minus its square (``"squared"``, as the paper's text
  says). Done within 0.01 of the goal (each coordinate); the horizon (100) is the sampler's.
  """

  SPEED = 0.1

  def __init__(self, task: dict | None = None, reward: str = "distance",
               raw_actions: bool = False):
    if reward not in ("distance", "squared"):
      raise ValueError(f"2DNavigation reward={reward!r}: must be distance or squared")
    self.reward, self.raw_actions = reward, raw_actions
    self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
    bound = self.SPEED if raw_actions else 1.0
    self.action_space = spaces.Box(-bound, bound, (2,), np.float32)
    self._goal = np.zeros(2)
    self._state = np.zeros(2)
    if task:
      self.reset_task(task)

  def sample_tasks(self, n, rng):
    return [{"goal": g} for g in rng.uniform(-0.5, 0.5, (n, 2)).tolist()]

  def reset_task(self, task):
    self._goal = np.asarray(task["goal"], np.float64)

  def reset(self, *, seed=None, options=None):
    super().reset(seed=seed)
    self._state = np.zeros(2)
    return self._state.astype(np.float32), {}

  def step(self, action):
    scale = 1.0 if self.raw_actions else self.SPEED
    action = np.clip(np.asarray(action, np.float64) * scale, -self.SPEED, self.SPEED)
    self._state = self._state + action
    delta = self._state - self._goal
    squared = float(np.sum(delta ** 2))
    reward = -squared if self.reward == "squared" else -np.sqrt(squared)
    done = bool(np.all(np.abs(delta) < 0.01))
    return self._state.astype(np.float32), reward, done, False, {"task": {"goal": self._goal}}


# --- bandits and tabular MDPs --------------------------------------------------------------------


class BernoulliBandit(TaskEnv, gym.Env):
  """K arms with success probabilities drawn U[0, 1] per task; a constant observation."""

  def __init__(self, k: int = 5, task: dict | None = None):
    self.k = k
    self.observation_space = spaces.Box(0.0, 0.0, (1,), np.float32)
    self.action_space = spaces.Discrete(k)
    self._means = np.full(k, 0.5)
    if task:
      self.reset_task(task)

  def sample_tasks(self, n, rng):
    return [{"means": m} for m in rng.uniform(0, 1, (n, self.k)).tolist()]

  def reset_task(self, task):
    self._means = np.asarray(task["means"], np.float64)

  def reset(self, *, seed=None, options=None):
    super().reset(seed=seed)
    return np.zeros(1, np.float32), {}

  def step(self, action):
    reward = float(self.np_random.random() < self._means[int(action)])
    return np.zeros(1, np.float32), reward, False, False, {}


class TabularMDP(TaskEnv, gym.Env):
  """Random MDPs: transitions ~ Dirichlet(1), mean rewards ~ N(1, 1); one-hot state observation."""

  def __init__(self, num_states: int = 10, num_actions: int = 5, task: dict | None = None):
    self.num_states, self.num_actions = num_states, num_actions
    self.observation_space = spaces.Box(0.0, 1.0, (num_states,), np.float32)
    self.action_space = spaces.Discrete(num_actions)
    self._transitions = np.full((num_states, num_actions, num_states), 1.0 / num_states)
    self._rewards = np.zeros((num_states, num_actions))
    self._state = 0
    if task:
      self.reset_task(task)

  def sample_tasks(self, n, rng):
    shape = (self.num_states, self.num_actions)
    return [{"transitions": rng.dirichlet(np.ones(self.num_states), size=shape).tolist(),
             "rewards": rng.normal(1.0, 1.0, shape).tolist()} for _ in range(n)]

  def reset_task(self, task):
    self._transitions = np.asarray(task["transitions"])
    self._rewards = np.asarray(task["rewards"])

  def _obs(self):
    obs = np.zeros(self.num_states, np.float32)
    obs[self._state] = 1.0
    return obs

  def reset(self, *, seed=None, options=None):
    super().reset(seed=seed)
    self._state = 0
    return self._obs(), {}

  def step(self, action):
    reward = float(self._rewards[self._state, int(action)])
    p = self._transitions[self._state, int(action)]
    self._state = int(self.np_random.choice(self.num_states, p=p / p.sum()))
    return self._obs(), reward, False, False, {}


# --- MuJoCo locomotion ---------------------------------------------------------------------------


def _cheetah_reward(env, progress, action):
  """HalfCheetah tasks: progress minus 0.05 * |a|^2, the MAML code's control cost."""
  ctrl = env.control_cost(action)
  return progress - ctrl, {"reward_forward": progress, "reward_ctrl": -ctrl}


def _ant_reward(env, progress, action):
  """Ant tasks: progress plus survival, minus control and contact costs (gymnasium's weights)."""
  ctrl, contact = env.control_cost(action), env.contact_cost
  reward = progress + env.healthy_reward - ctrl - contact
  return reward, {"reward_forward": progress, "reward_ctrl": -ctrl, "reward_contact": -contact,
                  "reward_survive": env.healthy_reward}


def _locomotion(base_name: str, key: str, sample, progress, reward, **base_kwargs):
  """A factory for a MuJoCo v5 environment whose reward depends on a per-task value ``key``.

  ``sample(n, rng)`` draws the task values, ``progress(env, x_velocity, value)`` scores the
  motion; ``reward`` adds the robot's costs. Classes are built lazily so that importing this
  module does not need MuJoCo.
  """

  def make_env(task=None, **kwargs):
    from gymnasium.envs.mujoco import ant_v5, half_cheetah_v5
    base = {"ant": ant_v5.AntEnv, "half_cheetah": half_cheetah_v5.HalfCheetahEnv}[base_name]

    class LocomotionTask(TaskEnv, base):
      def __init__(self, task=None, **kw):
        base.__init__(self, **dict(base_kwargs, **kw))
        self._value = None
        if task:
          self.reset_task(task)

      def sample_tasks(self, n, rng):
        return [{key: v} for v in sample(n, rng)]

      def reset_task(self, task):
        self._value = np.asarray(task[key], np.float64)

      def step(self, action):
        # rllab's normalize wrapper (the original code) clips to the action box before the
        # environment sees the action, so the control cost is paid on the clipped action.
        space = self.action_space
        return base.step(self, np.clip(action, space.low, space.high))

      def _get_rew(self, x_velocity, action):
        return reward(self, progress(self, x_velocity, self._value), action)

    return LocomotionTask(task, **kwargs)

  return make_env


def _disc(n, rng, radius=3.0):
  angle = rng.uniform(0, 2 * np.pi, n)
  r = radius * np.sqrt(rng.uniform(0, 1, n))
  return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1).tolist()


def _torso_xy(env):
  return env.data.body(env._main_body).xpos[:2]  # rllab's get_body_com("torso")


make_half_cheetah_vel = _locomotion(  # -|v - v_goal|, v_goal ~ U[0, 2]
    "half_cheetah", "velocity", lambda n, rng: rng.uniform(0.0, 2.0, n).tolist(),
    lambda env, v, goal: -abs(v - float(goal)), _cheetah_reward, ctrl_cost_weight=0.05)
make_half_cheetah_dir = _locomotion(  # d * v, d = +1 forward or -1 backward
    "half_cheetah", "direction", lambda n, rng: rng.choice([-1.0, 1.0], n).tolist(),
    lambda env, v, d: float(d) * v, _cheetah_reward, ctrl_cost_weight=0.05)
make_ant_vel = _locomotion(  # -|v - v_goal|, v_goal ~ U[0, 3]
    "ant", "velocity", lambda n, rng: rng.uniform(0.0, 3.0, n).tolist(),
    lambda env, v, goal: -abs(v - float(goal)), _ant_reward)
make_ant_dir = _locomotion(
    "ant", "direction", lambda n, rng: rng.choice([-1.0, 1.0], n).tolist(),
    lambda env, v, d: float(d) * v, _ant_reward)
make_ant_goal = _locomotion(  # -|xy - goal|_1, goal uniform in a disc of radius 3
    "ant", "goal", _disc, lambda env, v, goal: -float(np.sum(np.abs(_torso_xy(env) - goal))),
    # The torso's x, y in the observation, as in the original (rllab) task: without them a
    # memoryless policy cannot know where it is relative to the goal.
    _ant_reward, exclude_current_positions_from_observation=False)


# name -> (factory, horizon)
ENVS = {
    "2DNavigation-v0": (Navigation2D, 100),
    "Bandit-K5-v0": (lambda **kw: BernoulliBandit(5, **kw), 10),
    "Bandit-K10-v0": (lambda **kw: BernoulliBandit(10, **kw), 10),
    "Bandit-K50-v0": (lambda **kw: BernoulliBandit(50, **kw), 10),
    "TabularMDP-v0": (TabularMDP, 10),
    "HalfCheetahVel-v5": (make_half_cheetah_vel, 200),
    "HalfCheetahDir-v5": (make_half_cheetah_dir, 200),
    "AntVel-v5": (make_ant_vel, 200),
    "AntDir-v5": (make_ant_dir, 200),
    "AntGoal-v5": (make_ant_goal, 200),
}


def _metaworld(benchmark: str, env_name: str | None = None, **kwargs):
  from rl import metaworld_tasks  # pylint: disable=import-outside-toplevel
  return metaworld_tasks.MetaWorldTasks(benchmark, env_name, **kwargs)


# Meta-World's (rl/metaworld_tasks.py, imported with the package when one is made), at
# Meta-World v3's episode length.
METAWORLD_ML1 = ("reach-v3", "push-v3", "pick-place-v3")
ENVS.update({f"ML1-{t}": (lambda t=t, **kw: _metaworld("ML1", t, **kw), 500)
             for t in METAWORLD_ML1})
ENVS["ML10"] = (lambda **kw: _metaworld("ML10", **kw), 500)
METAWORLD_FAMILIES = tuple(f"ML1-{t}" for t in METAWORLD_ML1) + ("ML10",)


def make(name: str, **kwargs):
  if name not in ENVS:
    raise ValueError(f"--env={name}: unknown (known: {', '.join(sorted(ENVS))})")
  try:
    return ENVS[name][0](**kwargs)
  except TypeError as e:  # an option the environment does not take
    raise ValueError(f"--env_kwargs={kwargs}: not accepted by {name}: {e}") from None


def horizon(name: str) -> int:
  return ENVS[name][1]


def register() -> None:
  """Registers every task family as a gymnasium id under ``maml/``."""
  for name, (factory, steps) in ENVS.items():
    env_id = f"maml/{name}"
    if env_id not in gym.registry:
      gym.register(env_id, entry_point=factory, max_episode_steps=steps)


register()
