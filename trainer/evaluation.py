"""Summaries of evaluation episodes: mean and 95% interval per number of inner steps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def t_quantile_975(dof: int) -> float:
  """Student's t 97.5% quantile, by bisection on its CDF (Simpson's rule on the density).

  Exact to ~1e-6 (12.706 for 1 degree of freedom, 2.093 for 19, 1.960 in the limit); no SciPy.
  """
  log_norm = (math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)
              - 0.5 * math.log(dof * math.pi))

  def cdf_above_half(t: float) -> float:
    x = np.linspace(0.0, t, 4001)
    density = np.exp(log_norm - (dof + 1) / 2 * np.log1p(x * x / dof))
    h = t / 4000
    return h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum()
                    + 2 * density[2:-1:2].sum())

  low, high = 1.9, 15.0
  for _ in range(60):
    mid = (low + high) / 2
    low, high = (mid, high) if cdf_above_half(mid) < 0.475 else (low, mid)
  return (low + high) / 2


def mean_ci95(values: np.ndarray, t_interval: bool = False) -> dict:
  """``{"mean", "ci95"}``: ci95 = z * std / sqrt(n) with z = 1.96, the paper's protocol for its
  600 episodes; with ``t_interval``, Student's t quantile for n - 1 degrees of freedom, right
  for the tens of tasks an RL evaluation has (2.09 for 20 tasks)."""
  values = np.asarray(values, np.float64)
  n = len(values)
  if n < 2:
    return {"mean": float(values.mean()), "ci95": float("nan")}
  z = t_quantile_975(n - 1) if t_interval else 1.96
  std = values.std(ddof=1) if t_interval else values.std()
  return {"mean": float(values.mean()), "ci95": float(z * std / math.sqrt(n))}


def summarize(metric_name: str, split: str, per_step: np.ndarray,
              loss_per_step: np.ndarray | None, t_interval: bool = False,
              steps: tuple[int, ...] | None = None, **extra) -> dict:
  """``per_step`` is ``[S, episodes]``, row i after ``steps[i]`` adaptation steps (default
  0..S-1); returns the eval JSON's content (no ``loss_by_inner_steps`` for learners without an
  evaluation loss, e.g. RL's returns)."""
  interval = lambda v: mean_ci95(v, t_interval)
  steps = tuple(range(per_step.shape[0])) if steps is None else tuple(steps)
  if len(steps) != per_step.shape[0]:
    raise ValueError(f"{per_step.shape[0]} rows of results for {len(steps)} step counts")
  summary = {
      "split": split,
      "episodes": int(per_step.shape[1]),
      "metric": metric_name,
      "interval": "student_t" if t_interval else "normal_1.96",
      "by_inner_steps": {str(s): interval(row) for s, row in zip(steps, per_step)},
  }
  if loss_per_step is not None:
    summary["loss_by_inner_steps"] = {str(s): interval(row)
                                      for s, row in zip(steps, loss_per_step)}
  return dict(summary, **extra)


def write_json(path: str | os.PathLike, content: dict) -> None:
  """Writes atomically: a reader never sees a half-written file."""
  path = Path(path)
  partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # two writers never share it
  partial.write_text(json.dumps(content, indent=1) + "\n")
  os.replace(partial, path)


def last_step(summary: dict) -> dict:
  """The entry of ``by_inner_steps`` after the most adaptation steps."""
  return summary["by_inner_steps"][str(max(int(s) for s in summary["by_inner_steps"]))]


def format_summary(summary: dict) -> str:
  scale, unit = (100.0, "%") if summary["metric"] == "accuracy" else (1.0, "")
  parts = [f"{s} steps: {v['mean'] * scale:.2f} ± {v['ci95'] * scale:.2f}{unit}"
           for s, v in summary["by_inner_steps"].items()]
  if "classifier" in summary:  # no inner steps: another rule (a pretraining run's)
    parts = [f"{summary['classifier']}: {parts[0].split(': ', 1)[1]}"]
  if "success_rate_by_inner_steps" in summary:  # Meta-World's
    parts.append("success rate " + ", ".join(
        f"{s} steps {100 * v['mean']:.1f} ± {100 * v['ci95']:.1f}%"
        for s, v in summary["success_rate_by_inner_steps"].items()))
  return (f"{summary['split']} {summary['metric']} over {summary['episodes']} episodes — "
          + "; ".join(parts))
