"""The training controller: resume, compiled loops, validation, checkpoints, logs, preemption.

Task- and strategy-agnostic (Orbit's split): it drives a :class:`trainer.learner.MetaLearner`
with datasets from a task object and never looks inside a batch.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import tensorflow as tf
from absl import logging
from tqdm import tqdm

from pipeline import streams
from trainer import config, distribute, evaluation
from trainer.config import RunConfig


class TrainingDiverged(RuntimeError):
  pass


class _Preemption:
  """SIGTERM sets a flag; the loop checkpoints at the next loop boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Logs:
  """metrics.jsonl, TensorBoard scalars and a progress display, on the chief only."""

  def __init__(self, model_dir: Path, chief: bool, total: int, initial: int):
    self.chief = chief
    self.jsonl = open(model_dir / "metrics.jsonl", "a") if chief else None
    self.writer = (tf.summary.create_file_writer(str(model_dir / "tb")) if chief
                   else tf.summary.create_noop_writer())
    self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                    disable=not (chief and sys.stderr.isatty()))

  def scalars(self, step: int, values: dict) -> None:
    if not self.chief:
      return
    with self.writer.as_default(step=step):
      for k, v in values.items():
        tf.summary.scalar(k, v)
    self.writer.flush()
    self.jsonl.write(json.dumps(dict(step=step, time=time.time(), **values)) + "\n")
    self.jsonl.flush()
    if self.bar.disable:
      shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
      logging.info("step %d: %s", step, shown)
    else:
      self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in values.items()
                            if "loss" in k or "metric" in k or "val/" in k})

  def close(self):
    self.bar.close()
    if self.jsonl:
      self.jsonl.close()


def _distributed(strategy, task, make):
  """tf.data tasks are spread over replicas; host-side ones (RL's task lists) are used as is."""
  if getattr(task, "host_side", False):
    return make(streams.Sharding())
  return strategy.distribute_datasets_from_function(
      lambda ctx: make(streams.Sharding.from_input_context(ctx)))


def run_evaluation(learner, task, split: str, episodes: int) -> dict:
  ds = _distributed(learner.strategy, task,
                    lambda sharding: task.eval_dataset(split, episodes, sharding))
  losses, metrics = learner.evaluate(ds)
  return evaluation.summarize(task.metric, split, metrics, losses,
                              step=int(learner.step.numpy()))


def _checkpoint_dirs(cfg: RunConfig, chief: bool, strategy) -> tuple[Path, Path]:
  if chief:
    return cfg.model_dir / "ckpt", cfg.model_dir / "best"
  worker = strategy.cluster_resolver.task_id  # non-chief workers save to throwaway folders
  scratch = cfg.model_dir / "workers" / f"worker{worker}"
  return scratch / "ckpt", scratch / "best"


