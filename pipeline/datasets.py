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
  image_size: int
  channels: int
  invert: bool
  default_source: str  # relative to paths.datasets_root()


DATASETS = {
    "omniglot": DatasetInfo(image_size=28, channels=1, invert=True, default_source="omniglot"),
    "miniimagenet": DatasetInfo(image_size=84, channels=3, invert=False,
                                default_source="miniimagenet_subset"),
}


def dataset_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise DataError(f"--dataset={name}: unknown dataset (known: {', '.join(sorted(DATASETS))})")
  return DATASETS[name]


def default_source(name: str) -> Path:
  return paths.datasets_root() / dataset_info(name).default_source


def build_dataset(dataset: str, *, source: str | os.PathLike | None = None,
                  output: str | os.PathLike | None = None, image_size: int | None = None,
                  rotations: bool = True, split_scheme: str = "maml", resample: str = "lanczos",
                  images_per_shard: int = 10000, overwrite: bool = False,
                  skip_corrupt: bool = False, beam_args: Sequence[str] = ()) -> dict:
  """Lists ``source``, runs the Beam build into ``output`` and returns the manifest."""
  from pipeline.build import build_records  # Beam is imported only when building
  info = dataset_info(dataset)
  source = str(source or default_source(dataset))
  output = Path(output or paths.default_records_dir(dataset))
  size = image_size or info.image_size
  try:
    spec = imaging.ImageSpec(size=size, channels=info.channels, invert=info.invert,
                             resample=resample)
  except ValueError as e:
    raise DataError(f"--image_size/--resample: {e}") from e
  lister: Callable[[], sources.SourceListing]
  if dataset == "omniglot":
    lister = lambda: sources.list_omniglot(source, split_scheme=split_scheme, rotations=rotations)
  else:
    lister = lambda: sources.list_miniimagenet(source)
  if output.exists() and not overwrite:  # before listing: fail fast
    raise DataError(f"--output={output} already exists; pass --overwrite to replace it")
  listing = lister()
  build_args = {"source": source, "rotations": rotations if dataset == "omniglot" else None,
                "split_scheme": split_scheme if dataset == "omniglot" else "ravi_larochelle"}
  return build_records(listing, output, spec, images_per_shard=images_per_shard,
                       overwrite=overwrite, skip_corrupt=skip_corrupt, beam_args=beam_args,
                       build_args=build_args)
