"""The meta-RL family's flags and config (``--dataset=rl``).

Imports TensorFlow only (not gymnasium or MuJoCo, the ``rl`` extra), so that every command
line can name these flags, and ``--helpfull`` list them, without the extra installed.
"""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from pipeline.errors import UsageError
from rl import estimators, maml_rl, promp
from trainer import meta_flags
from trainer.flag_groups import FlagGroup

RL = FlagGroup("meta-reinforcement learning", __name__)
_TRPO = maml_rl.TRPOConfig
_PROMP = promp.ProMPConfig
_define = RL.define

_define(flags.DEFINE_string, "env", "2DNavigation-v0", "RL task family: 2DNavigation-v0, "
        "Bandit-K5-v0, Bandit-K10-v0, Bandit-K50-v0, TabularMDP-v0, HalfCheetahVel-v5, "
        "HalfCheetahDir-v5, AntVel-v5, AntDir-v5, AntGoal-v5.")
_define(flags.DEFINE_string, "env_kwargs", "{}", "JSON object of options for the task family, "
        "e.g. '{\"reward\": \"squared\"}' for 2DNavigation-v0's squared-distance reward "
        "(default: minus the distance, as the original code).")
_define(flags.DEFINE_integer, "rollouts_per_task", 20, "Episodes per task and per adaptation "
        "round.", lower_bound=1)
_define(flags.DEFINE_integer, "eval_rollouts_per_task", None, "Episodes per task and per "
        "adaptation round in validation and meta-test (default: --rollouts_per_task). The "
        "original code's RL test scripts sampled 40 (twice its training's 20); must divide "
        "--meta_batch_size * --rollouts_per_task, the sampler's environments.", lower_bound=1,
        may_change=True)
_define(flags.DEFINE_float, "eval_later_lr_scale", 1.0, "Validation and meta-test take "
        "adaptation steps after the first at --inner_lr times this (1: every step at "
        "--inner_lr). The original code's RL test scripts used 0.5 (0.5, then 0.25).",
        lower_bound=0.0, may_change=True)
_define(flags.DEFINE_integer, "horizon", 0, "Episode length (0: the task family's: 100 "
        "navigation, 200 locomotion, 10 bandits/MDPs).", lower_bound=0)
_define(flags.DEFINE_float, "gamma", 0.99, "Discount.", lower_bound=0.0, upper_bound=1.0)
_define(flags.DEFINE_float, "gae_lambda", 1.0, "GAE lambda.", lower_bound=0.0, upper_bound=1.0)
_define(flags.DEFINE_enum, "outer_optimizer", "trpo", ["trpo", "adam", "promp"],
        "Meta-optimizer for RL: trpo (MAML-TRPO, the paper's), adam (one Adam step on the "
        "surrogate), promp (ProMP: --promp_steps Adam steps at --meta_lr on the clipped "
        "surrogate with a KL penalty on each inner step; rl/promp.py).")
_define(flags.DEFINE_enum, "inner_estimator", "reinforce", list(estimators.INNER_ESTIMATORS),
        "How the inner step's policy gradient is differentiated for the meta-gradient (the same "
        "step; rl/estimators.py): reinforce (MAML-TRPO's: no term through the pre-update "
        "sampling distribution), dice (every such term: the return's unbiased Hessian), lvc "
        "(ProMP's low-variance curvature: the same-step terms only).")
_define(flags.DEFINE_float, "emaml_weight", 0.0, "E-MAML (Stadie et al. 2018): > 0 adds this "
        "times the score-function term through the pre-update sampling distribution, "
        "E[post-update return x grad log pi(pre-update episodes)], to the meta-gradient (the "
        "returns centred and scaled over the meta-batch's tasks); 0: MAML's objective. Works "
        "with every --outer_optimizer and --inner_estimator.", lower_bound=0.0)
_define(flags.DEFINE_integer, "promp_steps", _PROMP.steps, "ProMP: Adam steps per batch of "
        "samples.", lower_bound=1)
_define(flags.DEFINE_float, "clip_eps", _PROMP.clip_eps, "ProMP: the likelihood ratio's clip "
        "range (1 - eps, 1 + eps).", lower_bound=0.0)
_define(flags.DEFINE_float, "inner_kl_penalty", _PROMP.inner_kl_penalty, "ProMP: the initial "
        "weight of KL(sampling || current) of each inner step's pre-update policy.",
        lower_bound=0.0)
_define(flags.DEFINE_float, "inner_kl_target", _PROMP.inner_kl_target, "ProMP: > 0 adapts each "
        "inner step's KL weight towards this KL after every iteration (halved below 1/1.5 of "
        "it, doubled above 1.5 x); 0 keeps it fixed.", lower_bound=0.0)
