"""The training controller: resume, compiled loops, validation, checkpoints, logs, preemption.

Task- and strategy-agnostic (Orbit's split): it drives any :class:`trainer.family.Learner`
with data from a :class:`trainer.family.Task` and never looks inside a batch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import tensorflow as tf
from absl import logging
from tqdm import tqdm

from trainer import distribute, evaluation
from trainer import model_dir as guard
from trainer.config import RunConfig


class TrainingDiverged(RuntimeError):
  pass


class _Preemption:
  """SIGTERM or Ctrl-C (SIGINT) set a flag; the loop checkpoints at the next loop boundary and
  exits cleanly. A second Ctrl-C stops at once (KeyboardInterrupt)."""

  def __init__(self, cluster: bool = False):
    self.requested = None  # the signal received
    self._previous = {}
    # Across workers, SIGTERM belongs to TensorFlow's PreemptionCheckpointHandler (see
    # _ClusterPreemption); Ctrl-C is passed on to it as a SIGTERM to this process.
    self._cluster = cluster
    self._signals = (signal.SIGINT,) if cluster else (signal.SIGTERM, signal.SIGINT)

  def __enter__(self):
    for sig in self._signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT and self.requested == signal.SIGINT:
      raise KeyboardInterrupt
    if self._cluster:
      os.kill(os.getpid(), signal.SIGTERM)
      return
    self.requested = signum
    if signum == signal.SIGINT:
      print("\nCtrl-C: saving at the end of this loop, then stopping (Ctrl-C again: stop now)",
            file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


class _ClusterPreempted(Exception):
  pass


class _ClusterPreemption:
  """Multi-worker preemption with TensorFlow's own mechanism, as Model Garden uses it.

  A SIGTERM to any worker is shared through the coordination service; every worker then
  checkpoints after the same loop (the chief into the model_dir, the others into their scratch
  folders) and stops, so re-running the same commands resumes from one consistent step.
  ``check`` must be called once per loop on every worker.
  """

  def __init__(self, strategy, manager: tf.train.CheckpointManager):
    config = tf.distribute.experimental.TerminationConfig(exit_fn=self._exit)
    self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver, manager, termination_config=config)

  @staticmethod
  def _exit():
    raise _ClusterPreempted()

  def check(self, step: int) -> bool:
    """True when this loop was the cluster's last: its step is saved."""
    try:
      self._handler.save_checkpoint_if_preempted(checkpoint_number=step)
    except _ClusterPreempted:
      return True
    return False


class _Logs:
  """metrics.jsonl, TensorBoard scalars and a progress display, on the chief only."""

  def __init__(self, model_dir: Path, chief: bool, total: int, initial: int):
    self.chief, self.total = chief, total
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
      # Not a terminal (a log file, CI): one short line per log interval; every value is in
      # metrics.jsonl and TensorBoard.
      print(f"step {step}/{self.total}: {_short(values)}", file=sys.stderr, flush=True)
    else:
      self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in values.items()
                            if "loss" in k or "metric" in k or "val/" in k})

  def close(self):
    self.bar.close()
    if self.jsonl:
      self.jsonl.close()


def _short(values: dict) -> str:
  """``train: loss 0.412, accuracy 86.2%, 3.2 steps/s`` or ``val: accuracy 95.13 ± 0.92%``."""
  show = lambda k, v: f"{100 * v:.2f}%" if k.endswith("accuracy") else f"{v:.4g}"
  if "train/steps_per_s" in values:
    loss = values["train/query_loss_post"]
    metric = next(k for k in values if k.startswith("train/query_") and k.endswith("_post")
                  and k != "train/query_loss_post")
    name = metric[len("train/query_"):-len("_post")]
    return (f"train: query loss {loss:.4g}, {name} {show(name, values[metric])}, "
            f"{values['train/steps_per_s']:.2f} steps/s")
  name = next(k for k in values if k.startswith("val/") and k != "val/ci95"
              and "_after_" not in k)
  ci = values["val/ci95"]
  ci = f"{100 * ci:.2f}%" if name.endswith("accuracy") else f"{ci:.3g}"
  return f"val: {name[4:]} {show(name, values[name]).rstrip('%')} ± {ci}"


