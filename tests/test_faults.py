"""Faults a real run meets, each played end to end: what the trainer does, in one line.

Changed settings on an existing model_dir, two runs on one model_dir, damaged records found at
start-up, a corrupt newest checkpoint, Ctrl-C, logs past the restored step, divergence, a
misspelled split, a builder that cannot write its output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from helpers import (FAST_BEAM, REPO, SINUSOID, checkpoint_step, error_line, free_ports,
                      make_tiny_omniglot, trainer)
from pipeline import datasets
from pipeline.errors import UsageError



def steps_logged(run: Path, key: str = "train/support_loss_pre") -> list[int]:
  """Steps of the metrics.jsonl lines holding ``key`` (training lines by default)."""
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if key in r]


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory) -> Path:
  run = tmp_path_factory.mktemp("faults") / "run"
  result = trainer(*SINUSOID, "--num_iterations=30", "--checkpoint_every=10",
                   f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  return run


# --- the model_dir remembers its settings ------------------------------------------------------


@pytest.mark.slow
def test_config_json_records_the_flags_and_resolved_model(sinusoid_run):
  record = json.loads((sinusoid_run / "config.json").read_text())
  assert record["flags"]["dataset"] == "sinusoid" and record["flags"]["k_shot"] == 5
  assert record["model"]["kind"] == "mlp" and record["model"]["norm"] == "none"
  assert record["meta"]["inner_lr"] == 0.01 and record["eval_inner_steps"] == 3
  assert record["code_version"]


def test_eval_with_a_changed_architecture_is_refused_and_keeps_the_report(sinusoid_run):
  before = (sinusoid_run / "eval_test.json").read_text()
  result = trainer(*SINUSOID, "--mode=eval", "--norm=layer_norm", "--hidden_sizes=40,41",
                   f"--model_dir={sinusoid_run}")
  assert result.returncode == 1
  line = error_line(result.stderr)
  assert "--hidden_sizes=40,40 (now 40,41)" in line and "--norm=none (now layer_norm)" in line
  assert (sinusoid_run / "eval_test.json").read_text() == before


@pytest.mark.slow
def test_resume_with_changed_settings_is_refused_but_run_length_may_change(sinusoid_run):
  result = trainer(*SINUSOID, "--num_iterations=40", "--learn_inner_lr",
                   f"--model_dir={sinusoid_run}")
  assert result.returncode == 1 and "--learn_inner_lr=False (now True)" in error_line(
      result.stderr)
  assert checkpoint_step(sinusoid_run) == 30
  longer = trainer(*SINUSOID, "--num_iterations=40", "--checkpoint_every=10",
                   "--eval_episodes=10", "--mode=train", f"--model_dir={sinusoid_run}")
  assert longer.returncode == 0, longer.stderr[-2000:]
  assert checkpoint_step(sinusoid_run) == 40


def test_a_cosine_run_resumed_with_another_length_is_refused(tmp_path):
  """The cosine schedule anneals over --num_iterations: another length would silently change
  the meta learning rate of every remaining step, so only eval may name another length. The
  rule is the supervised families' own (Family.fixed_on_resume), not the runner's."""
  from trainer import family
  from trainer import model_dir as guard
  images = family.family_of("omniglot")
  flags = {"meta_lr_schedule": "cosine", "num_iterations": 60000, "mode": "train"}
  guard.write_run_record(tmp_path, {"flags": flags})
  with pytest.raises(UsageError, match=r"--num_iterations=60000 \(now 3000\)"):
    guard.check_run_record(tmp_path, {"flags": {**flags, "num_iterations": 3000}}, images,
                           training=True)
  guard.check_run_record(tmp_path, {"flags": {**flags, "num_iterations": 3000, "mode": "eval"}},
                         images, training=False)
  constant = tmp_path / "constant"
  constant.mkdir()
  guard.write_run_record(constant, {"flags": {**flags, "meta_lr_schedule": "constant"}})
  guard.check_run_record(constant, {"flags": {**flags, "meta_lr_schedule": "constant",
                                              "num_iterations": 3000}}, images, training=True)
  rl = family.family_of("rl")  # no schedule over the length: RL may resume longer
  guard.check_run_record(tmp_path, {"flags": {**flags, "num_iterations": 3000}}, rl,
                         training=True)


def test_a_run_recorded_before_a_flag_existed_resumes_at_its_default_only(tmp_path):
  """A newer version's flag is absent from an older run's record: that run ran as its default,
  so resuming with the default passes and any other value is refused."""
  from trainer import family, supervised_config  # noqa: F401  (defines --resnet_widths)
  from trainer import model_dir as guard
  images = family.family_of("omniglot")
  guard.write_run_record(tmp_path, {"flags": {"mode": "train", "model": "conv4"}})
  default = ["64", "160", "320", "640"]
  guard.check_run_record(tmp_path, {"flags": {"mode": "train", "model": "conv4",
                                              "resnet_widths": default}}, images, training=True)
  with pytest.raises(UsageError, match=r"--resnet_widths=.*64.*160.*\(now .*8.*\)"):
    guard.check_run_record(tmp_path, {"flags": {"mode": "train", "model": "conv4",
                                                "resnet_widths": ["8"] * 4}}, images,
                           training=True)


@pytest.mark.slow
def test_the_default_mode_refuses_a_cosine_run_resumed_with_another_length(tmp_path):
  """The trainer's default mode (train_eval) trains too, so it refuses as --mode=train does;
  meta-testing the same run may name another length."""
  run = tmp_path / "run"
  cosine = (*SINUSOID, "--meta_lr_schedule=cosine", "--checkpoint_every=10")
  first = trainer(*cosine, "--num_iterations=20", f"--model_dir={run}")
  assert first.returncode == 0, first.stderr[-2000:]
  report = (run / "eval_test.json").read_text()
  longer = trainer(*cosine, "--num_iterations=40", f"--model_dir={run}")
  assert longer.returncode == 1
  assert "--num_iterations=20 (now 40)" in error_line(longer.stderr)
  assert checkpoint_step(run) == 20 and (run / "eval_test.json").read_text() == report
  evaluated = trainer(*cosine, "--num_iterations=40", "--mode=eval", f"--model_dir={run}")
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]


@pytest.mark.slow
def test_eval_of_a_step_number_uses_that_checkpoint_or_lists_the_kept_ones(tmp_path):
  """ckpt/ rotates (the newest 3: 30, 40, 50); --keep_checkpoint_every=20 keeps 20 and 40 in
  kept/ for good, and a step meta-test finds either folder's."""
  run = tmp_path / "run"
  result = trainer(*SINUSOID, "--num_iterations=50", "--checkpoint_every=10",
                   "--keep_checkpoint_every=20", "--mode=train", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(p.name for p in (run / "kept").glob("*.index")) == ["ckpt-20.index",
                                                                    "ckpt-40.index"]
  for step, folder in ((20, "kept"), (30, "ckpt")):
    done = trainer(*SINUSOID, "--num_iterations=50", "--mode=eval", f"--eval_checkpoint={step}",
                   f"--model_dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((run / f"eval_test_step{step}.json").read_text())
    assert report["checkpoint"].endswith(f"{folder}/ckpt-{step}") and report["step"] == step
  missing = trainer(*SINUSOID, "--num_iterations=50", "--mode=eval", "--eval_checkpoint=10",
                    f"--model_dir={run}")
  assert "--eval_checkpoint=10: no checkpoint of that step" in error_line(missing.stderr)
  assert "(kept: 20, 30, 40, 50;" in error_line(missing.stderr)


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_not_half_restored(tmp_path, sinusoid_run):
  """Without config.json (a run older than it), the strict restore still refuses."""
  run = tmp_path / "copy"
  result = trainer(*SINUSOID, "--num_iterations=10", "--checkpoint_every=10", "--mode=train",
                   f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-2000:]
  (run / "config.json").unlink()
  result = trainer(*SINUSOID, "--mode=eval", "--hidden_sizes=8,8", f"--model_dir={run}")
  assert result.returncode == 1 and "ckpt-10" in error_line(result.stderr)
  assert not (run / "eval_test.json").exists()


# --- one run per model_dir -----------------------------------------------------------------------


def start_long_run(run: Path, logged: int, checkpoint_every: int = 100000) -> subprocess.Popen:
  """A sinusoid run far longer than any test, returned once it has logged ``logged`` lines."""
  proc = subprocess.Popen([sys.executable, "-m", "trainer.main", *SINUSOID,
                           "--num_iterations=1000000", f"--checkpoint_every={checkpoint_every}",
                           f"--model_dir={run}"], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (run / "metrics.jsonl").exists() or len(steps_logged(run)) < logged:
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      raise AssertionError(f"the run did not log {logged} lines: {proc.stderr.read()[-2000:]}")
    time.sleep(0.05)
  return proc


@pytest.mark.slow
def test_a_second_run_on_a_model_dir_in_use_is_refused_naming_the_holder(tmp_path):
  run = tmp_path / "run"
  proc = start_long_run(run, 1)
  try:
    second = trainer(*SINUSOID, "--num_iterations=1000000", f"--model_dir={run}")
    assert second.returncode == 1
    assert f"in use by process {proc.pid}" in error_line(second.stderr)
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
  assert proc.returncode == 0 and not (run / ".lock").exists()  # released on exit


def test_a_checkpoint_rotated_away_while_copied_is_chosen_again(tmp_path, monkeypatch):
  from trainer import loop

  saved = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])).save(str(tmp_path / "ckpt"))
  choices = iter([str(tmp_path / "gone-7"), saved])  # the first was deleted by rotation
  monkeypatch.setattr(loop.guard, "choose_checkpoint", lambda model_dir, which: next(choices))
  target = tf.train.Checkpoint(v=tf.Variable([0.0, 0.0]))
  cfg = types.SimpleNamespace(model_dir=tmp_path, eval_checkpoint="best")
  assert loop._restore_a_copy(target, cfg) == saved
  np.testing.assert_array_equal(target.v.numpy(), [1.0, 2.0])


