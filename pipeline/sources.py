"""Turns a raw dataset on disk (folders or the archives as distributed) into work units.

A work unit is one source class (an Omniglot character, a MiniImagenet synset) with its image
references and the output classes it becomes (an Omniglot character becomes four classes with
rotations on). Listing happens on the driver and reads only directories and zip indexes, so
it is fast and every structural error (missing folder, CSV row without a file) is reported
before any worker starts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import random
import zipfile
from pathlib import Path
from typing import Any, Sequence

from pipeline import storage
from pipeline.errors import DataError

OMNIGLOT_SETS = ("images_background", "images_evaluation")
OMNIGLOT_SPLIT_SEED = 1  # random.Random(1).shuffle, as in the original MAML data generator
OMNIGLOT_MAML_SPLIT_SIZES = {"train": 1100, "val": 100}  # the rest (423 of 1623) is test
OMNIGLOT_LAKE_VAL_ALPHABETS = 5  # background alphabets held out for validation in `lake`
MINI_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """One source image: a member of a zip archive, or a plain file when ``archive`` is None.

  ``data`` carries the encoded bytes when a pipeline stage has already read them (TFDS).
  """
  archive: str | None
  member: str
  data: bytes | None = dataclasses.field(default=None, compare=False, repr=False)

  def describe(self) -> str:
    return f"{self.archive}:{self.member}" if self.archive else self.member


@dataclasses.dataclass(frozen=True)
class OutputClass:
  """One class of the built dataset: its split, label within the split and shard."""
  split: str
  label: int
  name: str
  rotation: int = 0  # quarter turns, counter-clockwise (np.rot90 / tf.image.rot90)
  shard: str = ""


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  """A source class, the images it holds and the output classes it becomes."""
  source_name: str
  images: tuple[ImageRef, ...]
  outputs: tuple[OutputClass, ...]


@dataclasses.dataclass
class SourceListing:
  dataset: str
  units: list[WorkUnit]
  archives: list[str]  # files whose SHA-256 the manifest records (zips, CSVs)
  info: dict  # facts about the source for the manifest (character counts, split scheme, ...)
  # A Beam PTransform from the pipeline root to the work units with their image bytes, for
  # sources the driver cannot cheaply address image by image (TFDS); None: Create(units).
  read_units: Any = None


# ---------------------------------------------------------------------------------------------
# Omniglot


def _omniglot_set_locations(source: str) -> dict[str, tuple[str | None, str]]:
  """Maps each Omniglot set to (zip or None, folder) from a folder or a comma-separated zip list."""
  locations: dict[str, tuple[str | None, str]] = {}
  parts = [p for p in source.split(",") if p]
  if len(parts) == 1 and Path(parts[0]).is_dir():
    root = Path(parts[0])
    for name in OMNIGLOT_SETS:
      if (root / name).is_dir():
        locations[name] = (None, str(root / name))
      elif (root / f"{name}.zip").is_file():
        locations[name] = (str(root / f"{name}.zip"), name)
    missing = [n for n in OMNIGLOT_SETS if n not in locations]
    if missing:
      raise DataError(
          f"--source={source}: expected {' and '.join(missing)} there, as a folder "
          f"(<name>/<Alphabet>/characterNN/*.png) or as the distributed <name>.zip")
    return locations
  for part in parts:
    path = Path(part)
    if not path.is_file():
      raise DataError(f"--source: {part} is neither a folder nor a file")
    if not zipfile.is_zipfile(path):
      raise DataError(f"--source: {part} is not a zip archive")
    name = path.name[:-4] if path.name.endswith(".zip") else path.name
    if name not in OMNIGLOT_SETS:
      raise DataError(f"--source: {part}: expected a file named images_background.zip or "
                      f"images_evaluation.zip")
    locations[name] = (str(path), name)
  missing = [n for n in OMNIGLOT_SETS if n not in locations]
  if missing:
    raise DataError(f"--source={source}: missing {', '.join(m + '.zip' for m in missing)}")
  return locations


def _list_characters(archive: str | None, folder: str) -> dict[tuple[str, str], list[ImageRef]]:
  """(alphabet, character) -> sorted image refs, from a zip index or a directory walk."""
  chars: dict[tuple[str, str], list[ImageRef]] = {}
  if archive is not None:
    try:
      with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise DataError(f"{archive}: cannot read zip archive ({e})") from e
    prefix = folder.rstrip("/") + "/"
    for member in names:
      if not member.startswith(prefix) or not member.lower().endswith(IMAGE_SUFFIXES):
        continue
      parts = member[len(prefix):].split("/")
      if len(parts) != 3:
        raise DataError(f"{archive}:{member}: expected {prefix}<Alphabet>/<character>/<image>")
      chars.setdefault((parts[0], parts[1]), []).append(ImageRef(archive, member))
    if not chars:
      raise DataError(f"{archive}: no images under {prefix} (is this an Omniglot archive?)")
  else:
    root = Path(folder)
    for path in sorted(root.glob("*/*/*")):
      if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        chars.setdefault((path.parent.parent.name, path.parent.name), []).append(
            ImageRef(None, str(path)))
    if not chars:
      raise DataError(f"{folder}: no images found as <Alphabet>/<character>/<image>.png")
  for refs in chars.values():
    refs.sort(key=lambda r: r.member)
  return chars


def omniglot_split_assignment(keys_by_set: dict[str, list[tuple[str, str]]],
                              scheme: str) -> dict[str, list[tuple[str, str]]]:
  """Assigns (alphabet, character) keys to train/val/test; each split sorted by name.

  ``maml``: all 1,623 characters sorted by name, shuffled with ``random.Random(1)``, then
  1,100 train, 100 val and the remaining 423 test, as in the original MAML code (which shuffled
  with seed 1 but in ``os.listdir`` order, so its exact split cannot be recovered).
  ``lake``: the background set's alphabets for train and val (5 alphabets, drawn with
  ``random.Random(1)`` from the sorted list, held out for val), the evaluation set for test.
  """
  if scheme == "maml":
    everything = sorted(k for keys in keys_by_set.values() for k in keys)
    random.Random(OMNIGLOT_SPLIT_SEED).shuffle(everything)
    n_train, n_val = OMNIGLOT_MAML_SPLIT_SIZES["train"], OMNIGLOT_MAML_SPLIT_SIZES["val"]
    if len(everything) <= n_train + n_val:
      raise DataError(f"--split=maml needs more than {n_train + n_val} characters; the source "
                      f"has {len(everything)} (use --split=lake for a partial Omniglot)")
    splits = {"train": everything[:n_train], "val": everything[n_train:n_train + n_val],
              "test": everything[n_train + n_val:]}
  elif scheme == "lake":
    background = sorted(keys_by_set["images_background"])
    alphabets = sorted({a for a, _ in background})
    if len(alphabets) <= OMNIGLOT_LAKE_VAL_ALPHABETS:
      raise DataError(f"--split=lake needs more than {OMNIGLOT_LAKE_VAL_ALPHABETS} background "
                      f"alphabets; the source has {len(alphabets)}")
    random.Random(OMNIGLOT_SPLIT_SEED).shuffle(alphabets)
    val_alphabets = set(alphabets[:OMNIGLOT_LAKE_VAL_ALPHABETS])
    splits = {"train": [k for k in background if k[0] not in val_alphabets],
              "val": [k for k in background if k[0] in val_alphabets],
              "test": sorted(keys_by_set["images_evaluation"])}
  else:
    raise DataError(f"--split={scheme}: unknown Omniglot split scheme (use maml or lake)")
  return {name: sorted(keys) for name, keys in splits.items()}


def list_omniglot(source: str, *, split_scheme: str = "maml",
                  rotations: bool = True) -> SourceListing:
  locations = _omniglot_set_locations(source)
  refs: dict[tuple[str, str], list[ImageRef]] = {}
  keys_by_set: dict[str, list[tuple[str, str]]] = {}
  for set_name, (archive, folder) in locations.items():
    chars = _list_characters(archive, folder)
    keys_by_set[set_name] = sorted(chars)
    refs.update(chars)
  splits = omniglot_split_assignment(keys_by_set, split_scheme)
  quarter_turns = (0, 1, 2, 3) if rotations else (0,)
  units = []
  for split, keys in splits.items():
    label = 0
    for alphabet, character in keys:
      base = f"{alphabet}/{character}"
      outputs = []
      for k in quarter_turns:
        name = f"{base}/rot{90 * k:03d}" if rotations else base
        outputs.append(OutputClass(split=split, label=label, name=name, rotation=k))
        label += 1
      units.append(WorkUnit(base, tuple(refs[(alphabet, character)]), tuple(outputs)))
  info = {
      "split_scheme": split_scheme,
      "split_seed": OMNIGLOT_SPLIT_SEED,
      "num_characters": len(refs),
      "num_images": sum(len(v) for v in refs.values()),
      "characters_per_split": {s: len(k) for s, k in splits.items()},
      "rotations": list(90 * k for k in quarter_turns),
  }
  if split_scheme == "lake":
    info["val_alphabets"] = sorted({a for a, _ in splits["val"]})
  archives = sorted(a for a, _ in locations.values() if a is not None)
  return SourceListing("omniglot", units, archives, info)


# ---------------------------------------------------------------------------------------------
# MiniImagenet


def read_split_csv(path: str | Path) -> list[tuple[int, str, str]]:
  """(row number, filename, label) rows of a Ravi & Larochelle split CSV (local or remote)."""
  try:
    if storage.is_remote(path):
      text = storage.beam_read(str(path)).decode("utf-8")
    else:
      text = Path(path).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read ({e})") from e
  reader = csv.reader(io.StringIO(text))
  header = next(reader, None)
  if header is None or [h.strip() for h in header] != ["filename", "label"]:
    raise DataError(f"{path}: expected the header 'filename,label', found {header!r}")
  rows = []
  for row_number, row in enumerate(reader, start=2):
    if not row:
      continue
    if len(row) != 2 or not row[0].strip() or not row[1].strip():
      raise DataError(f"{path}: row {row_number}: expected 'filename,label', found {row!r}")
    rows.append((row_number, row[0].strip(), row[1].strip()))
  if not rows:
    raise DataError(f"{path}: no rows")
  return rows


def list_miniimagenet(source: str) -> SourceListing:
  root = Path(source)
  if not root.is_dir():
    raise DataError(f"--source={source}: expected a folder with images/ (or images.zip) and "
                    f"train.csv, val.csv, test.csv")
  if (root / "images").is_dir():
    archive = None
    available = {p.name for p in (root / "images").iterdir()}
    member_of = lambda f: str(root / "images" / f)
    where = str(root / "images")
  elif (root / "images.zip").is_file():
    archive = str(root / "images.zip")
    try:
      with zipfile.ZipFile(archive) as zf:
        members = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise DataError(f"{archive}: cannot read zip archive ({e})") from e
    prefixed = {m for m in members if m.startswith("images/")}
    available = {m[len("images/"):] for m in prefixed} if prefixed else set(members)
    member_of = (lambda f: "images/" + f) if prefixed else (lambda f: f)
    where = archive
  else:
    raise DataError(f"--source={source}: neither images/ nor images.zip found there")
  units, seen_classes = [], {}
  for split in MINI_SPLITS:
    csv_path = root / f"{split}.csv"
    if not csv_path.is_file():
      raise DataError(f"--source={source}: {split}.csv is missing")
    by_class: dict[str, list[ImageRef]] = {}
    for row_number, filename, label in read_split_csv(csv_path):
      if filename not in available:
        raise DataError(f"{csv_path}: row {row_number}: {filename} not found in {where}")
      if label in seen_classes and seen_classes[label] != split:
        raise DataError(f"{csv_path}: row {row_number}: class {label} is also in "
                        f"{seen_classes[label]}.csv; splits must not share classes")
      seen_classes[label] = split
      by_class.setdefault(label, []).append(ImageRef(archive, member_of(filename)))
    for label_index, (name, refs) in enumerate(by_class.items()):  # CSV order of first appearance
      units.append(WorkUnit(name, tuple(refs), (OutputClass(split, label_index, name),)))
  archives = ([archive] if archive else []) + [str(root / f"{s}.csv") for s in MINI_SPLITS]
  info = {"num_images": sum(len(u.images) for u in units), "num_classes": len(units)}
  return SourceListing("miniimagenet", units, archives, info)


SPLITS = ("train", "val", "test")


def parse_split_ratios(text: str) -> tuple[float, float, float]:
  """``"0.6,0.2,0.2"`` -> the train/val/test shares of the classes (positive, summing to 1)."""
  try:
    ratios = tuple(float(x) for x in text.split(","))
  except ValueError:
    ratios = ()
  if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
    raise DataError(f"--split_ratios={text}: expected three positive shares of the classes for "
                    f"train,val,test summing to 1, e.g. 0.6,0.2,0.2")
  return ratios  # type: ignore[return-value]


def split_by_ratios(names: Sequence[str], ratios: Sequence[float], seed: int
                    ) -> dict[str, list[str]]:
  """Classes to train/val/test: sorted, shuffled with ``random.Random(seed)``, then cut by the
  shares (rounded; test takes the rest). Each split sorted by name. Every split needs 2."""
  shuffled = sorted(names)
  random.Random(seed).shuffle(shuffled)
  n_train = round(ratios[0] * len(shuffled))
  n_val = round(ratios[1] * len(shuffled))
  cut = {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val],
         "test": shuffled[n_train + n_val:]}
  check_split_sizes({k: len(v) for k, v in cut.items()},
                    f"--split_ratios={','.join(f'{r:g}' for r in ratios)}")
  return {k: sorted(v) for k, v in cut.items()}


def check_split_sizes(sizes: dict[str, int], what: str) -> None:
  for split in SPLITS:
    if sizes.get(split, 0) < 2:
      raise DataError(f"{what}: split {split!r} gets {sizes.get(split, 0)} of "
                      f"{sum(sizes.values())} classes; every split needs at least 2 (an "
                      f"episode needs 2 classes)")


def units_for_splits(splits: dict[str, list[str]],
                     refs: dict[str, Sequence[ImageRef]]) -> list[WorkUnit]:
  """One work unit per class; labels 0..n-1 within each split in the order given."""
  units = []
  for split in SPLITS:
    for label, name in enumerate(splits.get(split, ())):
      units.append(WorkUnit(name, tuple(refs[name]), (OutputClass(split, label, name),)))
  return units


def assign_shards(units: Sequence[WorkUnit], images_per_shard: int) -> list[WorkUnit]:
  """Packs each split's classes, in label order, into shards of at most ``images_per_shard``.

  A class never spans two shards (a larger class gets a shard of its own), so a reader finds
  any class from the manifest alone. Shard names are ``<split>-NNNNN-of-MMMMM.tfrecord``.
  """
  if images_per_shard < 1:
    raise DataError(f"--images_per_shard={images_per_shard}: must be at least 1")
  by_split: dict[str, list[tuple[OutputClass, int]]] = {}
  for unit in units:
    for out in unit.outputs:
      by_split.setdefault(out.split, []).append((out, len(unit.images)))
  shard_of: dict[tuple[str, int], str] = {}
  for split, classes in by_split.items():
    classes.sort(key=lambda item: item[0].label)
    groups, current, filled = [], [], 0
    for out, count in classes:
      if current and filled + count > images_per_shard:
        groups.append(current)
        current, filled = [], 0
      current.append(out)
      filled += count
    if current:
      groups.append(current)
    for i, group in enumerate(groups):
      for out in group:
        shard_of[(split, out.label)] = f"{split}-{i:05d}-of-{len(groups):05d}.tfrecord"
  return [dataclasses.replace(unit, outputs=tuple(
      dataclasses.replace(o, shard=shard_of[(o.split, o.label)]) for o in unit.outputs))
          for unit in units]

