"""Memory options keep the meta-gradient exact: task chunks, recomputed inner steps, mixed
precision within its bound."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from helpers import TWO_CPUS, mirrored_over_two_cpus
from numerics import assert_close_f32, relative_difference
from pipeline.errors import UsageError
from trainer import learner, maml, models, optim, tasks


@pytest.mark.slow
@pytest.mark.numerics
def test_task_chunks_and_remat_give_the_same_meta_gradient_as_all_tasks_at_once():
  """Chunks of 1, 2 and 4 tasks, recomputed inner steps, and both, under one device, two
  mirrored replicas and XLA: the same meta-gradient (weights and learned rates), metric sums
  and batch moments."""
  task = tasks.SinusoidRegression(5, 5, 5, 8, 8, seed=0)
  # Batch norm with per-step running statistics: the moments are averaged over chunks too.
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(32, 32), norm="batch_norm",
                           stat_slots=3)
  meta = maml.MetaConfig(2, 0.05, loss="mse", per_step_inner_lr=True)

  def make(strategy, chunk, jit, remat=False):
    return learner.MetaLearner(strategy, cfg, dataclasses.replace(meta, remat=remat),
                               optim.AdamConfig(1e-2), seed=0, meta_batch_size=8,
                               eval_inner_steps=2, jit_compile=jit, task_chunk=chunk)

  def meta_gradient(strategy, chunk, jit, remat=False):
    # The learner's own per-replica computation, all-reduced as in its train step.
    l = make(strategy, chunk, jit, remat)
    batch = next(task.train_data(strategy, 0).batches)
    def replica(b):
      params, lrs = l._values()
      out = l._meta_gradients((False, False), params, lrs, l._inputs(b, l._train_per_replica),
                              tf.constant(0, tf.int64))
      return tf.distribute.get_replica_context().all_reduce("sum", out)
    grads, sums = strategy.experimental_local_results(
        tf.function(lambda b: strategy.run(replica, (b,)))(batch))[0]
    replicas = strategy.num_replicas_in_sync  # moments are averaged, not summed, over them
    sums = {k: v / replicas if k.startswith("moments/") else v for k, v in sums.items()}
    return {k: v.numpy() for k, v in {**grads, **sums}.items()}

  one = tf.distribute.OneDeviceStrategy(TWO_CPUS[0])
  two = mirrored_over_two_cpus()
  refs = {jit: meta_gradient(one, 0, jit) for jit in (False, True)}
  assert any(k.startswith("moments/") for k in refs[False])
  # Second order through batch norm over 5 examples is ill-conditioned: XLA and graph mode,
  # two correct float32 evaluations of one meta-gradient, differ by up to ~6e-3 of an
  # entry's norm (lr/dense0/offset, oneDNN off; ~1e-6 for the moments). That spread is the
  # computation's own rounding sensitivity: chunks, replicas and remat, which add the same
  # terms in other orders (tests/numerics.py), must agree within twice it, each mode with
  # its own reference. A task lost or counted twice is off by O(1/8) and still fails.
  spread = {k: relative_difference(refs[True][k], refs[False][k]) for k in refs[False]}
  assert max(spread.values()) < 2e-2, spread
  for strategy, chunk, jit, remat in ((one, 2, False, False), (one, 1, False, False),
                                      (two, 2, False, False), (one, 4, True, False),
                                      (one, 0, False, True), (two, 0, False, True),
                                      (one, 2, False, True), (one, 0, True, True)):
    got = meta_gradient(strategy, chunk, jit, remat)
    for k, expected in refs[jit].items():
      assert_close_f32(got[k], expected, reduction_length=32, stages=2, at_least=2 * spread[k],
                       err_msg=f"{k} chunk={chunk} jit={jit} remat={remat}")
  # End to end: chunked training follows the same path (losses over three steps).
  losses = []
  for chunk in (0, 2):
    l = make(one, chunk, False)
    means = l.train_loop(task.train_data(one, 0), tf.constant(3))
    losses.append(float(means["query_loss_post"]))
  # Three meta-steps of the sums above.
  assert_close_f32(losses[1], losses[0], reduction_length=32, stages=3 * 2, err_msg="losses")
  with pytest.raises(ValueError, match="--task_chunk=3 does not divide the 8"):
    make(one, 3, False)


def _meta_gradient_error(cfg, batch, dtype, **meta_kwargs):
  """Relative norm of (low-precision - float32) meta-gradient, and the two query losses."""
  import functools
  params = {k: tf.constant(v) for k, v in models.init_params(cfg, 0).items()}
  out = {}
  for name in ("float32", dtype):
    meta = maml.MetaConfig(compute_dtype=name, **meta_kwargs)
    out[name] = tf.function(functools.partial(maml.meta_gradients, cfg, meta,
                                              global_batch=2))(params, None, batch)
  (g32, s32), (glow, slow) = out["float32"], out[dtype]
  assert all(v.dtype == tf.float32 and np.all(np.isfinite(v.numpy())) for v in glow.values())
  diff = np.sqrt(sum(float(tf.reduce_sum(tf.square(glow[k] - g32[k]))) for k in g32))
  norm = np.sqrt(sum(float(tf.reduce_sum(tf.square(g32[k]))) for k in g32))
  return diff / norm, float(s32["query_loss_post"]), float(slow["query_loss_post"])


@pytest.mark.parametrize("dtype,bound", [("bfloat16", 0.25), ("float16", 0.01)])
def test_mixed_precision_meta_gradient_stays_near_float32_mlp(dtype, bound):
  """Second-order sinusoid meta-gradient in low precision, float32 weights and losses;
  measured: bfloat16 0.16 (8-bit mantissa), float16 with loss scaling ~1e-3."""
  rng = np.random.default_rng(0)
  x = lambda n: tf.constant(rng.uniform(-5, 5, (2, n, 1)), tf.float32)
  batch = {"support_x": x(5), "support_y": x(5), "query_x": x(10), "query_y": x(10)}
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(40, 40), norm="none")
  error, loss32, loss_low = _meta_gradient_error(cfg, batch, dtype, inner_steps=2,
                                                 inner_lr=0.01, loss="mse")
  assert error < bound and abs(loss_low - loss32) < 0.02 * loss32, (error, loss32, loss_low)


def test_bfloat16_conv4_meta_gradient_on_cpu_is_bounded():
  """conv4 in bfloat16 on this CPU: oneDNN's bfloat16 convolution gradients accumulate in low
  precision, 0.2-0.3 relative error measured (TPUs accumulate in float32); the losses agree."""
  cfg = models.ModelConfig("conv4", (28, 28, 1), 3, num_filters=16)
  rng = np.random.default_rng(0)
  labels = lambda m: tf.constant(np.tile(np.repeat(np.arange(3), m), (2, 1)), tf.int32)
  batch = {"support_x": tf.constant(rng.uniform(0, 1, (2, 3, 28, 28, 1)), tf.float32),
           "support_y": labels(1),
           "query_x": tf.constant(rng.uniform(0, 1, (2, 6, 28, 28, 1)), tf.float32),
           "query_y": labels(2)}
  error, loss32, loss_low = _meta_gradient_error(cfg, batch, "bfloat16", inner_steps=2,
                                                 inner_lr=0.1)
  assert error < 0.5 and abs(loss_low - loss32) < 0.02 * loss32, (error, loss32, loss_low)


def test_float16_conv4_is_refused_on_cpu_at_start(tmp_path, omniglot_records):
  from helpers import error_line, trainer
  result = trainer("--dataset=omniglot", "--compute_dtype=float16",
                   f"--data_dir={omniglot_records}", f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert "--compute_dtype=float16: TensorFlow has no float16 gradients" in error_line(
      result.stderr)
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.numerics
def test_remat_gives_the_same_meta_gradient_for_maml_mamlpp_anil_and_meta_sgd():
  """Recomputing each inner step in the backward pass (second order through the recomputed
  inner gradient) changes nothing: weights, per-step norm parameters, learned rates, MSL."""
  rng = np.random.default_rng(0)
  B, N = 3, 3

  def batch(shape):
    return {"support_x": tf.constant(rng.normal(size=(B, N) + shape), tf.float32),
            "support_y": tf.constant(np.tile(np.arange(N), (B, 1)), tf.int32),
            "query_x": tf.constant(rng.normal(size=(B, 2 * N) + shape), tf.float32),
            "query_y": tf.constant(np.tile(np.arange(N), (B, 2)), tf.int32)}

  conv = lambda **kw: models.ModelConfig("conv4", (8, 8, 1), N, num_filters=4, **kw)
  cases = {
      "maml": (conv(), maml.MetaConfig(3, 0.4)),
      "mamlpp": (conv(param_slots=4, stat_slots=4),
                 maml.MetaConfig(3, 0.1, per_step_inner_lr=True, msl_iterations=10,
                                 inner_adapt="no_norm")),
      "anil": (conv(), maml.MetaConfig(2, 0.4, inner_adapt="head")),
      "meta_sgd": (models.ModelConfig("mlp", (4,), N, hidden_sizes=(8,)),
                   maml.MetaConfig(2, 0.1, learn_inner_lr=True)),
      "first_order": (conv(), maml.MetaConfig(2, 0.4, first_order=True)),
  }
  for name, (cfg, meta) in cases.items():
    b = batch(cfg.input_shape)
    params = {k: tf.constant(v) for k, v in models.init_params(cfg, 0).items()}
    shapes = maml.learned_rate_shapes(meta, params)
    lrs = {k: tf.constant(0.1 + 0.01 * rng.random(s), tf.float32)
           for k, s in shapes.items()} or None
    got = {}
    for remat in (False, True):
      m = dataclasses.replace(meta, remat=remat)
      grads, sums = tf.function(lambda: maml.meta_gradients(
          cfg, m, params, lrs, b, B, iteration=tf.constant(3, tf.int64)))()
      got[remat] = {**grads, **sums}
    assert all(np.abs(v.numpy()).max() > 0 for k, v in got[False].items()
               if not k.startswith(("support", "query"))), name
    for k, ref in got[False].items():
      # Recomputed inner steps may be scheduled and fused otherwise (tests/numerics.py):
      # 3x3x4-term sums through 3 inner steps of forward, backward and its backward.
      assert_close_f32(got[True][k], ref, reduction_length=36, stages=9, err_msg=f"{name}: {k}")


@pytest.mark.slow
def test_the_benchmark_reports_variants_and_the_plot_draws_them(tmp_path):
  """bench_meta_step.py's lines name their variant and peak memory net of the baseline, and
  plot_memory.py turns a sweep of them into a PNG (sinusoid: seconds, not minutes)."""
  import json
  import subprocess
  import sys

  from helpers import REPO
  lines = []
  for spec in ("sinusoid_5shot,second,false,0,false,1", "sinusoid_5shot,second,false,0,true,2",
               "sinusoid_5shot,second,false,5,true,1"):
    result = subprocess.run([sys.executable, "bench/bench_meta_step.py", f"--single={spec}",
                             "--steps=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines.append(json.loads(result.stdout.strip().splitlines()[-1]))
  assert [r["variant"] for r in lines] == ["default", "remat", "task_chunk=5+remat"]
  assert [r["inner_steps"] for r in lines] == [1, 2, 1]
  assert all(0 <= r["net_peak_mb"] <= r["max_rss_mb"] for r in lines)
  sweep = tmp_path / "sweep.jsonl"
  sweep.write_text("".join(json.dumps(r) + "\n" for r in lines))
  png = tmp_path / "memory.png"
  plot = subprocess.run([sys.executable, "bench/plot_memory.py", str(sweep), f"--output={png}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert plot.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot.stderr
  empty = tmp_path / "empty.jsonl"
  empty.write_text("not json\n")
  bad = subprocess.run([sys.executable, "bench/plot_memory.py", str(empty), f"--output={png}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "no bench_meta_step.py result lines" in bad.stderr


def test_the_peak_window_forgets_earlier_transients_and_sees_the_steps_own_peak():
  """A transient before the window (the benchmark's input generation) must not hide the peak
  inside it: the window restarts the high-water mark from the current resident memory."""
  import importlib.util
  import os


  from helpers import REPO
  if not os.access("/proc/self/clear_refs", os.W_OK):
    pytest.skip("no /proc/self/clear_refs: the high-water mark cannot be restarted here")
  spec = importlib.util.spec_from_file_location(
      "process_memory", os.path.join(REPO, "trainer", "process_memory.py"))
  process_memory = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(process_memory)
  transient = np.ones(96 * 2**20, np.float32)  # 384 MB, touched, then returned to the OS
  del transient
  baseline = process_memory.start_peak_window()
  assert process_memory.max_rss_mb() < baseline + 100
  inside = np.ones(48 * 2**20, np.float32)  # 192 MB
  assert process_memory.max_rss_mb() - baseline >= 180
  del inside


def test_the_pytorch_yardstick_names_the_interpreter_without_torch():
  """bench/peer_torch_func.py runs from a venv of its own; from ours it says so in one line."""
  import importlib.util
  import subprocess
  import sys

  from helpers import REPO
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed in this interpreter")
  result = subprocess.run([sys.executable, "bench/peer_torch_func.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert result.stderr.strip() == (f"{sys.executable} has no torch: run this script from a venv "
                                   "with torch installed (see this file's docstring); it is not "
                                   "a dependency of the toolkit")


@pytest.mark.slow
def test_the_trainer_takes_remat_and_task_chunk_and_records_them(tmp_path):
  import json

  from helpers import SINUSOID, trainer
  run = tmp_path / "run"
  result = trainer(*SINUSOID, "--remat", "--task_chunk=5", "--inner_steps=2",
                   "--num_iterations=20", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads((run / "config.json").read_text())
  assert record["meta"]["remat"] is True and record["flags"]["task_chunk"] == 5
  # Both may change when resuming: they do not change the meta-gradient.
  again = trainer(*SINUSOID, "--inner_steps=2", "--num_iterations=30", f"--model_dir={run}")
  assert again.returncode == 0, again.stderr[-2000:]


# --- the memory planner (--memory_budget, trainer/memory_plan.py) ---------------------------

def _fake_probe(table: dict, calls: list):
  """A probe reading ``table[(task_chunk, remat)] = (peak GB, seconds)``, recording its calls."""
  def probe(values, image_shape, per_replica, candidate):
    calls.append((candidate.task_chunk, candidate.remat))
    peak, seconds = table[(candidate.task_chunk, candidate.remat)]
    return {"peak_bytes": peak * 1e9, "seconds": seconds}
  return probe


def test_the_planner_takes_the_fastest_candidate_that_fits_and_probes_no_more_than_it_needs():
  from trainer import memory_plan
  # 8 tasks a replica: chunks 0 (all), 4, 2, 1; peaks fall with the chunk and with remat.
  table = {(0, False): (8.0, 1.0), (4, False): (5.0, 1.1), (2, False): (3.5, 1.3),
           (1, False): (2.9, 1.8), (0, True): (4.0, 1.5), (4, True): (2.5, 1.6),
           (2, True): (1.5, 1.9), (1, True): (1.0, 2.5)}
  for budget, chosen, probed in (
      (10, (0, False), [(0, False)]),  # everything fits within 90% of 10 GB
      (4.0, (2, False), [(0, False), (4, False), (2, False), (0, True), (4, True)]),
      (3.3, (4, True), [(0, False), (4, False), (2, False), (1, False), (0, True), (4, True)]),
      (1.2, (1, True), None)):
    calls = []
    plan = memory_plan.choose({}, None, 8, int(budget * 1e9), _fake_probe(table, calls))
    assert (plan.chosen.task_chunk, plan.chosen.remat) == chosen, budget
    if probed is not None:
      assert calls == probed, budget
    line = memory_plan.explain(plan, int(budget * 1e9))
    assert line.startswith(f"--memory_budget={budget:.2f} GB: chose "), line
  with pytest.raises(UsageError, match=r"--memory_budget=0.80 GB: nothing fits; the smallest "
                                       r"peak measured was 1.00 GB"):
    memory_plan.choose({}, None, 8, int(0.8e9), _fake_probe(table, []))


@pytest.mark.parametrize("text,size", [("16GB", 16 * 10**9), ("800MB", 8 * 10**8),
                                       ("1.5GiB", int(1.5 * 2**30)), ("2048", 2048)])
def test_sizes_parse_in_decimal_and_binary_units(text, size):
  from trainer import memory_plan
  assert memory_plan.parse_size(text) == size


@pytest.mark.parametrize("text", ["16 XB", "-1GB", "GB", "0MB"])
def test_a_size_that_is_no_size_is_refused_naming_the_flag(text):
  from trainer import memory_plan
  with pytest.raises(UsageError, match=f"--memory_budget={text}: not a size"):
    memory_plan.parse_size(text)


@pytest.mark.slow
def test_what_the_planner_chooses_stays_under_the_budget_when_measured_again():
  """Real probes of the Omniglot conv4 (28 x 28, 5-way 1-shot, 15 query, 32 tasks): its
  all-at-once step needs more than the budget; the choice, probed again in a new process,
  stays under it (net process peak, as bench/ measures it)."""
  from trainer import config, memory_plan
  if not os.access("/proc/self/clear_refs", os.W_OK):
    pytest.skip("no /proc/self/clear_refs: the process peak cannot be measured here")
  values = dict(config.default_values(), dataset="omniglot", k_query=15, meta_batch_size=32)
  budget = 600 * 10**6
  plan = memory_plan.choose(values, [28, 28, 1], 32, budget)
  first = dict(plan.measured)[memory_plan.Candidate(0, False)]
  assert first["peak_bytes"] > budget, first  # so the choice had to save memory
  assert plan.chosen != memory_plan.Candidate(0, False)
  again = memory_plan.probe(values, [28, 28, 1], 32, plan.chosen)
  assert again["peak_bytes"] <= budget, (plan.chosen, again, plan.measured)


@pytest.mark.slow
def test_the_trainer_refuses_a_budget_beside_task_chunk_or_a_bad_size_in_one_line(tmp_path):
  from helpers import SINUSOID, error_line, trainer
  both = trainer(*SINUSOID, "--memory_budget=1GB", "--task_chunk=5",
                 f"--model_dir={tmp_path / 'a'}")
  assert "--memory_budget chooses --task_chunk and --remat itself" in error_line(both.stderr)
  bad = trainer(*SINUSOID, "--memory_budget=lots", f"--model_dir={tmp_path / 'b'}")
  assert "--memory_budget=lots: not a size" in error_line(bad.stderr)
