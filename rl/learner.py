"""The MAML-RL meta-learner, with the interface :mod:`trainer.loop` drives.

Like :class:`trainer.learner.MetaLearner` it offers ``train_loop(iterator, n)``, ``evaluate``,
``step``, ``strategy`` and ``checkpoint_items``, so RL runs use the same entry point,
checkpoints and resume, logs, progress bar and evaluation report. Rollouts run on the host
(environments are Python); gradients, the inner step and TRPO run in compiled TF functions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from rl import maml_rl, policies, promp, returns
from rl.config import RLConfig
from rl.sampler import Rollouts, VectorSampler
from trainer import maml, optim


def emaml_scores(post_returns: np.ndarray) -> np.ndarray:
  """Each task's mean post-update return minus the meta-batch's mean, over their spread: the
  baseline adds no bias to E-MAML's term (a pre-update score has mean zero in every task) and
  the scale makes ``--emaml_weight`` independent of the task family's reward units."""
  centred = post_returns - post_returns.mean()
  return centred / (centred.std() + 1e-8)


class RLMetaLearner:
  def __init__(self, strategy: tf.distribute.Strategy, cfg: RLConfig,
               policy: policies.PolicyConfig, sampler: VectorSampler, *, seed: int):
    if strategy.num_replicas_in_sync != 1:
      raise ValueError("RL meta-training runs on one device (sampling dominates its time); "
                       "use --strategy=auto or one_device")
    self.strategy, self.cfg, self.policy, self.sampler = strategy, cfg, policy, sampler
    self._per_task_success, self._eval_success = [], None
    with strategy.scope():
      self.params = {k: tf.Variable(v, name=k) for k, v in policies.init_params(policy, seed).items()}
      # TRPO needs no optimizer state, only the iteration count; Adam keeps its own (ProMP's
      # Adam takes several steps per iteration, so it counts iterations apart).
      self.optimizer = (optim.Adam(optim.AdamConfig(cfg.meta_lr), self.params)
                        if cfg.outer_optimizer in ("adam", "promp") else None)
      self._iterations = (self.optimizer.iterations if cfg.outer_optimizer == "adam" else
                          tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations"))
      self._kl_coeff = (tf.Variable(np.full(cfg.inner_steps, cfg.promp.inner_kl_penalty,
                                            np.float32), trainable=False, name="inner_kl_coeff")
                        if cfg.outer_optimizer == "promp" else None)
    inner = dict(estimator=cfg.inner_estimator, horizon=cfg.horizon)
    self._trpo = maml_rl.TRPOStep(policy, cfg.trpo, cfg.inner_lr, cfg.first_order,
                                  emaml_weight=cfg.emaml_weight, **inner)
    self._promp = (promp.ProMPStep(policy, cfg.promp, inner_lr=cfg.inner_lr,
                                   inner_steps=cfg.inner_steps, first_order=cfg.first_order,
                                   optimizer=self.optimizer, kl_coeff=self._kl_coeff,
                                   emaml_weight=cfg.emaml_weight, **inner)
                   if cfg.outer_optimizer == "promp" else None)
    self._adapt = tf.function(lambda p, pre: maml_rl.adapt(policy, p, pre, cfg.inner_lr, True))
    self._eval_adapt = tf.function(lambda p, pre: maml_rl.adapt(
        policy, p, pre, cfg.inner_lr, True, later_lr_scale=cfg.eval_later_lr_scale))
    self._inner_losses = tf.function(
        lambda p, pre: maml_rl.inner_losses(policy, maml.tile(p, cfg.meta_batch_size), pre))

  @property
  def step(self) -> tf.Variable:
    return self._iterations

  def eval_variant(self) -> tuple[str, dict]:
    """The evaluation protocol the report records, and its file's suffix when it is not the
    training protocol (more rollouts, smaller later steps)."""
    suffix = ""
    if self.cfg.eval_rollouts_per_task != self.cfg.rollouts_per_task:
      suffix += f"_rollouts{self.cfg.eval_rollouts_per_task}"
    if self.cfg.eval_later_lr_scale != 1.0:
      suffix += f"_laterlr{self.cfg.eval_later_lr_scale:g}"
    return suffix, {"rollouts_per_task": self.cfg.eval_rollouts_per_task,
                    "later_lr_scale": self.cfg.eval_later_lr_scale}

  def checkpoint_items(self) -> dict:
    # Under "optimizer/iterations" for TRPO too, where checkpoints have always kept the count.
    if self.cfg.outer_optimizer == "promp":
      return {"params": self.params, "optimizer": {"iterations": self._iterations,
                                                   "adam": self.optimizer.state(),
                                                   "inner_kl_coeff": self._kl_coeff}}
    state = self.optimizer.state() if self.optimizer else {"iterations": self._iterations}
    return {"params": self.params, "optimizer": state}

  # --- rollouts ---------------------------------------------------------------------------------

  def _rollouts(self, tasks: list[dict], fast: dict[str, np.ndarray], seed: int,
                R: int) -> Rollouts:
    """``R`` episodes of each task; in passes of as many tasks as the sampler has room for
    when ``len(tasks) * R`` is not its number of environments (evaluation's own ``R``)."""
    M, E = len(tasks), self.sampler.num_envs
    if M * R == E:
      return self._one_pass(tasks, fast, seed, R)
    per_pass, parts = E // R, []
    for pass_, start in enumerate(range(0, M, per_pass)):
      rows = list(range(start, min(start + per_pass, M)))
      padded = rows + [rows[-1]] * (per_pass - len(rows))  # the sampler runs all its envs
      part = self._one_pass([tasks[i] for i in padded], {k: v[padded] for k, v in fast.items()},
                            seed * 100 + pass_, R)
      parts.append([x[:len(rows) * R] for x in dataclasses.astuple(part)])
    return Rollouts(*(np.concatenate(xs) for xs in zip(*parts)))

  def _one_pass(self, tasks, fast, seed, R) -> Rollouts:
    M = len(tasks)
    env_tasks = [tasks[e // R] for e in range(M * R)]

    def act(obs, rng):
      actions = policies.sample_actions(self.policy, fast, obs.reshape(M, R, -1), rng)
      return actions.reshape((M * R,) + actions.shape[2:])

    return self.sampler.rollouts(env_tasks, act, self.cfg.horizon, seed)

  def _batch(self, tasks: list[dict], rollouts: Rollouts, R: int) -> dict:
    """Per-task tensors with per-task baselines and normalized GAE advantages."""
    M, T = len(tasks), self.cfg.horizon
    adv = np.zeros_like(rollouts.rewards)
    for m in range(M):
      rows = slice(m * R, (m + 1) * R)
      rew, mask, obs = rollouts.rewards[rows], rollouts.mask[rows], rollouts.obs[rows]
      values = returns.fit_linear_baseline(obs, returns.discounted_returns(rew, mask, self.cfg.gamma),
                                           mask)
      adv[rows] = returns.normalize(returns.gae(rew, values, mask, self.cfg.gamma,
                                                self.cfg.gae_lambda), mask)
    per_task = lambda x: x.reshape((M, R * T) + x.shape[2:])
    return {"obs": tf.constant(per_task(rollouts.obs)),
            "actions": tf.constant(per_task(rollouts.actions).astype(
                np.int32 if self.sampler.discrete else np.float32)),
            "advantages": tf.constant(per_task(adv), tf.float32),
            "mask": tf.constant(per_task(rollouts.mask), tf.float32)}

  def _numpy_tiled(self, M: int) -> dict[str, np.ndarray]:
    return {k: np.broadcast_to(v.numpy()[None], (M,) + tuple(v.shape)) for k, v in self.params.items()}

  def _adapt_and_roll(self, tasks, seed, steps, evaluation=False):
    """Alternates sampling and inner steps; returns batches and mean return per round.

    ``evaluation`` samples evaluation's number of episodes, steps at its rates, and skips the
    baseline fit and tensors of the final round, whose returns are all that is needed.
    """
    R = self.cfg.eval_rollouts_per_task if evaluation else self.cfg.rollouts_per_task
    adapt = self._eval_adapt if evaluation else self._adapt
    fast = self._numpy_tiled(len(tasks))
    batches, per_task_returns, self._per_task_success = [], [], []
    for round_ in range(steps + 1):
      rollouts = self._rollouts(tasks, fast, seed * 1000 + round_, R)
      per_task_returns.append(rollouts.returns.reshape(len(tasks), R).mean(axis=1))
      self._per_task_success.append(rollouts.success.reshape(len(tasks), R).mean(axis=1))
      if round_ < steps or not evaluation:
        batches.append(self._batch(tasks, rollouts, R))
      if round_ < steps:
        adapted = adapt({k: tf.identity(v) for k, v in self.params.items()}, batches)
        fast = {k: v.numpy() for k, v in adapted.items()}
    return batches, per_task_returns

  # --- the trainer's interface -------------------------------------------------------------------

  def meta_iteration(self, tasks: list[dict], seed: int) -> dict:
    batches, rets = self._adapt_and_roll(tasks, seed, self.cfg.inner_steps)
    pre, post = batches[:-1], batches[-1]
    if self.cfg.emaml_weight:  # E-MAML's scores: post-update returns, centred and scaled
      post = dict(post, emaml_scores=tf.constant(emaml_scores(rets[-1]), tf.float32))
    params = {k: tf.identity(v) for k, v in self.params.items()}
    inner_loss = float(tf.reduce_mean(self._inner_losses(params, pre[0])))
    if self.cfg.outer_optimizer == "trpo":
      new, info = self._trpo(params, pre, post)
      for k, v in self.params.items():
        v.assign(new[k])
      self._iterations.assign_add(1)
      surrogate, trpo = info["surrogate_before"], info  # the surrogate before the update
    elif self.cfg.outer_optimizer == "promp":
      info = self._promp(self.params, pre, post)
      self._iterations.assign_add(1)
      surrogate, trpo = info["surrogate_before"], None
    else:
      old_logp, old_dist = self._trpo.old_policy(params, pre, post)
      grads, surrogate, _ = self._trpo.gradient(params, pre, post, old_logp, old_dist)
      self.optimizer.apply(self.params, grads)
      surrogate, trpo = float(surrogate), None
    # Headline first: the mean return after adaptation, then before it.
    metrics = {"return_post": float(rets[-1].mean()), "return_pre": float(rets[0].mean()),
               "surrogate_loss": surrogate, "inner_loss": inner_loss}
    if trpo is not None:
      # KL between the post-update policies before and after the step (0 if none was
      # accepted), and the share of iterations whose line search accepted a step.
      metrics["kl"], metrics["step_accepted"] = trpo["kl"], trpo["accepted"]
    if self.cfg.outer_optimizer == "promp":
      # The clipped objective after the update, and each inner step's KL to its sampler.
      metrics["surrogate_after"] = info["surrogate_after"]
      metrics["inner_kl"], metrics["inner_kl_coeff"] = info["inner_kl"], info["inner_kl_coeff"]
    if self.sampler.reports_success:  # share of episodes that succeeded, after and before
      success = self._per_task_success
      metrics["success_post"], metrics["success_pre"] = (float(success[-1].mean()),
                                                         float(success[0].mean()))
    if "log_std" in self.params:  # Gaussian policies: the exploration left to adapt with
      metrics["policy_std"] = float(tf.reduce_mean(tf.exp(self.params["log_std"])))
    return metrics

  def train_loop(self, data, num_steps) -> dict:
    """``num_steps`` meta-iterations on ``data.batches`` (task lists and rollout seeds); the
    means of their metrics."""
    totals = None
    n = int(num_steps)
    for _ in range(n):
      tasks, seed = next(data.batches)
      metrics = self.meta_iteration(tasks, seed)
      totals = metrics if totals is None else {k: totals[k] + metrics[k] for k in totals}
    return {k: v / n for k, v in totals.items()}

  def evaluate(self, dataset) -> tuple[None, np.ndarray]:
    """(no loss: RL's evaluation measures returns only, average return per task after
    0..eval_inner_steps steps ``[steps+1, tasks]``)."""
    per_round, success = [], []
    for tasks, seed, keep in dataset:
      _, rets = self._adapt_and_roll(tasks, seed, self.cfg.eval_inner_steps, evaluation=True)
      per_round.append(np.stack(rets)[:, :keep])
      success.append(np.stack(self._per_task_success)[:, :keep])
    self._eval_success = np.concatenate(success, axis=1)
    return None, np.concatenate(per_round, axis=1)

  def evaluation_extras(self) -> dict[str, np.ndarray]:
    """Other per-task figures of the last :meth:`evaluate`, ``[S+1, tasks]`` each: the
    success rate, for families that report success (Meta-World)."""
    return {"success_rate": self._eval_success} if self.sampler.reports_success else {}
