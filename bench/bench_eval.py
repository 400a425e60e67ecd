#!/usr/bin/env python
"""Evaluation benchmark: seconds per evaluation batch (adaptation plus query), every step
measured against only some (--eval_measured_steps), side by side, as JSON lines.

  python bench/bench_eval.py                                   # ResNet-12 5w1s, 15 steps
  python bench/bench_eval.py --configs=mini_5w1s --measured=0

The variants alternate call by call in one process (A, B, A, B, ...), so a machine that is busy
with something else slows both alike; the ratio is the figure to read. Inputs are random
tensors of the case's evaluation shapes (--eval_batch_size tasks, --eval_k_query, the
evaluation steps) and a freshly initialised model: the cost does not depend on the weights.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

from absl import app, flags  # noqa: E402

import bench_meta_step  # noqa: E402  (its config reader and device name; its flags unused)

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["resnet12_mini_5w1s"], "Image configs (configs/<name>.cfg) to time.")
flags.DEFINE_list("measured", ["0"], "Step counts the cheaper variant measures (the last "
                  "evaluation step is always added), as --eval_measured_steps.")
flags.DEFINE_integer("calls", 4, "Timed calls per variant (after one warm-up call each).")


def run_case(case: str) -> list[dict]:
  import numpy as np
  import tensorflow as tf
  from trainer import maml, meta_flags, models
  from trainer import supervised_config as sc
  values = bench_meta_step.case_values(case)
  shape = {"omniglot": (28, 28, 1), "miniimagenet": (84, 84, 3)}[values["dataset"]]
  cfg = sc.model_config(values, shape)
  meta = sc.meta_config(values)
  steps = meta_flags.eval_inner_steps(values)
  n, k = values["n_way"], values["k_shot"]
  q = values["eval_k_query"] or values["k_query"]
  batch = values["eval_batch_size"] or values["meta_batch_size"]
  params = {key: tf.constant(v) for key, v in models.init_params(cfg, 0).items()}
  lrs = {key: tf.constant(np.full(s, meta.inner_lr, np.float32))
         for key, s in maml.learned_rate_shapes(meta, params).items()} or None
  rng = np.random.default_rng(0)
  labels = lambda m: tf.constant(np.tile(np.repeat(np.arange(n), m), (batch, 1)), tf.int32)
  inputs = {"support_x": tf.constant(rng.random((batch, n * k) + cfg.input_shape, np.float32)),
            "support_y": labels(k),
            "query_x": tf.constant(rng.random((batch, n * q) + cfg.input_shape, np.float32)),
            "query_y": labels(q)}
  chosen = tuple(sorted({int(s) for s in FLAGS.measured} | {steps}))
  variants = {"every_step": None, "measured=" + ",".join(map(str, chosen)): chosen}
  fns = {name: tf.function(functools.partial(maml.evaluate, cfg, meta, steps=steps,
                                             measured=m))
         for name, m in variants.items()}
  times = {name: [] for name in fns}
  for name, fn in fns.items():  # warm-up (tracing)
    tf.nest.map_structure(lambda t: t.numpy(), fn(params, lrs, inputs))
  for _ in range(FLAGS.calls):
    for name, fn in fns.items():
      start = time.perf_counter()
      tf.nest.map_structure(lambda t: t.numpy(), fn(params, lrs, inputs))
      times[name].append(time.perf_counter() - start)
  base = float(np.median(times["every_step"]))
  rows = []
  for name in fns:
    median = float(np.median(times[name]))
    rows.append({"bench": "evaluation", "case": case, "variant": name, "eval_inner_steps": steps,
                 "tasks_per_batch": batch, "n_way": n, "k_shot": k, "k_query": q,
                 "seconds_per_batch": round(median, 3),
                 "seconds_per_episode": round(median / batch, 3),
                 "speedup_vs_every_step": round(base / median, 2),
                 "device": bench_meta_step.device(tf)})
  return rows


def main(argv):
  del argv
  for case in FLAGS.configs:
    for row in run_case(case):
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
