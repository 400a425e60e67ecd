"""The trainer end to end: flags, resume after SIGKILL, SIGTERM, divergence, strategies, results."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from helpers import (REPO, SINUSOID, TWO_CPUS, checkpoint_step, free_ports, mirrored_over_two_cpus,
                     trainer)
from numerics import assert_close_f32


def final_params(model_dir: Path) -> dict[str, np.ndarray]:
  reader = tf.train.load_checkpoint(str(model_dir / "ckpt"))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if k.startswith("params/")}


# --- start-up errors -------------------------------------------------------------------------


def test_unknown_flag_in_a_flagfile_fails_at_start(tmp_path):
  flagfile = tmp_path / "typo.cfg"
  flagfile.write_text("# a comment\n--dataset=sinusoid\n--n_wya=5\n")
  result = trainer(f"--flagfile={flagfile}", f"--model_dir={tmp_path / 'run'}")
  assert result.returncode != 0 and "n_wya" in result.stderr
  assert not (tmp_path / "run").exists()


def test_n_way_beyond_the_classes_of_a_split_is_named(tmp_path, mini_records):
  result = trainer("--dataset=miniimagenet", f"--data_dir={mini_records}", "--n_way=17",
                   f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert "--n_way=17: split 'val'" in result.stderr and "16 classes" in result.stderr


def test_evaluation_steps_to_measure_beyond_those_taken_are_refused_by_name(tmp_path):
  result = trainer(*SINUSOID, "--eval_inner_steps=5", "--eval_measured_steps=0,9",
                   f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert ("--eval_measured_steps=0,9: 9 is beyond the 5 evaluation steps (--eval_inner_steps)"
          in result.stderr)
  assert not (tmp_path / "run").exists()


def test_records_of_another_dataset_are_refused(tmp_path, mini_records):
  result = trainer("--dataset=omniglot", f"--data_dir={mini_records}",
                   f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 1 and "holds 'miniimagenet' records" in result.stderr


def test_a_flag_of_another_task_family_is_refused_not_ignored(tmp_path):
  result = trainer(*SINUSOID, "--n_way=20", "--num_filters=8", f"--model_dir={tmp_path / 'r'}")
  assert result.returncode == 1
  assert "--n_way, --num_filters do(es) not apply to --dataset=sinusoid" in result.stderr
  result = trainer("--dataset=rl", "--learn_inner_lr", "--jit_compile=true",
                   f"--model_dir={tmp_path / 'r'}")
  assert result.returncode == 1
  assert "--jit_compile, --learn_inner_lr do(es) not apply to --dataset=rl" in result.stderr
  assert not (tmp_path / "r").exists()


def test_each_flag_is_defined_once_in_the_module_of_the_group_that_reads_it():
  """The runner's group and the families' groups partition the trainer's flags, and each
  group's flags are absl flags of its own module (so --helpfull lists them under it)."""
  from absl import flags
  from trainer import config, family
  groups = {id(g): g for f in family.FAMILIES for g in f.groups()}
  groups[id(config.RUN)] = config.RUN
  names = [n for g in groups.values() for n in g.names]
  assert len(names) == len(set(names)) and set(names) == set(config.flag_names())
  for group in groups.values():
    defined = {f.name for f in flags.FLAGS.get_flags_for_module(group.module)}
    assert set(group.names) <= defined, (group.title, set(group.names) - defined)
    assert group.may_change <= set(group.names)
  rl = next(f for f in family.FAMILIES if f.name == "rl")
  assert {"max_kl", "env", "num_workers"} <= set(rl.flag_names())
  assert "max_kl" not in config.RUN.names and "jit_compile" not in rl.flag_names()


