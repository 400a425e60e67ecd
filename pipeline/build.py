"""The Beam pipeline that writes class-indexed TFRecord shards and their manifest.

Shape of the pipeline (one element per source class, so parallelism is at class granularity):

    Create(work units) -> Reshuffle -> EncodeUnit --records--> GroupByKey(shard) -> WriteShard
                                                  --errors---> ToList -> write _errors.json

Errors travel as data rather than exceptions, so every runner reports them the same way and the
driver can name the faulty file in one line. Workers read sources and write shards through
Beam's filesystems, so a remote runner needs no shared disk and ``--output`` may be a bucket.
The driver checks the per-shard statistics against the listing and commits: a local output is
built in a temporary folder beside it and renamed into place whole; a remote one (object
stores have no folder rename) gets its shards moved in from a temporary prefix and the manifest
written last, so a reader, which refuses a folder without a manifest, never sees a half build.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import imaging, records, storage
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
    if ref.data is not None:
      return ref.data
    if ref.archive is None:
      return storage.beam_read(ref.member)
    zf = self._zips.get(ref.archive)
    if zf is None:
      opened = (storage.beam_open(ref.archive) if storage.is_remote(ref.archive)
                else ref.archive)
      zf = self._zips[ref.archive] = zipfile.ZipFile(opened)
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
    classes, offset = [], 0
    # The TFRecord framing is TensorFlow's; the bytes then travel through Beam's filesystems.
    with tempfile.TemporaryDirectory() as local:
      local_path = os.path.join(local, shard)
      with tf.io.TFRecordWriter(local_path) as writer:
        for label, name, source_digest, block in blocks:
          for serialized in block:
            writer.write(serialized)
          classes.append({"label": label, "name": name, "shard": shard, "offset": offset,
                          "count": len(block), "source_sha256": source_digest})
          offset += len(block)
      digest = sha256_file(local_path)
      storage.beam_copy_file(local_path, storage.join(self._tmp_dir, shard))
    stats = {"shard": shard, "num_records": offset, "sha256": digest, "classes": classes}
    storage.beam_write(storage.join(self._tmp_dir, STATS_DIR, shard + ".json"),
                       json.dumps(stats).encode())
    yield shard


def _write_errors(errors: list, path: str) -> None:
  storage.beam_write(path, json.dumps(sorted(errors, key=lambda e: e["file"])).encode())


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
                  options: PipelineOptions, read_units=None) -> None:
  storage.beam_mkdirs(storage.join(tmp_dir, STATS_DIR))
  logging.getLogger("apache_beam").setLevel(max(logging.getLogger().level, logging.WARNING))
  with beam.Pipeline(options=options) as p:
    listed = (p | "ListClasses" >> (read_units(units) if read_units else beam.Create(units)))
    encoded = (listed
               | "Spread" >> beam.Reshuffle()
               | "Encode" >> beam.ParDo(EncodeUnitFn(spec)).with_outputs("errors", main="records"))
    _ = (encoded.records
         | "GroupByShard" >> beam.GroupByKey()
         | "WriteShard" >> beam.ParDo(WriteShardFn(tmp_dir)))
    _ = (encoded.errors
         | "CollectErrors" >> beam.combiners.ToList()
         | "WriteErrors" >> beam.Map(_write_errors, storage.join(tmp_dir, ERRORS_FILE)))


def _check_and_collect(units: list[WorkUnit], tmp_dir: str, skip_corrupt: bool):
  """Reads what the workers left; raises DataError on any failure the run must not survive."""
  errors_path = storage.join(tmp_dir, ERRORS_FILE)
  errors = (json.loads(storage.beam_read(errors_path)) if storage.beam_exists(errors_path)
            else [])
  fatal = [e for e in errors if e.get("fatal") or not skip_corrupt]
  if fatal:
    first = fatal[0]
    more = f" (and {len(fatal) - 1} more bad file(s))" if len(fatal) > 1 else ""
    hint = "" if skip_corrupt else "; --skip_corrupt skips such files and lists them in the manifest"
    raise DataError(f"{first['file']}: {first['reason']}{more}{hint}")
  shard_stats = {}
  for path in storage.beam_list(storage.join(tmp_dir, STATS_DIR)):
    if path.endswith(".json"):
      stats = json.loads(storage.beam_read(path))
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
  """Builds the records folder ``output`` (a local path or a URL) from ``listing``."""
  output = storage.canonical(output)
  units = assign_shards(listing.units, images_per_shard)
  build_args = dict(build_args or {}, images_per_shard=images_per_shard,
                    skip_corrupt=skip_corrupt)
  options = default_pipeline_options(beam_args)

  def build(tmp_dir: str) -> dict:
    archive_sums = {os.path.basename(a): sha256_file(a) for a in listing.archives}
    _run_pipeline(units, spec, tmp_dir, options, listing.read_units)
    shard_stats, errors = _check_and_collect(units, tmp_dir, skip_corrupt)
    return _manifest(listing, units, shard_stats, errors, spec, build_args, archive_sums)

  if storage.is_remote(output):
    return _build_remote(output, build, overwrite)
  return _build_local(Path(output), build, overwrite)


def _build_local(output: Path, build, overwrite: bool) -> dict:
  """Builds beside ``output`` and renames the finished folder into place."""
  if output.exists() and not overwrite:
    raise DataError(f"--output={output} already exists; pass --overwrite to replace it")
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    manifest = build(str(tmp_dir))
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


def _build_remote(output: str, build, overwrite: bool) -> dict:
  """Builds under a temporary prefix of ``output``, moves the shards in, writes the manifest
  last. A replaced build loses its manifest first, so no reader mixes old and new shards."""
  manifest_path = storage.join(output, records.MANIFEST_NAME)
  old_shards = [p for p in storage.beam_list(output)
                if p.endswith(".tfrecord") and "/_tmp-" not in p]
  if storage.beam_exists(manifest_path) and not overwrite:
    raise DataError(f"--output={output} already holds records; pass --overwrite to replace them")
  if old_shards and not overwrite:
    raise DataError(f"--output={output} holds {len(old_shards)} shard(s) but no manifest (an "
                    f"interrupted build?); pass --overwrite to replace them")
  tmp_dir = storage.join(output, f"_tmp-{uuid.uuid4().hex[:8]}")
  try:
    manifest = build(tmp_dir)
    storage.beam_delete([manifest_path])
    storage.beam_delete(old_shards)
    for split in manifest["splits"].values():
      for shard in split["shards"]:
        storage.beam_rename(storage.join(tmp_dir, shard["file"]),
                            storage.join(output, shard["file"]))
    storage.beam_write(manifest_path, json.dumps(manifest, indent=1).encode())
    return manifest
  finally:
    storage.beam_delete(storage.beam_list(tmp_dir) + [tmp_dir])
