#!/usr/bin/env python
"""Write one episode of held-out classes as image folders, to try tools/predict.py on.

    python tools/sample_episode.py --data_dir=data/records/omniglot --output=/tmp/episode

Picks ``--n_way`` unrotated classes of ``--split`` (test by default: classes no model saw in
training) and copies their source images, unchanged (Omniglot's 105 px black-on-white PNGs,
MiniImagenet's JPEGs), into ``OUTPUT/support/<class>/`` (``--k_shot`` each) and
``OUTPUT/query/`` (``--k_query`` each, named ``<class>__<n>.<ext>`` so the answer is visible).
The images come from the source files the records were built from, so that folder must still
be where the build found it.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import zipfile
from pathlib import Path

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from pipeline import episodes, records  # noqa: E402
from pipeline.errors import DataError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Records folder (tools/build_tfrecords.py output).")
flags.DEFINE_string("split", "test", "Split to take the classes from.")
flags.DEFINE_integer("n_way", 5, "Classes.", lower_bound=2)
flags.DEFINE_integer("k_shot", 1, "Support images per class.", lower_bound=1)
flags.DEFINE_integer("k_query", 3, "Query images per class.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Chooses the classes and images.")
flags.DEFINE_string("output", None, "Folder to create.")


def _source_files(data_dir: Path, cls: dict) -> list[tuple[str, bytes]]:
  """The source images of one class as the records name them (``archive.zip:member``, a path,
  or ``tfds:NAME/split/index``), with the image bytes the records hold."""
  dataset = tf.data.TFRecordDataset(str(data_dir / cls["shard"]))
  dataset = dataset.skip(cls["offset"]).take(cls["count"]).map(records.parse)
  return [(r["filename"].numpy().decode(), r["image"].numpy()) for r in dataset]


def _read(source: str, stored: bytes) -> bytes:
  if source.startswith("tfds:"):  # TFDS examples have no file; the records keep their pixels
    return stored
  archive, sep, member = source.partition(".zip:")
  if sep:
    with zipfile.ZipFile(archive + ".zip") as zf:
      return zf.read(member)
  return Path(source).read_bytes()


def sample(data_dir: Path, split: str, n_way: int, k_shot: int, k_query: int, seed: int,
           output: Path) -> list[str]:
  manifest = episodes.read_manifest(data_dir)
  if split not in manifest["splits"]:
    raise DataError(f"--split={split}: {data_dir} has splits {sorted(manifest['splits'])}")
  classes = [c for c in manifest["splits"][split]["classes"] if c.get("rotation", 0) == 0
             and c["count"] >= k_shot + k_query]
  if len(classes) < n_way:
    raise DataError(f"--n_way={n_way}: split {split!r} of {data_dir} has {len(classes)} "
                    f"unrotated classes with {k_shot + k_query} images")
  if output.exists():
    raise DataError(f"--output={output} already exists")
  rng = random.Random(seed)
  chosen = rng.sample(classes, n_way)
  partial = output.with_name(f".{output.name}.partial")
  shutil.rmtree(partial, ignore_errors=True)
  try:
    names = _write(data_dir, chosen, k_shot, k_query, rng, partial)
    os.replace(partial, output)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return names


def _write(data_dir: Path, chosen: list[dict], k_shot: int, k_query: int, rng: random.Random,
           partial: Path) -> list[str]:
  names = []
  for cls in chosen:
    name = cls["name"].removesuffix("/rot000").replace("/", "_")
    names.append(name)
    files = rng.sample(_source_files(data_dir, cls), k_shot + k_query)
    for i, (source, stored) in enumerate(files):
      suffix = ((".jpg" if stored[:2] == b"\xff\xd8" else ".png") if source.startswith("tfds:")
                else (Path(source).suffix or ".png"))
      target = (partial / "support" / name / f"{i}{suffix}" if i < k_shot else
                partial / "query" / f"{name}__{i - k_shot}{suffix}")
      target.parent.mkdir(parents=True, exist_ok=True)
      try:
        target.write_bytes(_read(source, stored))
      except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{source}: cannot read the source image the records came from "
                        f"({e})") from None
  return names


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.data_dir or not FLAGS.output:
    print("sample_episode: error: --data_dir and --output are required", file=sys.stderr)
    return 1
  try:
    names = sample(Path(FLAGS.data_dir), FLAGS.split, FLAGS.n_way, FLAGS.k_shot, FLAGS.k_query,
                   FLAGS.seed, Path(FLAGS.output))
  except DataError as e:
    print(f"sample_episode: error: {e}", file=sys.stderr)
    return 1
  print(f"{FLAGS.output}/support: {FLAGS.n_way} classes x {FLAGS.k_shot} ({', '.join(names)}); "
        f"{FLAGS.output}/query: {FLAGS.n_way * FLAGS.k_query} images named <class>__<n>")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
