#!/usr/bin/env python
"""The memory yardstick of issue 11: second-order MAML as a modern PyTorch per-task loop.

Not part of the toolkit and not run by the tests: PyTorch is no dependency. It answers "how much
memory does the leanest straightforward PyTorch meta-step take at our peer shapes", with the
same architecture as ours (configs/omniglot_5w1s.cfg and configs/mini_5w1s.cfg: conv4, batch
norm with a meta-learned offset and no scale, the inner loop adapting everything but the norm)
and the same bookkeeping as bench/bench_meta_step.py (median seconds per step after a warm-up,
whole-process max RSS, and the peak above the process's baseline before the first step).

Per task: ``torch.func.grad`` of the support loss (its result stays differentiable, hence
second order), the adapted weights' query loss, ``backward()`` accumulating the meta-gradient;
each task's graph is freed before the next is built, which is what makes a per-task loop lean.

  python3.11 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch numpy
  /tmp/venv-torch/bin/python bench/peer_torch_func.py --cases=peer_omniglot_5w1s_q15,peer_mini_5w1s_q15

Prints one JSON line per case, in the fields of bench_meta_step.py's (``variant``:
``torch_func_per_task``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

# trainer/process_memory.py by its path: this runs in a PyTorch virtualenv without the project.
_spec = importlib.util.spec_from_file_location(
    "process_memory", Path(__file__).resolve().parents[1] / "trainer" / "process_memory.py")
process_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(process_memory)

# The peer shapes of bench_meta_step.PEERS with their configs' architectures (kept here as
# numbers so that this script needs neither TensorFlow nor the trainer).
CASES = {
    "peer_omniglot_5w1s_q15": dict(image=(1, 28, 28), filters=64, downsample="stride",
                                   features="mean", n_way=5, k_shot=1, k_query=15,
                                   meta_batch_size=32, inner_steps=1, inner_lr=0.4),
    "peer_mini_5w1s_q15": dict(image=(3, 84, 84), filters=32, downsample="maxpool",
                               features="flatten", n_way=5, k_shot=1, k_query=15,
                               meta_batch_size=4, inner_steps=5, inner_lr=0.01),
}


def run_single(case: str, steps: int, threads: int) -> dict:
  import numpy as np
  import torch
  import torch.nn.functional as F
  from torch.func import grad

  torch.set_num_threads(threads)
  c = CASES[case]
  channels, side, _ = c["image"]
  f = c["filters"]
  stride = 2 if c["downsample"] == "stride" else 1
  gen = torch.Generator().manual_seed(0)

  def glorot(*shape):
    fan_in = shape[1] * shape[2] * shape[3] if len(shape) == 4 else shape[1]
    fan_out = shape[0] * shape[2] * shape[3] if len(shape) == 4 else shape[0]
    limit = (6.0 / (fan_in + fan_out)) ** 0.5
    return ((torch.rand(*shape, generator=gen) * 2 - 1) * limit).requires_grad_()

  params, cin, out_side = {}, channels, side
  for i in range(4):
    params[f"conv{i}"] = glorot(f, cin, 3, 3)
    params[f"offset{i}"] = torch.zeros(f, requires_grad=True)
    cin = f
    out_side = -(-out_side // 2) if stride == 2 else out_side // 2
  width = f if c["features"] == "mean" else f * out_side * out_side
  params["out_w"] = (torch.randn(c["n_way"], width, generator=gen) * 0.01).requires_grad_()
  params["out_b"] = torch.zeros(c["n_way"], requires_grad=True)
  adapted = [k for k in params if not k.startswith("offset")]

  def forward(p, x):
    h = x
    for i in range(4):
      h = F.conv2d(h, p[f"conv{i}"], stride=stride, padding=1)
      h = F.batch_norm(h, None, None, None, p[f"offset{i}"], training=True, eps=1e-3)
      h = F.relu(h)
      if stride == 1:
        h = F.max_pool2d(h, 2)
    h = h.mean(dim=(2, 3)) if c["features"] == "mean" else h.flatten(1)
    return F.linear(h, p["out_w"], p["out_b"])

  def support_loss(fast, frozen, x, y):
    # The original code's reduction (ours: --loss_reduction=original): per-example loss / K,
    # summed over the N*K support examples.
    return F.cross_entropy(forward({**frozen, **fast}, x), y, reduction="sum") / c["k_shot"]

  n, k, q, b = c["n_way"], c["k_shot"], c["k_query"], c["meta_batch_size"]
  rng = np.random.default_rng(0)
  support_x = torch.from_numpy(rng.random((b, n * k) + c["image"], np.float32))
  query_x = torch.from_numpy(rng.random((b, n * q) + c["image"], np.float32))
  support_y = torch.arange(n).repeat_interleave(k)
  query_y = torch.arange(n).repeat_interleave(q)
  inner_grad = grad(support_loss)

  def meta_step():
    for p in params.values():
      p.grad = None
    for t in range(b):
      frozen = {key: v for key, v in params.items() if key not in adapted}
      fast = {key: params[key] for key in adapted}
      for _ in range(c["inner_steps"]):
        g = inner_grad(fast, frozen, support_x[t], support_y)
        fast = {key: fast[key] - c["inner_lr"] * g[key] for key in adapted}
      loss = F.cross_entropy(forward({**frozen, **fast}, query_x[t]), query_y) / b
      loss.backward()
    return {key: v.grad for key, v in params.items()}

  baseline = process_memory.start_peak_window()
  start = time.perf_counter()
  meta_step()
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    meta_step()
    times.append(time.perf_counter() - start)
  peak = process_memory.max_rss_mb()
  median = float(np.median(times))
  return {"bench": "meta_step", "case": case, "variant": "torch_func_per_task",
          "framework": f"torch {torch.__version__}", "order": "second",
          "meta_batch_size": b, "inner_steps": c["inner_steps"], "n_way": n, "k_shot": k,
          "k_query": q, "seconds_per_step": round(median, 4),
          "tasks_per_s": round(b / median, 1), "first_call_s": round(first, 2),
          "max_rss_mb": round(peak, 1), "net_peak_mb": round(peak - baseline, 1),
          "baseline_mb": round(baseline, 1), "threads": threads}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--single", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if importlib.util.find_spec("torch") is None:
    sys.exit(f"{sys.executable} has no torch: run this script from a venv with torch installed "
             "(see this file's docstring); it is not a dependency of the toolkit")
  if args.single:
    print(json.dumps(run_single(args.single, args.steps, args.threads)), flush=True)
    return
  for case in args.cases.split(","):
    if case not in CASES:
      sys.exit(f"--cases: unknown case {case!r}; known: {', '.join(CASES)}")
    # A fresh process per case, so that each max RSS is its own.
    out = subprocess.run([sys.executable, __file__, f"--single={case}", f"--steps={args.steps}",
                          f"--threads={args.threads}"], capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    print(lines[-1] if lines and not out.returncode else json.dumps(
        {"case": case, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}), flush=True)


if __name__ == "__main__":
  main()
