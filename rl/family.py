"""The meta-RL task family: MAML-RL's tasks, sampler, policy and TRPO meta-learner.

Registered in :mod:`trainer.family` and imported only when ``--dataset=rl`` is chosen, so
gymnasium and MuJoCo (the ``rl`` extra) are needed only then.
"""

from __future__ import annotations

import json

import tensorflow as tf

from pipeline.errors import DataError
from rl import envs, learner, maml_rl, policies, sampler, task
from trainer import config, family


def rl_config(values: dict, horizon: int) -> learner.RLConfig:
  return learner.RLConfig(
      meta_batch_size=values["meta_batch_size"], rollouts_per_task=values["rollouts_per_task"],
      horizon=horizon, inner_lr=values["inner_lr"], inner_steps=values["inner_steps"],
      eval_inner_steps=config.eval_inner_steps(values),
      eval_rollouts_per_task=values["eval_rollouts_per_task"] or values["rollouts_per_task"],
      eval_later_lr_scale=values["eval_later_lr_scale"],
      first_order=values["first_order"],
      gamma=values["gamma"], gae_lambda=values["gae_lambda"],
      outer_optimizer=values["outer_optimizer"], meta_lr=values["meta_lr"],
      trpo=maml_rl.TRPOConfig(values["max_kl"], values["cg_iters"], values["cg_damping"],
                              values["ls_max_steps"], values["ls_backtrack_ratio"]))


def build(values: dict, strategy: tf.distribute.Strategy) -> family.Built:
  if values["env"] not in envs.ENVS:
    raise DataError(f"--env={values['env']}: unknown (known: {', '.join(sorted(envs.ENVS))})")
  try:
    env_kwargs = json.loads(values["env_kwargs"])
  except json.JSONDecodeError as e:
    raise DataError(f"--env_kwargs={values['env_kwargs']}: not JSON ({e})") from None
  if not isinstance(env_kwargs, dict):
    raise DataError(f"--env_kwargs={values['env_kwargs']}: must be a JSON object")
  envs_in_sampler = values["meta_batch_size"] * values["rollouts_per_task"]
  if envs_in_sampler % (values["eval_rollouts_per_task"] or 1):
    raise DataError(f"--eval_rollouts_per_task={values['eval_rollouts_per_task']} must divide "
                    f"--meta_batch_size * --rollouts_per_task = {envs_in_sampler} (evaluation "
                    f"samples in passes over the sampler's environments)")
  vector = sampler.VectorSampler(values["env"],
                                 envs_in_sampler,
                                 values["num_workers"], env_kwargs)
  policy = policies.PolicyConfig("categorical" if vector.discrete else "gaussian",
                                 vector.obs_dim, vector.action_dim,
                                 tuple(int(h) for h in values["hidden_sizes"]))
  cfg = rl_config(values, values["horizon"] or envs.horizon(values["env"]))
  rl_task = task.MetaRLTask(vector, values["meta_batch_size"], values["seed"])
  meta_learner = learner.RLMetaLearner(strategy, cfg, policy, vector, seed=values["seed"])
  return family.Built(rl_task, meta_learner, False, config.run_record(values))
