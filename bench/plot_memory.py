#!/usr/bin/env python
"""Plots bench_meta_step.py's JSON lines: peak memory (and step time) against inner steps, one
line per variant (default, --task_chunk, --remat, both).

  python bench/bench_meta_step.py --cases=peer_mini_5w1s_q15 --orders=second \\
      --remats=false,true --task_chunks=0,1 --inner_steps_sweep=1,2,5,10 --steps=3 > sweep.jsonl
  python bench/plot_memory.py sweep.jsonl --output=docs/meta_step_memory.png [--notime]
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "PNG to write.")
flags.DEFINE_boolean("time", True, "Also plot seconds per step (only from a quiet machine).")
flags.DEFINE_string("title", "", "Figure title.")


def read(paths: list[str]) -> dict[str, list[dict]]:
  by_variant: dict[str, list[dict]] = {}
  for path in paths:
    with open(path) as f:
      for line in f:
        if not line.startswith("{"):
          continue
        row = json.loads(line)
        if "error" in row or "inner_steps" not in row:
          continue
        by_variant.setdefault(row["variant"], []).append(row)
  if not by_variant:
    raise ValueError(f"{', '.join(paths)}: no bench_meta_step.py result lines")
  return {v: sorted(rows, key=lambda r: r["inner_steps"]) for v, rows in by_variant.items()}


def main(argv):
  if len(argv) < 2 or not FLAGS.output:
    print("usage: plot_memory.py SWEEP.jsonl... --output=PNG", file=sys.stderr)
    return 2
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  try:
    data = read(argv[1:])
  except (OSError, ValueError) as e:
    print(f"plot_memory: error: {e}", file=sys.stderr)
    return 1
  panels = ["net_peak_mb"] + (["seconds_per_step"] if FLAGS.time else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  labels = {"net_peak_mb": "peak memory above the process baseline (MB)",
            "seconds_per_step": "seconds per meta-step"}
  for ax, key in zip(axes[0], panels):
    for variant, rows in sorted(data.items()):
      ax.plot([r["inner_steps"] for r in rows], [r[key] for r in rows], marker="o",
              label=variant)
    ax.set_xlabel("inner steps")
    ax.set_ylabel(labels[key])
    ax.grid(alpha=0.3)
    ax.legend()
  if FLAGS.title:
    fig.suptitle(FLAGS.title)
  fig.tight_layout()
  tmp = FLAGS.output + ".partial.png"
  fig.savefig(tmp, dpi=110)
  import os
  os.replace(tmp, FLAGS.output)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
