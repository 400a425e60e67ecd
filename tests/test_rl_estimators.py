"""The inner-step estimators of rl/estimators.py against exact answers by enumeration.

A two-step MDP small enough to list every trajectory: from the start state the first action
picks one of two states, the second action there is rewarded by a table. The policy is a
linear softmax of the one-hot state, so its parameters are shared by both steps and the scores
of the two steps interact (the cross terms LVC drops are not zero). The return's exact gradient
and Hessian come from differentiating the enumerated expectation; each estimator's expected
Hessian is the probability-weighted sum of its Hessian on every trajectory. Float64 throughout:
the comparisons are exact up to rounding (1e-9), so no processor's summation order matters.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

from rl import estimators, maml_rl, policies, promp
from trainer import optim

CFG = policies.PolicyConfig("categorical", obs_dim=3, action_dim=2, hidden_sizes=())
FIRST_REWARD = np.array([0.3, -0.2])  # by the first action
SECOND_REWARD = np.array([[1.0, -0.5], [-0.4, 0.8]])  # [state reached, second action]
THETA = np.array([0.2, -0.1, 0.4, -0.3, -0.2, 0.5, 0.1, 0.05])  # kernel [3, 2] then bias [2]
TRAJECTORIES = list(itertools.product(range(2), range(2)))


def unflatten(theta, tasks):
  kernel = tf.reshape(theta[:6], [1, 3, 2])
  bias = tf.reshape(theta[6:], [1, 2])
  return {"out/kernel": tf.tile(kernel, [tasks, 1, 1]), "out/bias": tf.tile(bias, [tasks, 1])}


def trajectory_batch(horizon=2):
  """Every trajectory as one task of one episode: obs, actions, return-to-go advantages."""
  obs, actions, adv = [], [], []
  for a, b in TRAJECTORIES:
    states = [0, 1 + a][:horizon]
    obs.append(np.eye(3)[states])
    actions.append([a, b][:horizon])
    rewards = [FIRST_REWARD[a], SECOND_REWARD[a, b]][:horizon]
    adv.append(np.cumsum(rewards[::-1])[::-1])
  return {"obs": tf.constant(np.array(obs)), "actions": tf.constant(np.array(actions)),
          "advantages": tf.constant(np.array(adv)),
          "mask": tf.ones([len(TRAJECTORIES), horizon], tf.float64)}


def probabilities(theta, batch):
  logp = policies.log_prob(CFG, unflatten(theta, len(TRAJECTORIES)), batch["obs"],
                           batch["actions"])
  return tf.exp(tf.reduce_sum(logp, axis=1))


def exact_value(theta, horizon=2):
  batch = trajectory_batch(horizon)
  return tf.reduce_sum(probabilities(theta, batch) * batch["advantages"][:, 0])


def hessian(f, theta):
  theta = tf.constant(theta)
  with tf.GradientTape() as outer:
    outer.watch(theta)
    with tf.GradientTape() as inner:
      inner.watch(theta)
      value = f(theta)
    grad = inner.gradient(value, theta)
  return grad.numpy(), outer.jacobian(grad, theta).numpy()


def expected_estimate(estimator, horizon=2):
  """E over trajectories of the estimator's inner objective's gradient and Hessian at THETA
  (the objective is minus the loss, times the horizon: the loss averages over steps)."""
  batch = trajectory_batch(horizon)
  weights = probabilities(tf.constant(THETA), batch)  # constants: sampled, not differentiated

  def objective(theta):
    losses = estimators.inner_losses(CFG, unflatten(theta, len(TRAJECTORIES)), batch,
                                     estimator, horizon)
    return -horizon * tf.reduce_sum(weights * losses)

  return hessian(objective, THETA)


def cross_terms():
  """E[sum over t != t' of grad log pi_t grad log pi_t'^T R_>=max(t,t')], by enumeration."""
  batch = trajectory_batch()
  theta = tf.constant(THETA)
  with tf.GradientTape() as tape:
    tape.watch(theta)
    logp = policies.log_prob(CFG, unflatten(theta, len(TRAJECTORIES)), batch["obs"],
                             batch["actions"])
  scores = tape.jacobian(logp, theta).numpy()  # [trajectory, step, parameter]
  p = probabilities(theta, batch).numpy()
  to_go = batch["advantages"].numpy()
  total = np.zeros((8, 8))
  for i in range(len(TRAJECTORIES)):
    g0, g1 = scores[i, 0], scores[i, 1]
    total += p[i] * (np.outer(g0, g1) + np.outer(g1, g0)) * to_go[i, 1]
  return total


@pytest.mark.parametrize("estimator", estimators.INNER_ESTIMATORS)
def test_every_inner_estimator_gives_the_exact_policy_gradient(estimator):
  exact_grad, _ = hessian(exact_value, THETA)
  grad, _ = expected_estimate(estimator)
  np.testing.assert_allclose(grad, exact_grad, rtol=0, atol=1e-12)


def test_dice_hessian_is_the_exact_hessian_of_the_return():
  _, exact = hessian(exact_value, THETA)
  _, dice = expected_estimate("dice")
  np.testing.assert_allclose(dice, exact, rtol=0, atol=1e-12)


def test_lvc_hessian_misses_exactly_the_cross_step_terms():
  """ProMP's statement: the LVC estimator keeps the same-step outer products of scores and
  drops those of different steps."""
  _, exact = hessian(exact_value, THETA)
  _, lvc = expected_estimate("lvc")
  missing = cross_terms()
  assert np.abs(missing).max() > 0.01  # the bias is there to be found
  np.testing.assert_allclose(lvc, exact - missing, rtol=0, atol=1e-12)


def test_reinforce_hessian_misses_every_score_outer_product():
  """MAML-TRPO's inner objective differentiated twice: only sum_t hess log pi_t R_>=t."""
  _, exact = hessian(exact_value, THETA)
  _, reinforce = expected_estimate("reinforce")
  batch = trajectory_batch()
  p = probabilities(tf.constant(THETA), batch)

  def curvature_only(theta):
    logp = policies.log_prob(CFG, unflatten(theta, len(TRAJECTORIES)), batch["obs"],
                             batch["actions"])
    return tf.reduce_sum(p[:, None] * logp * batch["advantages"])

  _, expected = hessian(curvature_only, THETA)
  np.testing.assert_allclose(reinforce, expected, rtol=0, atol=1e-12)
  assert np.abs(reinforce - exact).max() > 0.05


def test_at_horizon_one_lvc_is_unbiased_as_dice():
  _, exact = hessian(lambda t: exact_value(t, horizon=1), THETA)
  for estimator in ("lvc", "dice"):
    _, estimate = expected_estimate(estimator, horizon=1)
    np.testing.assert_allclose(estimate, exact, rtol=0, atol=1e-12, err_msg=estimator)


def random_batch(rng, tasks=2, rollouts=3, horizon=4, obs_dim=3, actions=2):
  """Several episodes per task, some ended early (masked tails)."""
  n = rollouts * horizon
  lengths = rng.integers(1, horizon + 1, size=(tasks, rollouts))
  mask = (np.arange(horizon)[None, None] < lengths[..., None]).reshape(tasks, n)
  return {"obs": tf.constant(rng.normal(size=(tasks, n, obs_dim))),
          "actions": tf.constant(rng.integers(0, actions, size=(tasks, n))),
          "advantages": tf.constant(rng.normal(size=(tasks, n))),
          "mask": tf.constant(mask.astype(np.float64))}


def test_the_inner_step_is_the_same_for_every_estimator_on_padded_batches():
  """Same adapted parameters (first derivatives agree at the sampling policy), while the
  second-order meta-gradients through the step differ."""
  rng = np.random.default_rng(0)
  cfg = policies.PolicyConfig("categorical", obs_dim=3, action_dim=2, hidden_sizes=(5,))
  params = {k: tf.constant(v.astype(np.float64) + rng.normal(size=v.shape) * 0.3)
            for k, v in policies.init_params(cfg, 1).items()}
  pre, post = random_batch(rng), random_batch(rng)
  fasts, meta_grads = {}, {}
  for estimator in estimators.INNER_ESTIMATORS:
    with tf.GradientTape() as tape:
      tape.watch(list(params.values()))
      fast = maml_rl.adapt(cfg, params, [pre], 0.5, first_order=False, estimator=estimator,
                           horizon=4)
      loss = tf.reduce_sum(estimators.inner_losses(cfg, fast, post))
    fasts[estimator] = fast
    meta_grads[estimator] = np.concatenate([g.numpy().ravel()
                                            for g in tape.gradient(loss, params).values()])
  for estimator in ("lvc", "dice"):
    for k in params:
      np.testing.assert_allclose(fasts[estimator][k].numpy(), fasts["reinforce"][k].numpy(),
                                 rtol=0, atol=1e-12, err_msg=(estimator, k))
    assert np.abs(meta_grads[estimator] - meta_grads["reinforce"]).max() > 1e-4, estimator
  assert np.abs(meta_grads["lvc"] - meta_grads["dice"]).max() > 1e-4


def test_lvc_away_from_the_sampling_policy_is_the_importance_weighted_gradient():
  """With the sampling log-probabilities given (ProMP's later outer steps on one batch), the
  LVC objective's gradient is E_old[ratio * grad log pi * A]."""
  rng = np.random.default_rng(1)
  batch = random_batch(rng, tasks=1)
  theta_old = tf.constant(THETA)
  theta = tf.constant(THETA + rng.normal(size=8) * 0.2)
  batch["logp_old"] = policies.log_prob(CFG, unflatten(theta_old, 1), batch["obs"],
                                        batch["actions"])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(theta)
    loss = estimators.inner_losses(CFG, unflatten(theta, 1), batch, "lvc")[0]
    logp = policies.log_prob(CFG, unflatten(theta, 1), batch["obs"], batch["actions"])[0]
  scores = tape.jacobian(logp, theta).numpy()
  ratio = np.exp(logp.numpy() - batch["logp_old"].numpy()[0])
  mask, adv = batch["mask"].numpy()[0], batch["advantages"].numpy()[0]
  expected = -(mask * ratio * adv) @ scores / mask.sum()
  np.testing.assert_allclose(tape.gradient(loss, theta).numpy(), expected, rtol=1e-10)


def test_clipped_surrogate_stops_the_gradient_outside_the_clip_range():
  logp = tf.constant([[0.0, 0.5, -0.5, 0.5, -0.5]], tf.float64)
  old = tf.zeros_like(logp)
  adv = tf.constant([[1.0, 1.0, 1.0, -1.0, -1.0]], tf.float64)
  mask = tf.ones_like(logp)
  with tf.GradientTape() as tape:
    tape.watch(logp)
    loss = estimators.clipped_surrogate(logp, old, adv, mask, clip_eps=0.2)[0]
  ratio = np.exp(logp.numpy()[0])
  # Gradient flows where the unclipped term is the minimum: inside the range, or outside on
  # the side the advantage's sign penalises (ratio 0.61 with A > 0, ratio 1.65 with A < 0).
  flows = np.array([True, False, True, True, False])
  expected = np.where(flows, -ratio * adv.numpy()[0] / 5, 0.0)
  np.testing.assert_allclose(tape.gradient(loss, logp).numpy()[0], expected, rtol=1e-12)
  value = np.minimum(ratio * adv.numpy()[0], np.clip(ratio, 0.8, 1.2) * adv.numpy()[0])
  assert float(loss) == pytest.approx(-value.mean(), rel=1e-12)


def test_promp_first_step_follows_the_lvc_meta_gradient_of_maml_trpo():
  """At the sampling policy the clipped ratio is 1 and every inner KL is at its minimum, so
  ProMP's objective has the gradient of MAML-TRPO's surrogate with the LVC inner estimator;
  after ``steps`` Adam steps the inner KL is no longer zero."""
  rng = np.random.default_rng(2)
  cfg = policies.PolicyConfig("categorical", obs_dim=3, action_dim=2, hidden_sizes=(5,))
  params = {k: tf.Variable(v + rng.normal(size=v.shape).astype(np.float32) * 0.3)
            for k, v in policies.init_params(cfg, 1).items()}
  as_float32 = lambda b: {k: tf.cast(v, tf.float32) if v.dtype == tf.float64 else
                          tf.cast(v, tf.int32) for k, v in b.items()}
  pre, post = as_float32(random_batch(rng)), as_float32(random_batch(rng))
  optimizer = optim.Adam(optim.AdamConfig(1e-2), params)
  step = promp.ProMPStep(cfg, promp.ProMPConfig(steps=3, inner_kl_penalty=0.5), inner_lr=0.5,
                         inner_steps=1, first_order=False, estimator="lvc", horizon=4,
                         optimizer=optimizer, kl_coeff=tf.Variable([0.5]))
  current = {k: tf.identity(v) for k, v in params.items()}
  pre_logp, pre_dist, post_logp = step.sampling_policies(current, [pre], post)
  with tf.GradientTape() as tape:
    tape.watch(list(current.values()))
    loss, _, inner_kls = step.objective(current, [dict(pre, logp_old=pre_logp[0])], post,
                                        pre_dist, post_logp)
  grads = tape.gradient(loss, current)
  assert float(inner_kls[0]) == pytest.approx(0.0, abs=1e-7)
  trpo = maml_rl.TRPOStep(cfg, maml_rl.TRPOConfig(), 0.5, False, estimator="lvc", horizon=4)
  old_logp, old_dist = trpo.old_policy(current, [pre], post)
  expected, _, _ = trpo.gradient(current, [pre], post, old_logp, old_dist)
  for k in params:
    np.testing.assert_allclose(grads[k].numpy(), expected[k].numpy(), rtol=1e-4, atol=1e-6,
                               err_msg=k)
  info = step(params, [pre], post)
  assert int(optimizer.iterations) == 3 and info["inner_kl"] > 0
  assert info["surrogate_after"] < info["surrogate_before"]


EMAML_LR = 0.7


def flatten(fast):
  return tf.concat([tf.reshape(fast["out/kernel"], [-1]), tf.reshape(fast["out/bias"], [-1])], 0)


def one_trajectory_steps(theta):
  """For each trajectory tau: the policies before and after the inner step taken on tau alone
  (REINFORCE, as MAML-TRPO's; at the sampling policy every estimator takes the same step)."""
  batch = trajectory_batch()
  params = {"out/kernel": tf.reshape(theta[:6], [3, 2]), "out/bias": theta[6:]}
  chains = []
  for i in range(len(TRAJECTORIES)):
    one = {k: v[i:i + 1] for k, v in batch.items()}
    chains.append((one, maml_rl.adapt_all(CFG, params, [one], EMAML_LR, first_order=False,
                                          estimator="reinforce", horizon=2)))
  return chains


def test_emaml_term_completes_the_gradient_through_the_sampling_distribution():
  """E-MAML's objective is E_{tau ~ pi_theta}[J(theta'(tau))] with the pre-update trajectory's
  probability differentiated too. By enumeration: its exact gradient equals the expectation of
  MAML's meta-gradient (REINFORCE inner step) plus emaml_loss's term, and MAML's alone misses
  it by more than the tolerance could hide."""
  batch = trajectory_batch()

  def formulation_two(theta):
    p = probabilities(theta, batch)
    return tf.add_n([p[i] * exact_value(flatten(chain[-1]))
                     for i, (_, chain) in enumerate(one_trajectory_steps(theta))])

  p0 = probabilities(tf.constant(THETA), batch)  # the sampled distribution: constants

  def estimated(theta, weight):
    total = 0.0
    for i, (one, chain) in enumerate(one_trajectory_steps(theta)):
      post = exact_value(flatten(chain[-1]))
      scores = tf.reshape(p0[i] * post, [1])
      total += p0[i] * post - weight * estimators.emaml_loss(CFG, chain[:1], [one], scores, 2)
    return total

  exact, _ = hessian(formulation_two, THETA)
  with_term, _ = hessian(lambda t: estimated(t, 1.0), THETA)
  maml_only, _ = hessian(lambda t: estimated(t, 0.0), THETA)
  np.testing.assert_allclose(with_term, exact, rtol=0, atol=1e-12)
  assert np.abs(maml_only - exact).max() > 0.01
  assert float(estimated(tf.constant(THETA), 1.0)) == pytest.approx(
      float(estimated(tf.constant(THETA), 0.0)), abs=1e-15)  # zero in value


def test_emaml_scores_are_centred_and_scaled_over_the_tasks():
  from rl.learner import emaml_scores

  scores = emaml_scores(np.array([-30.0, -10.0, -20.0, -20.0]))
  np.testing.assert_allclose(scores, [-np.sqrt(2), np.sqrt(2), 0.0, 0.0], rtol=1e-6)