def test_model_dir_defaults_to_runs_named_after_the_last_flagfile():
  from trainer import config
  argv = ["main", "--flagfile=configs/demo.cfg", "--flagfile", "configs/mini_5w1s.cfg"]
  assert config.flagfile_of(argv) == "configs/mini_5w1s.cfg"
  assert config.default_model_dir(config.flagfile_of(argv)) == REPO / "runs" / "mini_5w1s"
  assert config.default_model_dir(config.flagfile_of(["main"])) == REPO / "runs" / "default"


def test_every_paper_config_parses_and_documents_itself():
  configs = sorted((REPO / "configs").glob("*.cfg"))
  assert {c.stem for c in configs} >= {
      "omniglot_5w1s", "omniglot_5w5s", "omniglot_20w1s", "omniglot_20w5s", "mini_5w1s",
      "mini_5w5s", "sinusoid_5shot", "sinusoid_10shot"}
  for cfg in configs:
    text = cfg.read_text()
    assert f"--flagfile=configs/{cfg.name}" in text and "Expected:" in text and "Time:" in text
  result = trainer("--flagfile=configs/sinusoid_5shot.cfg", "--helpfull")
  assert "--[no]learn_inner_lr: Meta-SGD" in result.stdout  # absl exits 1 after help
  values = config_values(*(f"{name}.cfg" for name in (
      "omniglot_5w1s", "omniglot_5w5s", "omniglot_20w1s", "omniglot_20w5s", "mini_5w1s",
      "mini_5w5s")))
  for name, flags_ in values.items():  # the paper's experiments run the original's settings
    assert flags_["loss_reduction"] == "original", name
    assert "Fidelity:" in (REPO / "configs" / name).read_text(), name


def config_values(*names: str) -> dict[str, dict]:
  """Each config's flag values as the trainer parses them (nested --flagfile lines followed),
  in a subprocess: absl's flags are process-wide."""
  script = textwrap.dedent("""
      import json, sys
      from absl import flags
      from trainer import config
      out = {}
      for name in sys.argv[1:]:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["x", f"--flagfile=configs/{name}"])
        out[name] = config.flag_values()
      print(json.dumps(out))
  """)
  result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.splitlines()[-1])


def test_a_variant_config_includes_its_base_and_states_only_what_differs():
  """``--flagfile=configs/<base>.cfg`` first, then only lines that change the base's values,
  and the header names the base."""
  variants = {}
  for path in sorted((REPO / "configs").glob("*.cfg")):
    flag_lines = [l.strip() for l in path.read_text().splitlines() if l.startswith("--")]
    bases = [l.split("=", 1)[1] for l in flag_lines if l.startswith("--flagfile=")]
    if bases:
      assert len(bases) == 1 and flag_lines[0].startswith("--flagfile="), path.name
      assert f"Variant of {bases[0]}" in path.read_text(), path.name
      variants[path.name] = (Path(bases[0]).name, flag_lines[1:])
  assert {"anil_omniglot_5w1s.cfg", "omniglot_20w5s.cfg", "rl_ant_goal.cfg"} <= set(variants)
  values = config_values(*variants, *{base for base, _ in variants.values()})
  for name, (base, lines) in variants.items():
    changed = {k for k in values[name] if values[name][k] != values[base][k]}
    stated = {l[2:].split("=", 1)[0] for l in lines}
    stated = {k[2:] if k.startswith("no") and k[2:] in values[name] else k for k in stated}
    assert stated == changed, (name, stated ^ changed)


