"""Comparing two float32 computations of one quantity whose sums may run in different orders.

Strategies (replicas' partial sums all-reduced), XLA against graph mode, task chunks and
oneDNN's kernels on different processors all change the order in which float32 terms are
added, so such results agree to rounding, not bit for bit. A sum of ``L`` float32 terms taken
in another order differs by at most about ``L * eps`` relative to the sum of the terms'
magnitudes (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §4.2), and each
dependent stage after it (an inner step, a meta-step, Adam's rescaling) carries the difference
on. The tolerance is therefore derived from the computation: ``stages * L * eps``, relative to
the norm of the compared tensor (element-wise relative errors are meaningless for entries that
are sums close to zero). A real fault (a replica's share lost or counted twice, another
episode, another step) differs by O(1) relative and fails by orders of magnitude.

Bit-exact claims (resume, samplers: the same kernels on the same inputs in the same order)
use ``np.testing.assert_array_equal`` instead.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def float32_tolerance(reduction_length: int, stages: int = 1) -> float:
  """Norm-relative tolerance for ``stages`` dependent stages of sums of up to
  ``reduction_length`` float32 terms."""
  return stages * reduction_length * EPS32


def relative_difference(actual, expected) -> float:
  """``||actual - expected|| / ||expected||`` in float64."""
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), np.finfo(np.float32).tiny))


def assert_close_f32(actual, expected, *, reduction_length: int, stages: int = 1,
                     at_least: float = 0.0, err_msg: str = "") -> None:
  """``||actual - expected|| <= tolerance * ||expected||`` (in float64), the tolerance being
  ``float32_tolerance(...)`` or ``at_least`` if larger: a measured rounding sensitivity of an
  ill-conditioned computation (the spread between two correct float32 evaluations of it)."""
  a = np.asarray(actual, np.float64)
  e = np.asarray(expected, np.float64)
  assert a.shape == e.shape, f"{err_msg}: shapes {a.shape} and {e.shape}"
  tolerance = max(float32_tolerance(reduction_length, stages), at_least)
  error, scale = np.linalg.norm(a - e), np.linalg.norm(e)
  assert error <= tolerance * max(scale, np.finfo(np.float32).tiny), (
      f"{err_msg}: |actual - expected| = {error:.3g} > {tolerance:.2g} x |expected| "
      f"= {tolerance * scale:.3g} (largest difference {np.abs(a - e).max():.3g})")
