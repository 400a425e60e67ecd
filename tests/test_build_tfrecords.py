"""The Beam builder: counts, contents, class-indexed layout, atomicity and bad input."""

from __future__ import annotations

import functools
import http.server
import io
import json
import random
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import FAST_BEAM, make_tiny_mini, make_tiny_omniglot, real_dataset
from pipeline import datasets, download, records
from pipeline.checksums import sha256_file
from pipeline.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def read_shard(path: Path) -> list[dict]:
  out = []
  for raw in tf.data.TFRecordDataset(str(path)):
    ex = records.parse(raw)
    out.append({"image": ex["image"].numpy(), "label": int(ex["label"]),
                "filename": ex["filename"].numpy().decode()})
  return out


def decode(png: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(png)))


def build_tiny_omniglot(tmp_path, layout="folder", **kwargs):
  src = make_tiny_omniglot(tmp_path / f"src-{layout}", layout=layout)
  out = tmp_path / f"out-{layout}"
  kwargs.setdefault("split_scheme", "lake")
  manifest = datasets.build_dataset("omniglot", source=src, output=out, beam_args=FAST_BEAM,
                                    **kwargs)
  return src, out, manifest


def leftovers(parent: Path) -> list[str]:
  return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- contents and layout -----------------------------------------------------------------------


def test_tiny_omniglot_counts_and_lake_split(tmp_path):
  _, out, manifest = build_tiny_omniglot(tmp_path)
  # 7 background alphabets (5 held out for val), 2 evaluation ones; 2 characters x 4 rotations.
  assert {s: v["num_classes"] for s, v in manifest["splits"].items()} == {
      "train": 2 * 2 * 4, "val": 5 * 2 * 4, "test": 2 * 2 * 4}
  assert {s: v["num_images"] for s, v in manifest["splits"].items()} == {
      "train": 16 * 3, "val": 40 * 3, "test": 16 * 3}
  assert manifest["image_shape"] == [28, 28, 1]
  assert manifest["source"]["num_characters"] == 18
  assert len(manifest["source"]["val_alphabets"]) == 5
  assert json.loads((out / "manifest.json").read_text()) == manifest


def test_records_are_class_contiguous_and_manifest_offsets_locate_each_class(tmp_path):
  _, out, manifest = build_tiny_omniglot(tmp_path, images_per_shard=10)
  for split, info in manifest["splits"].items():
    assert len(info["shards"]) > 1
    for shard in info["shards"]:
      rows = read_shard(out / shard["file"])
      assert len(rows) == shard["num_records"] <= 12  # one class of 3 images may not fit 10
      assert shard["sha256"] == sha256_file(out / shard["file"])
      in_shard = [c for c in info["classes"] if c["shard"] == shard["file"]]
      assert sum(c["count"] for c in in_shard) == len(rows)
      for c in in_shard:
        assert [r["label"] for r in rows[c["offset"]:c["offset"] + c["count"]]] == [c["label"]] * c["count"]
    assert [c["label"] for c in info["classes"]] == list(range(info["num_classes"]))


