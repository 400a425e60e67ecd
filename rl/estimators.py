"""How the inner step's gradient is estimated, which decides the meta-gradient's second-order
terms; and ProMP's outer objective.

The inner step is ``theta' = theta + lr * g`` with ``g`` the policy gradient from the pre-update
rollouts, which were sampled from ``theta`` itself. Every estimator below gives the same ``g``
(so the same adapted policy); they differ in what differentiating ``g`` once more gives, i.e. in
the estimate of the return's Hessian that the meta-gradient ``(I + lr H)^T grad J(theta')``
uses:

- ``reinforce`` (MAML-TRPO, the paper's code): ``-mean(log pi(a|s) A)``. Its Hessian is
  ``sum_t hess log pi_t A_t``: every term that comes from differentiating the sampling
  distribution (the outer products of scores) is missing, so nothing in the meta-gradient
  rewards a pre-update policy for sampling what makes the inner step good.
- ``dice`` (Foerster et al. 2018, in the baseline form of Farquhar et al. 2019): per trajectory
  ``sum_t (box(S_<=t) - box(S_<t)) A_t`` with ``S`` the running sum of log-probabilities and
  ``box(x) = exp(x - stop(x))``. Its Hessian, with ``A_t`` the return to go, is unbiased:
  ``sum_t hess log pi_t R_>=t + sum_{t,t'} grad log pi_t grad log pi_t'^T R_>=max(t,t')``.
- ``lvc`` (ProMP's low-variance curvature, Rothfuss et al. 2019): ``sum_t ratio_t A_t`` with the
  per-step likelihood ratio against the sampling policy. Its Hessian keeps the ``t = t'`` outer
  products and drops the others: biased for horizons above one, with lower variance.

Every estimator above differentiates MAML's objective, ``E_tau[J(theta'(tau))]`` with the
pre-update rollouts ``tau`` held fixed in the derivative's second argument ("formulation I" of
ProMP's paper). E-MAML (Stadie et al. 2018) differentiates the expectation over ``tau`` as well
("formulation II"): its extra term ``E[J(theta') grad log pi_theta(tau)]`` credits the pre-update
policy with the return its samples lead to after adaptation (:func:`emaml_loss`).

``tests/test_rl_estimators.py`` pins all of them against exact answers by enumeration.
"""

from __future__ import annotations

import tensorflow as tf

from rl import policies

INNER_ESTIMATORS = ("reinforce", "lvc", "dice")


def masked_mean(x, mask):
  """Mean over each task's valid steps: ``[M, N] -> [M]``."""
  return tf.reduce_sum(x * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


def magic_box(x):
  """1 in value, ``d/dx = 1`` in every order of derivative (DiCE's operator)."""
  return tf.exp(x - tf.stop_gradient(x))


def score_weights(estimator: str, logp: tf.Tensor, batch: dict, horizon: int) -> tf.Tensor:
  """What multiplies the advantages in the inner objective: ``[M, N]``, whose gradient at the
  sampling policy is the score ``grad log pi(a|s)`` for each estimator.

  ``batch["logp_old"]``, when present, is the sampling policy's log-probability (ProMP's
  several outer steps per batch evaluate the inner objective away from it; LVC's ratio is then
  the importance weight). Otherwise the sampling policy is the one evaluated.
  """
  if estimator == "reinforce":
    return logp
  if estimator == "lvc":
    old = batch.get("logp_old")
    return tf.exp(logp - tf.stop_gradient(logp if old is None else old))
  if estimator == "dice":
    mask = batch["mask"]
    per_episode = tf.reshape(logp * mask, [tf.shape(logp)[0], -1, horizon])
    upto = tf.cumsum(per_episode, axis=-1)
    weight = magic_box(upto) - magic_box(upto - per_episode)
    return tf.reshape(weight, tf.shape(logp))
  raise ValueError(f"unknown inner estimator {estimator!r}: one of {INNER_ESTIMATORS}")


def inner_losses(cfg: policies.PolicyConfig, fast: dict, batch: dict,
                 estimator: str = "reinforce", horizon: int | None = None) -> tf.Tensor:
  """The inner objective of each task ``[M]`` (a loss: minus the advantage-weighted term).
  ``horizon`` (the episode length of the ``rollouts x horizon`` layout) is needed by DiCE."""
  logp = policies.log_prob(cfg, fast, batch["obs"], batch["actions"])
  weights = score_weights(estimator, logp, batch, horizon)
  return -masked_mean(weights * batch["advantages"], batch["mask"])


def emaml_loss(cfg: policies.PolicyConfig, fasts: list[dict], pre_batches: list[dict],
               scores: tf.Tensor, horizon: int) -> tf.Tensor:
  """E-MAML's score-function term as a loss: ``-mean_m(scores_m (S_m - stop(S_m)))``, with
  ``S_m`` the mean over task ``m``'s pre-update episodes of their log-probability under the
  policy that sampled them (``fasts[i]`` for ``pre_batches[i]``). Zero in value, so adding it
  leaves a line search's comparisons alone; its gradient is ``-mean_m(scores_m grad S_m)``.
  ``scores [M]``: each task's post-update return (the learner centres and scales it over the
  tasks, a baseline that keeps the term unbiased).
  """
  total = 0.0
  for fast, batch in zip(fasts, pre_batches):
    logp = policies.log_prob(cfg, fast, batch["obs"], batch["actions"])
    episodes = tf.cast(tf.shape(logp)[1] // horizon, logp.dtype)
    total += tf.reduce_sum(logp * batch["mask"], axis=1) / episodes
  return -tf.reduce_mean(tf.stop_gradient(scores) * (total - tf.stop_gradient(total)))


def clipped_surrogate(logp, old_logp, advantages, mask, clip_eps: float) -> tf.Tensor:
  """PPO's clipped likelihood-ratio loss per task ``[M]`` (ProMP's outer objective)."""
  ratio = tf.exp(logp - old_logp)
  clipped = tf.clip_by_value(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  return -masked_mean(tf.minimum(ratio * advantages, clipped * advantages), mask)
