#!/usr/bin/env python
"""Learning curves as PNGs.

``python tools/plot_curves.py <model_dir> [...]``: reads ``<model_dir>/metrics.jsonl`` (the
trainer writes it beside its TensorBoard events) and writes ``<model_dir>/curves_loss.png`` and
``curves_metric.png``; with several model dirs, each gets its own files.

``python tools/plot_curves.py --compare=val/accuracy --output=cmp.png <dir> [<dir> ...]``: one
metric of several runs on one plot (side-by-side comparisons at equal steps). Each line is
labelled with its method (MAML, MAML++, ANIL, Meta-SGD, MAML-TRPO, ProMP, read from the run's
``config.json``; the folder's name for runs without one, or where two runs share a method) and
the figure is titled with the dataset and setting. ``--compare=KEY,KEY,...``: several metrics
(e.g. ``train/return_pre,train/return_post``), each line labelled with run and metric. ``--reference=LABEL:VALUE`` (repeatable)
draws a published figure as a dashed line, in the metric's units (accuracy in percent or as a
fraction).

Where a resumed run logged a step twice, the later line wins.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DATASET_NAMES = {"omniglot": "Omniglot", "miniimagenet": "MiniImagenet", "sinusoid": "sinusoid",
                 "cifarfs": "CIFAR-FS", "fc100": "FC100", "rl": "meta-RL"}


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


def run_flags(model_dir: Path) -> dict:
  """The flags of the run's ``config.json`` ({} for runs without one)."""
  try:
    return json.loads((model_dir / "config.json").read_text()).get("flags", {})
  except (OSError, json.JSONDecodeError):
    return {}


def method(flags: dict) -> str | None:
  """MAML, MAML++, ANIL, Meta-SGD, MAML-TRPO or ProMP, from the run's flags (and "from a
  pretrained body" for a run started with --init_from)."""
  if not flags:
    return None
  if flags.get("dataset") == "rl":
    return {"trpo": "MAML-TRPO", "promp": "ProMP"}.get(flags.get("outer_optimizer", "trpo"),
                                                       "MAML (Adam)")
  body = " from a pretrained body" if flags.get("init_from") else ""
  if flags.get("inner_adapt") == "head":
    return "ANIL" + body
  if flags.get("per_step_inner_lr") or flags.get("msl_iterations"):
    return "MAML++" + body
  if flags.get("learn_inner_lr"):
    return "Meta-SGD" + body
  return "MAML" + (" (first order)" if flags.get("first_order") else "") + body


def setting(flags: dict) -> str | None:
  """``Omniglot 20-way 1-shot``, ``sinusoid 5-shot``, ``meta-RL 2DNavigation-v0``."""
  if not flags:
    return None
  dataset = flags.get("dataset", "")
  name = DATASET_NAMES.get(dataset, dataset)
  if dataset == "rl":
    return f"{name} {flags.get('env', '')}".strip()
  if dataset == "sinusoid":
    return f"{name} {flags.get('k_shot')}-shot"
  return f"{name} {flags.get('n_way')}-way {flags.get('k_shot')}-shot"


def labels(model_dirs: list[Path]) -> list[str]:
  """Each run's method; the folder's name added where two runs would share a label."""
  methods = [method(run_flags(d)) or d.name for d in model_dirs]
  return [f"{m} ({d.name})" if methods.count(m) > 1 and m != d.name else m
          for m, d in zip(methods, model_dirs)]


def parse_reference(text: str) -> tuple[str, float]:
  label, _, value = text.rpartition(":")
  try:
    return label or "published", float(value)
  except ValueError:
    raise SystemExit(f"plot_curves: --reference={text}: expected LABEL:VALUE, e.g. "
                     f"'MAML paper:95.8'") from None


def plot(model_dir: Path) -> list[Path]:
  series = read_metrics(model_dir)
  groups = {"loss": [k for k in series if "loss" in k],
            "metric": [k for k in series if k.startswith("val/") and not k.endswith("ci95")
                       and "_after_" not in k]
            + [k for k in series if "loss" not in k and k.startswith("train/")
               and not k.endswith("steps_per_s")]}
  flags = run_flags(model_dir)
  title = " ".join(x for x in (method(flags), setting(flags)) if x) or model_dir.name
  written = []
  for name, keys in groups.items():
    if not keys:
      continue
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted(keys):
      steps = sorted(series[key])
      ax.plot(steps, [series[key][s] for s in steps], label=key, marker="." if len(steps) < 30 else None)
    ax.set_xlabel("meta-step")
    ax.set_title(f"{title}: {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = model_dir / f"curves_{name}.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    written.append(out)
  return written


def compare(key: str, model_dirs: list[Path], output: Path,
            references: list[tuple[str, float]] = ()) -> Path:
  """``key``: one metric, or several separated by commas (e.g. an RL run's
  ``train/return_pre,train/return_post``: each line is then labelled with its key too)."""
  keys = key.split(",")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  top = 0.0
  for model_dir, label in zip(model_dirs, labels(model_dirs)):
    metrics = read_metrics(model_dir)
    for one in keys:
      series = metrics.get(one)
      if not series:
        raise SystemExit(f"plot_curves: {model_dir / 'metrics.jsonl'} has no {one!r}")
      steps = sorted(series)
      top = max(top, max(series.values()))
      ax.plot(steps, [series[s] for s in steps],
              label=label if len(keys) == 1 else f"{label}: {one}",
              marker="." if len(steps) < 30 else None)
  fraction = all(k.endswith("accuracy") for k in keys) and top <= 1.0
  for (label, value), color in zip(references, ("black", "dimgray", "gray", "darkgray")):
    value = value / 100.0 if fraction and value > 1.0 else value
    ax.axhline(value, linestyle="--", linewidth=1, color=color, label=label)
  settings = {setting(run_flags(d)) for d in model_dirs} - {None}
  if len(settings) == 1:
    ax.set_title(settings.pop())
  ax.set_xlabel("meta-step")
  ax.set_ylabel(key if len(keys) == 1 else os.path.commonprefix(keys).rstrip("_/") or "value")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = output.with_name(output.name + ".tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  tmp.replace(output)
  return output


def main(argv: list[str]) -> int:
  pairs = [a.split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a]
  options = {k: v for k, v in pairs if k != "--reference"}
  references = [parse_reference(v) for k, v in pairs if k == "--reference"]
  dirs = [a for a in argv[1:] if not a.startswith("--")]
  if not dirs or set(options) - {"--compare", "--output"} or (references and
                                                               "--compare" not in options):
    print(__doc__, file=sys.stderr)
    return 2
  if "--compare" in options:
    output = Path(options.get("--output", "compare.png"))
    print(compare(options["--compare"], [Path(d) for d in dirs], output, references))
    return 0
  for arg in dirs:
    for path in plot(Path(arg)):
      print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