def test_rotated_classes_hold_rotated_pixels_of_the_inverted_resized_source(tmp_path):
  src, out, manifest = build_tiny_omniglot(tmp_path)
  classes = manifest["splits"]["test"]["classes"][:4]
  assert [c["rotation"] for c in classes] == [0, 90, 180, 270]
  rows = read_shard(out / classes[0]["shard"])
  base = [decode(r["image"]) for r in rows[classes[0]["offset"]:classes[0]["offset"] + 3]]
  source_file = Path(rows[0]["filename"])
  reference = 255 - np.asarray(Image.open(source_file).convert("L").resize(
      (28, 28), Image.Resampling.LANCZOS))
  np.testing.assert_array_equal(base[0], reference)
  for c in classes[1:]:
    rotated = [decode(r["image"]) for r in rows[c["offset"]:c["offset"] + 3]]
    for b, r in zip(base, rotated):
      np.testing.assert_array_equal(r, np.rot90(b, k=c["rotation"] // 90))


def test_zip_and_folder_layouts_build_the_same_records(tmp_path):
  _, out_dir, m_dir = build_tiny_omniglot(tmp_path, layout="folder")
  _, out_zip, m_zip = build_tiny_omniglot(tmp_path, layout="zip")
  for split in ("train", "val", "test"):  # shard checksums differ: the filename feature does
    assert m_dir["splits"][split]["classes"] == m_zip["splits"][split]["classes"]
  for shard in m_dir["splits"]["train"]["shards"]:
    a, b = read_shard(out_dir / shard["file"]), read_shard(out_zip / shard["file"])
    assert [(r["image"], r["label"]) for r in a] == [(r["image"], r["label"]) for r in b]
  assert set(m_zip["source"]["archives_sha256"]) == {"images_background.zip",
                                                     "images_evaluation.zip"}
  assert m_dir["source"]["images_sha256"] == m_zip["source"]["images_sha256"]


def test_norotations_gives_one_class_per_character(tmp_path):
  _, _, manifest = build_tiny_omniglot(tmp_path, rotations=False)
  assert manifest["splits"]["train"]["num_classes"] == 4
  assert manifest["splits"]["train"]["classes"][0]["name"].count("/") == 1


@pytest.mark.slow
def test_full_real_omniglot_counts_and_maml_split(omniglot_records):
  manifest = json.loads((omniglot_records / "manifest.json").read_text())
  assert manifest["source"]["num_characters"] == 1623
  assert manifest["source"]["num_images"] == 32460
  assert manifest["source"]["characters_per_split"] == {"train": 1100, "val": 100, "test": 423}
  splits = manifest["splits"]
  assert {s: v["num_classes"] for s, v in splits.items()} == {"train": 4400, "val": 400,
                                                              "test": 1692}
  assert {s: v["num_images"] for s, v in splits.items()} == {"train": 88000, "val": 8000,
                                                             "test": 33840}
  chars = {s: {c["name"].rsplit("/", 1)[0] for c in v["classes"]} for s, v in splits.items()}
  assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"]
              or chars["val"] & chars["test"])
  # The documented rule, redone from the zip indexes: sort "Alphabet/characterNN", shuffle
  # with random.Random(1), cut 1100 / 100 / rest.
  names = set()
  for z in ("images_background.zip", "images_evaluation.zip"):
    with zipfile.ZipFile(real_dataset("omniglot") / z) as zf:
      names |= {"/".join(n.split("/")[1:3]) for n in zf.namelist() if n.endswith(".png")}
  order = sorted(names)
  random.Random(1).shuffle(order)
  assert chars == {"train": set(order[:1100]), "val": set(order[1100:1200]),
                   "test": set(order[1200:])}
  assert all(c["count"] == 20 for v in splits.values() for c in v["classes"])


def test_real_miniimagenet_subset_keeps_jpeg_bytes(mini_records):
  manifest = json.loads((mini_records / "manifest.json").read_text())
  splits = manifest["splits"]
  assert {s: v["num_classes"] for s, v in splits.items()} == {"train": 64, "val": 16, "test": 20}
  assert all(c["count"] == 100 for v in splits.values() for c in v["classes"])
  assert manifest["image_shape"] == [84, 84, 3]
  first = splits["test"]["classes"][0]
  rows = read_shard(mini_records / first["shard"])[first["offset"]:first["offset"] + 2]
  with zipfile.ZipFile(real_dataset("miniimagenet_subset") / "images.zip") as zf:
    for r in rows:
      assert r["image"] == zf.read(r["filename"].rsplit(":", 1)[1])  # unchanged JPEG bytes


def test_miniimagenet_folder_layout_and_resize_of_odd_sizes(tmp_path):
  src = make_tiny_mini(tmp_path / "src", layout="folder", odd_size=True)
  out = tmp_path / "out"
  manifest = datasets.build_dataset("miniimagenet", source=src, output=out, beam_args=FAST_BEAM)
  assert {s: v["num_images"] for s, v in manifest["splits"].items()} == {
      "train": 12, "val": 8, "test": 8}
  c = manifest["splits"]["train"]["classes"][0]
  rows = read_shard(out / c["shard"])
  assert rows[0]["image"][:8] == b"\x89PNG\r\n\x1a\n"  # the 100x100 one: resized, lossless
  assert decode(rows[0]["image"]).shape == (84, 84, 3)
  assert rows[1]["image"][:2] == b"\xff\xd8"  # 84x84 JPEGs stay as they were


# --- atomicity and bad input -----------------------------------------------------------------


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tmp_path):
  src, out, first = build_tiny_omniglot(tmp_path)
  with pytest.raises(DataError, match="already exists; pass --overwrite"):
    datasets.build_dataset("omniglot", source=src, output=out, split_scheme="lake",
                           beam_args=FAST_BEAM)
  second = datasets.build_dataset("omniglot", source=src, output=out, split_scheme="lake",
                                  overwrite=True, rotations=False, beam_args=FAST_BEAM)
  assert second["splits"]["train"]["num_classes"] == first["splits"]["train"]["num_classes"] // 4
  assert json.loads((out / "manifest.json").read_text())["build"]["rotations"] is False
  assert leftovers(tmp_path) == []


def corrupt_one(src: Path) -> Path:
  victim = sorted((src / "images_evaluation").rglob("*.png"))[0]
  victim.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
  return victim


def test_corrupt_image_fails_naming_the_file_and_leaves_no_output(tmp_path):
  src = make_tiny_omniglot(tmp_path / "src", layout="folder")
  victim = corrupt_one(src)
  out = tmp_path / "out"
  with pytest.raises(DataError, match=str(victim.name)) as info:
    datasets.build_dataset("omniglot", source=src, output=out, split_scheme="lake",
                           beam_args=FAST_BEAM)
  assert "--skip_corrupt" in str(info.value)
  assert not out.exists() and leftovers(tmp_path) == []


