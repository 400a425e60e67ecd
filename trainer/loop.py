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

from pipeline.errors import UsageError, first_line
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
  """``train: query loss post 0.412, query accuracy post 86.20%, 3.2 steps/s`` (the learner's
  first two metrics) or ``val: accuracy 95.13 ± 0.92%``."""
  def show(key, value):
    name = key.split("/", 1)[-1]
    text = f"{100 * value:.2f}%" if "accuracy" in name else f"{value:.4g}"
    return f"{name.replace('_', ' ')} {text}"

  if "train/steps_per_s" in values:
    headline = [k for k in values if k != "train/steps_per_s"][:2]
    return ("train: " + ", ".join(show(k, values[k]) for k in headline)
            + f", {values['train/steps_per_s']:.2f} steps/s")
  name = next(k for k in values if k.startswith("val/") and k != "val/ci95"
              and "_after_" not in k)
  ci = values["val/ci95"]
  ci = f"{100 * ci:.2f}%" if name.endswith("accuracy") else f"{ci:.3g}"
  return f"val: {show(name, values[name]).rstrip('%')} ± {ci}"


class EvaluationInterrupted(Exception):
  """A signal asked to stop during a validation: it is abandoned, and redone on resume."""


def _interruptible(batches, stop):
  """``batches``, checking ``stop()`` before each: a long validation (ResNet-12's: minutes
  per batch on a CPU) must not hold a SIGTERM until it ends."""
  for batch in batches:
    if stop is not None and stop():
      raise EvaluationInterrupted()
    yield batch


def run_evaluation(learner, task, split: str, episodes: int, stop=None) -> dict:
  """The evaluation summary; ``stop``: a callable that, once true, abandons it between batches
  (raising :class:`EvaluationInterrupted`)."""
  data = task.eval_data(learner.strategy, split, episodes)
  losses, metrics = learner.evaluate(_interruptible(data, stop) if stop else data)
  summary = evaluation.summarize(task.metric, split, metrics, losses,
                                 t_interval=task.small_sample,
                                 steps=getattr(learner, "measured_steps", None),
                                 step=int(learner.step.numpy()))
  # A learner's other figures by inner steps (RL on Meta-World: the success rate).
  extras = getattr(learner, "evaluation_extras", dict)()
  for name, per_step in extras.items():
    summary[f"{name}_by_inner_steps"] = {
        str(s): evaluation.mean_ci95(per_step[s], task.small_sample)
        for s in range(per_step.shape[0])}
  return summary


def _checkpoint_dirs(cfg: RunConfig, chief: bool, strategy) -> tuple[Path, Path]:
  if chief:
    return cfg.model_dir / "ckpt", cfg.model_dir / "best"
  worker = strategy.cluster_resolver.task_id  # non-chief workers save to throwaway folders
  scratch = cfg.model_dir / "workers" / f"worker{worker}"
  return scratch / "ckpt", scratch / "best"


