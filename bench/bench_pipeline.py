#!/usr/bin/env python
"""Data-path benchmark: record build times and sampler throughput, one JSON object per line.

  python bench/bench_pipeline.py            # real data from $MAML_DATASETS
  python bench/bench_pipeline.py --skip_build --records_root=/tmp/records

Throughput is measured after a warm-up, over --seconds of wall time per case, on whatever
machine runs it (docs/benchmarks.md names the one that produced its figures).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

from absl import app, flags  # noqa: E402

from pipeline import datasets, episodes  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("records_root", None, "Folder holding omniglot/ and miniimagenet/ records; "
                    "default: a temporary folder, built first.")
flags.DEFINE_boolean("skip_build", False, "Use existing records under --records_root.")
flags.DEFINE_float("seconds", 5.0, "Measurement time per sampler case.")

CASES = [
    ("omniglot", "train", episodes.EpisodeSpec(5, 1, 15, 32), "memory"),
    ("omniglot", "train", episodes.EpisodeSpec(20, 1, 1, 16), "memory"),
    ("miniimagenet", "train", episodes.EpisodeSpec(5, 1, 15, 4), "memory"),
    ("miniimagenet", "train", episodes.EpisodeSpec(5, 1, 15, 4), "per_episode"),
]


def emit(**fields):
  print(json.dumps(fields), flush=True)


def time_sampler(data, spec, seconds):
  it = iter(episodes.meta_batches(data, spec, seed=0))
  for _ in range(5):
    next(it)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    count += 1
  elapsed = time.perf_counter() - start
  return count / elapsed


def main(_):
  root = Path(FLAGS.records_root or tempfile.mkdtemp(prefix="bench-records-"))
  machine = f"{platform.machine()} {os.cpu_count()} cores"
  if not FLAGS.skip_build:
    for name in ("omniglot", "miniimagenet"):
      start = time.perf_counter()
      manifest = datasets.build_dataset(name, output=root / name, overwrite=True)
      emit(bench="build", dataset=name, seconds=round(time.perf_counter() - start, 2),
           images=sum(s["num_images"] for s in manifest["splits"].values()),
           runner="DirectRunner multi_processing", machine=machine)
  for name, split, spec, decode in CASES:
    start = time.perf_counter()
    data = episodes.load_split(root / name, split, decode=decode)
    load = time.perf_counter() - start
    rate = time_sampler(data, spec, FLAGS.seconds)
    emit(bench="sampler", dataset=name, split=split, n_way=spec.n_way, k_shot=spec.k_shot,
         k_query=spec.k_query, meta_batch_size=spec.meta_batch_size, decode=decode,
         load_seconds=round(load, 2), meta_batches_per_s=round(rate, 1),
         episodes_per_s=round(rate * spec.meta_batch_size, 1), machine=machine)


if __name__ == "__main__":
  app.run(main)
