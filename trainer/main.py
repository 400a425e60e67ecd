"""Meta-train and meta-test MAML: ``python -m trainer.main --flagfile=configs/<name>.cfg``.

Deliberately thin: flags -> config objects -> task, strategy and learner -> train / evaluate.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from pipeline import paths  # noqa: E402
from pipeline.errors import DataError  # noqa: E402
from trainer import config, distribute, evaluation, learner, loop, tasks  # noqa: E402

FLAGS = flags.FLAGS


def build_task():
  eval_k_query = FLAGS.eval_k_query or FLAGS.k_query
  eval_batch = FLAGS.eval_batch_size or FLAGS.meta_batch_size
  if FLAGS.dataset == "sinusoid":
    return tasks.SinusoidRegression(FLAGS.k_shot, FLAGS.k_query, eval_k_query,
                                    FLAGS.meta_batch_size, eval_batch, FLAGS.seed)
  data_dir = FLAGS.data_dir or str(paths.default_records_dir(FLAGS.dataset))
  task = tasks.FewShotClassification(data_dir, FLAGS.n_way, FLAGS.k_shot, FLAGS.k_query,
                                     eval_k_query, FLAGS.meta_batch_size, eval_batch,
                                     FLAGS.seed)
  if task.manifest["dataset"] != FLAGS.dataset:
    raise DataError(f"--data_dir={data_dir} holds {task.manifest['dataset']!r} records, "
                    f"not --dataset={FLAGS.dataset}")
  return task


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()
  try:
    task = build_task()
    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.tpu)
    replicas = strategy.num_replicas_in_sync
    for name in ("meta_batch_size", "eval_batch_size"):
      value = getattr(FLAGS, name) or FLAGS.meta_batch_size
      if value % replicas:
        raise DataError(f"--{name}={value} is not divisible by the {replicas} replicas")
    run = config.run_config()
    model = config.model_config(task.image_shape, FLAGS.n_way)
    jit = {"true": True, "false": False}.get(FLAGS.jit_compile,
                                             distribute.default_jit_compile(model.kind))
    meta_learner = learner.MetaLearner(
        strategy, model, config.meta_config(), config.adam_config(), seed=FLAGS.seed,
        meta_batch_size=FLAGS.meta_batch_size,
        eval_inner_steps=FLAGS.eval_inner_steps or FLAGS.inner_steps, jit_compile=jit,
        eval_batch_size=FLAGS.eval_batch_size)
  except (DataError, ValueError) as e:
    print(f"trainer: error: {e}", file=sys.stderr)
    return 1
  logging.info("model_dir=%s strategy=%s replicas=%d jit_compile=%s", run.model_dir,
               type(strategy).__name__, replicas, jit)
  if run.mode in ("train", "train_eval"):
    try:
      result = loop.train(meta_learner, task, run)
    except loop.TrainingDiverged as e:
      print(f"trainer: error: {e}", file=sys.stderr)
      return 2
    if result["status"] == "preempted":
      return 0
  if run.mode in ("eval", "train_eval"):
    try:
      summary = loop.evaluate(meta_learner, task, run)
    except FileNotFoundError as e:
      print(f"trainer: error: {e}", file=sys.stderr)
      return 1
    print(evaluation.format_summary(summary), flush=True)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