class _Training:
  """One training run's state between loops: the checkpoints, the best-by-validation record,
  the data, the logs. :func:`train` drives it through its named steps."""

  def __init__(self, learner, task, cfg: RunConfig, record: dict | None):
    self.learner, self.task, self.cfg = learner, task, cfg
    strategy = learner.strategy
    self.chief = distribute.is_chief(strategy)
    cfg.model_dir.mkdir(parents=True, exist_ok=True)
    if record is not None and self.chief:
      guard.write_run_record(cfg.model_dir, record)
    self.checkpoint = tf.train.Checkpoint(**learner.checkpoint_items())
    self.ckpt_dir, best_dir = _checkpoint_dirs(cfg, self.chief, strategy)
    self.step = self._restore()
    self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.ckpt_dir), max_to_keep=3)
    self.best_manager = tf.train.CheckpointManager(self.checkpoint, str(best_dir), max_to_keep=1)
    self.kept_manager = (tf.train.CheckpointManager(self.checkpoint,
                                                    str(self.ckpt_dir.parent / "kept"),
                                                    max_to_keep=None)
                         if cfg.keep_checkpoint_every else None)
    self.best_path = cfg.model_dir / "best.json"
    self.best = json.loads(self.best_path.read_text()) if self.best_path.exists() else None
    self.data = task.train_data(strategy, self.step)
    self.logs = _Logs(cfg.model_dir, self.chief, cfg.num_iterations, self.step)

  def _restore(self) -> int:
    """Resumes from the newest intact checkpoint; drops logs written past it."""
    restored = guard.restore_newest_intact(self.checkpoint, self.ckpt_dir)
    if restored:
      logging.info("resumed from %s", restored)
    elif hasattr(self.learner, "fresh_start"):
      done = self.learner.fresh_start()
      if done:
        logging.info("%s", done)
    step = int(self.learner.step.numpy())
    if self.chief:
      dropped = guard.trim_metrics(self.cfg.model_dir, step)
      if dropped:
        logging.warning("dropped %d metrics.jsonl line(s) written after step %d (the restored "
                        "checkpoint)", dropped, step)
      if (self.cfg.model_dir / "tb").exists():
        guard.purge_tensorboard(self.cfg.model_dir / "tb", step)
    return step

  def _due(self, every: int) -> bool:
    return (bool(every) and self.step % every == 0) or self.finished

  @property
  def finished(self) -> bool:
    return self.step == self.cfg.num_iterations

  def stretch(self) -> int:
    """Steps until the next log, validation, checkpoint or the end (at most steps_per_loop)."""
    cfg, step = self.cfg, self.step
    boundaries = [cfg.num_iterations, _next_multiple(step, cfg.log_every),
                  _next_multiple(step, cfg.checkpoint_every)]
    if cfg.keep_checkpoint_every:
      boundaries.append(_next_multiple(step, cfg.keep_checkpoint_every))
    if cfg.eval_every:
      boundaries.append(_next_multiple(step, cfg.eval_every))
    return min([step + cfg.steps_per_loop] + boundaries) - step

  def train(self, n: int) -> None:
    """``n`` meta-steps in one compiled loop; refuses to go on from non-finite values."""
    start = time.perf_counter()
    means = {k: float(v) for k, v in self.learner.train_loop(self.data, tf.constant(n)).items()}
    elapsed = time.perf_counter() - start
    if not (all(math.isfinite(v) for v in means.values())
            and _finite(self.learner.checkpoint_items())):
      raise TrainingDiverged(_diverged(self.step, n, means, self.ckpt_dir))
    self.step += n
    self.logs.bar.update(n)
    if self._due(self.cfg.log_every):
      self.logs.scalars(self.step, {**{f"train/{k}": v for k, v in means.items()},
                                    "train/steps_per_s": n / elapsed})

  def validation_missing(self) -> bool:
    """Whether the restored step was due for a validation that metrics.jsonl lacks (a signal
    or SIGKILL ended the run during it): it is run before training goes on."""
    if not (self.chief and self.step and self._due(self.cfg.eval_every)):
      return False
    with open(self.cfg.model_dir / "metrics.jsonl") as f:
      for line in f:
        entry = json.loads(line)
        if entry.get("step") == self.step and any(k.startswith("val/") for k in entry):
          return False
    return True

  def validate(self, stop=None) -> None:
    """Validation episodes; the best checkpoint by them is kept in ``best/``. ``stop``: see
    :func:`run_evaluation`."""
    if not self._due(self.cfg.eval_every):
      return
    metric = self.task.metric
    summary = run_evaluation(self.learner, self.task, "val", self.cfg.val_episodes, stop)
    last = evaluation.last_step(summary)
    extras = {f"val/{name[:-len('_by_inner_steps')]}_after_{k}_steps": v["mean"]
              for name, by_step in summary.items() if name.endswith("_by_inner_steps")
              and name not in ("by_inner_steps", "loss_by_inner_steps")
              for k, v in by_step.items()}
    self.logs.scalars(self.step, {f"val/{metric}": last["mean"], "val/ci95": last["ci95"],
                                  **{f"val/{metric}_after_{k}_steps": v["mean"]
                                     for k, v in summary["by_inner_steps"].items()},
                                  **extras})
    best = self.best
    if best is None or (last["mean"] > best["value"] if self.task.higher_is_better
                        else last["mean"] < best["value"]):
      self.best_manager.save(checkpoint_number=self.step)
      self.best = {"step": self.step, "value": last["mean"], "ci95": last["ci95"],
                   "metric": metric, "checkpoint": self.best_manager.latest_checkpoint}
      if self.chief:
        evaluation.write_json(self.best_path, self.best)

  def save(self) -> None:
    if self._due(self.cfg.checkpoint_every):
      self.manager.save(checkpoint_number=self.step)
    every = self.cfg.keep_checkpoint_every
    if every and self.step % every == 0:
      self.kept_manager.save(checkpoint_number=self.step)

  def stop_during_validation(self, preemption: "_Preemption") -> str:
    """A signal arrived during a validation: saves the step (unless saved) and names it."""
    if not (self.manager.latest_checkpoint or "").endswith(f"-{self.step}"):
      self.manager.save(checkpoint_number=self.step)
    name = signal.Signals(preemption.requested).name
    logging.warning("%s during the validation of step %d: saved the step to %s; re-run the "
                    "command to resume (the validation is redone first)", name, self.step,
                    self.manager.latest_checkpoint)
    return "interrupted" if preemption.requested == signal.SIGINT else "preempted"

  def stop(self, preemption: "_Preemption", cluster: "_ClusterPreemption | None") -> str | None:
    """"interrupted" or "preempted" when a signal asked to stop (saved first), else None."""
    if self.finished:
      return None
    if preemption.requested:
      self.manager.save(checkpoint_number=self.step)
      name = signal.Signals(preemption.requested).name
      logging.warning("%s: saved step %d to %s; re-run the command to resume", name, self.step,
                      self.manager.latest_checkpoint)
      return "interrupted" if preemption.requested == signal.SIGINT else "preempted"
    if cluster is not None and cluster.check(self.step):
      logging.warning("preemption of a worker: saved step %d to %s; re-run the commands to "
                      "resume", self.step, self.manager.latest_checkpoint)
      return "preempted"
    return None