def train(learner, task, cfg: RunConfig, record: dict | None = None) -> dict:
  """Trains to ``cfg.num_iterations`` (resuming from ``model_dir``); returns a status dict.

  ``record`` (what defines the run, see :func:`trainer.config.run_record`) is written to
  ``<model_dir>/config.json`` when the run has none yet.
  """
  strategy = learner.strategy
  chief = distribute.is_chief(strategy)
  cfg.model_dir.mkdir(parents=True, exist_ok=True)
  record_path = cfg.model_dir / config.RUN_RECORD
  if record is not None and chief and not record_path.exists():
    evaluation.write_json(record_path, record)
  checkpoint = tf.train.Checkpoint(**learner.checkpoint_items())
  ckpt_dir, best_dir = _checkpoint_dirs(cfg, chief, strategy)
  manager = tf.train.CheckpointManager(checkpoint, str(ckpt_dir), max_to_keep=3)
  best_manager = tf.train.CheckpointManager(checkpoint, str(best_dir), max_to_keep=1)
  if manager.latest_checkpoint:
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info("resumed from %s", manager.latest_checkpoint)
  step = int(learner.step.numpy())
  best_path = cfg.model_dir / "best.json"
  best = json.loads(best_path.read_text()) if best_path.exists() else None
  iterator = iter(_distributed(strategy, task, lambda s: task.train_dataset(s, step)))
  logs = _Logs(cfg.model_dir, chief, cfg.num_iterations, step)
  status = "finished"
  try:
    with _Preemption() as preemption:
      while step < cfg.num_iterations:
        boundaries = [cfg.num_iterations, _next_multiple(step, cfg.log_every),
                      _next_multiple(step, cfg.checkpoint_every)]
        if cfg.eval_every:
          boundaries.append(_next_multiple(step, cfg.eval_every))
        n = min([step + cfg.steps_per_loop] + boundaries) - step
        start = time.perf_counter()
        means = {k: float(v) for k, v in learner.train_loop(iterator, tf.constant(n)).items()}
        elapsed = time.perf_counter() - start
        if not all(math.isfinite(v) for v in means.values()):
          raise TrainingDiverged(
              f"non-finite training loss between steps {step} and {step + n} ({means}); "
              f"stopped without saving: the last good checkpoint is "
              f"{manager.latest_checkpoint or 'none (no checkpoint was written yet)'}")
        step += n
        logs.bar.update(n)
        final = step == cfg.num_iterations
        if step % cfg.log_every == 0 or final:
          logs.scalars(step, {
              "train/support_loss_pre": means["support_loss_pre"],
              f"train/support_{task.metric}_pre": means["support_metric_pre"],
              "train/query_loss_post": means["query_loss_post"],
              f"train/query_{task.metric}_post": means["query_metric_post"],
              "train/steps_per_s": n / elapsed,
              **{f"train/{k}": v for k, v in means.items() if k not in _STANDARD}})
        if (cfg.eval_every and step % cfg.eval_every == 0) or final:
          summary = run_evaluation(learner, task, "val", cfg.val_episodes)
          last = summary["by_inner_steps"][str(len(summary["by_inner_steps"]) - 1)]
          logs.scalars(step, {f"val/{task.metric}": last["mean"], "val/ci95": last["ci95"],
                              **{f"val/{task.metric}_after_{k}_steps": v["mean"]
                                 for k, v in summary["by_inner_steps"].items()}})
          better = (best is None or (last["mean"] > best["value"] if task.higher_is_better
                                     else last["mean"] < best["value"]))
          if better:
            best_manager.save(checkpoint_number=step)
            best = {"step": step, "value": last["mean"], "ci95": last["ci95"],
                    "metric": task.metric, "checkpoint": best_manager.latest_checkpoint}
            if chief:
              evaluation.write_json(best_path, best)
        if step % cfg.checkpoint_every == 0 or final:
          manager.save(checkpoint_number=step)
        if preemption.requested and not final:
          manager.save(checkpoint_number=step)
          logging.warning("SIGTERM: saved step %d to %s; re-run the command to resume", step,
                          manager.latest_checkpoint)
          status = "preempted"
          break
  finally:
    logs.close()
  return {"status": status, "step": step, "best": best}


_STANDARD = ("support_loss_pre", "support_metric_pre", "query_loss_post", "query_metric_post")


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


def evaluate(learner, task, cfg: RunConfig) -> dict:
  """Meta-tests the best-by-val checkpoint (else, or if asked, the latest); writes
  eval_<split>.json."""
  checkpoint = tf.train.Checkpoint(**learner.checkpoint_items())
  latest = tf.train.latest_checkpoint(str(cfg.model_dir / "ckpt"))
  chosen = latest if cfg.eval_checkpoint == "latest" else (
      tf.train.latest_checkpoint(str(cfg.model_dir / "best")) or latest)
  if chosen is None:
    raise FileNotFoundError(f"--model_dir={cfg.model_dir}: no checkpoint to evaluate; train "
                            f"first (--mode=train or train_eval)")
  checkpoint.restore(chosen).expect_partial()
  summary = run_evaluation(learner, task, cfg.eval_split, cfg.eval_episodes)
  summary["checkpoint"] = chosen
  if distribute.is_chief(learner.strategy):
    running = getattr(learner, "eval_running_stats", False)
    summary["norm_stats"] = "running" if running else "batch"
    summary["checkpoint_choice"] = cfg.eval_checkpoint
    suffix = ("_latest" if cfg.eval_checkpoint == "latest" else "") + ("_running" if running else "")
    evaluation.write_json(cfg.model_dir / f"eval_{cfg.eval_split}{suffix}.json", summary)
  return summary

