#!/usr/bin/env python
"""Builds class-indexed TFRecord shards and a manifest from a raw few-shot dataset (Apache Beam).

  python tools/build_tfrecords.py --dataset=omniglot            # ../shared/datasets/omniglot
  python tools/build_tfrecords.py --dataset=miniimagenet --source=/data/mini --output=/data/rec
  python tools/build_tfrecords.py --dataset=omniglot --download  # official zips, SHA-256 checked
  python tools/build_tfrecords.py --dataset=folder --source=/data/birds --output=/data/rec \
      --image_size=84 --split_ratios=0.6,0.2,0.2                # one subfolder per class
  python tools/build_tfrecords.py --dataset=cifarfs --tfds_data_dir=~/tensorflow_datasets
  python tools/build_tfrecords.py --dataset=tfds:oxford_flowers102 --image_size=84 ...

Runs on Beam's DirectRunner over every local core by default. Anything after ``--`` goes to
Beam's PipelineOptions unchanged, e.g. ``-- --runner=FlinkRunner --flink_master=host:8081`` or
``-- --direct_running_mode=in_memory --direct_num_workers=1``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags, logging

from pipeline import datasets, download, paths
from pipeline.errors import DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", None,
                    f"Which dataset to build: {', '.join(sorted(datasets.DATASETS))}, or "
                    f"tfds:NAME[:CONFIG] (any TFDS image classification dataset prepared in "
                    f"--tfds_data_dir). folder: one subfolder of --source per class.")
flags.register_validator("dataset", lambda v: v is None or datasets.is_known(v),
                         f"must be one of {', '.join(sorted(datasets.DATASETS))} or "
                         f"tfds:NAME[:CONFIG]")
flags.DEFINE_string("source", None,
                    "Omniglot: a folder holding images_background/ and images_evaluation/ "
                    "(folders or the distributed .zip files), or the two zips comma-separated. "
                    "MiniImagenet: a folder with images/ (or images.zip) and train/val/test.csv. "
                    "folder: a folder (or gs:// URL) with one subfolder of images per class "
                    "(nested paths allowed: the class is the folder holding the images). "
                    f"Default: ${paths.ENV_VAR}/<omniglot|miniimagenet_subset>.")
flags.DEFINE_string("output", None, "Records folder to create: a local path or a URL any Beam "
                    "and tf.io.gfile filesystem reaches (gs://bucket/records). Default: "
                    "data/records/<dataset>.")
flags.DEFINE_integer("image_size", None, "Output side in pixels (default 28 Omniglot, 84 Mini, "
                     "32 cifarfs/fc100; required for folder and tfds:).", lower_bound=1)
flags.DEFINE_enum("channels", None, ["1", "3"], "folder/tfds: 1 (grayscale) or 3 (RGB, the "
                  "default); every image is converted.")
flags.DEFINE_string("split_ratios", "0.6,0.2,0.2", "folder/tfds: shares of the classes for "
                    "train,val,test (classes sorted, then shuffled with --split_seed).")
flags.DEFINE_integer("split_seed", 0, "folder/tfds: seed of the class shuffle before the split.")
flags.DEFINE_string("splits_csv", None, "folder: split by CSVs instead of ratios, in "
                    "MiniImagenet's filename,label format (label = the class folder): a folder "
                    "holding train.csv, val.csv and test.csv, or the three comma-separated.")
flags.DEFINE_string("tfds_data_dir", None, "tfds/cifarfs/fc100: the TFDS data dir where the "
                    "dataset is already prepared (tfds build NAME --data_dir=...). Default: "
                    "TFDS's own (~/tensorflow_datasets).")
flags.DEFINE_list("tfds_splits", [], "tfds/cifarfs/fc100: the TFDS splits whose examples are "
                  "pooled before the class split (default: all of them).")
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
    from pipeline import sources  # pylint: disable=import-outside-toplevel
    manifest = datasets.build_dataset(
        FLAGS.dataset, source=source, output=FLAGS.output, image_size=FLAGS.image_size,
        channels=int(FLAGS.channels) if FLAGS.channels else None,
        rotations=FLAGS.rotations, split_scheme=FLAGS.split, resample=FLAGS.resample,
        split_ratios=sources.parse_split_ratios(FLAGS.split_ratios),
        split_seed=FLAGS.split_seed, splits_csv=FLAGS.splits_csv,
        tfds_data_dir=(os.path.expanduser(FLAGS.tfds_data_dir) if FLAGS.tfds_data_dir
                       else None), tfds_splits=FLAGS.tfds_splits,
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