@pytest.mark.slow
def test_every_config_builds_its_task_and_learner(omniglot_records, mini_records, cifar_records):
  """Each flagfile through its family's factory: flags that apply, a task, a learner."""
  script = textwrap.dedent("""
      import importlib.util, sys
      from pathlib import Path
      import tensorflow as tf
      from absl import flags
      from trainer import config, family
      from rl import envs
      metaworld = importlib.util.find_spec("metaworld") is not None
      records = dict(zip(["omniglot", "miniimagenet", "cifarfs", "fc100"], sys.argv[1:]))
      FLAGS = flags.FLAGS
      for path in sorted(Path("configs").glob("*.cfg")):
        FLAGS.unparse_flags()
        FLAGS(["x", f"--flagfile={path}"])
        values = config.flag_values()
        chosen = family.family_of(values["dataset"])
        family.refuse_inapplicable(chosen, {n for n in values if FLAGS[n].present},
                                   config.RUN.names)
        values["data_dir"] = records.get(values["dataset"])
        if values.get("env") in envs.METAWORLD_FAMILIES and not metaworld:
          print(path.stem, *["-"] * 8, flush=True)  # built in test_metaworld's virtualenv
          continue
        if chosen.name == "rl":  # few environments: the factory, not the sampler, is tested
          values.update(meta_batch_size=2, rollouts_per_task=1, eval_rollouts_per_task=None)
        source = values["init_from"]  # a config's pretraining run: its body is compared below
        if source:
          values["init_from"] = None
        built = chosen.build(values, tf.distribute.get_strategy())
        assert built.learner.step.numpy() == 0 and built.task.splits
        model, meta = built.record.get("model", {}), built.record.get("meta", {})
        params = getattr(built.learner, "params", {})
        body = sorted((k, tuple(v.shape)) for k, v in params.items() if not k.startswith("out/"))
        print(path.stem, model.get("param_slots"), model.get("stat_slots"),
              meta.get("inner_adapt"), meta.get("per_step_inner_lr"), meta.get("msl_iterations"),
              type(built.learner).__name__, source or "-", hash(tuple(body)), flush=True)
  """)
  result = subprocess.run([sys.executable, "-c", script, str(omniglot_records),
                           str(mini_records), str(cifar_records["cifarfs"]),
                           str(cifar_records["fc100"])], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
  assert rows["mamlpp_omniglot_5w1s"][:5] == ["6", "6", "no_norm", "True", "5000"]
  assert rows["mamlpp_mini_5w1s"][:5] == ["6", "6", "no_norm", "True", "7500"]
  assert rows["anil_mini_5w1s"][2] == "head" and rows["omniglot_5w1s"][2] == "no_norm"
  configs = {c.stem for c in (REPO / "configs").glob("*.cfg")}
  assert set(rows) == configs
  assert {r[-3] for k, r in rows.items() if k.startswith("rl_")} == {"RLMetaLearner"}
  assert rows["sinusoid_5shot"][-3] == "MetaLearner"
  assert rows["cifarfs_5w1s"][2] == rows["fc100_5w1s"][2] == "no_norm"
  # A config that starts from a pretraining config's run has that run's body, name for name
  # and shape for shape (what --init_from loads).
  sources = {k: r[-2] for k, r in rows.items() if r[-2] != "-"}
  assert sources == {"conv4_mini_5w1s_pretrained": "runs/pretrain_conv4_mini",
                     "resnet12_mini_5w1s": "runs/pretrain_resnet12_mini",
                     "resnet12_mini_5w5s": "runs/pretrain_resnet12_mini"}
  for name, source in sources.items():
    pretraining = source.split("/")[-1]
    assert rows[pretraining][-3] == "PretrainLearner" and rows[name][-1] == rows[pretraining][-1]


# --- checkpoints -----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_ends_with_identical_weights(tmp_path):
  args = [*SINUSOID, "--num_iterations=1000", "--checkpoint_every=50", "--steps_per_loop=5",
          "--deterministic", "--mode=train"]
  straight = trainer(*args, f"--model_dir={tmp_path / 'straight'}")
  assert straight.returncode == 0, straight.stderr[-2000:]
  killed = tmp_path / "killed"
  for attempt, delay in enumerate((0.0, 0.3)):  # kill twice: right at and after a checkpoint
    log_path = tmp_path / f"attempt{attempt}.log"
    target = checkpoint_step(killed) + 50
    with open(log_path, "w") as log:
      proc = subprocess.Popen([sys.executable, "-m", "trainer.main", *args,
                               f"--model_dir={killed}"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=log)
      deadline = time.time() + 300
      while checkpoint_step(killed) < target:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.02)
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  interrupted_at = checkpoint_step(killed)
  assert 0 < interrupted_at < 1000
  resumed = trainer(*args, f"--model_dir={killed}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stderr
  a, b = final_params(tmp_path / "straight"), final_params(killed)
  assert a.keys() == b.keys() and len(a) == 6
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  run = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "trainer.main", *SINUSOID,
                           "--num_iterations=100000", "--checkpoint_every=50000",
                           "--steps_per_loop=10", f"--model_dir={run}"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step" in err
  step = checkpoint_step(run)
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  # Not a periodic checkpoint (every 50,000): the preemption one, at the last step run.
  assert 0 < step < 50000 and step == max(r["step"] for r in rows)


def test_sigterm_during_a_validation_stops_it_and_the_resume_redoes_it(tmp_path):
  """A validation long enough to take minutes (ResNet-12's on a CPU) gives way to SIGTERM
  between its batches; the step is saved, and the resumed run validates it before going on."""
  run = tmp_path / "run"
  args = [*SINUSOID, "--eval_every=20", "--checkpoint_every=20", "--mode=train",
          "--num_iterations=40", f"--model_dir={run}"]
  proc = subprocess.Popen([sys.executable, "-m", "trainer.main", *args,
                           "--val_episodes=10000000"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while '"step": 20' not in ((run / "metrics.jsonl").read_text()
                             if (run / "metrics.jsonl").exists() else ""):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)
  time.sleep(1)  # into the validation (a million batches: hours)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM during the validation of step 20" in err
  assert checkpoint_step(run) == 20
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert not any("val/mse" in r for r in rows) and not (run / "best.json").exists()
  resumed = trainer(*args, "--val_episodes=20")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "val/mse" in r] == [20, 40]
  first_val = next(i for i, r in enumerate(rows) if "val/mse" in r)
  assert all(r["step"] <= 20 for r in rows[:first_val])  # validated before training on


@pytest.mark.slow
def test_best_checkpoint_after_a_resume_is_the_best_of_the_whole_run(tmp_path):
  run = tmp_path / "run"
  args = [*SINUSOID, "--eval_every=10", "--checkpoint_every=10", "--mode=train",
          "--val_episodes=10", f"--model_dir={run}"]
  assert trainer(*args, "--num_iterations=30").returncode == 0
  resumed = trainer(*args, "--num_iterations=60")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  val = {r["step"]: r["val/mse"] for r in rows if "val/mse" in r}
  assert sorted(val) == [10, 20, 30, 40, 50, 60]
  best = json.loads((run / "best.json").read_text())
  assert best["value"] == min(val.values()) and val[best["step"]] == best["value"]
  assert tf.train.latest_checkpoint(str(run / "best")).endswith(f"ckpt-{best['step']}")


# --- results -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sinusoid_adaptation_lowers_the_test_mse_and_writes_the_eval_json(tmp_path):
  run = tmp_path / "run"
  result = trainer(*SINUSOID, "--num_iterations=1500", "--checkpoint_every=500",
                   "--eval_every=500", "--eval_episodes=200", "--eval_inner_steps=5",
                   "--steps_per_loop=50", "--jit_compile=auto", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "jit_compile=True" in result.stderr  # the default for MLPs
  report = json.loads((run / "eval_test.json").read_text())
  assert report["split"] == "test" and report["episodes"] == 200 and report["metric"] == "mse"
  steps = report["by_inner_steps"]
  assert list(steps) == ["0", "1", "2", "3", "4", "5"]
  assert all(set(v) == {"mean", "ci95"} for v in steps.values())
  pre, post = steps["0"], steps["5"]
  assert post["mean"] + post["ci95"] < pre["mean"] - pre["ci95"]  # clearly, not by chance
  assert "test mse over 200 episodes" in result.stdout
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert any("val/mse" in l for l in lines) and any("train/steps_per_s" in l for l in lines)
  assert json.loads((run / "best.json").read_text())["metric"] == "mse"
  assert list((run / "tb").iterdir())
  assert any("val/mse_after_5_steps" in l for l in lines)  # every inner step is logged
  assert report["checkpoint"].endswith(f"ckpt-{json.loads((run / 'best.json').read_text())['step']}")
  latest = trainer(*SINUSOID, "--num_iterations=1500", "--eval_inner_steps=5",
                   "--eval_episodes=200", "--mode=eval", "--eval_checkpoint=latest",
                   f"--model_dir={run}")
  assert latest.returncode == 0, latest.stderr[-2000:]
  other = json.loads((run / "eval_test_latest.json").read_text())
  assert other["checkpoint"].endswith("ckpt/ckpt-1500") and other["checkpoint_choice"] == "latest"
  assert json.loads((run / "eval_test.json").read_text()) == report  # the best's report kept
  some = trainer(*SINUSOID, "--num_iterations=1500", "--eval_inner_steps=5",
                 "--eval_episodes=200", "--mode=eval", "--eval_checkpoint=latest",
                 "--eval_measured_steps=0,2", f"--model_dir={run}")
  assert some.returncode == 0, some.stderr[-2000:]
  measured = json.loads((run / "eval_test_latest.json").read_text())["by_inner_steps"]
  assert list(measured) == ["0", "2", "5"]  # the last step always
  for s, v in measured.items():  # the same episodes and adaptation as every step's report
    assert v["mean"] == pytest.approx(other["by_inner_steps"][s]["mean"], rel=1e-5)


@pytest.mark.slow
def test_short_omniglot_training_is_far_above_chance_on_test_classes(tmp_path, omniglot_records):
  run = tmp_path / "run"
  result = trainer("--flagfile=configs/omniglot_5w1s.cfg", f"--data_dir={omniglot_records}",
                   "--num_iterations=150", "--eval_every=150", "--val_episodes=20",
                   "--eval_inner_steps=3",
                   "--eval_episodes=300", "--log_every=50", f"--model_dir={run}")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((run / "eval_test.json").read_text())
  acc = report["by_inner_steps"]["3"]
  # chance is 0.2; the original settings (N(0, 1) head) start slowly: 58% measured here
  assert acc["mean"] - acc["ci95"] > 0.45, report


def test_plot_curves_writes_png_learning_curves(tmp_path):
  run = tmp_path / "run"
  assert trainer(*SINUSOID, "--num_iterations=40", "--eval_every=20", "--mode=train",
                 f"--model_dir={run}").returncode == 0
  result = subprocess.run([sys.executable, "tools/plot_curves.py", str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  pngs = sorted(p.name for p in run.glob("*.png"))
  assert pngs and all((run / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
  other = tmp_path / "other"
  (other).mkdir()
  lines = (run / "metrics.jsonl").read_text().splitlines()
  (other / "metrics.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
  out = tmp_path / "cmp.png"
  both = subprocess.run([sys.executable, "tools/plot_curves.py", "--compare=val/mse",
                         f"--output={out}", str(run), str(other)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert both.returncode == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", both.stderr
  missing = subprocess.run([sys.executable, "tools/plot_curves.py", "--compare=val/nope",
                            f"--output={out}", str(run)], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
  assert missing.returncode != 0 and "has no 'val/nope'" in missing.stderr
  with_reference = subprocess.run([sys.executable, "tools/plot_curves.py", "--compare=val/mse",
                                   "--reference=paper:0.5", f"--output={out}", str(run)],
                                  cwd=REPO, capture_output=True, text=True, timeout=300)
  assert with_reference.returncode == 0, with_reference.stderr


def test_curves_are_labelled_with_the_method_and_titled_with_the_setting(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("plot_curves", REPO / "tools" / "plot_curves.py")
  plot_curves = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plot_curves)
  base = {"dataset": "omniglot", "n_way": 20, "k_shot": 1, "inner_adapt": "no_norm"}
  runs = {"side20_omniglot_20w1s": base,
          "side20_mamlpp_omniglot_20w1s": dict(base, per_step_inner_lr=True, msl_iterations=5000),
          "side20_anil_omniglot_20w1s": dict(base, inner_adapt="head"),
          "no_record": None}
  dirs = []
  for name, flags_ in runs.items():
    (tmp_path / name).mkdir()
    if flags_ is not None:
      (tmp_path / name / "config.json").write_text(json.dumps({"flags": flags_}))
    dirs.append(tmp_path / name)
  assert plot_curves.labels(dirs) == ["MAML", "MAML++", "ANIL", "no_record"]
  assert plot_curves.labels(dirs[:1] * 2) == ["MAML (side20_omniglot_20w1s)"] * 2
  assert plot_curves.setting(base) == "Omniglot 20-way 1-shot"
  assert plot_curves.method({"dataset": "rl", "env": "2DNavigation-v0"}) == "MAML-TRPO"
  assert plot_curves.parse_reference("MAML paper:95.8") == ("MAML paper", 95.8)


def test_comparing_several_metrics_draws_one_labelled_line_per_run_and_metric(tmp_path,
                                                                               monkeypatch):
  import importlib.util
  spec = importlib.util.spec_from_file_location("plot_curves", REPO / "tools" / "plot_curves.py")
  plot_curves = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plot_curves)
  run = tmp_path / "rl_ant_vel"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"flags": {"dataset": "rl", "env": "AntVel-v5"}}))
  (run / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "train/return_pre": -s, "train/return_post": s}) + "\n"
      for s in (1, 2, 3)))
  drawn = []
  monkeypatch.setattr(plot_curves.plt, "close",
                      lambda fig: drawn.extend(fig.axes[0].get_lines()))
  out = plot_curves.compare("train/return_pre,train/return_post", [run], tmp_path / "c.png")
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [(l.get_label(), list(l.get_ydata())) for l in drawn] == [
      ("MAML-TRPO: train/return_pre", [-1, -2, -3]), ("MAML-TRPO: train/return_post", [1, 2, 3])]
  with pytest.raises(SystemExit, match="has no 'train/kl'"):
    plot_curves.compare("train/return_pre,train/kl", [run], tmp_path / "c.png")


# --- distribution ------------------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.slow
def test_mirrored_over_two_devices_equals_one_device():
  from trainer import learner, maml, models, optim, tasks
  task = tasks.SinusoidRegression(5, 5, 5, 8, 8, seed=0)
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(32, 32), norm="batch_norm")

  def run(strategy):
    # Adam's epsilon 1: its update is then close to linear in the meta-gradient. With 1e-8,
    # g / sqrt(v) turns a rounding difference of an entry near zero into a difference of a
    # whole step (lr), which no tolerance on rounding can describe.
    l = learner.MetaLearner(strategy, cfg, maml.MetaConfig(2, 0.05, loss="mse"),
                            optim.AdamConfig(1e-2, epsilon=1.0), seed=0, meta_batch_size=8,
                            eval_inner_steps=2, jit_compile=False)
    means = l.train_loop(task.train_data(strategy, 0), tf.constant(3))
    # 12 evaluation episodes in batches of 8: the last batch is padded, then masked.
    losses, metrics = l.evaluate(task.eval_data(strategy, "val", 12))
    return ({k: float(v) for k, v in means.items()},
            {k: v.numpy() for k, v in l.params.items()}, losses, metrics)

  m1, p1, l1, e1 = run(tf.distribute.OneDeviceStrategy(TWO_CPUS[0]))
  m2, p2, l2, e2 = run(mirrored_over_two_cpus())
  # The replicas' sums run in another order (tests/numerics.py): sums of up to 32 terms (the
  # hidden width), through 3 meta-steps of 3 forward and backward passes each.
  close = functools.partial(assert_close_f32, reduction_length=32, stages=3 * 3 * 2)
  for k in m1:
    close(m2[k], m1[k], err_msg=k)
  for k in p1:
    close(p2[k], p1[k], err_msg=k)
  assert e1.shape == (3, 12) and l1.shape == (3, 12)
  close(e2, e1, err_msg="metrics")
  close(l2, l1, err_msg="losses")
  assert any(np.abs(p1[k] - models.init_params(cfg, 0)[k]).max() > 1e-4 for k in p1)


def test_meta_sgd_rates_are_learned_checkpointed_and_used_in_evaluation(tmp_path):
  from trainer import learner, maml, models, optim, tasks
  task = tasks.SinusoidRegression(5, 5, 5, 4, 4, seed=0)
  cfg = models.ModelConfig("mlp", (1,), 1, hidden_sizes=(16,), norm="none")
  meta = maml.MetaConfig(1, 0.01, loss="mse", learn_inner_lr=True)

  def make():
    return learner.MetaLearner(tf.distribute.get_strategy(), cfg, meta, optim.AdamConfig(1e-2),
                               seed=0, meta_batch_size=4, eval_inner_steps=2,
                               jit_compile=False)

  trained = make()
  trained.train_loop(task.train_data(trained.strategy, 0), tf.constant(5))
  rates = {k: v.numpy() for k, v in trained.inner_lrs.items()}
  assert rates and all(np.abs(r - 0.01).max() > 1e-4 for r in rates.values())  # learned
  path = tf.train.Checkpoint(**trained.checkpoint_items()).save(str(tmp_path / "ckpt"))
  restored = make()
  tf.train.Checkpoint(**restored.checkpoint_items()).restore(path) \
      .assert_existing_objects_matched()
  for k, r in rates.items():
    np.testing.assert_array_equal(restored.inner_lrs[k].numpy(), r)
  data = task.eval_data(restored.strategy, "val", 8)
  np.testing.assert_allclose(restored.evaluate(data)[1], trained.evaluate(data)[1], rtol=1e-6)
  # The evaluation adapts with the learned rates, not with --inner_lr: zero rates change it.
  for v in restored.inner_lrs.values():
    v.assign(tf.zeros_like(v))
  frozen = restored.evaluate(data)[1]
  np.testing.assert_allclose(frozen[1], frozen[0], rtol=1e-6)  # no adaptation at all
  assert not np.allclose(frozen[1], trained.evaluate(data)[1][1])


@pytest.mark.slow
def test_multi_worker_mirrored_with_two_local_workers_completes_steps(tmp_path):
  ports = free_ports(2)
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  procs = []
  for index in range(2):
    env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster,
                                                 "task": {"type": "worker", "index": index}}))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "trainer.main", *SINUSOID, "--strategy=multi_worker",
         "--num_iterations=6", "--checkpoint_every=3", "--steps_per_loop=3",
         f"--model_dir={tmp_path / 'run'}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert checkpoint_step(tmp_path / "run") == 6
  assert "replicas=2" in outputs[0][1]
  assert json.loads((tmp_path / "run" / "eval_test.json").read_text())["episodes"] == 20


def test_small_sample_intervals_use_students_t():
  from trainer import evaluation
  assert evaluation.t_quantile_975(1) == pytest.approx(12.7062, abs=1e-3)
  assert evaluation.t_quantile_975(19) == pytest.approx(2.0930, abs=1e-3)
  assert evaluation.t_quantile_975(10000) == pytest.approx(1.9602, abs=1e-3)
  values = np.arange(20, dtype=float)
  t = evaluation.mean_ci95(values, t_interval=True)["ci95"]
  assert t == pytest.approx(2.0930 * values.std(ddof=1) / np.sqrt(20), rel=1e-4)
  assert evaluation.mean_ci95(values)["ci95"] == pytest.approx(1.96 * values.std() / np.sqrt(20))
