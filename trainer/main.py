"""Meta-train and meta-test MAML: ``python -m trainer.main --flagfile=configs/<name>.cfg``.

Deliberately thin: flags -> the task family's factory (trainer/family.py) -> the model_dir's
and the data's checks -> train / evaluate (trainer/loop.py). No family is imported here: their
flag modules when trainer/config.py registers every flag, their code only when chosen (RL's
gymnasium/MuJoCo extra only for --dataset=rl).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import tensorflow as tf
from absl import app, flags, logging

from pipeline import runtime_env
from pipeline.errors import DataError, UsageError, first_line
from trainer import config, distribute, evaluation, family, loop
from trainer import model_dir as guard

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime_env.quiet_python_logger()  # after absl has set up logging from the flags
  if FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()
  try:
    return run()
  except KeyboardInterrupt:
    print("trainer: stopped by a second Ctrl-C, without saving", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if FLAGS.debug:
      raise
    # TensorFlow's warnings about half-used objects, logged while they are torn down after
    # the error, would only bury the one line that says what went wrong.
    logging.set_verbosity(logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    hint = "" if isinstance(e, (DataError, UsageError)) else " (--debug shows the traceback)"
    print(f"trainer: error: {one_line(e)}{hint}", file=sys.stderr)
    return 1


def one_line(error: BaseException) -> str:
  """An error as one line: ours (DataError, UsageError) name the file or flag; others get their
  type and the first line that says something (TensorFlow's runtime errors start with
  boilerplate); a lost worker says which and how to resume."""
  if isinstance(error, (DataError, UsageError, ValueError)):
    return first_line(error)
  text = error.message if isinstance(error, tf.errors.OpError) else str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if (isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError))
      and any(m in text for m in ("unhealthy", "Collective ops is aborted", "Connection reset"))):
    lost = sorted({line for line in lines if line.startswith("/job:")}) or _peers()
    return (f"a worker was lost ({', '.join(lost) or 'unknown task'}: "
            f"{'stopped sending heartbeats' if 'unhealthy' in text else 'connection lost'}); "
            f"the others stopped too: re-run every worker's command to resume from the last "
            f"checkpoint")
  boilerplate = ("Graph execution error", "Detected at node", "File \"", "[[", "{{")
  useful = [line for line in lines if not line.startswith(boilerplate)]
  first = useful[0] if useful else (lines[0] if lines else "")
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _peers() -> list[str]:
  """The other workers of this one's TF_CONFIG cluster, as /job:<type>/task:<i> (address)."""
  try:
    spec = json.loads(os.environ.get("TF_CONFIG", "{}"))
  except json.JSONDecodeError:
    return []
  me = spec.get("task", {})
  return [f"/job:{job}/task:{i} ({address})"
          for job, addresses in spec.get("cluster", {}).items()
          for i, address in enumerate(addresses)
          if (job, i) != (me.get("type"), me.get("index"))]


def run() -> int:
  """Builds the chosen family, checks the model_dir and the data, then trains/evaluates."""
  values = config.flag_values()
  chosen = family.family_of(values["dataset"])
  family.refuse_inapplicable(chosen, {name for name in values if FLAGS[name].present},
                             config.RUN.names)
  strategy = distribute.make_strategy(values["strategy"], values["tpu"])
  built = chosen.build(values, strategy)
  task, meta_learner = built.task, built.learner
  run_cfg = config.run_config(values, sys.argv)
  if run_cfg.eval_split not in task.splits:
    raise UsageError(f"--eval_split={run_cfg.eval_split}: not a split of this task "
                     f"({', '.join(task.splits)})")
  record = config.run_record(values, **built.record)
  guard.check_run_record(run_cfg.model_dir, record, chosen, run_cfg.training)
  needed = ((["train", "val"] if run_cfg.training else [])
            + ([run_cfg.eval_split] if run_cfg.evaluating else []))
  task.check_data(list(dict.fromkeys(needed)))
  logging.info("model_dir=%s strategy=%s replicas=%d jit_compile=%s", run_cfg.model_dir,
               type(strategy).__name__, strategy.num_replicas_in_sync, built.jit_compile)
  # One process trains in a model_dir at a time (under multi-worker, the chief writes it).
  # Meta-testing alone only reads a copy of a checkpoint and writes its own report, so it
  # runs beside a live training run.
  lock = (guard.Lock(run_cfg.model_dir) if distribute.is_chief(strategy) and run_cfg.training
          else contextlib.nullcontext())
  with lock:
    return execute(task, meta_learner, run_cfg, record)


def execute(task, meta_learner, run_cfg, record: dict | None = None) -> int:
  """Train and/or meta-test, as --mode says; the same for supervised and RL learners."""
  if run_cfg.training:
    try:
      result = loop.train(meta_learner, task, run_cfg, record)
    except loop.TrainingDiverged as e:
      print(f"trainer: error: {e}", file=sys.stderr)
      return 2
    if result["status"] == "preempted":
      return 0
    if result["status"] == "interrupted":
      return 130
  if run_cfg.evaluating:
    summary = loop.evaluate(meta_learner, task, run_cfg)
    print(evaluation.format_summary(summary), flush=True)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
