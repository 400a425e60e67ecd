"""Where real datasets and built records live.

One setting decides where the raw datasets are: the ``MAML_DATASETS`` environment variable,
defaulting to ``../shared/datasets`` beside the repository root. Tests, benchmarks and the
demo all go through :func:`datasets_root`, so pointing a run at another copy of the data is
one ``export`` and never an edit.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MAML_DATASETS"

REPO_ROOT = Path(__file__).resolve().parents[1]


def datasets_root() -> Path:
  """The folder holding ``omniglot/``, ``miniimagenet_subset/``, ... (may not exist)."""
  value = os.environ.get(ENV_VAR)
  if value:
    return Path(value).expanduser().resolve()
  return (REPO_ROOT.parent / "shared" / "datasets").resolve()


def default_records_dir(dataset: str) -> Path:
  """Where ``tools/build_tfrecords.py`` writes when ``--output`` is not given (and the
  trainer reads without ``--data_dir``): ``data/records/tfds_cifar100`` for tfds:cifar100."""
  return REPO_ROOT / "data" / "records" / dataset.replace(":", "_")
