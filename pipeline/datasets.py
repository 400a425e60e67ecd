"""What each known dataset needs to be built: its lister, image spec and defaults."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

from pipeline import imaging, paths, sources
from pipeline.errors import DataError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  image_size: int | None  # None: --image_size is required
  channels: int
  invert: bool
  default_source: str | None  # relative to paths.datasets_root(); None: --source is required


DATASETS = {
    "omniglot": DatasetInfo(image_size=28, channels=1, invert=True, default_source="omniglot"),
    "miniimagenet": DatasetInfo(image_size=84, channels=3, invert=False,
                                default_source="miniimagenet_subset"),
    "folder": DatasetInfo(image_size=None, channels=3, invert=False, default_source=None),
    "cifarfs": DatasetInfo(image_size=32, channels=3, invert=False, default_source=None),
    "fc100": DatasetInfo(image_size=32, channels=3, invert=False, default_source=None),
}
_TFDS = DatasetInfo(image_size=None, channels=3, invert=False, default_source=None)


def is_known(name: str) -> bool:
  return name in DATASETS or name.startswith("tfds:")


def dataset_info(name: str) -> DatasetInfo:
  if name.startswith("tfds:"):
    return _TFDS
  if name not in DATASETS:
    raise DataError(f"--dataset={name}: unknown dataset (known: {', '.join(sorted(DATASETS))}, "
                    f"tfds:NAME[:CONFIG])")
  return DATASETS[name]


def default_source(name: str) -> Path:
  relative = dataset_info(name).default_source
  if relative is None:
    raise DataError(f"--dataset={name}: --source is required (no default location)")
  return paths.datasets_root() / relative


def build_dataset(dataset: str, *, source: str | os.PathLike | None = None,
                  output: str | os.PathLike | None = None, image_size: int | None = None,
                  channels: int | None = None, rotations: bool = True,
                  split_scheme: str = "maml", resample: str = "lanczos",
                  split_ratios: Sequence[float] = (0.6, 0.2, 0.2), split_seed: int = 0,
                  splits_csv: str | None = None, tfds_data_dir: str | None = None,
                  tfds_splits: Sequence[str] = (), images_per_shard: int = 10000,
                  overwrite: bool = False, skip_corrupt: bool = False,
                  beam_args: Sequence[str] = ()) -> dict:
  """Lists ``source``, runs the Beam build into ``output`` and returns the manifest."""
  from pipeline import build, folders, storage, tfds_source  # Beam only when building
  info = dataset_info(dataset)
  from_tfds = dataset.startswith("tfds:") or dataset in tfds_source.PRESETS
  if not from_tfds:
    source = str(source or default_source(dataset))
  output = storage.canonical(output or paths.default_records_dir(dataset))
  size = image_size or info.image_size
  if size is None:
    raise DataError(f"--dataset={dataset}: --image_size is required (the side, in pixels, every "
                    f"image is resized to)")
  try:
    spec = imaging.ImageSpec(size=size, channels=channels or info.channels, invert=info.invert,
                             resample=resample)
  except ValueError as e:
    raise DataError(f"--image_size/--channels/--resample: {e}") from e
  lister: Callable[[], sources.SourceListing]
  if dataset == "omniglot":
    lister = lambda: sources.list_omniglot(source, split_scheme=split_scheme, rotations=rotations)
    build_args = {"source": source, "rotations": rotations, "split_scheme": split_scheme}
  elif dataset == "miniimagenet":
    lister = lambda: sources.list_miniimagenet(source)
    build_args = {"source": source, "split_scheme": "ravi_larochelle"}
  elif dataset == "folder":
    lister = lambda: folders.list_folder(source, split_ratios=split_ratios,
                                         split_seed=split_seed, splits_csv=splits_csv)
    build_args = {"source": storage.canonical(source)}
  else:
    lister = lambda: tfds_source.list_tfds(dataset, data_dir=tfds_data_dir, splits=tfds_splits,
                                           split_ratios=split_ratios, split_seed=split_seed)
    build_args = {"tfds_data_dir": tfds_data_dir}
  # Before listing: fail fast (the builder checks again, remote outputs included).
  if not storage.is_remote(output) and Path(output).exists() and not overwrite:
    raise DataError(f"--output={output} already exists; pass --overwrite to replace it")
  listing = lister()
  return build.build_records(listing, output, spec, images_per_shard=images_per_shard,
                             overwrite=overwrite, skip_corrupt=skip_corrupt,
                             beam_args=beam_args, build_args=build_args)
