"""Shared fixtures: real datasets (through MAML_DATASETS) and tiny datasets made on the fly;
the ``real_data`` marker on every test that uses the real datasets; two logical CPU devices
(``helpers.TWO_CPUS``) for the tests of strategies, set up once before TensorFlow starts."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

from helpers import FAST_BEAM, TWO_CPUS, make_tiny_omniglot, real_dataset  # noqa: E402
from pipeline import datasets  # noqa: E402

import tensorflow as tf  # noqa: E402

# The physical CPU as two logical devices, so that a MirroredStrategy over them replicates as on
# two GPUs; it must be configured before TensorFlow's runtime starts, hence here. Tests that do
# not name the second device run on the first, as on a plain CPU.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * len(TWO_CPUS))

REAL_DATA_FIXTURES = {"omniglot_records", "mini_records"}


def pytest_collection_modifyitems(items):
  """``-m real_data`` / ``-m "not real_data"`` select by the fixtures a test uses."""
  for item in items:
    if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.real_data)


def built_once(tmp_path_factory, name: str, build) -> Path:
  """``build(out)``'s records, made by the first pytest worker that needs them and read by the
  others (under pytest-xdist every worker has its own session; the real datasets take a minute
  of CPU each to build). Tests only read them. The builder renames its output into place when
  complete, so an existing manifest means finished records."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the basetemp all workers share
  out = root / "shared-records" / name
  with open(root / f"shared-records-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (out / "manifest.json").exists():
      out.parent.mkdir(parents=True, exist_ok=True)
      build(out)
  return out


@pytest.fixture(scope="session")
def omniglot_records(tmp_path_factory) -> Path:
  """The full real Omniglot, built once with the default (multi-process) runner."""
  return built_once(tmp_path_factory, "omniglot", lambda out: datasets.build_dataset(
      "omniglot", source=real_dataset("omniglot"), output=out))


@pytest.fixture(scope="session")
def small_omniglot(tmp_path_factory) -> Path:
  """Tiny Omniglot-like records at 12 px (16 train classes of 3 images): the smallest images a
  conv4 takes, for tests that compile it (XLA) or run it under strategies."""
  root = tmp_path_factory.mktemp("small_omniglot")
  src = make_tiny_omniglot(root / "src", layout="folder")
  datasets.build_dataset("omniglot", source=src, output=root / "records", split_scheme="lake",
                         image_size=12, beam_args=FAST_BEAM)
  return root / "records"


@pytest.fixture(scope="session")
def cifar_records(tmp_path_factory) -> dict[str, Path]:
  """CIFAR-FS and FC100 records from TFDS's mock CIFAR-100 (random pixels and labels, nothing
  downloaded): 3,000 examples per TFDS split, so every class has the 16 images a 5w1s
  15-query episode needs."""
  import tensorflow_datasets as tfds
  root = tmp_path_factory.mktemp("cifar")
  built = {}
  with tfds.testing.mock_data(num_examples=3000, policy=tfds.testing.MockPolicy.USE_CODE,
                              data_dir=str(root / "tfds")):
    for name in ("cifarfs", "fc100"):
      datasets.build_dataset(name, output=root / name, tfds_data_dir=str(root / "tfds"),
                             tfds_splits=("train", "test"), beam_args=FAST_BEAM)
      built[name] = root / name
  return built


@pytest.fixture(scope="session")
def mini_records(tmp_path_factory) -> Path:
  return built_once(tmp_path_factory, "miniimagenet", lambda out: datasets.build_dataset(
      "miniimagenet", source=real_dataset("miniimagenet_subset"), output=out,
      beam_args=FAST_BEAM))
