"""Lists a class-per-folder image dataset (local or on any Beam filesystem) as work units.

A class is a folder that holds image files (any format Pillow reads, by extension); its name
is its path under the source, so nested layouts (``Alphabet/character01``) keep their meaning.
Classes are split between train/val/test by seeded shares of the classes, or by split CSVs in
MiniImagenet's ``filename,label`` format. Everything structural is checked here, on the
driver, before a worker starts; unreadable images are found by the workers (one line, or
skipped with --skip_corrupt).
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import Sequence

from pipeline import sources, storage
from pipeline.errors import DataError
from pipeline.sources import ImageRef, SourceListing

MIN_IMAGES = 2  # an episode draws at least one support and one query image per class


def image_suffixes() -> frozenset[str]:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return frozenset(Image.registered_extensions())


def _relative(root: str, path: str) -> str:
  rel = path[len(root):].lstrip("/") if path.startswith(root) else path
  return rel.replace(os.sep, "/")


def list_class_folders(source: str) -> tuple[str, dict[str, list[str]], list[str]]:
  """(root, class name -> sorted image paths, other files) of a class-per-folder source."""
  root = storage.canonical(source)
  if not storage.is_remote(root) and not os.path.isdir(root):
    raise DataError(f"--source={source}: no such folder")
  suffixes = image_suffixes()
  classes: dict[str, list[str]] = {}
  others: dict[str, list[str]] = {}
  loose = []
  for path in storage.beam_list(root):
    rel = _relative(root, path)
    folder, name = posixpath.split(rel)
    if posixpath.splitext(name)[1].lower() not in suffixes:
      others.setdefault(folder, []).append(rel)
    elif not folder:
      loose.append(rel)
    else:
      classes.setdefault(folder, []).append(path)
  if loose:
    raise DataError(f"{storage.join(root, loose[0])}: images directly in --source; put each "
                    f"class's images in a folder of its own ({len(loose)} such file(s))")
  for folder in sorted(classes):
    parent = posixpath.dirname(folder)
    while parent:
      if parent in classes:
        raise DataError(f"{storage.join(root, parent)}: holds images and also class folders "
                        f"below it ({folder}); move its own images into a subfolder")
      parent = posixpath.dirname(parent)
  empty = sorted(f for f in others if f and f not in classes
                 and not any(c.startswith(f + "/") for c in classes))
  if not storage.is_remote(root):  # object stores have no empty folders to find
    for dirpath, dirnames, filenames in os.walk(root):
      if not dirnames and not filenames and dirpath != root:
        empty.append(_relative(root, dirpath))
  if empty:
    raise DataError(f"{storage.join(root, sorted(empty)[0])}: class folder without images "
                    f"(images are files Pillow reads: {', '.join(sorted(suffixes)[:6])}, ...)")
  if not classes:
    raise DataError(f"--source={source}: no class folders with images found")
  for paths in classes.values():
    paths.sort()
  ignored = sorted(r for f, rs in others.items() for r in rs)
  return root, classes, ignored


def _csv_splits(root: str, classes: dict[str, list[str]], splits_csv: str
                ) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
  """(split -> class names, class -> image paths, CSV paths) from MiniImagenet-style CSVs."""
  parts = [p for p in splits_csv.split(",") if p]
  if len(parts) == 1:
    files = [storage.join(parts[0], f"{s}.csv") for s in sources.SPLITS]
  elif len(parts) == 3:
    files = parts
  else:
    raise DataError(f"--splits_csv={splits_csv}: expected a folder holding train.csv, val.csv "
                    f"and test.csv, or the three files comma-separated in that order")
  by_path = {_relative(root, p): p for paths in classes.values() for p in paths}
  splits: dict[str, list[str]] = {}
  chosen: dict[str, list[str]] = {}
  split_of: dict[str, str] = {}
  for split, csv_path in zip(sources.SPLITS, files):
    for row, filename, label in sources.read_split_csv(csv_path):
      path = by_path.get(f"{label}/{filename}") or by_path.get(filename)
      if path is None:
        raise DataError(f"{csv_path}: row {row}: {filename} found neither in "
                        f"{storage.join(root, label)} nor under {root}")
      name = posixpath.dirname(_relative(root, path))
      if split_of.setdefault(name, split) != split:
        raise DataError(f"{csv_path}: row {row}: class {name} is also in the "
                        f"{split_of[name]} CSV; splits must not share classes")
      if name not in chosen:
        splits.setdefault(split, []).append(name)
      chosen.setdefault(name, []).append(path)
  sources.check_split_sizes({k: len(v) for k, v in splits.items()}, f"--splits_csv={splits_csv}")
  return {k: sorted(v) for k, v in splits.items()}, chosen, files


def list_folder(source: str, *, split_ratios: Sequence[float] = (0.6, 0.2, 0.2),
                split_seed: int = 0, splits_csv: str | None = None) -> SourceListing:
  root, classes, ignored = list_class_folders(source)
  if splits_csv:
    splits, chosen, csvs = _csv_splits(root, classes, splits_csv)
    info = {"split_scheme": "csv", "splits_csv": [storage.canonical(c) for c in csvs]}
  else:
    splits = sources.split_by_ratios(list(classes), split_ratios, split_seed)
    chosen, csvs = classes, []
    info = {"split_scheme": "ratios", "split_ratios": list(split_ratios),
            "split_seed": split_seed}
  for name in sorted(chosen):
    if len(chosen[name]) < MIN_IMAGES:
      logging.warning("%s: %d image(s); no episode can draw a support and a query image from "
                      "it (the trainer refuses K + Q above the smallest class)",
                      storage.join(root, name), len(chosen[name]))
  refs = {name: [ImageRef(None, p) for p in paths] for name, paths in chosen.items()}
  units = sources.units_for_splits(splits, refs)
  info.update(root=root, num_classes=len(units),
              num_images=sum(len(u.images) for u in units),
              classes_per_split={s: len(v) for s, v in splits.items()},
              unused_classes=len(classes) - len(chosen), ignored_files=len(ignored))
  return SourceListing("folder", units, csvs, info)
