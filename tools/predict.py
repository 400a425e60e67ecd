#!/usr/bin/env python
"""Classify images of new classes with an exported MAML model, from a few labelled examples.

    python tools/predict.py --export=EXPORT_DIR --support=SUPPORT_DIR --query=DIR_OR_FILES [--json]

``SUPPORT_DIR`` holds one subfolder per class (its name is the class name) with one or more
images each, any format Pillow reads, any size. The model adapts to them, then predicts every
query image: one line per image (file, class, probability), or with ``--json`` one JSON object
per line. Images are converted to the export's channels and resized with the records builder's
filter; the export does the rest (inversion, scaling, adaptation).

With batch norm on batch statistics (the paper's setting, ``query_batch_dependent`` in the
export's metadata) the query images are predicted together in one batch, as an episode's query
set is in meta-test, so a prediction depends on the other query images passed.

Needs TensorFlow, Pillow and absl only, like the export itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("export", None, "Folder written by python -m trainer.export.")
flags.DEFINE_string("support", None, "Folder with one subfolder of images per class.")
flags.DEFINE_list("query", [], "Image files and/or folders of images to classify.")
flags.DEFINE_boolean("json", False, "One JSON object per query image instead of text lines.")

METADATA_NAME = "maml_export.json"
RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
            "box": Image.Resampling.BOX, "nearest": Image.Resampling.NEAREST}


class InputError(ValueError):
  """Bad input; the message names the folder or file."""


def _files(folder: Path) -> list[Path]:
  """Every file below ``folder`` (hidden ones skipped), in a stable order."""
  return sorted(p for p in folder.rglob("*")
                if p.is_file() and not any(part.startswith(".")
                                           for part in p.relative_to(folder).parts))


def load_image(path: Path, image: dict) -> np.ndarray:
  """uint8 ``[H, W, C]`` in the export's channels and size (the builder's filter)."""
  try:
    with Image.open(path) as img:
      img.load()
      converted = img.convert("L" if image["channels"] == 1 else "RGB")
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise InputError(f"{path}: not a readable image ({e})") from None
  size = (image["width"], image["height"])
  if converted.size != size:
    converted = converted.resize(size, RESAMPLE[image.get("resample", "lanczos")])
  pixels = np.asarray(converted, dtype=np.uint8)
  return pixels[:, :, None] if pixels.ndim == 2 else pixels


def read_support(folder: Path, metadata: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(class names, images, labels) from one subfolder per class."""
  if not folder.is_dir():
    raise InputError(f"--support={folder}: not a folder")
  classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
  n_way = metadata["n_way"]
  if len(classes) < 2:
    raise InputError(f"--support={folder}: {len(classes)} class folder(s); the model tells "
                     f"{n_way} classes apart, one subfolder each")
  if len(classes) != n_way:
    raise InputError(f"--support={folder}: {len(classes)} class folders, but the export is "
                     f"{n_way}-way; give exactly {n_way}")
  images, labels = [], []
  for label, cls in enumerate(classes):
    files = _files(cls)
    if not files:
      raise InputError(f"{cls}: empty class folder (needs at least one image)")
    for path in files:
      images.append(load_image(path, metadata["image"]))
      labels.append(label)
  return [c.name for c in classes], np.stack(images), np.asarray(labels, np.int32)


def read_queries(entries: list[str], metadata: dict) -> tuple[list[Path], np.ndarray]:
  paths = []
  for entry in entries:
    path = Path(entry)
    if path.is_dir():
      paths.extend(_files(path))
    elif path.is_file():
      paths.append(path)
    else:
      raise InputError(f"--query: {path} does not exist")
  if not paths:
    raise InputError(f"--query={','.join(entries) or '(none)'}: no query images")
  return paths, np.stack([load_image(p, metadata["image"]) for p in paths])


def predict(export: Path, support: Path, queries: list[str]) -> list[dict]:
  """One ``{"file", "class", "probability"}`` per query image."""
  metadata_path = export / METADATA_NAME
  if not metadata_path.is_file():
    raise InputError(f"--export={export}: no {METADATA_NAME} (not written by trainer.export)")
  metadata = json.loads(metadata_path.read_text())
  names, support_images, support_labels = read_support(support, metadata)
  paths, query_images = read_queries(queries, metadata)
  import tensorflow as tf  # after the inputs are known to be good: it takes seconds
  model = tf.saved_model.load(str(export))
  try:
    result = model.signatures["adapt_and_predict"](
        support_images=tf.constant(support_images),
        support_labels=tf.constant(support_labels), query_images=tf.constant(query_images))
  except tf.errors.InvalidArgumentError as e:  # the export's own checks, as a last resort
    reason = next((line for line in e.message.splitlines() if "assertion failed" in line),
                  e.message.splitlines()[0])
    raise InputError(f"--export={export} refused the inputs: {reason.strip()}") from None
  probabilities = result["probabilities"].numpy()
  labels = result["labels"].numpy()
  return [{"file": str(p), "class": names[k], "probability": float(probabilities[i, k])}
          for i, (p, k) in enumerate(zip(paths, labels))]


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.export or not FLAGS.support:
    print("predict: error: --export and --support are required", file=sys.stderr)
    return 1
  try:
    rows = predict(Path(FLAGS.export), Path(FLAGS.support), FLAGS.query)
  except (InputError, OSError, json.JSONDecodeError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 1
  for row in rows:
    print(json.dumps(row) if FLAGS.json else
          f"{row['file']}\t{row['class']}\t{row['probability']:.4f}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
