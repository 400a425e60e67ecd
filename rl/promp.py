"""ProMP's meta-update (Rothfuss et al., ICLR 2019, "Proximal Meta-Policy Search").

One batch of pre- and post-update rollouts serves several Adam steps on the meta-parameters.
The objective, differentiated through the inner steps (LVC's estimator by default, see
:mod:`rl.estimators`), is PPO's clipped likelihood ratio of the adapted policy on the
post-update rollouts plus, for each inner step, a penalty ``eta_i * KL(pi_old || pi)`` between
the pre-update policies that sampled its rollouts and the ones now evaluated (so the inner
steps stay near the policies whose samples they use). Away from the sampling policies the
inner objective is importance-weighted (the sampling log-probabilities ride in each pre-update
batch as ``logp_old``). ``eta`` is fixed, or adapted per inner step towards a target KL (halved
below target / 1.5, doubled above 1.5 x target), as ProMP's code does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from rl import estimators, maml_rl, policies
from trainer import optim


@dataclasses.dataclass(frozen=True)
class ProMPConfig:
  steps: int = 5  # Adam steps per batch of samples (ProMP's num_promp_steps)
  clip_eps: float = 0.3
  inner_kl_penalty: float = 5e-4  # initial eta
  inner_kl_target: float = 0.0  # > 0: adapt eta towards it after every meta-iteration


class ProMPStep:
  """Compiled pieces of ProMP's update; ``optimizer`` is the meta-parameters' Adam."""

  def __init__(self, policy: policies.PolicyConfig, cfg: ProMPConfig, *, inner_lr: float,
               inner_steps: int, first_order: bool, estimator: str, horizon: int,
               optimizer: optim.Adam, kl_coeff: tf.Variable, emaml_weight: float = 0.0):
    self.cfg, self.kl_coeff = cfg, kl_coeff
    chain = lambda p, pre: maml_rl.adapt_all(policy, p, pre, inner_lr, first_order,
                                             estimator=estimator, horizon=horizon)

    @tf.function
    def sampling_policies(params, pre, post):
      """Log-probabilities and distributions of the policies that sampled each batch."""
      fasts = chain(params, pre)
      pre_logp = [policies.log_prob(policy, f, b["obs"], b["actions"]) for f, b in zip(fasts, pre)]
      pre_dist = [policies.distribution(policy, f, b["obs"]) for f, b in zip(fasts, pre)]
      post_logp = policies.log_prob(policy, fasts[-1], post["obs"], post["actions"])
      return pre_logp, pre_dist, post_logp

    def objective(params, pre, post, pre_dist, post_logp):
      fasts = chain(params, pre)
      logp = policies.log_prob(policy, fasts[-1], post["obs"], post["actions"])
      surrogate = tf.reduce_mean(estimators.clipped_surrogate(
          logp, post_logp, post["advantages"], post["mask"], cfg.clip_eps))
      inner_kls = tf.stack([
          tf.reduce_mean(estimators.masked_mean(
              policies.kl(policy, old, policies.distribution(policy, f, b["obs"])), b["mask"]))
          for f, b, old in zip(fasts, pre, pre_dist)])
      loss = surrogate + tf.reduce_mean(self.kl_coeff * inner_kls)
      if emaml_weight:  # E-MAML's term (zero in value; rl/estimators.py)
        loss += emaml_weight * estimators.emaml_loss(policy, fasts[:-1], pre,
                                                     post["emaml_scores"], horizon)
      return loss, surrogate, inner_kls

    @tf.function
    def update(params, pre, post, pre_dist, post_logp):
      """``cfg.steps`` Adam steps; the objective before the first and after the last."""
      before = None
      for _ in range(cfg.steps):
        with tf.GradientTape() as tape:
          current = {k: tf.identity(v) for k, v in params.items()}
          tape.watch(list(current.values()))
          loss, surrogate, _ = objective(current, pre, post, pre_dist, post_logp)
        if before is None:
          before = surrogate
        optimizer.apply(params, tape.gradient(loss, current))
      _, after, inner_kls = objective({k: tf.identity(v) for k, v in params.items()}, pre, post,
                                      pre_dist, post_logp)
      return before, after, inner_kls

    self.sampling_policies, self.objective, self.update = sampling_policies, objective, update

  def __call__(self, params: dict[str, tf.Variable], pre: list[dict], post: dict) -> dict:
    """Updates ``params`` in place; returns diagnostics."""
    current = {k: tf.identity(v) for k, v in params.items()}
    pre_logp, pre_dist, post_logp = self.sampling_policies(current, pre, post)
    pre = [dict(b, logp_old=lp) for b, lp in zip(pre, pre_logp)]
    before, after, inner_kls = self.update(params, pre, post, pre_dist, post_logp)
    inner_kls = inner_kls.numpy()
    if self.cfg.inner_kl_target > 0:
      coeff = self.kl_coeff.numpy()
      target = self.cfg.inner_kl_target
      coeff = np.where(inner_kls < target / 1.5, coeff / 2,
                       np.where(inner_kls > target * 1.5, coeff * 2, coeff))
      self.kl_coeff.assign(coeff.astype(np.float32))
    return {"surrogate_before": float(before), "surrogate_after": float(after),
            "inner_kl": float(inner_kls.mean()), "inner_kl_coeff": float(self.kl_coeff.numpy().mean())}