def train(learner, task, cfg: RunConfig, record: dict | None = None) -> dict:
  """Trains to ``cfg.num_iterations`` (resuming from ``model_dir``); returns a status dict.

  ``record`` (what defines the run, see :func:`trainer.config.run_record`) is written to
  ``<model_dir>/config.json`` when the run has none yet.
  """
  run = _Training(learner, task, cfg, record)
  cluster = (_ClusterPreemption(learner.strategy, run.manager)
             if isinstance(learner.strategy, tf.distribute.MultiWorkerMirroredStrategy) else None)
  status = "finished"
  try:
    with _Preemption(cluster=cluster is not None) as preemption:
      # Single process: a signal abandons a validation between its batches (all workers of a
      # cluster must leave together, through TensorFlow's handler: they finish it).
      stop = None if cluster is not None else (lambda: preemption.requested is not None)
      try:
        if cluster is None and run.validation_missing():
          run.validate(stop)
          run.save()
        while run.step < cfg.num_iterations:
          run.train(run.stretch())
          run.validate(stop)
          run.save()
          stopped = run.stop(preemption, cluster)
          if stopped:
            status = stopped
            break
      except EvaluationInterrupted:
        status = run.stop_during_validation(preemption)
  finally:
    run.logs.close()
  return {"status": status, "step": run.step, "best": run.best}


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


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


def _restore_a_copy(checkpoint: tf.train.Checkpoint, cfg: RunConfig) -> str:
  """Restores the chosen checkpoint from a private copy of its files, so a training run that
  holds the model_dir (``--mode=eval`` takes no lock) may rotate or replace it meanwhile; a
  copy that loses that race is taken again. Returns the checkpoint's own path."""
  for _ in range(5):
    chosen = guard.choose_checkpoint(cfg.model_dir, cfg.eval_checkpoint)
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
        raise UsageError(f"{chosen}: cannot be evaluated with these flags' model "
                         f"({first_line(e)})") from None
  raise UsageError(f"{chosen}: removed while being read, five times; is a run rotating "
                   f"checkpoints very fast?")


def evaluate(learner, task, cfg: RunConfig) -> dict:
  """Meta-tests the best-by-val checkpoint (else, or if asked, the latest); writes
  eval_<split>[...].json."""
  checkpoint = tf.train.Checkpoint(**learner.checkpoint_items())
  chosen = _restore_a_copy(checkpoint, cfg)
  summary = run_evaluation(learner, task, cfg.eval_split, cfg.eval_episodes)
  summary["checkpoint"] = chosen
  if distribute.is_chief(learner.strategy):
    variant, fields = learner.eval_variant()
    summary.update(fields)
    summary["checkpoint_choice"] = cfg.eval_checkpoint
    choice = {"best": "", "latest": "_latest"}.get(cfg.eval_checkpoint,
                                                   f"_step{cfg.eval_checkpoint}")
    evaluation.write_json(cfg.model_dir / f"eval_{cfg.eval_split}{choice}{variant}.json",
                          summary)
  return summary

