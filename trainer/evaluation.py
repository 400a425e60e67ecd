"""Summaries of evaluation episodes: mean and 95% interval per number of inner steps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def mean_ci95(values: np.ndarray) -> dict:
  """``{"mean", "ci95"}`` with ci95 = 1.96 * std / sqrt(n), the paper's protocol."""
  values = np.asarray(values, np.float64)
  n = len(values)
  return {"mean": float(values.mean()),
          "ci95": float(1.96 * values.std() / math.sqrt(n)) if n > 1 else float("nan")}


def summarize(metric_name: str, split: str, per_step: np.ndarray, loss_per_step: np.ndarray,
              **extra) -> dict:
  """``per_step`` is ``[steps+1, episodes]``; returns the eval JSON's content."""
  return dict({
      "split": split,
      "episodes": int(per_step.shape[1]),
      "metric": metric_name,
      "by_inner_steps": {str(s): mean_ci95(per_step[s]) for s in range(per_step.shape[0])},
      "loss_by_inner_steps": {str(s): mean_ci95(loss_per_step[s])
                              for s in range(loss_per_step.shape[0])},
  }, **extra)


def write_json(path: str | os.PathLike, content: dict) -> None:
  """Writes atomically: a reader never sees a half-written file."""
  path = Path(path)
  partial = path.with_name(f".{path.name}.partial")
  partial.write_text(json.dumps(content, indent=1) + "\n")
  os.replace(partial, path)


def format_summary(summary: dict) -> str:
  scale, unit = (100.0, "%") if summary["metric"] == "accuracy" else (1.0, "")
  parts = [f"{s} steps: {v['mean'] * scale:.2f} ± {v['ci95'] * scale:.2f}{unit}"
           for s, v in summary["by_inner_steps"].items()]
  return (f"{summary['split']} {summary['metric']} over {summary['episodes']} episodes — "
          + "; ".join(parts))
