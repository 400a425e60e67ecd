"""Meta-train and meta-test MAML: ``python -m trainer.main --flagfile=configs/<name>.cfg``.

Deliberately thin: flags -> config objects -> task, strategy and learner -> train / evaluate.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from pipeline import paths  # noqa: E402
from pipeline.errors import DataError  # noqa: E402
from trainer import config, distribute, evaluation, learner, loop, tasks  # noqa: E402
from trainer import model_dir as guard  # noqa: E402

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


def build_rl(strategy):
  """Task and learner for --dataset=rl (imported lazily: gymnasium and MuJoCo are an extra)."""
  from rl import envs, learner as rl_learner, maml_rl, policies, sampler, task as rl_task
  if FLAGS.env not in envs.ENVS:
    raise DataError(f"--env={FLAGS.env}: unknown (known: {', '.join(sorted(envs.ENVS))})")
  horizon = FLAGS.horizon or envs.horizon(FLAGS.env)
  try:
    env_kwargs = json.loads(FLAGS.env_kwargs)
  except json.JSONDecodeError as e:
    raise DataError(f"--env_kwargs={FLAGS.env_kwargs}: not JSON ({e})") from None
  if not isinstance(env_kwargs, dict):
    raise DataError(f"--env_kwargs={FLAGS.env_kwargs}: must be a JSON object")
  vector = sampler.VectorSampler(FLAGS.env, FLAGS.meta_batch_size * FLAGS.rollouts_per_task,
                                 FLAGS.num_workers, env_kwargs)
  policy = policies.PolicyConfig("categorical" if vector.discrete else "gaussian",
                                 vector.obs_dim, vector.action_dim,
                                 tuple(int(h) for h in FLAGS.hidden_sizes))
  cfg = rl_learner.RLConfig(
      env=FLAGS.env, meta_batch_size=FLAGS.meta_batch_size,
      rollouts_per_task=FLAGS.rollouts_per_task, horizon=horizon, inner_lr=FLAGS.inner_lr,
      inner_steps=FLAGS.inner_steps, eval_inner_steps=FLAGS.eval_inner_steps or 3,
      first_order=FLAGS.first_order, gamma=FLAGS.gamma, gae_lambda=FLAGS.gae_lambda,
      outer_optimizer=FLAGS.outer_optimizer, meta_lr=FLAGS.meta_lr,
      trpo=maml_rl.TRPOConfig(FLAGS.max_kl, FLAGS.cg_iters, FLAGS.cg_damping,
                              FLAGS.ls_max_steps, FLAGS.ls_backtrack_ratio))
  task = rl_task.MetaRLTask(vector, FLAGS.meta_batch_size, FLAGS.seed)
  return task, rl_learner.RLMetaLearner(strategy, cfg, policy, vector, seed=FLAGS.seed)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
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
    hint = "" if isinstance(e, DataError) else " (--debug shows the traceback)"
    print(f"trainer: error: {one_line(e)}{hint}", file=sys.stderr)
    return 1


def one_line(error: BaseException) -> str:
  """An error as one line: ours name the file or flag; others get their type and the first
  line that says something (TensorFlow's runtime errors start with boilerplate)."""
  text = error.message if isinstance(error, tf.errors.OpError) else str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(error, (DataError, ValueError)) and lines:
    return lines[0]
  if isinstance(error, tf.errors.UnavailableError) and "unhealthy" in text:
    lost = sorted({line for line in lines if line.startswith("/job:")})
    return (f"a worker was lost ({', '.join(lost) or 'unknown task'} stopped sending "
            f"heartbeats); the others stopped too: re-run every worker's command to resume "
            f"from the last checkpoint")
  boilerplate = ("Graph execution error", "Detected at node", "File \"", "[[", "{{")
  useful = [line for line in lines if not line.startswith(boilerplate)]
  first = useful[0] if useful else (lines[0] if lines else "")
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


def run() -> int:
  """Builds everything, checks the model_dir and the data, then trains and/or evaluates."""
  strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.tpu)
  if FLAGS.dataset == "rl":
    task, meta_learner = build_rl(strategy)
    jit = False
  else:
    task, meta_learner, jit = build_supervised(strategy)
  run_cfg = config.run_config()
  if run_cfg.eval_split not in task.splits:
    raise DataError(f"--eval_split={run_cfg.eval_split}: not a split of this task "
                    f"({', '.join(task.splits)})")
  record = config.run_record(getattr(meta_learner, "model", None),
                             getattr(meta_learner, "meta", None),
                             getattr(task, "manifest", None))
  guard.check_run_record(run_cfg.model_dir, record)
  training = run_cfg.mode in ("train", "train_eval")
  evaluating = run_cfg.mode in ("eval", "train_eval")
  if hasattr(task, "check_data"):
    needed = (["train", "val"] if training else []) + ([run_cfg.eval_split] if evaluating else [])
    task.check_data(list(dict.fromkeys(needed)), sha256=FLAGS.verify_records)
  logging.info("model_dir=%s strategy=%s replicas=%d jit_compile=%s", run_cfg.model_dir,
               type(strategy).__name__, strategy.num_replicas_in_sync, jit)
  # One process writes a model_dir at a time (under multi-worker, the chief writes it).
  lock = (guard.Lock(run_cfg.model_dir) if distribute.is_chief(strategy)
          else contextlib.nullcontext())
  with lock:
    return execute(task, meta_learner, run_cfg, record)


def build_supervised(strategy):
  task = build_task()
  replicas = strategy.num_replicas_in_sync
  for name in ("meta_batch_size", "eval_batch_size"):
    value = getattr(FLAGS, name) or FLAGS.meta_batch_size
    if value % replicas:
      raise DataError(f"--{name}={value} is not divisible by the {replicas} replicas")
  model = config.model_config(getattr(task, "image_shape", None), FLAGS.n_way)
  jit = {"true": True, "false": False}.get(FLAGS.jit_compile,
                                           distribute.default_jit_compile(model.kind))
  meta_learner = learner.MetaLearner(
      strategy, model, config.meta_config(), config.adam_config(), seed=FLAGS.seed,
      meta_batch_size=FLAGS.meta_batch_size,
      eval_inner_steps=FLAGS.eval_inner_steps or FLAGS.inner_steps, jit_compile=jit,
      eval_batch_size=FLAGS.eval_batch_size,
      eval_running_stats=FLAGS.eval_norm_stats == "running")
  return task, meta_learner, jit


def execute(task, meta_learner, run_cfg, record: dict | None = None) -> int:
  """Train and/or meta-test, as --mode says; the same for supervised and RL learners."""
  if run_cfg.mode in ("train", "train_eval"):
    try:
      result = loop.train(meta_learner, task, run_cfg, record)
    except loop.TrainingDiverged as e:
      print(f"trainer: error: {e}", file=sys.stderr)
      return 2
    if result["status"] == "preempted":
      return 0
    if result["status"] == "interrupted":
      return 130
  if run_cfg.mode in ("eval", "train_eval"):
    summary = loop.evaluate(meta_learner, task, run_cfg)
    print(evaluation.format_summary(summary), flush=True)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
