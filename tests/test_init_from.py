"""``--init_from=MODEL_DIR`` (trainer/init_from.py): a new run takes another run's body, keeps
its own head, never reads the source again once it has a checkpoint, and refuses in one line a
source it cannot use."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from helpers import SINUSOID, error_line, trainer


def weights(model_dir: Path, sub: str = "ckpt") -> dict[str, np.ndarray]:
  """The learner's weights (``params/...``) in a run's newest checkpoint of ``sub``, by name."""
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / sub)))
  return {k.split("/")[1].replace(".S", "/"): reader.get_tensor(k)
          for k in reader.get_variable_to_shape_map()
          if k.startswith("params/") and "OPTIMIZER" not in k}


def run(model_dir: Path, *args) -> None:
  result = trainer(*SINUSOID, "--mode=train", "--checkpoint_every=5", f"--model_dir={model_dir}",
                   *args)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
  """A briefly meta-trained sinusoid run: its weights are no longer anyone's initialisation."""
  model_dir = tmp_path_factory.mktemp("init_from") / "source"
  run(model_dir, "--num_iterations=10")
  return model_dir


@pytest.mark.slow
def test_a_new_run_starts_from_the_sources_body_and_its_own_head(source, tmp_path):
  # meta_lr 0: the first checkpoint holds the weights the run started from.
  started = tmp_path / "started"
  result = run(started, "--num_iterations=5", "--meta_lr=0", "--seed=1", f"--init_from={source}")
  assert "initialised 4 body weights from" in result.stderr
  plain = tmp_path / "plain"
  run(plain, "--num_iterations=5", "--meta_lr=0", "--seed=1")
  got, src, own = weights(started), weights(source), weights(plain)
  assert sorted(got) == sorted(own) and {"out/kernel", "out/bias"} <= set(got)
  for name in got:
    if name.startswith("out/"):
      np.testing.assert_array_equal(got[name], own[name], err_msg=name)  # its own head
    else:
      np.testing.assert_array_equal(got[name], src[name], err_msg=name)  # the source's body
      assert not np.array_equal(got[name], own[name]), name  # which is not the seed's own

  # Resumed, it restores its own checkpoint and never reads the source (deleted here).
  trained = tmp_path / "trained"
  run(trained, "--num_iterations=5", "--seed=1", f"--init_from={source}")
  at_5 = weights(trained)
  moved = tmp_path / "source_moved"
  shutil.copytree(source, moved)
  shutil.rmtree(source)
  try:
    result = run(trained, "--num_iterations=10", "--seed=1", f"--init_from={source}")
    assert "resumed from" in result.stderr and "initialised" not in result.stderr
    assert any(not np.array_equal(v, at_5[k]) for k, v in weights(trained).items())
  finally:
    shutil.copytree(moved, source)


@pytest.mark.parametrize("make_source,expected", [
    (lambda root, source: root, "not a run folder (no config.json)"),
    (lambda root, source: shutil.copytree(source, root / "empty", ignore=shutil.ignore_patterns(
        "ckpt", "best")), "the run has no checkpoint yet"),
], ids=["not_a_run", "no_checkpoint"])
def test_an_unusable_source_is_refused_at_start_up_in_one_line(source, tmp_path, make_source,
                                                               expected):
  bad = make_source(tmp_path, source)
  result = trainer(*SINUSOID, "--num_iterations=5", f"--model_dir={tmp_path / 'new'}",
                   f"--init_from={bad}")
  assert result.returncode == 1
  line = error_line(result.stderr)
  assert f"--init_from={bad}" in line and expected in line, line
  assert not (tmp_path / "new" / "ckpt").exists()


def test_a_source_of_another_architecture_is_refused_naming_a_weight(source, tmp_path):
  result = trainer(*SINUSOID, "--num_iterations=5", "--hidden_sizes=8,8",
                   f"--model_dir={tmp_path / 'new'}", f"--init_from={source}")
  assert result.returncode == 1
  line = error_line(result.stderr)
  assert "its model (mlp) is not this body: it has other shapes:" in line, line
  assert "(here (1, 8))" in line or "(here (8" in line, line
  assert not (tmp_path / "new" / "ckpt").exists()
