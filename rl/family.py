"""The meta-RL task family: MAML-RL's tasks, sampler, policy and TRPO meta-learner.

Registered in :mod:`trainer.family`; its flags are in :mod:`rl.config`. This module is
imported only when ``--dataset=rl`` is chosen, so gymnasium and MuJoCo (the ``rl`` extra) are
needed only then.
"""

from __future__ import annotations

import tensorflow as tf

from pipeline.errors import UsageError
from rl import config, envs, learner, metaworld_tasks, policies, sampler, task
from trainer import family, meta_flags


def build(values: dict, strategy: tf.distribute.Strategy) -> family.Built:
  if values["mode"] == "pretrain":
    raise UsageError("--mode=pretrain: pretrains image backbones, not policies")
  if values["env"] not in envs.ENVS:
    raise UsageError(f"--env={values['env']}: unknown (known: {', '.join(sorted(envs.ENVS))})")
  kwargs = config.env_kwargs(values)
  cfg = config.rl_config(values, values["horizon"] or envs.horizon(values["env"]))
  try:
    vector = sampler.VectorSampler(values["env"], cfg.meta_batch_size * cfg.rollouts_per_task,
                                   values["num_workers"], kwargs)
  except metaworld_tasks.MetaWorldMissing as e:
    raise UsageError(f"--env={values['env']}: {e}") from None
  policy = policies.PolicyConfig("categorical" if vector.discrete else "gaussian",
                                 vector.obs_dim, vector.action_dim,
                                 meta_flags.hidden_sizes(values))
  rl_task = task.MetaRLTask(vector, values["meta_batch_size"], values["seed"])
  meta_learner = learner.RLMetaLearner(strategy, cfg, policy, vector, seed=values["seed"])
  return family.Built(rl_task, meta_learner, False,
                      {"eval_inner_steps": cfg.eval_inner_steps})
