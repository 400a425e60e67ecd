"""The sinusoid task sampler: the paper's distribution, layout and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import sinusoid
from pipeline.errors import DataError


def test_batches_follow_the_paper_distribution_and_layout():
  spec = sinusoid.SinusoidSpec(k_shot=5, k_query=10, meta_batch_size=25)
  batches = [{k: v.numpy() for k, v in b.items()}
             for b in sinusoid.meta_batches(spec, seed=0).take(40)]
  b = batches[0]
  assert b["support_inputs"].shape == (25, 5, 1) and b["query_targets"].shape == (25, 10, 1)
  amp = np.concatenate([x["amplitude"] for x in batches])
  phase = np.concatenate([x["phase"] for x in batches])
  xs = np.concatenate([x["support_inputs"].ravel() for x in batches])
  assert 0.1 <= amp.min() and amp.max() <= 5.0 and abs(amp.mean() - 2.55) < 0.15
  assert 0.0 <= phase.min() and phase.max() <= math.pi and abs(phase.mean() - math.pi / 2) < 0.1
  assert -5 <= xs.min() and xs.max() <= 5 and abs(xs.mean()) < 0.15
  for x in batches[:3]:
    for side in ("support", "query"):
      expected = x["amplitude"][:, None, None] * np.sin(x[f"{side}_inputs"] - x["phase"][:, None, None])
      np.testing.assert_allclose(x[f"{side}_targets"], expected, rtol=1e-5, atol=1e-5)


def test_sinusoid_streams_are_deterministic_and_resumable():
  spec = sinusoid.SinusoidSpec(meta_batch_size=4)
  full = [b["support_inputs"].numpy() for b in sinusoid.meta_batches(spec, seed=3).take(5)]
  again = [b["support_inputs"].numpy()
           for b in sinusoid.meta_batches(spec, seed=3, start_step=2).take(3)]
  for a, b in zip(full[2:], again):
    np.testing.assert_array_equal(a, b)
  ev = list(sinusoid.evaluation_batches(spec, seed=3, num_episodes=6))
  assert len(ev) == 2 and ev[1]["valid"].numpy().tolist() == [True, True, False, False]


def test_bad_sinusoid_spec_is_rejected():
  with pytest.raises(DataError, match="amplitude"):
    sinusoid.SinusoidSpec(amplitude=(5.0, 0.1))
  with pytest.raises(DataError, match="meta_batch_size=0"):
    sinusoid.SinusoidSpec(meta_batch_size=0)
