"""Datasets beyond Omniglot and MiniImagenet: class-per-folder images, TFDS datasets (through
TFDS's own mock data, nothing downloaded) and records on a remote filesystem (``ram://``,
reached by Beam and tf.io.gfile alike), each built, read back and refused when bad."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import ram_filesystem  # noqa: F401  (registers Beam's ram:// filesystem)
from helpers import FAST_BEAM, REPO, error_line, trainer
from pipeline import datasets, episodes, records, tfds_source
from pipeline.errors import DataError


def write_image(path, rng, size=(20, 30), mode="RGB", fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  shape = (size[0], size[1], 3) if mode == "RGB" else size
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, format=fmt)


def make_folder_dataset(root, classes=10, per_class=4, seed=0):
  """Nested class folders (group*/classN), mixed formats and sizes, a stray non-image file."""
  rng = np.random.default_rng(seed)
  for c in range(classes):
    for i in range(per_class):
      suffix = ("png", "jpg", "bmp", "gif")[i % 4]
      write_image(root / f"group{c % 3}" / f"class{c:02d}" / f"img{i}.{suffix}", rng,
                  size=(16 + c, 24 + i))
  (root / "group0" / "class00" / "notes.txt").write_text("not an image")
  return root


def build_folder(src, out, **kwargs):
  kwargs.setdefault("image_size", 12)
  kwargs.setdefault("split_ratios", (0.34, 0.33, 0.33))
  return datasets.build_dataset("folder", source=src, output=out, beam_args=FAST_BEAM, **kwargs)


def read_records(path) -> list[dict]:
  return [{k: v.numpy() for k, v in records.parse(r).items()}
          for r in tf.data.TFRecordDataset(str(path))]


def names(manifest, split):
  return [c["name"] for c in manifest["splits"][split]["classes"]]


# --- class-per-folder ----------------------------------------------------------------------------


def test_nested_class_folders_split_by_seeded_ratios_recorded_in_the_manifest(tmp_path):
  src = make_folder_dataset(tmp_path / "src")
  manifest = build_folder(src, tmp_path / "out", split_seed=3, split_ratios=(0.6, 0.2, 0.2))
  assert {s: v["num_classes"] for s, v in manifest["splits"].items()} == {
      "train": 6, "val": 2, "test": 2}
  everything = sorted(n for s in ("train", "val", "test") for n in names(manifest, s))
  assert everything == sorted(f"group{c % 3}/class{c:02d}" for c in range(10))
  assert manifest["dataset"] == "folder" and manifest["image_shape"] == [12, 12, 3]
  source = manifest["source"]
  assert (source["split_ratios"], source["split_seed"], source["ignored_files"]) == (
      [0.6, 0.2, 0.2], 3, 1)
  again = build_folder(src, tmp_path / "again", split_seed=3, split_ratios=(0.6, 0.2, 0.2))
  other = build_folder(src, tmp_path / "other", split_seed=4, split_ratios=(0.6, 0.2, 0.2))
  assert names(again, "test") == names(manifest, "test")
  assert [names(other, s) for s in ("val", "test")] != [names(manifest, s) for s in ("val",
                                                                                    "test")]
  # Each class's records are its folder's images, resized.
  first = manifest["splits"]["val"]["classes"][0]
  rows = read_records(tmp_path / "out" / first["shard"])[first["offset"]:][:first["count"]]
  assert sorted(os.path.basename(r["filename"].decode()) for r in rows) == [
      "img0.png", "img1.jpg", "img2.bmp", "img3.gif"]
  assert all(np.asarray(Image.open(io.BytesIO(r["image"]))).shape == (12, 12, 3) for r in rows)


def test_grayscale_output_converts_every_image(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  build_folder(src, tmp_path / "out", channels=1)
  data = episodes.load_split(tmp_path / "out", "train")
  assert data.images.shape[1:] == (12, 12, 1)


@pytest.mark.slow
def test_the_trainer_takes_folder_records_with_no_other_change(tmp_path):
  src = make_folder_dataset(tmp_path / "src")
  build_folder(src, tmp_path / "rec")
  result = trainer("--dataset=folder", f"--data_dir={tmp_path / 'rec'}", "--n_way=2",
                   "--k_shot=1", "--k_query=1", "--meta_batch_size=2", "--num_filters=4",
                   "--num_iterations=2", "--eval_every=0", "--eval_episodes=4",
                   f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "run" / "eval_test.json").read_text())
  assert report["episodes"] == 4
  wrong = trainer("--dataset=miniimagenet", f"--data_dir={tmp_path / 'rec'}", "--n_way=2",
                  "--k_shot=1", "--k_query=1", f"--model_dir={tmp_path / 'run2'}")
  assert "holds 'folder' records" in error_line(wrong.stderr)


def write_csv(path, rows):
  path.write_text("filename,label\n" + "".join(f"{f},{label}\n" for f, label in rows))


def test_split_csvs_choose_classes_and_images(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  csvs = tmp_path / "csv"
  csvs.mkdir()
  # Two images of each chosen class, named relative to the class folder (MiniImagenet's form)
  # or to the source; the other images of those classes are left out.
  write_csv(csvs / "train.csv", [("img0.png", "group0/class00"), ("img1.jpg", "group0/class00"),
                                 ("group1/class01/img0.png", "group1/class01"),
                                 ("group1/class01/img2.bmp", "group1/class01")])
  write_csv(csvs / "val.csv", [("img0.png", "group2/class02"), ("img1.jpg", "group2/class02"),
                               ("img0.png", "group0/class03"), ("img3.gif", "group0/class03")])
  write_csv(csvs / "test.csv", [("img0.png", "group1/class04"), ("img1.jpg", "group1/class04"),
                                ("img0.png", "group2/class05"), ("img1.jpg", "group2/class05")])
  manifest = build_folder(src, tmp_path / "out", splits_csv=str(csvs))
  assert names(manifest, "train") == ["group0/class00", "group1/class01"]
  assert names(manifest, "val") == ["group0/class03", "group2/class02"]
  assert [c["count"] for s in manifest["splits"].values() for c in s["classes"]] == [2] * 6
  assert manifest["source"]["split_scheme"] == "csv"
  assert set(manifest["source"]["archives_sha256"]) == {"train.csv", "val.csv", "test.csv"}


def folder_error(src, tmp_path, **kwargs) -> str:
  with pytest.raises(DataError) as e:
    build_folder(src, tmp_path / "out", **kwargs)
  assert not (tmp_path / "out").exists()
  return str(e.value)


def test_a_csv_row_without_its_image_and_a_class_in_two_csvs_are_named(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  csvs = tmp_path / "csv"
  csvs.mkdir()
  pairs = {"train": ["group0/class00", "group1/class01"],
           "val": ["group2/class02", "group0/class03"], "test": ["group1/class04",
                                                                 "group2/class05"]}
  for split, classes in pairs.items():
    write_csv(csvs / f"{split}.csv", [("img0.png", c) for c in classes])
  write_csv(csvs / "val.csv", [("img0.png", "group2/class02"), ("img9.png", "group0/class03")])
  message = folder_error(src, tmp_path, splits_csv=str(csvs))
  assert f"{csvs / 'val.csv'}: row 3: img9.png found neither in" in message
  write_csv(csvs / "val.csv", [("img0.png", "group2/class02"), ("img1.jpg", "group0/class00")])
  message = folder_error(src, tmp_path, splits_csv=str(csvs))
  assert "row 3: class group0/class00 is also in the train CSV" in message


def test_an_empty_class_folder_is_named(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  (src / "group1" / "empty").mkdir()
  assert str(src / "group1" / "empty") in folder_error(src, tmp_path)
  (src / "group1" / "empty" / "readme.txt").write_text("no images here")
  assert "class folder without images" in folder_error(src, tmp_path)


def test_an_unreadable_image_is_named_and_leaves_nothing(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  bad = src / "group0" / "class03" / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  assert folder_error(src, tmp_path).startswith(f"{bad}: ")
  assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_too_few_classes_for_a_split_is_refused_naming_it(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=5)
  message = folder_error(src, tmp_path, split_ratios=(0.8, 0.1, 0.1))
  assert ("--split_ratios=0.8,0.1,0.1: split 'val' gets 0 of 5 classes; every split needs at "
          "least 2") in message


def test_images_beside_class_folders_are_refused(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  write_image(src / "loose.png", np.random.default_rng(0))
  assert "images directly in --source" in folder_error(src, tmp_path)
  (src / "loose.png").unlink()
  write_image(src / "group0" / "stray.png", np.random.default_rng(0))
  assert "holds images and also class folders below it" in folder_error(src, tmp_path)


def test_a_class_too_small_for_any_episode_is_warned_about(tmp_path, caplog):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  for extra in ("img1.jpg", "img2.bmp", "img3.gif"):
    (src / "group1" / "class04" / extra).unlink()
  with caplog.at_level(logging.WARNING):
    build_folder(src, tmp_path / "out")
  assert any(f"{src / 'group1' / 'class04'}: 1 image(s)" in r.getMessage()
             for r in caplog.records)


@pytest.mark.slow
def test_the_tool_names_the_flag_at_fault_in_one_line(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  for args, expected in [
      ([f"--source={src}"], "--image_size is required"),
      ([f"--source={src}", "--image_size=8", "--split_ratios=0.5,0.5"],
       "--split_ratios=0.5,0.5: expected three positive shares"),
      (["--image_size=8"], "--source is required")]:
    result = subprocess.run([sys.executable, "tools/build_tfrecords.py", "--dataset=folder",
                             f"--output={tmp_path / 'out'}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert expected in error_line(result.stderr, "build_tfrecords: error:")


# --- TensorFlow Datasets (mock data: nothing is downloaded) --------------------------------------


@pytest.fixture
def mock_cifar100(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=400, policy=tfds.testing.MockPolicy.USE_CODE,
                              data_dir=str(tmp_path / "tfds")):
    yield str(tmp_path / "tfds")


def build_tfds(name, out, data_dir, **kwargs):
  return datasets.build_dataset(name, output=out, tfds_data_dir=data_dir,
                                tfds_splits=("train", "test"), beam_args=FAST_BEAM, **kwargs)


def test_a_tfds_dataset_pools_its_splits_and_keeps_each_image(tmp_path, mock_cifar100):
  import tensorflow_datasets as tfds
  manifest = build_tfds("tfds:cifar100", tmp_path / "out", mock_cifar100, image_size=32)
  builder = tfds.builder("cifar100", data_dir=mock_cifar100)
  pooled = {}
  for split in ("train", "test"):
    for i, ex in enumerate(builder.as_dataset(split=split, shuffle_files=False)):
      pooled[f"tfds:cifar100/{split}/{i:09d}"] = (ex["image"].numpy(), int(ex["label"]))
  assert sum(s["num_images"] for s in manifest["splits"].values()) == len(pooled) == 800
  assert manifest["source"]["tfds_splits"] == ["train", "test"]
  for split, info in manifest["splits"].items():
    by_shard = {s["file"]: read_records(tmp_path / "out" / s["file"]) for s in info["shards"]}
    for cls in info["classes"]:
      rows = by_shard[cls["shard"]][cls["offset"]:cls["offset"] + cls["count"]]
      for row in rows:
        pixels, label = pooled[row["filename"].decode()]
        assert str(label) == cls["name"]  # mock data has no label names: the label itself
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), pixels)


def test_cifarfs_and_fc100_presets_place_classes_as_published(tmp_path, mock_cifar100):
  fs = build_tfds("cifarfs", tmp_path / "fs", mock_cifar100)
  assert set(names(fs, "val")) <= set(tfds_source.CIFARFS_VAL)
  assert set(names(fs, "test")) <= set(tfds_source.CIFARFS_TEST)
  assert fs["image_shape"] == [32, 32, 3]
  fc = build_tfds("fc100", tmp_path / "fc", mock_cifar100)
  superclass = {c: g for g, cs in tfds_source.CIFAR100_SUPERCLASSES.items() for c in cs}
  assert {superclass[c] for c in names(fc, "test")} <= set(tfds_source.FC100_TEST)
  assert {superclass[c] for c in names(fc, "val")} <= set(tfds_source.FC100_VAL)


def test_preset_class_lists_match_the_papers_sizes():
  assert len(tfds_source.CIFAR100_NAMES) == len(set(tfds_source.CIFAR100_NAMES)) == 100
  assert tfds_source.CIFAR100_NAMES[:3] == ("apple", "aquarium_fish", "baby")
  for preset, sizes in (("cifarfs", (64, 16, 20)), ("fc100", (60, 20, 20))):
    splits = tfds_source.PRESETS[preset].splits
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == sizes
    assert sorted(c for cs in splits.values() for c in cs) == sorted(tfds_source.CIFAR100_NAMES)


def test_an_unprepared_tfds_dataset_is_one_clear_line_and_no_download(tmp_path):
  result = subprocess.run([sys.executable, "tools/build_tfrecords.py", "--dataset=cifarfs",
                           f"--tfds_data_dir={tmp_path / 'empty'}", f"--output={tmp_path / 'o'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NO_PROXY="*", HTTPS_PROXY="http://0.0.0.0:9"))
  assert result.returncode == 1
  line = error_line(result.stderr, "build_tfrecords: error:")
  assert "tfds build cifar100" in line and "nothing is downloaded" in line
  assert not (tmp_path / "o").exists()


# --- records on a remote filesystem --------------------------------------------------------------


def copy_tree_to(local, url):
  for root, _, files in os.walk(local):
    for name in files:
      target = f"{url}/{os.path.relpath(os.path.join(root, name), local)}"
      tf.io.gfile.makedirs(os.path.dirname(target))
      tf.io.gfile.copy(os.path.join(root, name), target, overwrite=True)


def ram_listing(url):
  return sorted(p.removeprefix(url + "/") for p in tf.io.gfile.glob(f"{url}/*"))


def test_remote_source_and_output_build_and_read_back_like_local_ones(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  url = f"ram://bucket-{tmp_path.name}"
  copy_tree_to(src, f"{url}/src")
  local = build_folder(src, tmp_path / "local")
  remote = build_folder(f"{url}/src", f"{url}/records")
  assert ram_listing(f"{url}/records") == ["manifest.json", "test-00000-of-00001.tfrecord",
                                           "train-00000-of-00001.tfrecord",
                                           "val-00000-of-00001.tfrecord"]
  for split in ("train", "val", "test"):
    # The same classes and images (the records differ only in the source paths they name).
    assert ([(c["name"], c["count"]) for c in remote["splits"][split]["classes"]] ==
            [(c["name"], c["count"]) for c in local["splits"][split]["classes"]])
    episodes.verify_split(f"{url}/records", split, sha256=True)
  np.testing.assert_array_equal(episodes.load_split(f"{url}/records", "val").images,
                                episodes.load_split(tmp_path / "local", "val").images)


def test_a_failed_remote_build_leaves_no_manifest_and_no_temporary_files(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  (src / "group0" / "class03" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
  url = f"ram://bucket-{tmp_path.name}"
  copy_tree_to(src, f"{url}/src")
  with pytest.raises(DataError, match="broken.png"):
    build_folder(f"{url}/src", f"{url}/records")
  assert ram_listing(f"{url}/records") == []
  with pytest.raises(DataError, match="no manifest"):
    episodes.read_manifest(f"{url}/records")


def test_remote_output_is_replaced_only_with_overwrite_and_stale_shards_too(tmp_path):
  src = make_folder_dataset(tmp_path / "src", classes=6)
  url = f"ram://bucket-{tmp_path.name}"
  copy_tree_to(src, f"{url}/src")
  build_folder(f"{url}/src", f"{url}/records")
  with pytest.raises(DataError, match="already holds records; pass --overwrite"):
    build_folder(f"{url}/src", f"{url}/records")
  tf.io.gfile.remove(f"{url}/records/manifest.json")  # an interrupted earlier build
  with pytest.raises(DataError, match="3 shard.* but no manifest"):
    build_folder(f"{url}/src", f"{url}/records")
  replaced = build_folder(f"{url}/src", f"{url}/records", image_size=8, overwrite=True,
                          images_per_shard=4)
  shards = sorted(s["file"] for split in replaced["splits"].values() for s in split["shards"])
  assert ram_listing(f"{url}/records") == ["manifest.json"] + shards
  assert episodes.load_split(f"{url}/records", "train").images.shape[1:] == (8, 8, 3)
