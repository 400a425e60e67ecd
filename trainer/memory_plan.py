"""``--memory_budget=SIZE``: choose task chunks and rematerialisation by measuring them.

Why: second order is where "out of memory" begins (ResNet-12 through 15 inner steps: 11.7 GB
for one task here), and the two exact memory options (:mod:`trainer.learner`'s task chunks,
:mod:`trainer.maml`'s ``remat``) trade time for memory by amounts that depend on the model, the
shapes and the device. So the planner measures instead of guessing: each candidate's
meta-gradient runs in a fresh process (``python -m trainer.memory_plan --probe=...``) on random
inputs of one replica's shapes, on the device at hand, and reports its peak (CPU: the
process's resident high-water mark net of the baseline before the step, as ``bench/`` measures
it; GPU: TensorFlow's allocator peak) and its step time. A fresh process per candidate, because
memory freed by one candidate stays in the allocator and would hide the next one's peak.

Search: all tasks at once without remat first (the fastest when it fits); otherwise, with and
without remat, the largest task chunk that fits (the peak falls as the chunk shrinks); the
faster of the two fitting candidates by their measured times. A candidate fits when its peak
is within 90% of the budget (:data:`HEADROOM`: the same step's peak varies between processes).
Nothing fits: refused in one line
naming the smallest peak found.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import subprocess
import sys
import time

from pipeline.errors import UsageError

# A candidate fits when its measured peak is within this share of the budget: the same step's
# peak varies by a few percent from process to process (allocator, thread pools).
HEADROOM = 0.9
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str = "--memory_budget") -> int:
  """``16GB``, ``800MB``, ``1.5GiB`` -> bytes (decimal GB, binary GiB)."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
  unit = match and match.group(2).upper()
  if not match or unit not in _UNITS or float(match.group(1)) <= 0:
    raise UsageError(f"{flag}={text}: not a size; write e.g. 16GB, 800MB or 1.5GiB")
  return int(float(match.group(1)) * _UNITS[unit])


def show(size_bytes: float) -> str:
  return f"{size_bytes / 1e9:.2f} GB"


@dataclasses.dataclass(frozen=True)
class Candidate:
  task_chunk: int  # 0: all of a replica's tasks at once
  remat: bool

  def describe(self) -> str:
    chunk = f"--task_chunk={self.task_chunk}" if self.task_chunk else "all tasks at once"
    return chunk + (", --remat" if self.remat else "")


def chunks(per_replica: int) -> list[int]:
  """Task chunks from the largest (0: all tasks) to 1: the divisors of a replica's tasks."""
  return [0] + [c for c in range(per_replica - 1, 0, -1) if per_replica % c == 0]


