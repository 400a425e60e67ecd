#!/usr/bin/env python
"""Builds class-indexed TFRecord shards and a manifest from a raw few-shot dataset (Apache Beam).

  python tools/build_tfrecords.py --dataset=omniglot            # ../shared/datasets/omniglot
  python tools/build_tfrecords.py --dataset=miniimagenet --source=/data/mini --output=/data/rec
  python tools/build_tfrecords.py --dataset=omniglot --download  # official zips, SHA-256 checked

Runs on Beam's DirectRunner over every local core by default. Anything after ``--`` goes to
Beam's PipelineOptions unchanged, e.g. ``-- --runner=FlinkRunner --flink_master=host:8081`` or
``-- --direct_running_mode=in_memory --direct_num_workers=1``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging

from pipeline import datasets, download, paths
from pipeline.errors import DataError

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", None, sorted(datasets.DATASETS), "Which dataset to build.")
flags.DEFINE_string("source", None,
                    "Omniglot: a folder holding images_background/ and images_evaluation/ "
                    "(folders or the distributed .zip files), or the two zips comma-separated. "
                    "MiniImagenet: a folder with images/ (or images.zip) and train/val/test.csv. "
                    f"Default: ${paths.ENV_VAR}/<omniglot|miniimagenet_subset>.")
flags.DEFINE_string("output", None, "Records folder to create. Default: data/records/<dataset>.")
flags.DEFINE_integer("image_size", None, "Output side in pixels (default 28 Omniglot, 84 Mini).",
                     lower_bound=1)
flags.DEFINE_boolean("rotations", True,
                     "Omniglot: add the 90/180/270-degree rotations of every character as "
                     "classes of their own (the MAML paper's augmentation).")
flags.DEFINE_enum("split", "maml", ["maml", "lake"],
                  "Omniglot split: maml = 1100/100/423 characters after a seeded shuffle; "
                  "lake = background alphabets for train/val, evaluation alphabets for test.")
flags.DEFINE_enum("resample", "lanczos", ["lanczos", "bilinear", "box", "nearest"],
                  "Resize filter (images are converted to grayscale/RGB first).")
flags.DEFINE_integer("images_per_shard", 10000,
                     "Records per shard at most; a class never spans two shards.", lower_bound=1)
flags.DEFINE_boolean("overwrite", False, "Replace an existing --output.")
flags.DEFINE_boolean("skip_corrupt", False,
                     "Skip unreadable images (listed under 'skipped' in the manifest) instead "
                     "of failing.")
flags.DEFINE_boolean("download", False,
                     "Omniglot: fetch the official zips (brendenlake/omniglot), verify their "
                     "SHA-256 and build from them.")
flags.DEFINE_string("download_dir", str(paths.REPO_ROOT / "data" / "downloads" / "omniglot"),
                    "Where --download keeps the zips.")
flags.DEFINE_string("download_base_url", download.OMNIGLOT_BASE_URL,
                    "Base URL of the Omniglot zips, for mirrors.")


def main(argv):
  beam_args = [a for a in argv[1:] if a != "--"]
  try:
    source = FLAGS.source
    if FLAGS.download:
      if FLAGS.dataset != "omniglot":
        raise DataError("--download is only available for --dataset=omniglot")
      source = str(download.fetch_omniglot(Path(FLAGS.download_dir), FLAGS.download_base_url))
    manifest = datasets.build_dataset(
        FLAGS.dataset, source=source, output=FLAGS.output, image_size=FLAGS.image_size,
        rotations=FLAGS.rotations, split_scheme=FLAGS.split, resample=FLAGS.resample,
        images_per_shard=FLAGS.images_per_shard, overwrite=FLAGS.overwrite,
        skip_corrupt=FLAGS.skip_corrupt, beam_args=beam_args)
  except (DataError, OSError) as e:  # OSError's text names the path (permissions, full disk)
    print(f"build_tfrecords: error: {e}", file=sys.stderr)
    return 1
  summary = {s: {"num_classes": v["num_classes"], "num_images": v["num_images"],
                 "num_shards": len(v["shards"])} for s, v in manifest["splits"].items()}
  logging.info("built %s", FLAGS.output or paths.default_records_dir(FLAGS.dataset))
  print(json.dumps({"dataset": manifest["dataset"], "image_shape": manifest["image_shape"],
                    "splits": summary, "skipped": len(manifest["skipped"])}))
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("dataset")
  app.run(lambda argv: sys.exit(main(argv)))