_define(flags.DEFINE_float, "max_kl", _TRPO.max_kl, "TRPO KL bound.", lower_bound=0.0)
_define(flags.DEFINE_integer, "cg_iters", _TRPO.cg_iters, "TRPO conjugate-gradient "
        "iterations.", lower_bound=1)
_define(flags.DEFINE_float, "cg_damping", _TRPO.cg_damping, "TRPO damping added to the "
        "Fisher-vector products.", lower_bound=0.0)
_define(flags.DEFINE_integer, "ls_max_steps", _TRPO.ls_max_steps, "TRPO line-search halvings.",
        lower_bound=1)
_define(flags.DEFINE_float, "ls_backtrack_ratio", _TRPO.ls_backtrack_ratio, "TRPO line-search "
        "step ratio.", lower_bound=0.0, upper_bound=1.0)
_define(flags.DEFINE_integer, "num_workers", 0, "Rollout worker processes (0: in-process).",
        lower_bound=0, may_change=True)


PROMP_FLAGS = {"promp_steps": _PROMP.steps, "clip_eps": _PROMP.clip_eps,
               "inner_kl_penalty": _PROMP.inner_kl_penalty,
               "inner_kl_target": _PROMP.inner_kl_target}


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """No defaults: the flags' are the only ones; evaluation's are resolved."""
  meta_batch_size: int  # tasks per meta-iteration
  rollouts_per_task: int
  horizon: int
  inner_lr: float
  inner_steps: int
  eval_inner_steps: int
  eval_rollouts_per_task: int  # validation and meta-test
  eval_later_lr_scale: float  # validation and meta-test: steps after the first at inner_lr * this
  first_order: bool
  gamma: float
  gae_lambda: float
  outer_optimizer: str  # "trpo", "adam" or "promp"
  meta_lr: float  # adam and promp
  trpo: maml_rl.TRPOConfig
  inner_estimator: str = "reinforce"
  promp: promp.ProMPConfig = promp.ProMPConfig()
  emaml_weight: float = 0.0  # E-MAML's score-function term (0: off)


def rl_config(values: dict, horizon: int) -> RLConfig:
  """The flags' RL config; ``horizon`` is --horizon or the environment's own."""
  cfg = RLConfig(
      meta_batch_size=values["meta_batch_size"], rollouts_per_task=values["rollouts_per_task"],
      horizon=horizon, inner_lr=values["inner_lr"], inner_steps=values["inner_steps"],
      eval_inner_steps=meta_flags.eval_inner_steps(values),
      eval_rollouts_per_task=values["eval_rollouts_per_task"] or values["rollouts_per_task"],
      eval_later_lr_scale=values["eval_later_lr_scale"],
      first_order=values["first_order"],
      gamma=values["gamma"], gae_lambda=values["gae_lambda"],
      outer_optimizer=values["outer_optimizer"], meta_lr=values["meta_lr"],
      trpo=maml_rl.TRPOConfig(values["max_kl"], values["cg_iters"], values["cg_damping"],
                              values["ls_max_steps"], values["ls_backtrack_ratio"]),
      inner_estimator=values["inner_estimator"], emaml_weight=values["emaml_weight"],
      promp=promp.ProMPConfig(values["promp_steps"], values["clip_eps"],
                              values["inner_kl_penalty"], values["inner_kl_target"]))
  if cfg.outer_optimizer != "promp":
    changed = [f"--{name}={values[name]}" for name, default in PROMP_FLAGS.items()
               if values[name] != default]
    if changed:
      raise UsageError(f"{', '.join(changed)}: ProMP's settings, read only with "
                       f"--outer_optimizer=promp (this run: --outer_optimizer="
                       f"{cfg.outer_optimizer})")
  environments = cfg.meta_batch_size * cfg.rollouts_per_task
  if environments % cfg.eval_rollouts_per_task:
    raise UsageError(f"--eval_rollouts_per_task={cfg.eval_rollouts_per_task} must divide "
                     f"--meta_batch_size * --rollouts_per_task = {environments} (evaluation "
                     f"samples in passes over the sampler's environments)")
  return cfg


def env_kwargs(values: dict) -> dict:
  """--env_kwargs as a dict (one line naming the flag if it is not a JSON object)."""
  try:
    kwargs = json.loads(values["env_kwargs"])
  except json.JSONDecodeError as e:
    raise UsageError(f"--env_kwargs={values['env_kwargs']}: not JSON ({e})") from None
  if not isinstance(kwargs, dict):
    raise UsageError(f"--env_kwargs={values['env_kwargs']}: must be a JSON object")
  return kwargs
