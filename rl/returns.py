"""Discounted returns, the linear feature baseline and GAE, all over masked fixed-horizon arrays.

Arrays are ``[E, T]`` (episodes x time) with ``mask[e, t] = 1`` while episode ``e`` is alive;
steps after an early end carry mask 0 and contribute nothing — in particular they are left
out of the baseline's least-squares fit, which is where peers produce NaNs.
"""

from __future__ import annotations

import numpy as np


def discounted_returns(rewards: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
  out = np.zeros_like(rewards, dtype=np.float64)
  running = np.zeros(rewards.shape[0])
  for t in reversed(range(rewards.shape[1])):
    running = (rewards[:, t] + gamma * running) * mask[:, t]
    out[:, t] = running
  return out


def baseline_features(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """rllab's features: obs, obs^2 (clipped), t/100, its square and cube, and 1; ``[E, T, F]``."""
  E, T = mask.shape
  o = np.clip(obs.reshape(E, T, -1).astype(np.float64), -10, 10)
  t = np.broadcast_to((np.arange(T) / 100.0)[None, :, None], (E, T, 1))
  return np.concatenate([o, o ** 2, t, t ** 2, t ** 3, np.ones((E, T, 1))], axis=-1) * mask[..., None]


def fit_linear_baseline(obs: np.ndarray, returns: np.ndarray, mask: np.ndarray,
                        reg: float = 1e-5) -> np.ndarray:
  """Ridge regression of returns on features over the live steps; returns the values ``[E, T]``.

  The regularizer grows tenfold (up to five times) while the system is singular, as rllab does.
  """
  feats = baseline_features(obs, mask)
  live = mask.reshape(-1) > 0
  X = feats.reshape(-1, feats.shape[-1])[live]
  y = returns.reshape(-1)[live]
  A, b = X.T @ X, X.T @ y
  coef = np.zeros(X.shape[1])
  for _ in range(5):
    try:
      coef = np.linalg.solve(A + reg * np.eye(A.shape[0]), b)
      if np.all(np.isfinite(coef)):
        break
    except np.linalg.LinAlgError:
      pass
    reg *= 10
  return (feats @ coef) * mask


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float,
        lam: float) -> np.ndarray:
  """Generalized advantage estimates; the value after a sequence's end is 0."""
  E, T = rewards.shape
  next_values = np.concatenate([values[:, 1:] * mask[:, 1:], np.zeros((E, 1))], axis=1)
  deltas = (rewards + gamma * next_values - values) * mask
  adv = np.zeros((E, T))
  running = np.zeros(E)
  for t in reversed(range(T)):
    next_mask = mask[:, t + 1] if t + 1 < T else np.zeros(E)
    running = deltas[:, t] + gamma * lam * next_mask * running
    adv[:, t] = running
  return adv * mask


def normalize(adv: np.ndarray, mask: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  n = max(mask.sum(), 1.0)
  mean = (adv * mask).sum() / n
  std = np.sqrt((((adv - mean) * mask) ** 2).sum() / n)
  return (adv - mean) / (std + eps) * mask