def measure(values: dict, image_shape, per_replica: int, candidate: Candidate,
            steps: int = 3) -> dict:
  """In this process: one replica's meta-gradient under ``candidate`` on random inputs of the
  flags' shapes; ``{"seconds"`` (median of ``steps`` after the first call), ``"first_call_s",
  "peak_bytes"`` (first call included: tracing and compiling take memory too)``, "peak_kind"}``."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from trainer import distribute, learner, maml, models, optim  # pylint: disable=import-outside-toplevel
  from trainer import process_memory  # pylint: disable=import-outside-toplevel
  from trainer import supervised_config as sc  # pylint: disable=import-outside-toplevel
  model = sc.model_config(values, tuple(image_shape) if image_shape else None)
  meta = dataclasses.replace(sc.meta_config(values), remat=candidate.remat)
  jit = {"true": True, "false": False}.get(values["jit_compile"],
                                           distribute.default_jit_compile(model.kind))
  strategy = tf.distribute.get_strategy()
  meta_learner = learner.MetaLearner(
      strategy, model, meta, optim.AdamConfig(), seed=0, meta_batch_size=per_replica,
      eval_inner_steps=1, jit_compile=jit, task_chunk=candidate.task_chunk)
  rng = np.random.default_rng(0)
  n = 1 if image_shape is None else values["n_way"]
  k, q = values["k_shot"], values["k_query"]
  if image_shape is None:
    draw = lambda m: tf.constant(10 * rng.random((per_replica, m, 1), np.float32) - 5)
    batch = {"support_x": draw(k), "support_y": draw(k), "query_x": draw(q), "query_y": draw(q)}
  else:
    labels = lambda m: tf.constant(np.tile(np.repeat(np.arange(n), m), (per_replica, 1)),
                                   tf.int32)
    images = lambda m: tf.constant(rng.random((per_replica, n * m) + tuple(image_shape),
                                              np.float32))
    batch = {"support_x": images(k), "support_y": labels(k), "query_x": images(q),
             "query_y": labels(q)}
  params, lrs = meta_learner._values()  # pylint: disable=protected-access
  phase = meta_learner._phase(0)  # pylint: disable=protected-access
  step = functools.partial(meta_learner._meta_gradients, phase)  # pylint: disable=protected-access
  run = tf.function(lambda p, r, b: step(p, r, b, tf.constant(0, tf.int64)))
  gpu = bool(tf.config.list_logical_devices("GPU"))
  if gpu:
    tf.config.experimental.reset_memory_stats("GPU:0")
    baseline = 0.0
  else:
    baseline = process_memory.start_peak_window()
  start = time.perf_counter()
  tf.nest.map_structure(lambda t: t.numpy(), run(params, lrs, batch))
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), run(params, lrs, batch))
    times.append(time.perf_counter() - start)
  if gpu:
    peak, kind = tf.config.experimental.get_memory_info("GPU:0")["peak"], "gpu_peak"
  else:
    peak, kind = (process_memory.max_rss_mb() - baseline) * 2**20, "net_max_rss"
  return {"seconds": float(np.median(times)), "first_call_s": first, "peak_bytes": peak,
          "peak_kind": kind}


def probe(values: dict, image_shape, per_replica: int, candidate: Candidate) -> dict:
  """:func:`measure` in a fresh process (see the module's docstring for why)."""
  spec = json.dumps({"values": values, "image_shape": image_shape, "per_replica": per_replica,
                     "task_chunk": candidate.task_chunk, "remat": candidate.remat})
  result = subprocess.run([sys.executable, "-m", "trainer.memory_plan", "--probe", spec],
                          capture_output=True, text=True)
  line = [l for l in result.stdout.splitlines() if l.startswith("{")]
  if result.returncode or not line:
    tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
    if "memory" in result.stderr.lower() or result.returncode in (-9, 137):
      return {"failed": f"out of memory ({tail})"}
    raise UsageError(f"--memory_budget: the probe of {candidate.describe()} failed: {tail}")
  return json.loads(line[-1])


@dataclasses.dataclass
class Plan:
  chosen: Candidate
  measured: list  # (candidate, probe result) in the order probed

  def record(self, budget: int) -> dict:
    """What config.json keeps of the choice."""
    return {"budget_bytes": budget, "task_chunk": self.chosen.task_chunk,
            "remat": self.chosen.remat,
            "probes": [dict(dataclasses.asdict(c), **r) for c, r in self.measured]}


def choose(values: dict, image_shape, per_replica: int, budget: int, probe_fn=probe) -> Plan:
  """The fastest candidate whose measured peak fits ``budget`` bytes (module docstring)."""
  measured = []

  def fits(candidate: Candidate):
    result = probe_fn(values, image_shape, per_replica, candidate)
    measured.append((candidate, result))
    return "failed" not in result and result["peak_bytes"] <= HEADROOM * budget, result

  everything = Candidate(0, False)
  ok, _ = fits(everything)
  if ok:
    return Plan(everything, measured)
  fitting = []
  for remat in (False, True):
    for chunk in chunks(per_replica):
      candidate = Candidate(chunk, remat)
      if candidate == everything:
        continue
      ok, result = fits(candidate)
      if ok:
        fitting.append((result["seconds"], candidate))
        break  # smaller chunks are slower and need no less than what already fits
  if not fitting:
    peaks = [r["peak_bytes"] for _, r in measured if "failed" not in r]
    smallest = min(peaks) if peaks else None
    raise UsageError(
        f"--memory_budget={show(budget)}: nothing fits; the smallest peak measured was "
        f"{show(smallest) if smallest is not None else 'none (every probe ran out of memory)'} "
        f"({Candidate(1, True).describe()}); raise the budget or shrink the meta-batch")
  return Plan(min(fitting, key=lambda f: f[0])[1], measured)


def explain(plan: Plan, budget: int) -> str:
  """The one line the trainer logs: what it chose and why."""
  result = dict(plan.measured)[plan.chosen]
  over = [f"{c.describe()} ({r['failed'] if 'failed' in r else show(r['peak_bytes'])})"
          for c, r in plan.measured if "failed" in r or r["peak_bytes"] > HEADROOM * budget]
  slower = [f"{c.describe()} ({show(r['peak_bytes'])}, {r['seconds']:.3g} s)"
            for c, r in plan.measured
            if c != plan.chosen and "failed" not in r and r["peak_bytes"] <= HEADROOM * budget]
  return (f"--memory_budget={show(budget)}: chose {plan.chosen.describe()} (peak "
          f"{show(result['peak_bytes'])}, {result['seconds']:.3g} s per step)"
          + (f"; over budget: {', '.join(over)}" if over else "")
          + (f"; fits but slower: {', '.join(slower)}" if slower else ""))


def main(argv: list[str]) -> int:
  if len(argv) != 3 or argv[1] != "--probe":
    print("usage: python -m trainer.memory_plan --probe JSON (the trainer's probe)",
          file=sys.stderr)
    return 2
  spec = json.loads(argv[2])
  result = measure(spec["values"], spec["image_shape"], spec["per_replica"],
                   Candidate(spec["task_chunk"], spec["remat"]))
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
