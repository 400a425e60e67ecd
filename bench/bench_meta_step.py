#!/usr/bin/env python
"""Meta-step benchmark: seconds per step, tasks/s, compile time and peak memory, as JSON lines.

  python bench/bench_meta_step.py                                 # graph mode, both orders
  python bench/bench_meta_step.py --jit=false,true --cases=omniglot_5w1s,sinusoid_5shot
  python bench/bench_meta_step.py --records=data/records/omniglot  # + the real training loop

Each (case, order, jit) runs in a fresh subprocess so that its peak memory (GPU peak, or the
process's max RSS on CPU) is its own. Inputs are random tensors of the case's shapes: the
sampler is measured separately (bench_pipeline.py) and, with --records, together with the step
in the learner's compiled training loop.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

from absl import app, flags  # noqa: E402

from trainer import process_memory  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["omniglot_5w1s", "omniglot_20w1s", "mini_5w1s", "mini_5w5s",
                            "sinusoid_5shot", "peer_omniglot_5w1s_q15", "peer_mini_5w1s_q15"],
                  "Cases: any configs/<name>.cfg that is not RL (its own shapes, model and "
                  "meta-learning settings), or a fixed comparison shape (peer_*, target_*).")
flags.DEFINE_list("orders", ["second", "first"], "MAML orders to run.")
flags.DEFINE_list("jit", ["false"], "XLA settings to run (false,true). XLA on a CPU "
                  "takes minutes per conv case.")
flags.DEFINE_list("task_chunks", ["0"], "--task_chunk values to run (0: all tasks at once); "
                  "a chunked case runs the learner's own chunk loop.")
flags.DEFINE_list("remats", ["false"], "--remat settings to run (false,true): recompute each "
                  "inner step's activations in the backward pass.")
flags.DEFINE_list("inner_steps_sweep", [], "Inner-step counts to run each case at instead of "
                  "its config's (the memory and time vs inner steps plot).")
flags.DEFINE_integer("steps", 5, "Timed steps per case (after one warm-up/compile step).")
flags.DEFINE_string("records", None, "Omniglot records: also time the learner's training loop "
                    "fed by the real sampler, from tf.data and drawn on the device (5w1s, 15 "
                    "query, meta-batch 32).")
flags.DEFINE_string("single", None,
                    "Internal: run one case as 'case,order,jit,chunk,remat,inner_steps'.")

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
# The shapes public MAML peers were compared at (docs/benchmarks.md): the paper's architecture,
# 15 query images per class. Overrides of the named config's flags.
PEERS = {
    "peer_omniglot_5w1s_q15": ("omniglot_5w1s", {"k_query": 15, "meta_batch_size": 32,
                                                 "inner_steps": 1}),
    "peer_mini_5w1s_q15": ("mini_5w1s", {"k_query": 15, "meta_batch_size": 4,
                                         "inner_steps": 5}),
    # Issue 11's accelerator target (fit in 16 GB); on a CPU its net peak stands in for it.
    "target_mini_5w1s_10steps_mb32": ("mini_5w1s", {"k_query": 15, "meta_batch_size": 32,
                                                     "inner_steps": 10}),
}
# The same shapes with the same conv4 written as a Keras model (bench/keras_conv4.py), run
# through --model=keras: the Keras path's cost against the built-in one, side by side.
_KERAS_CONV4 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_conv4.py")
PEERS.update({
    "keras_omniglot_5w1s_q15": ("omniglot_5w1s", dict(PEERS["peer_omniglot_5w1s_q15"][1],
                                                      model=f"keras:{_KERAS_CONV4}:omniglot")),
    "keras_mini_5w1s_q15": ("mini_5w1s", dict(PEERS["peer_mini_5w1s_q15"][1],
                                              model=f"keras:{_KERAS_CONV4}:mini")),
})


def flagfile_values(name: str) -> dict:
  """A config's flag values over the trainer's defaults (nested --flagfile lines followed)."""
  from trainer import config
  values = config.default_values()

  def read(path):
    for line in open(path):
      line = line.strip()
      if not line.startswith("--"):
        continue
      key, _, raw = line[2:].partition("=")
      if key == "flagfile":
        read(os.path.join(CONFIGS, "..", raw))
      elif raw or key in values:
        values[key] = FLAGS[key].parser.parse(raw) if raw else True
      else:  # --noname
        values[key[2:]] = False

  read(os.path.join(CONFIGS, f"{name}.cfg"))
  return values


def case_values(case: str) -> dict:
  if case in PEERS:
    base, overrides = PEERS[case]
    return dict(flagfile_values(base), **overrides)
  values = flagfile_values(case)
  if values["dataset"] == "rl":
    raise ValueError(f"{case}: RL has its own benchmark (bench/bench_rl.py)")
  return values


def peak_memory_mb(tf) -> tuple[float, str]:
  if tf.config.list_logical_devices("GPU"):
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, "gpu_peak"
  return process_memory.max_rss_mb(), "max_rss"


def timed(tf, step, *args):
  """(first call s, median s of --steps calls after it, peak MB, its kind, baseline MB): the
  peak window opens with the process holding TF, the model and the inputs."""
  import numpy as np
  baseline = process_memory.start_peak_window()
  start = time.perf_counter()
  tf.nest.map_structure(lambda t: t.numpy(), step(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), step(*args))
    times.append(time.perf_counter() - start)
  memory, kind = peak_memory_mb(tf)
  return compile_s, float(np.median(times)), memory, kind, baseline


def run_single(spec: str) -> dict:
  import functools
  import numpy as np
  import tensorflow as tf
  import dataclasses
  from trainer import maml, models
  from trainer import supervised_config as sc
  case, order, jit, chunk, remat, inner = spec.split(",")
  chunk = int(chunk)
  values = case_values(case)
  if inner:
    values["inner_steps"] = int(inner)
  shape = {"omniglot": (28, 28, 1), "miniimagenet": (84, 84, 3)}.get(values["dataset"])
  cfg = sc.model_config(values, shape)
  if values["mode"] == "pretrain":
    return run_pretrain_step(case, values, cfg, jit == "true")
  meta = dataclasses.replace(sc.meta_config(values), first_order=order == "first",
                             remat=remat == "true")
  is_regression = cfg.kind == "mlp" and values["dataset"] == "sinusoid"
  n = 1 if is_regression else values["n_way"]
  k, q, batch, steps = (values["k_shot"], values["k_query"], values["meta_batch_size"],
                        meta.inner_steps)
  params = {key: tf.constant(v) for key, v in models.init_params(cfg, 0).items()}
  lrs = {key: tf.constant(np.full(s, meta.inner_lr, np.float32))
         for key, s in maml.learned_rate_shapes(meta, params).items()} or None
  rng = np.random.default_rng(0)
  if is_regression:
    x = lambda m: tf.constant(10 * rng.random((batch, m, 1), np.float32) - 5)
    inputs = {"support_x": x(k), "support_y": x(k), "query_x": x(q), "query_y": x(q)}
  else:
    shape = cfg.input_shape
    labels = lambda m: tf.constant(np.tile(np.repeat(np.arange(n), m), (batch, 1)), tf.int32)
    # float32 draws: float64 ones would be a transient as large as the step (0.6 GB at
    # MiniImagenet meta-batch 32).
    inputs = {"support_x": tf.constant(rng.random((batch, n * k) + shape, np.float32)),
              "support_y": labels(k),
              "query_x": tf.constant(rng.random((batch, n * q) + shape, np.float32)),
              "query_y": labels(q)}
  step = tf.function(functools.partial(maml.meta_gradients, cfg, meta, global_batch=batch),
                     jit_compile=jit == "true")
  if chunk:
    from trainer import learner, optim
    meta_learner = learner.MetaLearner(tf.distribute.get_strategy(), cfg, meta,
                                       optim.AdamConfig(), seed=0, meta_batch_size=batch,
                                       eval_inner_steps=1, jit_compile=jit == "true",
                                       task_chunk=chunk)
    phase = meta_learner._phase(0)  # pylint: disable=protected-access
    step = tf.function(lambda p, r, b: meta_learner._meta_gradients(  # pylint: disable=protected-access
        phase, p, r, b, tf.constant(0, tf.int64)))
  compile_s, median, memory, kind, baseline = timed(tf, step, params, lrs, inputs)
  variant = "+".join(([f"task_chunk={chunk}"] if chunk else []) +
                     (["remat"] if meta.remat else [])) or "default"
  return {"bench": "meta_step", "case": case, "variant": variant, "order": order,
          "jit_compile": jit == "true", "task_chunk": chunk, "remat": meta.remat, "meta_batch_size": batch, "inner_steps": steps, "n_way": n, "k_shot": k,
          "k_query": q, "seconds_per_step": round(median, 4),
          "tasks_per_s": round(batch / median, 1), "first_call_s": round(compile_s, 2),
          "max_rss_mb" if kind == "max_rss" else "gpu_peak_mb": round(memory, 1),
          "net_peak_mb": round(memory - (baseline if kind == "max_rss" else 0.0), 1),
          "device": device(tf)}


def device(tf) -> str:
  gpus = tf.config.list_logical_devices("GPU")
  if gpus:
    return tf.config.experimental.get_device_details(
        tf.config.list_physical_devices("GPU")[0]).get("device_name", "GPU")
  return f"CPU {platform.machine()} x{os.cpu_count()}"


def run_training_loop(records: str, sampler: str) -> dict:
  import numpy as np
  import tensorflow as tf
  from trainer import learner, maml, models, optim, tasks
  task = tasks.FewShotClassification(records, 5, 1, 15, 15, 32, 32, seed=0, sampler=sampler)
  cfg = models.ModelConfig("conv4", task.image_shape, 5, num_filters=64)
  strategy = tf.distribute.OneDeviceStrategy(
      "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0")
  meta_learner = learner.MetaLearner(strategy, cfg, maml.MetaConfig(1, 0.4), optim.AdamConfig(),
                                     seed=0, meta_batch_size=32, eval_inner_steps=1,
                                     jit_compile=bool(tf.config.list_logical_devices("GPU")))
  iterator = task.train_data(strategy, 0)
  meta_learner.train_loop(iterator, tf.constant(1))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    float(meta_learner.train_loop(iterator, tf.constant(FLAGS.steps))["query_loss_post"])
    times.append((time.perf_counter() - start) / FLAGS.steps)
  median = float(np.median(times))
  return {"bench": "training_loop", "case": "omniglot_5w1s", "variant": f"sampler={sampler}",
          "fed_by": "tf.data sampler" if sampler == "host" else "episodes drawn in the step",
          "seconds_per_step": round(median, 4), "tasks_per_s": round(32 / median, 1),
          "device": device(tf)}


def run_pretrain_step(case: str, values: dict, cfg, jit: bool) -> dict:
  """A pretraining config's step (``--mode=pretrain``): one batch's gradient of the 64-way
  (the train classes') classifier, as trainer/pretrain.py takes it."""
  import dataclasses
  import functools
  import numpy as np
  import tensorflow as tf
  from trainer import models, pretrain
  classes = {"miniimagenet": 64, "omniglot": 4112}.get(values["dataset"], 64)
  cfg = dataclasses.replace(cfg, num_outputs=classes)
  batch = values["pretrain_batch_size"]
  params = {key: tf.constant(v) for key, v in models.init_params(cfg, 0).items()}
  rng = np.random.default_rng(0)
  images = tf.constant(rng.random((batch,) + cfg.input_shape, np.float32))
  labels = tf.constant(rng.integers(0, classes, batch), tf.int32)
  step = tf.function(functools.partial(pretrain._gradients, cfg,  # pylint: disable=protected-access
                                       global_batch=batch), jit_compile=jit)
  compile_s, median, memory, kind, baseline = timed(tf, step, params, images, labels)
  return {"bench": "pretrain_step", "case": case, "variant": "default", "jit_compile": jit,
          "batch_size": batch, "classes": classes, "seconds_per_step": round(median, 4),
          "images_per_s": round(batch / median, 1), "first_call_s": round(compile_s, 2),
          "max_rss_mb" if kind == "max_rss" else "gpu_peak_mb": round(memory, 1),
          "net_peak_mb": round(memory - (baseline if kind == "max_rss" else 0.0), 1),
          "device": device(tf)}


def main(_):
  if FLAGS.single:
    print(json.dumps(run_single(FLAGS.single)), flush=True)
    return
  for case in FLAGS.cases:
    for order in FLAGS.orders:
      for jit, chunk, remat, inner in ((j, c, r, i) for j in FLAGS.jit
                                       for c in FLAGS.task_chunks for r in FLAGS.remats
                                       for i in FLAGS.inner_steps_sweep or [""]):
        result = subprocess.run(
            [sys.executable, __file__, f"--single={case},{order},{jit},{chunk},{remat},{inner}",
             f"--steps={FLAGS.steps}"], capture_output=True, text=True)
        line = [l for l in result.stdout.splitlines() if l.startswith("{")]
        if result.returncode or not line:
          print(json.dumps({"bench": "meta_step", "case": case, "order": order,
                            "jit_compile": jit == "true", "error":
                            (result.stderr.strip().splitlines() or ["?"])[-1]}), flush=True)
        else:
          print(line[-1], flush=True)
  if FLAGS.records:
    for sampler in ("host", "device"):  # side by side, in this order, in one sitting
      print(json.dumps(run_training_loop(FLAGS.records, sampler)), flush=True)


if __name__ == "__main__":
  app.run(main)