@pytest.mark.slow
def test_meta_testing_runs_beside_a_live_training_run_that_rotates_checkpoints(tmp_path):
  """--mode=eval takes no lock: it restores a private copy of the checkpoint (the live run
  keeps saving and deleting old ones meanwhile) and writes only its own report."""
  run = tmp_path / "run"
  proc = start_long_run(run, 1, checkpoint_every=50)
  try:
    deadline = time.time() + 120
    while tf.train.latest_checkpoint(str(run / "ckpt")) is None and time.time() < deadline:
      time.sleep(0.05)
    results = [trainer(*SINUSOID, "--mode=eval", "--eval_checkpoint=latest",
                       f"--model_dir={run}")]
    still_training = proc.poll() is None
    steps_before_stop = max(steps_logged(run))
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  assert still_training and proc.returncode == 0
  report = json.loads((run / "eval_test_latest.json").read_text())
  assert report["checkpoint"].startswith(str(run / "ckpt" / "ckpt-"))
  assert 0 < report["step"] <= steps_before_stop
  assert not list(run.glob(".*.partial")) and not (run / ".lock").exists()


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  import socket
  (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                         "since": 0}))
  result = trainer(*SINUSOID, "--num_iterations=10", "--mode=train", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "stale lock" in result.stderr and not (run / ".lock").exists()


# --- data checked before the first step ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("tiny")
  src = make_tiny_omniglot(root / "src", layout="folder")
  out = root / "records"
  datasets.build_dataset("omniglot", source=src, output=out, split_scheme="lake",
                         beam_args=FAST_BEAM)
  return out


def damaged_copy(records: Path, target: Path) -> Path:
  import shutil
  shutil.copytree(records, target)
  return target


OMNIGLOT = ["--dataset=omniglot", "--n_way=2", "--k_shot=1", "--k_query=1",
            "--meta_batch_size=2", "--num_filters=4", "--num_iterations=4", "--eval_every=2",
            "--val_episodes=2", "--eval_episodes=2", "--log_every=2"]


def test_a_truncated_val_shard_is_named_before_the_first_step(tiny_records, tmp_path):
  records = damaged_copy(tiny_records, tmp_path / "records")
  manifest = json.loads((records / "manifest.json").read_text())
  shard = records / manifest["splits"]["val"]["shards"][0]["file"]
  shard.write_bytes(shard.read_bytes()[:-7])
  run = tmp_path / "run"
  result = trainer(*OMNIGLOT, f"--data_dir={records}", f"--model_dir={run}")
  assert result.returncode == 1
  line = error_line(result.stderr)
  assert str(shard) in line and "truncated or corrupt" in line
  assert not (run / "ckpt").exists() and not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_record_counts_always_and_sha256_on_request(tiny_records, tmp_path):
  records = damaged_copy(tiny_records, tmp_path / "records")
  manifest = json.loads((records / "manifest.json").read_text())
  manifest["splits"]["test"]["shards"][0]["sha256"] = "0" * 64
  (records / "manifest.json").write_text(json.dumps(manifest))
  run = tmp_path / "run"
  ok = trainer(*OMNIGLOT, f"--data_dir={records}", f"--model_dir={run}")
  assert ok.returncode == 0, ok.stderr[-2000:]
  verified = trainer(*OMNIGLOT, f"--data_dir={records}", f"--model_dir={run}", "--mode=eval",
                     "--verify_records")
  assert verified.returncode == 1 and "SHA-256 differs" in error_line(verified.stderr)
  manifest["splits"]["train"]["shards"][0]["num_records"] += 1
  (records / "manifest.json").write_text(json.dumps(manifest))
  counted = trainer(*OMNIGLOT, f"--data_dir={records}", f"--model_dir={tmp_path / 'run2'}")
  assert counted.returncode == 1 and "the manifest says" in error_line(counted.stderr)


def test_a_misspelled_eval_split_is_refused_at_start_for_every_task(tiny_records, tmp_path):
  for args in (SINUSOID, [*OMNIGLOT, f"--data_dir={tiny_records}"]):
    result = trainer(*args, "--eval_split=tset", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 1 and "--eval_split=tset" in error_line(result.stderr)
    assert not (tmp_path / "run" / "ckpt").exists()


# --- checkpoints and logs ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  run = tmp_path / "run"
  first = trainer(*SINUSOID, "--num_iterations=30", "--checkpoint_every=10", "--mode=train",
                  f"--model_dir={run}")
  assert first.returncode == 0, first.stderr[-2000:]
  data = next((run / "ckpt").glob("ckpt-30.data*"))
  data.write_bytes(data.read_bytes()[:40])
  resumed = trainer(*SINUSOID, "--num_iterations=40", "--checkpoint_every=10", "--mode=train",
                    f"--model_dir={run}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "ckpt-30 is corrupt" in resumed.stderr and "resumed from" in resumed.stderr
  assert (run / "ckpt" / "corrupt" / data.name).exists()  # kept aside, not deleted
  assert checkpoint_step(run) == 40
  steps = steps_logged(run)
  assert steps == sorted(steps) and steps.count(30) == 1  # steps 21-30 logged once


@pytest.mark.slow
def test_ctrl_c_saves_the_step_exits_130_and_a_second_resume_logs_no_duplicates(tmp_path):
  run = tmp_path / "run"
  proc = start_long_run(run, 3)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert "SIGINT: saved step" in err and "Traceback" not in err
  saved = checkpoint_step(run)
  assert saved == steps_logged(run)[-1]  # nothing lost since the last log
  # A crash after more logging: the resume drops the lines past the restored step.
  with open(run / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": saved + 10, "train/support_loss_pre": 1.0}) + "\n")
  resumed = trainer(*SINUSOID, f"--num_iterations={saved + 20}", "--mode=train",
                    f"--model_dir={run}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  steps = steps_logged(run)
  assert steps == sorted(steps) and len(steps) == len(set(steps)), steps[-5:]
  assert any(".restart" in p.name for p in (run / "tb").iterdir())  # TensorBoard's purge


def test_divergence_never_leaves_exploded_weights_as_the_good_checkpoint(tmp_path):
  run = tmp_path / "run"
  result = trainer(*SINUSOID, "--num_iterations=300", "--checkpoint_every=1",
                   "--steps_per_loop=1", "--log_every=1", "--meta_lr=1", "--inner_lr=0.5",
                   "--mode=train", f"--model_dir={run}")
  assert result.returncode == 2
  line = error_line(result.stderr)
  assert "non-finite training loss or parameters" in line and "/diverged" in line
  assert list((run / "ckpt" / "diverged").glob("ckpt-*.index"))
  good = tf.train.latest_checkpoint(str(run / "ckpt"))
  assert good is None or good in line
  if good:
    reader = tf.train.load_checkpoint(good)
    params = [n for n in reader.get_variable_to_shape_map() if n.startswith("params/")]
    assert params
    for name in params:
      value = reader.get_tensor(name)
      assert np.all(np.isfinite(value)) and np.abs(value).max() < 1e6, name


def test_builder_output_it_cannot_write_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  src = make_tiny_omniglot(tmp_path / "src", layout="folder")
  result = subprocess.run([sys.executable, "tools/build_tfrecords.py", "--dataset=omniglot",
                           f"--source={src}", f"--output={blocker / 'records'}", "--split=lake"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 1
  assert str(blocker) in error_line(result.stderr, "build_tfrecords: error:")
  assert os.path.isfile(blocker)


# --- preemption across workers -------------------------------------------------------------------


def start_workers(run: Path, ports: list[int], iterations: int) -> list[subprocess.Popen]:
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  procs = []
  for index in range(len(ports)):
    env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster,
                                                 "task": {"type": "worker", "index": index}}))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "trainer.main", *SINUSOID, "--strategy=multi_worker",
         f"--num_iterations={iterations}", "--checkpoint_every=100000", "--steps_per_loop=5",
         "--mode=train", f"--model_dir={run}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True))
  return procs


@pytest.mark.slow
def test_sigterm_to_one_worker_checkpoints_every_worker_at_the_same_step(tmp_path):
  run = tmp_path / "run"
  procs = start_workers(run, free_ports(2), 1000000)
  try:
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or len(steps_logged(run)) < 2:
      assert all(p.poll() is None for p in procs) and time.time() < deadline, \
          [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # the non-chief worker
    errs = [p.communicate(timeout=240)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err
  saved = checkpoint_step(run)
  assert saved > 0 and saved % 5 == 0 and "preemption of a worker: saved step" in errs[0]
  assert f"saved step {saved} " in errs[1]  # the same step on the other worker
  resumed = start_workers(run, free_ports(2), saved + 10)
  errs = [p.communicate(timeout=240)[1] for p in resumed]
  for p, err in zip(resumed, errs):
    assert p.returncode == 0, err[-3000:]
  assert f"resumed from {run / 'ckpt' / f'ckpt-{saved}'}" in errs[0]
  assert checkpoint_step(run) == saved + 10


@pytest.mark.slow
def test_a_worker_lost_outright_ends_the_other_with_one_line_naming_it(tmp_path):
  run = tmp_path / "run"
  procs = start_workers(run, free_ports(2), 1000000)
  try:
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or len(steps_logged(run)) < 2:
      assert all(p.poll() is None for p in procs) and time.time() < deadline
      time.sleep(0.1)
    procs[1].kill()
    _, err = procs[0].communicate(timeout=240)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert procs[0].returncode == 1
  line = error_line(err)
  # Named by the heartbeat monitor, or (a reset connection) as the cluster's other worker.
  assert "a worker was lost (/job:worker/" in line and "task:1" in line, line
  assert not (run / ".lock").exists()