def test_skip_corrupt_skips_and_lists_the_file(tmp_path):
  src = make_tiny_omniglot(tmp_path / "src", layout="folder")
  victim = corrupt_one(src)
  manifest = datasets.build_dataset("omniglot", source=src, output=tmp_path / "out",
                                    split_scheme="lake", skip_corrupt=True, beam_args=FAST_BEAM)
  assert [s["file"] for s in manifest["skipped"]] == [str(victim)]
  counts = sorted(c["count"] for c in manifest["splits"]["test"]["classes"])
  assert counts == [2] * 4 + [3] * 12  # the character lost one drawing in all four rotations


def test_csv_row_without_its_image_fails_naming_csv_and_row(tmp_path):
  src = make_tiny_mini(tmp_path / "src", layout="zip")
  with open(src / "val.csv", "a") as f:
    f.write("n9999999900000001.jpg,nva000000\n")
  out = tmp_path / "out"
  with pytest.raises(DataError, match=r"val\.csv: row 10: n9999999900000001\.jpg not found"):
    datasets.build_dataset("miniimagenet", source=src, output=out, beam_args=FAST_BEAM)
  assert not out.exists()


def test_corrupt_jpeg_inside_images_zip_is_named(tmp_path):
  src = make_tiny_mini(tmp_path / "src", layout="zip")
  with zipfile.ZipFile(src / "images.zip") as zf:
    entries = {n: zf.read(n) for n in zf.namelist()}
  victim = sorted(entries)[3]
  entries[victim] = entries[victim][:200]  # truncated JPEG
  with zipfile.ZipFile(src / "images.zip", "w") as zf:
    for n, d in entries.items():
      zf.writestr(n, d)
  with pytest.raises(DataError, match=f"images.zip:{victim}"):
    datasets.build_dataset("miniimagenet", source=src, output=tmp_path / "out",
                           beam_args=FAST_BEAM)
  assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_unknown_dataset_and_missing_source_are_clear_errors(tmp_path):
  with pytest.raises(DataError, match="--dataset=cifar: unknown dataset"):
    datasets.build_dataset("cifar", source=tmp_path, output=tmp_path / "out")
  with pytest.raises(DataError, match="images_background and images_evaluation"):
    datasets.build_dataset("omniglot", source=tmp_path, output=tmp_path / "out")
  assert not (tmp_path / "out").exists()


def run_tool(*args):
  return subprocess.run([sys.executable, str(REPO / "tools" / "build_tfrecords.py"), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


def test_tool_builds_and_reports_json(tmp_path):
  src = make_tiny_mini(tmp_path / "src", layout="folder")
  result = run_tool("--dataset=miniimagenet", f"--source={src}", f"--output={tmp_path / 'o'}",
                    "--", *FAST_BEAM)
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["splits"]["train"] == {"num_classes": 3, "num_images": 12, "num_shards": 1}


def test_tool_rejects_unknown_dataset_in_one_line(tmp_path):
  result = run_tool("--dataset=cifar", f"--output={tmp_path / 'o'}")
  assert result.returncode != 0
  assert "--dataset" in result.stderr and "cifar" in result.stderr
  assert not (tmp_path / "o").exists()


# --- download ----------------------------------------------------------------------------------


@pytest.fixture
def loopback_server(tmp_path):
  served = tmp_path / "served"
  served.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield served, f"http://127.0.0.1:{server.server_address[1]}/python/"
  server.shutdown()


def test_download_verifies_sha256_then_builds(tmp_path, loopback_server):
  served, url = loopback_server
  make_tiny_omniglot(served / "python", layout="zip")
  sums = {n: sha256_file(served / "python" / n) for n in download.OMNIGLOT_SHA256}
  got = download.fetch_omniglot(tmp_path / "dl", base_url=url, sha256=sums)
  manifest = datasets.build_dataset("omniglot", source=got, output=tmp_path / "out",
                                    split_scheme="lake", beam_args=FAST_BEAM)
  assert manifest["source"]["archives_sha256"] == sums


def test_download_with_wrong_sha256_keeps_nothing(tmp_path, loopback_server):
  served, url = loopback_server
  make_tiny_omniglot(served / "python", layout="zip")
  with pytest.raises(DataError, match="does not match the expected"):
    download.fetch_omniglot(tmp_path / "dl", base_url=url)  # the official sums
  assert list((tmp_path / "dl").iterdir()) == []


def test_download_of_a_missing_file_names_the_url(tmp_path, loopback_server):
  _, url = loopback_server
  with pytest.raises(DataError, match="images_background.zip: download failed"):
    download.fetch_omniglot(tmp_path / "dl", base_url=url)
