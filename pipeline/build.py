"""The Beam pipeline that writes class-indexed TFRecord shards and their manifest.

Shape of the pipeline (one element per source class, so parallelism is at class granularity):

    Create(work units) -> Reshuffle -> EncodeUnit --records--> GroupByKey(shard) -> WriteShard
                                                  --errors---> ToList -> write _errors.json

Errors travel as data rather than exceptions, so every runner reports them the same way and the
driver can name the faulty file in one line. Workers write into a temporary folder beside the
output; the driver checks the per-shard statistics against the listing, writes the manifest
and only then renames the folder into place, so the output appears complete or not at all.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import imaging, records
from pipeline.checksums import sha256_file
from pipeline.errors import DataError
from pipeline.sources import ImageRef, SourceListing, WorkUnit, assign_shards

STATS_DIR = "_stats"
ERRORS_FILE = "_errors.json"


class EncodeUnitFn(beam.DoFn):
  """Reads, checks and encodes one source class; emits one record block per output class."""

  def __init__(self, spec: imaging.ImageSpec):
    self._spec = spec
    self._zips: dict[str, zipfile.ZipFile] = {}

  def setup(self):
    self._zips = {}

  def _read(self, ref: ImageRef) -> bytes:
    if ref.archive is None:
      with open(ref.member, "rb") as f:
        return f.read()
    zf = self._zips.get(ref.archive)
    if zf is None:
      zf = self._zips[ref.archive] = zipfile.ZipFile(ref.archive)
    return zf.read(ref.member)

  def process(self, unit: WorkUnit):
    kept, digest = [], hashlib.sha256()
    for ref in unit.images:
      try:
        raw = self._read(ref)
        prepared = imaging.prepare(raw, self._spec)
      except Exception as e:  # pylint: disable=broad-except
        yield beam.pvalue.TaggedOutput("errors", {
            "file": ref.describe(), "reason": f"{type(e).__name__}: {e}"})
        continue
      digest.update(os.path.basename(ref.member).encode() + b"\0" + hashlib.sha256(raw).digest())
      kept.append((ref, prepared))
    if not kept:
      yield beam.pvalue.TaggedOutput("errors", {
          "file": unit.source_name, "reason": "class has no readable image", "fatal": True})
      return
    for out in unit.outputs:
      block = [records.serialize(imaging.encode_for_class(p, out.rotation), out.label,
                                 ref.describe()) for ref, p in kept]
      yield out.shard, (out.label, out.name, digest.hexdigest(), block)

  def teardown(self):
    for zf in self._zips.values():
      zf.close()


class WriteShardFn(beam.DoFn):
  """Writes one shard, its classes contiguous in label order, and a small statistics file."""

  def __init__(self, tmp_dir: str):
    self._tmp_dir = tmp_dir

  def process(self, item):
    import tensorflow as tf  # workers import TF only here
    shard, blocks = item
    blocks = sorted(blocks, key=lambda b: b[0])
    path = os.path.join(self._tmp_dir, shard)
    partial = path + ".inprogress"
    classes, offset = [], 0
    with tf.io.TFRecordWriter(partial) as writer:
      for label, name, source_digest, block in blocks:
        for serialized in block:
          writer.write(serialized)
        classes.append({"label": label, "name": name, "shard": shard, "offset": offset,
                        "count": len(block), "source_sha256": source_digest})
        offset += len(block)
    tf.io.gfile.rename(partial, path, overwrite=True)
    stats = {"shard": shard, "num_records": offset, "sha256": sha256_file(path),
             "classes": classes}
    stats_path = os.path.join(self._tmp_dir, STATS_DIR, shard + ".json")
    with tf.io.gfile.GFile(stats_path + ".inprogress", "w") as f:
      json.dump(stats, f)
    tf.io.gfile.rename(stats_path + ".inprogress", stats_path, overwrite=True)
    yield shard


def _write_errors(errors: list, path: str) -> None:
  with open(path, "w") as f:
    json.dump(sorted(errors, key=lambda e: e["file"]), f)


def default_pipeline_options(extra_args: Sequence[str] = ()) -> PipelineOptions:
  """DirectRunner on every local core unless ``extra_args`` choose another runner or mode."""
  args = list(extra_args)
  if not any(a.startswith("--runner") for a in args):
    if not any(a.startswith("--direct_num_workers") for a in args):
      args.append(f"--direct_num_workers={os.cpu_count() or 1}")
    if not any(a.startswith("--direct_running_mode") for a in args):
      args.append("--direct_running_mode=multi_processing")
  if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
    args.append("--default_sdk_harness_log_level=ERROR")
  return PipelineOptions(args)


def _run_pipeline(units: list[WorkUnit], spec: imaging.ImageSpec, tmp_dir: str,
                  options: PipelineOptions) -> None:
  os.makedirs(os.path.join(tmp_dir, STATS_DIR))
  logging.getLogger("apache_beam").setLevel(max(logging.getLogger().level, logging.WARNING))
  with beam.Pipeline(options=options) as p:
    encoded = (p
               | "ListClasses" >> beam.Create(units)
               | "Spread" >> beam.Reshuffle()
               | "Encode" >> beam.ParDo(EncodeUnitFn(spec)).with_outputs("errors", main="records"))
    _ = (encoded.records
         | "GroupByShard" >> beam.GroupByKey()
         | "WriteShard" >> beam.ParDo(WriteShardFn(tmp_dir)))
    _ = (encoded.errors
         | "CollectErrors" >> beam.combiners.ToList()
         | "WriteErrors" >> beam.Map(_write_errors, os.path.join(tmp_dir, ERRORS_FILE)))


def _check_and_collect(units: list[WorkUnit], tmp_dir: str, skip_corrupt: bool):
  """Reads what the workers left; raises DataError on any failure the run must not survive."""
  errors_path = os.path.join(tmp_dir, ERRORS_FILE)
  errors = json.loads(Path(errors_path).read_text()) if os.path.exists(errors_path) else []
  fatal = [e for e in errors if e.get("fatal") or not skip_corrupt]
  if fatal:
    first = fatal[0]
    more = f" (and {len(fatal) - 1} more bad file(s))" if len(fatal) > 1 else ""
    hint = "" if skip_corrupt else "; --skip_corrupt skips such files and lists them in the manifest"
    raise DataError(f"{first['file']}: {first['reason']}{more}{hint}")
  shard_stats = {}
  for name in os.listdir(os.path.join(tmp_dir, STATS_DIR)):
    if name.endswith(".json"):
      stats = json.loads(Path(tmp_dir, STATS_DIR, name).read_text())
      shard_stats[stats["shard"]] = stats
  written = {(s, c["label"]): c for s, st in shard_stats.items() for c in st["classes"]}
  skipped_files = {e["file"] for e in errors}
  for unit in units:
    expected = sum(1 for r in unit.images if r.describe() not in skipped_files)
    for out in unit.outputs:
      got = written.get((out.shard, out.label))
      if got is None:
        raise DataError(f"class {out.name} ({out.split}): no records were written to {out.shard}")
      if got["count"] != expected:
        raise DataError(f"class {out.name} ({out.split}): {got['count']} records written, "
                        f"{expected} expected from the source listing")
  return shard_stats, errors


def _manifest(listing: SourceListing, units: list[WorkUnit], shard_stats: dict, errors: list,
              spec: imaging.ImageSpec, build_args: dict, archive_sums: dict) -> dict:
  splits: dict[str, dict] = {}
  for unit in units:
    for out in unit.outputs:
      split = splits.setdefault(out.split, {"classes": []})
      stats = next(c for c in shard_stats[out.shard]["classes"] if c["label"] == out.label)
      split["classes"].append({"label": out.label, "name": out.name, "shard": out.shard,
                               "offset": stats["offset"], "count": stats["count"],
                               "rotation": 90 * out.rotation})
  for name, split in splits.items():
    split["classes"].sort(key=lambda c: c["label"])
    shards = sorted({c["shard"] for c in split["classes"]})
    split.update(num_classes=len(split["classes"]),
                 num_images=sum(c["count"] for c in split["classes"]),
                 shards=[{"file": s, "num_records": shard_stats[s]["num_records"],
                          "sha256": shard_stats[s]["sha256"]} for s in shards])
  source_digest = hashlib.sha256()
  for unit in sorted(units, key=lambda u: u.source_name):
    first = unit.outputs[0]
    stats = next(c for c in shard_stats[first.shard]["classes"] if c["label"] == first.label)
    source_digest.update(unit.source_name.encode() + b"\0" + stats["source_sha256"].encode())
  ordered = {s: splits[s] for s in ("train", "val", "test") if s in splits}
  return {
      "schema_version": records.SCHEMA_VERSION,
      "dataset": listing.dataset,
      "image_shape": [spec.size, spec.size, spec.channels],
      "pixel_values": ("uint8, ink = 255 (inverted from the source)" if spec.invert
                       else "uint8 as in the source"),
      "record_features": records.FEATURE_DOC,
      "splits": {s: {k: v[k] for k in ("num_classes", "num_images", "shards", "classes")}
                 for s, v in ordered.items()},
      "source": dict(listing.info, archives_sha256=archive_sums,
                     images_sha256=source_digest.hexdigest()),
      "build": dict(build_args, image_size=spec.size, channels=spec.channels,
                    invert=spec.invert, resample=spec.resample,
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat()),
      "skipped": errors,
  }


def build_records(listing: SourceListing, output: str | os.PathLike, spec: imaging.ImageSpec, *,
                  images_per_shard: int = 10000, overwrite: bool = False,
                  skip_corrupt: bool = False, beam_args: Sequence[str] = (),
                  build_args: dict | None = None) -> dict:
  """Builds the records folder ``output`` from ``listing``; returns the manifest."""
  output = Path(output)
  if "://" in str(output):
    raise DataError(f"--output={output}: only local (or mounted) folders are supported; the "
                    f"atomic rename that guarantees a complete output needs one filesystem")
  if output.exists() and not overwrite:
    raise DataError(f"--output={output} already exists; pass --overwrite to replace it")
  units = assign_shards(listing.units, images_per_shard)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    archive_sums = {os.path.basename(a): sha256_file(a) for a in listing.archives}
    _run_pipeline(units, spec, str(tmp_dir), default_pipeline_options(beam_args))
    shard_stats, errors = _check_and_collect(units, str(tmp_dir), skip_corrupt)
    manifest = _manifest(listing, units, shard_stats, errors, spec,
                         dict(build_args or {}, images_per_shard=images_per_shard,
                              skip_corrupt=skip_corrupt), archive_sums)
    shutil.rmtree(tmp_dir / STATS_DIR)
    (tmp_dir / ERRORS_FILE).unlink(missing_ok=True)
    (tmp_dir / records.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    if output.exists():
      trash = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
      output.rename(trash)
      tmp_dir.rename(output)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      tmp_dir.rename(output)
    return manifest
  finally:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir, ignore_errors=True)
