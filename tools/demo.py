#!/usr/bin/env python
"""`make demo`: finds or downloads Omniglot, builds its records once, samples one meta-batch.

Idempotent: a second run reuses data/records/omniglot when its manifest is complete.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

from pipeline import datasets, download, episodes, paths  # noqa: E402
from pipeline.errors import DataError  # noqa: E402

RECORDS = paths.default_records_dir("omniglot")


def find_omniglot() -> str:
  local = datasets.default_source("omniglot")
  if all((local / f"{n}.zip").is_file() or (local / n).is_dir()
         for n in ("images_background", "images_evaluation")):
    return str(local)
  print(f"Omniglot not found in {local}; downloading the official zips ...", flush=True)
  target = paths.REPO_ROOT / "data" / "downloads" / "omniglot"
  try:
    return str(download.fetch_omniglot(target))
  except DataError as e:
    raise SystemExit(
        f"demo: no Omniglot data. Put images_background.zip and images_evaluation.zip (from "
        f"github.com/brendenlake/omniglot, folder python/) in {local}, or point "
        f"{paths.ENV_VAR} at a folder whose omniglot/ subfolder holds them. ({e})")


@contextlib.contextmanager
def stderr_kept_back():
  """Beam's start-up lines (its workers' "Logging handler created", the missing GCP client
  libraries) kept off the terminal; replayed if the build fails, so nothing is lost."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile("w+") as kept:
    os.dup2(kept.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      kept.seek(0)
      sys.stderr.write(kept.read())
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def main() -> int:
  if not (RECORDS / "manifest.json").is_file():
    source = find_omniglot()
    start = time.time()
    print(f"Building Omniglot records from {source} into {RECORDS} ...", flush=True)
    with stderr_kept_back():
      datasets.build_dataset("omniglot", source=source, output=RECORDS)
    print(f"  built in {time.time() - start:.1f} s", flush=True)
  manifest = episodes.read_manifest(RECORDS)
  for split, info in manifest["splits"].items():
    print(f"  {split:5s}: {info['num_classes']:5d} classes, {info['num_images']:6d} images, "
          f"{len(info['shards'])} shard(s)")
  data = episodes.load_split(RECORDS, "test")
  spec = episodes.EpisodeSpec(n_way=5, k_shot=1, k_query=15, meta_batch_size=32)
  batch = next(iter(episodes.evaluation_batches(data, spec, seed=0, num_episodes=600)))
  print("One meta-batch of test episodes (5-way 1-shot 15-query, 32 tasks):")
  for name, value in batch.items():
    print(f"  {name:15s} {str(value.dtype.name):8s} {value.shape}")
  first = batch["episode_id"][0].numpy()
  print(f"  episode {first}: support labels {batch['support_labels'][0].numpy().tolist()}, "
        f"pixel mean {float(batch['support_images'][0].numpy().mean()):.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
