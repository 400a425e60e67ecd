"""MAML-RL's objectives and the TRPO meta-update, as functions of tensors.

Batches are per task: ``obs [M, N, d]``, ``actions``, ``advantages [M, N]``, ``mask [M, N]``
with ``N = rollouts x horizon``. The inner step is REINFORCE on the pre-update rollouts; the
outer objective is the importance-weighted surrogate on the post-update rollouts, whose
gradient flows back through the inner step (second order unless ``first_order``). The KL
constraint is the mean KL between the post-update policies before and after the meta-update,
and its Hessian-vector products differentiate through the inner step too.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from rl import estimators, policies
from trainer import maml


@dataclasses.dataclass(frozen=True)
class TRPOConfig:
  max_kl: float = 0.01
  cg_iters: int = 10
  cg_damping: float = 1e-5
  ls_max_steps: int = 15
  ls_backtrack_ratio: float = 0.5


_masked_mean = estimators.masked_mean


def inner_losses(cfg: policies.PolicyConfig, fast: dict, batch: dict) -> tf.Tensor:
  """REINFORCE loss of each task ``[M]``: -E[log pi(a|s) A] (MAML-TRPO's inner objective)."""
  return estimators.inner_losses(cfg, fast, batch)


def adapt_all(cfg, params: dict, pre_batches: list[dict], inner_lr: float, first_order: bool,
              later_lr_scale: float = 1.0, estimator: str = "reinforce",
              horizon: int | None = None) -> list[dict]:
  """Per-task parameters before and after each inner step (one per batch in
  ``pre_batches``): ``[theta, theta_1, ...]``. Steps after the first at ``inner_lr *
  later_lr_scale`` (the original's RL test scripts halved them); ``estimator`` is the inner
  objective's (:mod:`rl.estimators`): the same step, another second derivative."""
  fast = maml.tile(params, pre_batches[0]["obs"].shape[0])
  chain = [fast]
  for i, batch in enumerate(pre_batches):
    lr = inner_lr * (later_lr_scale if i else 1.0)
    loss = lambda f, b=batch: (tf.reduce_sum(estimators.inner_losses(cfg, f, b, estimator,
                                                                     horizon)), None)
    fast, _ = maml.sgd_step(fast, loss, {k: lr for k in fast}, first_order=first_order)
    chain.append(fast)
  return chain


def adapt(cfg, params: dict, pre_batches: list[dict], inner_lr: float, first_order: bool,
          later_lr_scale: float = 1.0, estimator: str = "reinforce",
          horizon: int | None = None):
  """Per-task parameters after one inner step per batch in ``pre_batches`` (:func:`adapt_all`)."""
  return adapt_all(cfg, params, pre_batches, inner_lr, first_order, later_lr_scale, estimator,
                   horizon)[-1]


def surrogate_and_kl(cfg, params, pre_batches, post, old_logp, old_dist, inner_lr, first_order,
                     estimator="reinforce", horizon=None, emaml_weight=0.0):
  """Mean over tasks of the surrogate loss and of KL(old || new) on the post-update rollouts.
  ``emaml_weight > 0`` adds E-MAML's term (:func:`rl.estimators.emaml_loss`, zero in value) on
  ``post["emaml_scores"]``."""
  chain = adapt_all(cfg, params, pre_batches, inner_lr, first_order, estimator=estimator,
                    horizon=horizon)
  fast = chain[-1]
  logp = policies.log_prob(cfg, fast, post["obs"], post["actions"])
  ratio = tf.exp(logp - old_logp)
  surrogate = tf.reduce_mean(-_masked_mean(ratio * post["advantages"], post["mask"]))
  if emaml_weight:
    surrogate += emaml_weight * estimators.emaml_loss(cfg, chain[:-1], pre_batches,
                                                      post["emaml_scores"], horizon)
  kl = policies.kl(cfg, old_dist, policies.distribution(cfg, fast, post["obs"]))
  return surrogate, tf.reduce_mean(_masked_mean(kl, post["mask"]))


# --- flat-vector helpers for conjugate gradient --------------------------------------------------


def dot(a: dict, b: dict) -> tf.Tensor:
  return tf.add_n([tf.reduce_sum(a[k] * b[k]) for k in a])


def conjugate_gradient(matvec, b: dict, iters: int, tol: float = 1e-10) -> dict:
  """Solves ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec``."""
  x = {k: tf.zeros_like(v) for k, v in b.items()}
  r = dict(b)
  p = dict(b)
  rr = dot(r, r)
  for _ in range(iters):
    Ap = matvec(p)
    alpha = rr / (dot(p, Ap) + 1e-20)
    x = {k: x[k] + alpha * p[k] for k in x}
    r = {k: r[k] - alpha * Ap[k] for k in r}
    rr_new = dot(r, r)
    if float(rr_new) < tol:
      break
    p = {k: r[k] + (rr_new / rr) * p[k] for k in p}
    rr = rr_new
  return x


def masked_conjugate_gradient(matvec, b: dict, iters: int, tol: float = 1e-10) -> dict:
  """:func:`conjugate_gradient` in a fixed number of iterations, for a compiled graph: once the
  residual is below ``tol`` the iterate stops changing (where the loop above breaks), so the
  answer is the same and the graph has no data-dependent exit."""
  x = {k: tf.zeros_like(v) for k, v in b.items()}
  r, p = dict(b), dict(b)
  rr = dot(r, r)
  done = rr < tol
  for _ in range(iters):
    Ap = matvec(p)
    alpha = tf.where(done, tf.zeros_like(rr), rr / (dot(p, Ap) + 1e-20))
    x = {k: x[k] + alpha * p[k] for k in x}
    r = {k: r[k] - alpha * Ap[k] for k in r}
    rr_new = dot(r, r)
    beta = tf.where(done, tf.zeros_like(rr), rr_new / rr)
    p = {k: r[k] + beta * p[k] for k in p}
    done = done | (rr_new < tol)
    rr = tf.where(done, rr, rr_new)
  return x


class TRPOStep:
  """Compiled pieces of one TRPO meta-update; shapes are fixed per configuration."""

  def __init__(self, cfg: policies.PolicyConfig, trpo: TRPOConfig, inner_lr: float,
               first_order: bool, estimator: str = "reinforce", horizon: int | None = None,
               emaml_weight: float = 0.0):
    self.cfg, self.trpo = cfg, trpo
    objective = lambda p, pre, post, old_logp, old_dist: surrogate_and_kl(
        cfg, p, pre, post, old_logp, old_dist, inner_lr, first_order, estimator, horizon,
        emaml_weight)
    self.objective = tf.function(objective)

    @tf.function
    def old_policy(params, pre, post):
      fast = adapt(cfg, params, pre, inner_lr, first_order, estimator=estimator, horizon=horizon)
      return (policies.log_prob(cfg, fast, post["obs"], post["actions"]),
              policies.distribution(cfg, fast, post["obs"]))

    @tf.function
    def gradient(params, pre, post, old_logp, old_dist):
      with tf.GradientTape() as tape:
        tape.watch(list(params.values()))
        surrogate, kl = objective(params, pre, post, old_logp, old_dist)
      return tape.gradient(surrogate, params), surrogate, kl

    @tf.function
    def fisher_vector(params, pre, post, old_logp, old_dist, vector):
      with tf.GradientTape() as outer:
        outer.watch(list(params.values()))
        with tf.GradientTape() as inner:
          inner.watch(list(params.values()))
          _, kl = objective(params, pre, post, old_logp, old_dist)
        grads = inner.gradient(kl, params)
        grad_v = dot(grads, vector)
      hv = outer.gradient(grad_v, params)
      return {k: hv[k] + trpo.cg_damping * vector[k] for k in hv}

    @tf.function
    def natural_direction(params, pre, post, old_logp, old_dist, grads):
      """``F^-1 grads`` by conjugate gradient, and ``direction^T F direction``, in one graph:
      the KL, its gradient and their forward pass through the inner step are computed once and
      every Fisher-vector product differentiates that gradient again on one persistent tape
      (separate calls of :func:`fisher_vector` redo the forward pass and the first backward
      pass each time)."""
      values = list(params.values())
      with tf.GradientTape(persistent=True) as outer:
        outer.watch(values)
        with tf.GradientTape() as inner:
          inner.watch(values)
          _, kl = objective(params, pre, post, old_logp, old_dist)
        kl_grads = inner.gradient(kl, params)

      def matvec(vector):
        with outer:  # the same tape, recording the product for its own derivative
          grad_v = dot(kl_grads, vector)
        hv = outer.gradient(grad_v, params)
        return {k: hv[k] + trpo.cg_damping * vector[k] for k in hv}

      direction = masked_conjugate_gradient(matvec, grads, trpo.cg_iters)
      return direction, dot(direction, matvec(direction))

    self.old_policy, self.gradient, self.fisher_vector = old_policy, gradient, fisher_vector
    self.natural_direction = natural_direction

  def __call__(self, params: dict, pre: list[dict], post: dict) -> tuple[dict, dict]:
    """Returns the new parameters and diagnostics; keeps the old ones if no step is accepted."""
    old_logp, old_dist = self.old_policy(params, pre, post)
    grads, surrogate, _ = self.gradient(params, pre, post, old_logp, old_dist)
    direction, dfd = self.natural_direction(params, pre, post, old_logp, old_dist, grads)
    shs = 0.5 * float(dfd)
    if not shs > 0:
      return params, {"surrogate_before": float(surrogate), "surrogate_after": float(surrogate),
                      "kl": 0.0, "accepted": 0.0}
    scale = (self.trpo.max_kl / shs) ** 0.5
    fraction = 1.0
    for _ in range(self.trpo.ls_max_steps):
      candidate = {k: params[k] - fraction * scale * direction[k] for k in params}
      new_surrogate, kl = self.objective(candidate, pre, post, old_logp, old_dist)
      if float(new_surrogate) < float(surrogate) and float(kl) <= self.trpo.max_kl:
        return candidate, {"surrogate_before": float(surrogate),
                           "surrogate_after": float(new_surrogate), "kl": float(kl),
                           "accepted": 1.0}
      fraction *= self.trpo.ls_backtrack_ratio
    return params, {"surrogate_before": float(surrogate), "surrogate_after": float(surrogate),
                    "kl": 0.0, "accepted": 0.0}
