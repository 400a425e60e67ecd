"""Functional policies with explicit, task-batched parameters (leading task axis ``M``).

``gaussian``: an MLP gives the mean of a diagonal Gaussian whose log standard deviation is a
state-independent parameter (rllab's choice, which MAML-RL used); ``categorical``: an MLP gives
logits. TF versions serve the gradients; a NumPy forward pass serves action sampling in the
rollout loop, where a TF call per environment step would dominate.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  kind: str  # "gaussian" or "categorical"
  obs_dim: int
  action_dim: int  # action size (gaussian) or number of actions (categorical)
  hidden_sizes: tuple[int, ...] = (100, 100)
  init_log_std: float = 0.0


def init_params(cfg: PolicyConfig, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  params, width = {}, cfg.obs_dim
  for i, hidden in enumerate(cfg.hidden_sizes + (cfg.action_dim,)):
    name = "out" if i == len(cfg.hidden_sizes) else f"dense{i}"
    limit = math.sqrt(6.0 / (width + hidden))
    scale = 0.01 if name == "out" else 1.0  # a near-uniform initial policy
    params[f"{name}/kernel"] = (scale * rng.uniform(-limit, limit, (width, hidden))).astype(np.float32)
    params[f"{name}/bias"] = np.zeros(hidden, np.float32)
    width = hidden
  if cfg.kind == "gaussian":
    params["log_std"] = np.full(cfg.action_dim, cfg.init_log_std, np.float32)
  return params


def _mlp(cfg, params, obs, ops):
  h = obs
  for i in range(len(cfg.hidden_sizes)):
    h = ops.relu(ops.einsum("mnd,mdk->mnk", h, params[f"dense{i}/kernel"])
                 + params[f"dense{i}/bias"][:, None, :])
  return ops.einsum("mnd,mdk->mnk", h, params["out/kernel"]) + params["out/bias"][:, None, :]


class _TF:
  relu = staticmethod(tf.nn.relu)
  einsum = staticmethod(tf.einsum)


class _NP:
  relu = staticmethod(lambda x: np.maximum(x, 0.0))
  einsum = staticmethod(lambda eq, a, b: np.einsum(eq, a, b, optimize=True))


def log_prob(cfg: PolicyConfig, params: dict, obs: tf.Tensor, actions: tf.Tensor) -> tf.Tensor:
  """``[M, N]`` log-probabilities of ``actions`` at ``obs`` (``[M, N, ...]``)."""
  out = _mlp(cfg, params, obs, _TF)
  if cfg.kind == "categorical":
    return -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(actions, tf.int32),
                                                           logits=out)
  log_std = params["log_std"][:, None, :]
  z = (actions - out) * tf.exp(-log_std)
  return tf.reduce_sum(-0.5 * tf.square(z) - log_std - 0.5 * math.log(2 * math.pi), axis=-1)


def distribution(cfg: PolicyConfig, params: dict, obs: tf.Tensor) -> dict:
  out = _mlp(cfg, params, obs, _TF)
  if cfg.kind == "categorical":
    return {"logits": out}
  return {"mean": out, "log_std": tf.broadcast_to(params["log_std"][:, None, :], tf.shape(out))}


def kl(cfg: PolicyConfig, old: dict, new: dict) -> tf.Tensor:
  """``[M, N]`` KL(old || new)."""
  if cfg.kind == "categorical":
    p_old = tf.nn.log_softmax(old["logits"])
    p_new = tf.nn.log_softmax(new["logits"])
    return tf.reduce_sum(tf.exp(p_old) * (p_old - p_new), axis=-1)
  var_old, var_new = tf.exp(2 * old["log_std"]), tf.exp(2 * new["log_std"])
  return tf.reduce_sum(new["log_std"] - old["log_std"]
                       + (var_old + tf.square(old["mean"] - new["mean"])) / (2 * var_new) - 0.5,
                       axis=-1)


def sample_actions(cfg: PolicyConfig, params: dict[str, np.ndarray], obs: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
  """NumPy: actions for ``obs [M, R, d]`` with per-task ``params [M, ...]``."""
  out = _mlp(cfg, params, obs.astype(np.float32), _NP)
  if cfg.kind == "categorical":
    logits = out - out.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random(probs.shape[:-1] + (1,))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), cfg.action_dim - 1)
  noise = rng.standard_normal(out.shape).astype(np.float32)
  return out + np.exp(params["log_std"])[:, None, :] * noise
