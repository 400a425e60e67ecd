"""What guards a model_dir: its run record, its lock, its checkpoints and its logs.

A model_dir is a run's whole state. These guards make a wrong command fail at start-up in one
line instead of silently mixing two runs: the settings it was started with (``config.json``)
are compared with the current ones, one process at a time holds it, a corrupt newest
checkpoint falls back to an intact one, and logs written past the restored step are dropped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import tensorflow as tf
from absl import flags, logging

from pipeline.errors import UsageError, first_line
from trainer import config, evaluation, family

RUN_RECORD = "config.json"
LOCK_NAME = ".lock"


def check_run_record(model_dir: Path, record: dict, chosen: family.Family,
                     training: bool) -> None:
  """Refuses settings that differ from those the run was started with (one line).

  What may differ is declared where each flag is defined (``may_change``): the runner's and
  the family's; the family may also keep a runner flag fixed for the run it was started as
  (the cosine schedule's length).
  """
  path = model_dir / RUN_RECORD
  if not path.exists():
    return
  try:
    stored = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise UsageError(f"{path}: unreadable ({e}); move it aside to start afresh") from None
  before, now = stored.get("flags", {}), record.get("flags", {})
  if (before.get("mode") == "pretrain") != (now.get("mode") == "pretrain"):
    raise UsageError(
        f"--model_dir={model_dir} holds a pretraining run: continue it (or re-test it) with "
        f"--mode=pretrain, or meta-train from it with --init_from={model_dir} in another "
        f"--model_dir" if before.get("mode") == "pretrain" else
        f"--model_dir={model_dir} holds a meta-training run; pretrain in another --model_dir")
  may_change = ((config.RUN.may_change | chosen.may_change())
                - chosen.fixed_on_resume(before, training))
  # A flag the record does not hold came after the run started, which ran as its default.
  before = {**{k: flags.FLAGS[k].default for k in set(now) - set(before) if k in flags.FLAGS},
            **before}
  differ = [f"--{k}={_show(before.get(k))} (now {_show(now.get(k))})"
            for k in sorted(set(before) | set(now))
            if k not in may_change and before.get(k) != now.get(k)]
  if stored.get("records") and record.get("records"):
    for k in ("dataset", "image_shape", "invert", "resample"):
      if stored["records"].get(k) != record["records"].get(k):
        differ.append(f"records' {k}={stored['records'].get(k)} (now "
                      f"{record['records'].get(k)} in --data_dir)")
  if differ:
    raise UsageError(f"--model_dir={model_dir} was started with other settings: "
                        f"{', '.join(differ)}; use the run's flags (see {path}) or another "
                        f"--model_dir")


def _show(value) -> str:
  if isinstance(value, list):
    return ",".join(str(v) for v in value)
  return str(value)


def write_run_record(model_dir: Path, record: dict) -> None:
  if not (model_dir / RUN_RECORD).exists():
    evaluation.write_json(model_dir / RUN_RECORD, record)


class Lock:
  """``<model_dir>/.lock`` held while a run writes there; stale locks of dead processes are
  taken over. Another live holder: one line naming it (pid, host)."""

  def __init__(self, model_dir: Path):
    self.path = model_dir / LOCK_NAME
    self.held = False

  def __enter__(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is not None and self._alive(holder):
          raise UsageError(
              f"--model_dir={self.path.parent} is in use by process {holder.get('pid')} on "
              f"{holder.get('host')} (since {time.ctime(holder.get('since', 0))}); wait for "
              f"it, stop it, or delete {self.path} if that process is gone") from None
        logging.warning("taking over the stale lock %s (%s)", self.path, holder)
        self.path.unlink(missing_ok=True)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise UsageError(f"{self.path}: could not take the lock (another run raced for it)")

  def _holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (OSError, json.JSONDecodeError):
      return None  # half-written by a process that died: stale

  @staticmethod
  def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
      return True  # cannot tell for another machine: assume it runs
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      return False
    except (PermissionError, KeyError, TypeError, ValueError):
      return True
    return True

  def __exit__(self, *exc):
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False


def _checkpoint_files(prefix: str) -> list[Path]:
  prefix_path = Path(prefix)
  return sorted(prefix_path.parent.glob(prefix_path.name + ".*"))


def checkpoints(directory: Path) -> list[str]:
  """The checkpoint prefixes a CheckpointManager of ``directory`` keeps, oldest first."""
  state = tf.train.get_checkpoint_state(str(directory))
  return list(state.all_model_checkpoint_paths) if state else []


def set_aside(directory: Path, prefix: str, folder: str) -> Path:
  """Moves a checkpoint's files to ``<directory>/<folder>/`` (kept, not deleted) and drops it
  from the directory's checkpoint list, so restores and managers created later ignore it."""
  target = Path(directory) / folder
  target.mkdir(exist_ok=True)
  for f in _checkpoint_files(prefix):
    shutil.move(str(f), target / f.name)
  state = tf.train.get_checkpoint_state(str(directory))
  paths_ = list(state.all_model_checkpoint_paths) if state else []
  stamps = list(state.all_model_checkpoint_timestamps) if state else []
  if len(stamps) != len(paths_):
    stamps = [time.time()] * len(paths_)
  kept = [(os.path.relpath(p, directory), t) for p, t in zip(paths_, stamps) if p != prefix]
  if not kept:
    (Path(directory) / "checkpoint").unlink(missing_ok=True)
    return target
  # Timestamps too: a CheckpointManager keeps (and later rotates) only entries that have them.
  tf.compat.v1.train.update_checkpoint_state(
      str(directory), kept[-1][0],
      all_model_checkpoint_paths=[p for p, _ in kept],
      all_model_checkpoint_timestamps=[t for _, t in kept])
  return target


def choose_checkpoint(model_dir: Path, which: str, flag: str = "--eval_checkpoint") -> str:
  """The checkpoint to meta-test or export: ``best`` (by validation, else the latest),
  ``latest``, or a step number whose checkpoint is kept. ``flag`` names the choice in errors."""
  ckpt_dir = model_dir / "ckpt"
  if which.isdigit():
    folders = (ckpt_dir, model_dir / "kept")  # the rotating three, then --keep_checkpoint_every's
    for folder in folders:
      chosen = str(folder / f"ckpt-{int(which)}")
      if tf.io.gfile.exists(chosen + ".index"):
        return chosen
    kept = sorted({int(p.name[5:-6]) for f in folders for p in f.glob("ckpt-*.index")})
    raise UsageError(f"{flag}={which}: no checkpoint of that step in {ckpt_dir} or "
                     f"{model_dir / 'kept'} (kept: {', '.join(map(str, kept)) or 'none'}; "
                     f"--keep_checkpoint_every keeps more)")
  latest = tf.train.latest_checkpoint(str(ckpt_dir))
  chosen = latest if which == "latest" else (
      tf.train.latest_checkpoint(str(model_dir / "best")) or latest)
  if chosen is None:
    raise UsageError(f"--model_dir={model_dir}: no checkpoint; train first (--mode=train or "
                     f"train_eval)")
  return chosen


def checkpoint_step(prefix: str) -> int:
  """The step a checkpoint prefix was saved at (``.../ckpt-1200`` -> 1200)."""
  return int(prefix.rsplit("-", 1)[1])


def restore_newest_intact(checkpoint: tf.train.Checkpoint, directory: Path) -> str | None:
  """Restores the newest checkpoint in ``directory`` that reads back whole; corrupt newer ones
  are set aside with a warning naming them. Every variable must be restored: a checkpoint of
  another model is refused, never half-loaded. Create the CheckpointManager after this."""
  for prefix in reversed(checkpoints(directory)):
    try:
      checkpoint.restore(prefix).assert_existing_objects_matched()
      return prefix
    except (tf.errors.OpError, ValueError, IndexError, AssertionError) as e:
      if not _unreadable(prefix):
        # Readable but not this model (shapes or variables differ): not corruption.
        raise UsageError(f"{prefix}: does not match the model these flags build "
                            f"({first_line(e)})") from None
      target = set_aside(directory, prefix, "corrupt")
      logging.warning("checkpoint %s is corrupt (%s); moved to %s; trying the one before",
                      prefix, first_line(e), target)
  return None


def _unreadable(prefix: str) -> bool:
  try:
    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
    return False
  except Exception:  # pylint: disable=broad-except
    return True


def trim_metrics(model_dir: Path, step: int) -> int:
  """Drops ``metrics.jsonl`` lines past ``step`` (written after the restored checkpoint);
  returns how many were dropped. Keeps the file strictly a record of the restored history."""
  path = model_dir / "metrics.jsonl"
  if not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] > step:
        dropped += 1
        continue
    except (json.JSONDecodeError, KeyError, TypeError):
      dropped += 1  # a line cut by a crash
      continue
    kept.append(line)
  if dropped:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)
  return dropped


def purge_tensorboard(log_dir: Path, step: int) -> None:
  """Makes TensorBoard discard events past ``step`` from earlier attempts of this run.

  TensorBoard drops a run's events with a larger step when it reads a SessionLog.START event
  (the mechanism TF1's supervisors used on restart); it is written in its own event file.
  """
  from tensorboard.compat.proto import event_pb2  # tensorboard comes with TensorFlow
  log_dir.mkdir(parents=True, exist_ok=True)
  name = log_dir / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.restart"
  with tf.io.TFRecordWriter(str(name)) as writer:
    writer.write(event_pb2.Event(wall_time=time.time(),
                                 file_version="brain.Event:2").SerializeToString())
    writer.write(event_pb2.Event(wall_time=time.time(), step=step,
                                 session_log=event_pb2.SessionLog(
                                     status=event_pb2.SessionLog.START)).SerializeToString())
