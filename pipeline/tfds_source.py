"""Few-shot records from a TensorFlow Datasets image-classification dataset already prepared.

``--dataset=tfds:NAME[:CONFIG]`` pools the examples of the chosen TFDS splits (CIFAR-100's
train and test alike), groups them by label and splits the classes between train/val/test by
seeded shares, as a class-per-folder source. Presets give the usual few-shot splits of
CIFAR-100: ``cifarfs`` (Bertinetto et al., ICLR 2019: 64/16/20 classes) and ``fc100``
(Oreshkin et al., NeurIPS 2018: 12/4/4 superclasses, so test classes share no superclass
with training ones).

The driver reads the labels once (images skipped undecoded) to know each class's size; the
Beam workers then read each TFDS split and hand the encoded images to the same encoding stage
as every other source. Nothing is downloaded: prepare the dataset first with
``tfds build NAME --data_dir=DIR``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from pipeline import sources
from pipeline.errors import DataError
from pipeline.sources import ImageRef, SourceListing, WorkUnit

# CIFAR-100's label names in label order (its meta file, alphabetical), and its superclasses.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_NAMES = tuple(sorted(c for group in CIFAR100_SUPERCLASSES.values() for c in group))

# CIFAR-FS (Bertinetto et al.'s split files): 16 validation and 20 test classes, the rest train.
CIFARFS_VAL = ("beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle",
               "butterfly", "sea", "camel", "cattle", "crab", "crocodile", "maple_tree",
               "motorcycle", "tractor")
CIFARFS_TEST = ("whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table",
                "wardrobe", "leopard", "plain", "chimpanzee", "fox", "snail", "worm", "baby",
                "man", "woman", "bicycle", "pickup_truck", "rocket")
# FC100 (Oreshkin et al.): superclasses per split.
FC100_VAL = ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
             "small_mammals")
FC100_TEST = ("aquatic_mammals", "insects", "medium_mammals", "people")


def _cifarfs() -> dict[str, list[str]]:
  held_out = set(CIFARFS_VAL) | set(CIFARFS_TEST)
  return {"train": sorted(c for c in CIFAR100_NAMES if c not in held_out),
          "val": sorted(CIFARFS_VAL), "test": sorted(CIFARFS_TEST)}


def _fc100() -> dict[str, list[str]]:
  held_out = set(FC100_VAL) | set(FC100_TEST)
  pick = lambda groups: sorted(c for g in groups for c in CIFAR100_SUPERCLASSES[g])
  return {"train": pick(g for g in CIFAR100_SUPERCLASSES if g not in held_out),
          "val": pick(FC100_VAL), "test": pick(FC100_TEST)}


@dataclasses.dataclass(frozen=True)
class Preset:
  tfds_name: str
  splits: dict[str, list[str]]
  citation: str


PRESETS = {
    "cifarfs": Preset("cifar100", _cifarfs(), "CIFAR-FS, Bertinetto et al., ICLR 2019"),
    "fc100": Preset("cifar100", _fc100(), "FC100, Oreshkin et al., NeurIPS 2018"),
}


def parse_name(dataset: str) -> tuple[str, str | None]:
  """``tfds:NAME[:CONFIG]`` -> (NAME, CONFIG or None)."""
  parts = dataset.split(":")
  if parts[0] != "tfds" or len(parts) not in (2, 3) or not all(parts[1:]):
    raise DataError(f"--dataset={dataset}: expected tfds:NAME or tfds:NAME:CONFIG")
  return parts[1], parts[2] if len(parts) == 3 else None


@dataclasses.dataclass(frozen=True)
class TfdsReader:
  """What a worker needs to read one TFDS split (picklable: no builder object)."""
  name: str
  config: str | None
  data_dir: str | None
  image_key: str
  label_key: str

  def builder(self):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    try:
      return tfds.builder(self.name, config=self.config, data_dir=self.data_dir)
    except Exception as e:  # pylint: disable=broad-except  (DatasetNotFoundError, bad config)
      raise DataError(f"--dataset=tfds:{self.name}: {str(e).splitlines()[0]}") from None

  def dataset(self, split: str, with_images: bool):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    builder = self.builder()
    features = builder.info.features
    for key in (self.image_key, self.label_key):
      if key not in features:
        raise DataError(f"--dataset=tfds:{self.name}: no feature {key!r} (has "
                        f"{', '.join(features)}); this builder reads image classification "
                        f"datasets with an image and a label feature")
    try:
      ds = builder.as_dataset(split=split, shuffle_files=False,
                              decoders={self.image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"--dataset=tfds:{self.name} split {split!r} in --tfds_data_dir="
                      f"{self.data_dir or '(TFDS default)'}: {str(e).splitlines()[0]} "
                      f"({self.prepare_hint()})") from None
    if with_images:
      return ds.map(lambda ex: (ex[self.image_key], ex[self.label_key]))
    return ds.map(lambda ex: ex[self.label_key])

  def prepare_hint(self) -> str:
    return (f"prepare it first with tfds build {self.name}"
            f"{'/' + self.config if self.config else ''} --data_dir=<dir>; nothing is "
            f"downloaded here")

  def labels(self, split: str) -> np.ndarray:
    chunks = [b.numpy() for b in self.dataset(split, with_images=False).batch(1 << 16)]
    return np.concatenate(chunks) if chunks else np.zeros([0], np.int64)

  def label_names(self, num_labels: int) -> list[str]:
    feature = self.builder().info.features[self.label_key]
    names = list(getattr(feature, "names", None) or [])
    return names if len(names) >= num_labels else [str(i) for i in range(num_labels)]


def member(reader: TfdsReader, split: str, index: int) -> str:
  return f"tfds:{reader.name}/{split}/{index:09d}"


def list_tfds(dataset: str, *, data_dir: str | None, splits: Sequence[str],
              split_ratios: Sequence[float] = (0.6, 0.2, 0.2), split_seed: int = 0,
              image_key: str = "image", label_key: str = "label") -> SourceListing:
  preset = PRESETS.get(dataset)
  name, config = (preset.tfds_name, None) if preset else parse_name(dataset)
  reader = TfdsReader(name, config, data_dir, image_key, label_key)
  if not splits:
    splits = sorted(reader.builder().info.splits)
  if not splits:
    raise DataError(f"--dataset={dataset}: tfds:{name} is not prepared in --tfds_data_dir="
                    f"{data_dir or '(TFDS default)'}: {reader.prepare_hint()}")
  by_label: dict[int, list[ImageRef]] = {}
  for split in splits:
    for index, label in enumerate(reader.labels(split)):
      by_label.setdefault(int(label), []).append(ImageRef(None, member(reader, split, index)))
  if not by_label:
    raise DataError(f"--dataset={dataset}: no examples in splits {', '.join(splits)}")
  names = reader.label_names(max(by_label) + 1)
  if preset:
    known = [n for n in names if not n.isdigit()]
    if known and known != list(CIFAR100_NAMES)[:len(known)]:
      raise DataError(f"--dataset={dataset}: tfds:{name}'s label names differ from CIFAR-100's "
                      f"({known[:3]}...); the preset's class split does not apply")
    names = list(CIFAR100_NAMES) + names[len(CIFAR100_NAMES):]
  refs = {names[label]: by_label[label] for label in sorted(by_label)}
  if preset:
    class_splits = {s: [c for c in cs if c in refs] for s, cs in preset.splits.items()}
    missing = sorted(set(CIFAR100_NAMES) - set(refs))
    if missing:
      logging.warning("--dataset=%s: %d of the preset's classes have no example in splits %s "
                      "(%s...); they are left out", dataset, len(missing), ",".join(splits),
                      ", ".join(missing[:3]))
    sources.check_split_sizes({k: len(v) for k, v in class_splits.items()},
                              f"--dataset={dataset}")
    info = {"split_scheme": dataset, "preset": preset.citation}
  else:
    class_splits = sources.split_by_ratios(list(refs), split_ratios, split_seed)
    info = {"split_scheme": "ratios", "split_ratios": list(split_ratios),
            "split_seed": split_seed}
  units = sources.units_for_splits(class_splits, refs)
  info.update(tfds_name=name, tfds_config=config, tfds_splits=list(splits),
              num_classes=len(units), num_images=sum(len(u.images) for u in units),
              classes_per_split={s: len(v) for s, v in class_splits.items()})
  label_of = {names[label]: label for label in by_label}
  return SourceListing(dataset, units, [], info,
                       read_units=lambda sharded: ReadTfds(reader, list(splits), sharded,
                                                           label_of))


def ReadTfds(reader: TfdsReader, splits: list[str], units: list[WorkUnit],
             label_of: dict[str, int]):  # pylint: disable=invalid-name  (a PTransform factory)
  """Pipeline root -> the work units of ``units`` with their images' bytes attached."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel

  by_label = {label_of[u.source_name]: u for u in units}
  by_name = {u.source_name: u for u in units}

  def read_split(split: str):
    for index, (image, label) in enumerate(reader.dataset(split, with_images=True)
                                           .as_numpy_iterator()):
      unit = by_label.get(int(label))
      if unit is not None:
        yield unit.source_name, ImageRef(None, member(reader, split, index), bytes(image))

  def attach(item):
    name, refs = item
    return dataclasses.replace(by_name[name], images=tuple(sorted(refs, key=lambda r: r.member)))

  class _Read(beam.PTransform):

    def expand(self, root):
      return (root
              | "TfdsSplits" >> beam.Create(splits)
              | "ReadTfdsSplit" >> beam.FlatMap(read_split)
              | "GroupByClass" >> beam.GroupByKey()
              | "AttachImages" >> beam.Map(attach))

  return _Read()
