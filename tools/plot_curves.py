#!/usr/bin/env python
"""Learning curves as PNGs.

``python tools/plot_curves.py <model_dir> [...]``: reads ``<model_dir>/metrics.jsonl`` (the
trainer writes it beside its TensorBoard events) and writes ``<model_dir>/curves_loss.png`` and
``curves_metric.png``; with several model dirs, each gets its own files.

``python tools/plot_curves.py --compare=val/accuracy --output=cmp.png <dir> [<dir> ...]``: one
metric of several runs on one plot (side-by-side comparisons at equal steps).

Where a resumed run logged a step twice, the later line wins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(model_dir: Path) -> dict[str, dict[int, float]]:
  path = model_dir / "metrics.jsonl"
  if not path.is_file():
    raise SystemExit(f"plot_curves: {path} not found (is {model_dir} a trainer --model_dir?)")
  series: dict[str, dict[int, float]] = {}
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise SystemExit(f"plot_curves: {path}: line {number} is not JSON ({e})") from e
    for key, value in record.items():
      if key not in ("step", "time"):
        series.setdefault(key, {})[record["step"]] = value
  return series


def plot(model_dir: Path) -> list[Path]:
  series = read_metrics(model_dir)
  groups = {"loss": [k for k in series if "loss" in k],
            "metric": [k for k in series if k.startswith("val/") and not k.endswith("ci95")
                       and "_after_" not in k]
            + [k for k in series if "loss" not in k and k.startswith("train/")
               and not k.endswith("steps_per_s")]}
  written = []
  for name, keys in groups.items():
    if not keys:
      continue
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted(keys):
      steps = sorted(series[key])
      ax.plot(steps, [series[key][s] for s in steps], label=key, marker="." if len(steps) < 30 else None)
    ax.set_xlabel("meta-step")
    ax.set_title(f"{model_dir.name}: {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = model_dir / f"curves_{name}.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    written.append(out)
  return written


def compare(key: str, model_dirs: list[Path], output: Path) -> Path:
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for model_dir in model_dirs:
    series = read_metrics(model_dir).get(key)
    if not series:
      raise SystemExit(f"plot_curves: {model_dir / 'metrics.jsonl'} has no {key!r}")
    steps = sorted(series)
    ax.plot(steps, [series[s] for s in steps], label=model_dir.name,
            marker="." if len(steps) < 30 else None)
  ax.set_xlabel("meta-step")
  ax.set_ylabel(key)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = output.with_name(output.name + ".tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  tmp.replace(output)
  return output


def main(argv: list[str]) -> int:
  options = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv[1:]
             if a.startswith("--") and "=" in a}
  dirs = [a for a in argv[1:] if not a.startswith("--")]
  if not dirs or set(options) - {"--compare", "--output"}:
    print(__doc__, file=sys.stderr)
    return 2
  if "--compare" in options:
    output = Path(options.get("--output", "compare.png"))
    print(compare(options["--compare"], [Path(d) for d in dirs], output))
    return 0
  for arg in dirs:
    for path in plot(Path(arg)):
      print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