def run_evaluation(learner, task, split: str, episodes: int) -> dict:
  losses, metrics = learner.evaluate(task.eval_data(learner.strategy, split, episodes))
  return evaluation.summarize(task.metric, split, metrics, losses,
                              t_interval=getattr(task, "small_sample", False),
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
  if record is not None and chief:
    guard.write_run_record(cfg.model_dir, record)
  checkpoint = tf.train.Checkpoint(**learner.checkpoint_items())
  ckpt_dir, best_dir = _checkpoint_dirs(cfg, chief, strategy)
  restored = guard.restore_newest_intact(checkpoint, ckpt_dir)
  if restored:
    logging.info("resumed from %s", restored)
  manager = tf.train.CheckpointManager(checkpoint, str(ckpt_dir), max_to_keep=3)
  best_manager = tf.train.CheckpointManager(checkpoint, str(best_dir), max_to_keep=1)
  step = int(learner.step.numpy())
  if chief:
    dropped = guard.trim_metrics(cfg.model_dir, step)
    if dropped:
      logging.warning("dropped %d metrics.jsonl line(s) written after step %d (the restored "
                      "checkpoint)", dropped, step)
    if (cfg.model_dir / "tb").exists():
      guard.purge_tensorboard(cfg.model_dir / "tb", step)
  best_path = cfg.model_dir / "best.json"
  best = json.loads(best_path.read_text()) if best_path.exists() else None
  iterator = iter(task.train_data(strategy, step))
  logs = _Logs(cfg.model_dir, chief, cfg.num_iterations, step)
  status = "finished"
  cluster = (_ClusterPreemption(strategy, manager)
             if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else None)
  try:
    with _Preemption(cluster=cluster is not None) as preemption:
      while step < cfg.num_iterations:
        boundaries = [cfg.num_iterations, _next_multiple(step, cfg.log_every),
                      _next_multiple(step, cfg.checkpoint_every)]
        if cfg.eval_every:
          boundaries.append(_next_multiple(step, cfg.eval_every))
        n = min([step + cfg.steps_per_loop] + boundaries) - step
        start = time.perf_counter()
        means = {k: float(v) for k, v in learner.train_loop(iterator, tf.constant(n)).items()}
        elapsed = time.perf_counter() - start
        finite = all(math.isfinite(v) for v in means.values())
        if not (finite and _finite(learner.checkpoint_items())):
          raise TrainingDiverged(_diverged(step, n, means, ckpt_dir))
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
          name = signal.Signals(preemption.requested).name
          logging.warning("%s: saved step %d to %s; re-run the command to resume", name, step,
                          manager.latest_checkpoint)
          status = "interrupted" if preemption.requested == signal.SIGINT else "preempted"
          break
        if cluster is not None and not final and cluster.check(step):
          logging.warning("preemption of a worker: saved step %d to %s; re-run the commands to "
                          "resume", step, manager.latest_checkpoint)
          status = "preempted"
          break
  finally:
    logs.close()
  return {"status": status, "step": step, "best": best}


def _finite(items: dict) -> bool:
  """Whether every floating-point variable of a learner's checkpoint items is finite."""
  checks = [tf.reduce_all(tf.math.is_finite(v)) for v in tf.nest.flatten(items)
            if isinstance(v, tf.Variable) and v.dtype.is_floating]
  return bool(tf.reduce_all(tf.stack(checks))) if checks else True  # one host sync per loop


def _diverged(step: int, n: int, means: dict, ckpt_dir: Path) -> str:
  """The divergence message; the checkpoint of ``step`` (if any) is set aside, since the steps
  right after it diverged: its weights may already be exploding though finite."""
  suspect = [p for p in guard.checkpoints(ckpt_dir) if p.endswith(f"-{step}")]
  moved = ""
  for prefix in suspect:
    moved = (f"; the checkpoint of step {step}, right before, was moved to "
             f"{guard.set_aside(ckpt_dir, prefix, 'diverged')}")
  good = guard.checkpoints(ckpt_dir)
  return (f"non-finite training loss or parameters between steps {step} and {step + n} "
          f"({', '.join(f'{k}={v:.4g}' for k, v in means.items())}); stopped without saving"
          f"{moved}; the last good checkpoint is "
          f"{good[-1] if good else 'none left (the run must start over)'}")


_STANDARD = ("support_loss_pre", "support_metric_pre", "query_loss_post", "query_metric_post")


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


def _chosen_checkpoint(cfg: RunConfig) -> str:
  latest = tf.train.latest_checkpoint(str(cfg.model_dir / "ckpt"))
  chosen = latest if cfg.eval_checkpoint == "latest" else (
      tf.train.latest_checkpoint(str(cfg.model_dir / "best")) or latest)
  if cfg.eval_checkpoint.isdigit():
    chosen = str(cfg.model_dir / "ckpt" / f"ckpt-{int(cfg.eval_checkpoint)}")
    if not tf.io.gfile.exists(chosen + ".index"):
      kept = sorted(int(p.name[5:-6]) for p in (cfg.model_dir / "ckpt").glob("ckpt-*.index"))
      raise guard.ModelDirError(f"--eval_checkpoint={cfg.eval_checkpoint}: no checkpoint of "
                                f"that step in {cfg.model_dir / 'ckpt'} (kept: "
                                f"{', '.join(map(str, kept)) or 'none'})")
  if chosen is None:
    raise guard.ModelDirError(f"--model_dir={cfg.model_dir}: no checkpoint to evaluate; train "
                            f"first (--mode=train or train_eval)")
  return chosen


def _restore_a_copy(checkpoint: tf.train.Checkpoint, cfg: RunConfig) -> str:
  """Restores the chosen checkpoint from a private copy of its files, so a training run that
  holds the model_dir (``--mode=eval`` takes no lock) may rotate or replace it meanwhile; a
  copy that loses that race is taken again. Returns the checkpoint's own path."""
  for _ in range(5):
    chosen = _chosen_checkpoint(cfg)
    with tempfile.TemporaryDirectory(prefix="eval-ckpt-") as copy_dir:
      copy = os.path.join(copy_dir, os.path.basename(chosen))
      try:
        files = tf.io.gfile.glob(chosen + ".*")
        if chosen + ".index" not in files:
          raise tf.errors.NotFoundError(None, None, f"{chosen}.index is gone")
        for f in files:
          tf.io.gfile.copy(f, copy + f[len(chosen):], overwrite=True)
        # Strict: the optimizer's slots too, so a checkpoint of another model is refused.
        checkpoint.restore(copy).assert_existing_objects_matched()
        return chosen
      except tf.errors.NotFoundError:
        logging.info("%s was rotated away while being copied; choosing again", chosen)
      except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise guard.ModelDirError(f"{chosen}: cannot be evaluated with these flags' model "
                                  f"({guard.first_line(e)})") from None
  raise guard.ModelDirError(f"{chosen}: removed while being read, five times; is a run "
                            f"rotating checkpoints very fast?")


def evaluate(learner, task, cfg: RunConfig) -> dict:
  """Meta-tests the best-by-val checkpoint (else, or if asked, the latest); writes
  eval_<split>[...].json."""
  checkpoint = tf.train.Checkpoint(**learner.checkpoint_items())
  chosen = _restore_a_copy(checkpoint, cfg)
  summary = run_evaluation(learner, task, cfg.eval_split, cfg.eval_episodes)
  summary["checkpoint"] = chosen
  if distribute.is_chief(learner.strategy):
    running = getattr(learner, "eval_running_stats", False)
    summary["norm_stats"] = "running" if running else "batch"
    summary["checkpoint_choice"] = cfg.eval_checkpoint
    choice = {"best": "", "latest": "_latest"}.get(cfg.eval_checkpoint,
                                                   f"_step{cfg.eval_checkpoint}")
    suffix = choice + ("_running" if running else "") + getattr(learner, "eval_suffix", "")
    summary.update(getattr(learner, "eval_protocol", {}))
    evaluation.write_json(cfg.model_dir / f"eval_{cfg.eval_split}{suffix}.json", summary)
  return summary

