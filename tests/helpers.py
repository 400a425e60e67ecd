"""What tests share besides fixtures: the trainer as a subprocess, its one error line, the one
MirroredStrategy over two logical CPUs, free ports, the real datasets' location, and tiny datasets written on
the fly (``from helpers import ...``; the fixtures that use them are in ``conftest.py``)."""

from __future__ import annotations

import functools
import io
import os
import socket
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline  # noqa: E402,F401  (TensorFlow's environment, set before it is imported)

from pipeline import datasets, paths  # noqa: E402

# In-process Beam for tiny builds: the multi-process default costs seconds of start-up.
FAST_BEAM = ("--direct_running_mode=in_memory", "--direct_num_workers=1")
REPO = Path(__file__).resolve().parents[1]
# The logical CPU devices conftest.py makes of the one physical CPU (strategy tests).
TWO_CPUS = ("/cpu:0", "/cpu:1")

# Without XLA: its compilation costs a short run about 3 s of CPU more than it saves (every
# trainer test pays it, and CI's two cores are busy); the default (XLA for MLPs) runs in
# test_sinusoid_adaptation_lowers_the_test_mse_and_writes_the_eval_json.
SINUSOID = ("--dataset=sinusoid", "--model=mlp", "--norm=none", "--k_shot=5", "--k_query=5",
            "--eval_k_query=20", "--meta_batch_size=10", "--inner_lr=0.01",
            "--eval_inner_steps=3", "--log_every=10", "--eval_every=0", "--val_episodes=20",
            "--eval_episodes=20", "--jit_compile=false")


@functools.cache
def mirrored_over_two_cpus():
  """One MirroredStrategy over TWO_CPUS for the whole process: each strategy numbers its
  collective ops from the same start, so a second one in the process would run collectives
  whose keys collide with the first's ("Shape mismatch in the collective instance")."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.distribute.MirroredStrategy(TWO_CPUS)


def trainer(*args, timeout=600, env=None, **kwargs) -> subprocess.CompletedProcess:
  """``python -m trainer.main ARGS`` from the repository root, output captured.

  A run killed by a signal it did not ask for (a segmentation fault inside TensorFlow's
  runtime: seen once in CI, in a 20-step sinusoid run, not reproduced in 19 runs of the same
  command) is reported with the crashing thread's stack (faulthandler's, which absl turns on)
  in the test's captured output and a warning, and run once more: the test then pins what the
  run does, not a rare crash of the runtime. A second crash fails the test.
  """
  command = [sys.executable, "-m", "trainer.main", *args]
  run = lambda: subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                               timeout=timeout, env=env, **kwargs)
  result = run()
  if result.returncode < 0:
    report = crash_report(result)
    print(report)
    warnings.warn(f"trainer.main died of signal {-result.returncode}; run again "
                  f"(stack in the captured output): {' '.join(args)[:300]}")
    result = run()
    if result.returncode < 0:
      result.stderr = crash_report(result) + "\n" + result.stderr[-2000:]
  return result


def crash_report(result: subprocess.CompletedProcess) -> str:
  """faulthandler's report of a crashed run, the crashing thread first."""
  start = result.stderr.find("Fatal Python error")
  text = result.stderr[start:] if start >= 0 else result.stderr[-4000:]
  return f"trainer.main died of signal {-result.returncode}:\n{text[:6000]}"


def checkpoint_step(model_dir: Path) -> int:
  """Step of the newest periodic checkpoint of a run, -1 without one."""
  import tensorflow as tf
  path = tf.train.latest_checkpoint(str(model_dir / "ckpt"))
  return int(path.rsplit("-", 1)[1]) if path else -1


def error_line(stderr: str, prefix: str = "trainer: error:") -> str:
  """The one error line; fails if there is a traceback or more than one error line."""
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.strip().splitlines() if line.startswith(prefix)]
  assert len(lines) == 1 and stderr.strip().splitlines()[-1] == lines[0], stderr[-3000:]
  return lines[0]


def free_ports(n: int) -> list[int]:
  """Ports free on loopback now (for local multi-worker clusters)."""
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def real_dataset(relative: str) -> Path:
  """A folder of the real datasets; the test is skipped without it (a clone has no data),
  except in CI (``CI=true``), where missing data fails the run."""
  path = paths.datasets_root() / relative
  if not path.exists():
    reason = (f"real data missing: {path} (set {paths.ENV_VAR} to a folder holding "
              f"{relative}/; docs/data.md)")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(reason)
    pytest.skip(reason)
  return path



def omniglot_png(rng: np.random.Generator, size: int = 105) -> bytes:
  """A 1-bit image like Omniglot's: white background, a few black strokes."""
  pixels = np.ones((size, size), bool)
  for _ in range(3):
    r, c = rng.integers(10, size - 30, 2)
    pixels[r:r + rng.integers(5, 25), c:c + 4] = False
  buf = io.BytesIO()
  Image.fromarray(pixels).convert("1").save(buf, format="PNG")
  return buf.getvalue()


def make_tiny_omniglot(root: Path, *, layout: str, background_alphabets: int = 7,
                       evaluation_alphabets: int = 2, characters: int = 2, drawers: int = 3,
                       seed: int = 0) -> Path:
  """Omniglot's layout in miniature, as folders or as the two distributed zips."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  char_id = 0
  for set_name, n_alpha in (("images_background", background_alphabets),
                            ("images_evaluation", evaluation_alphabets)):
    files = {}
    for a in range(n_alpha):
      for c in range(characters):
        char_id += 1
        for d in range(drawers):
          member = f"{set_name}/{set_name[7:10]}Alpha{a}/character{c + 1:02d}/{char_id:04d}_{d + 1:02d}.png"
          files[member] = omniglot_png(rng)
    if layout == "zip":
      with zipfile.ZipFile(root / f"{set_name}.zip", "w") as zf:
        for member, data in sorted(files.items()):
          zf.writestr(member, data)
    else:
      for member, data in files.items():
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(data)
  return root


def jpeg(rng: np.random.Generator, size: int = 84) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
      buf, format="JPEG", quality=90)
  return buf.getvalue()


def make_tiny_mini(root: Path, *, layout: str, classes=(3, 2, 2), per_class: int = 4,
                   odd_size: bool = False, seed: int = 0) -> Path:
  """MiniImagenet's layout (images/ or images.zip plus split CSVs) in miniature."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  files = {}
  for split, n_classes in zip(("train", "val", "test"), classes):
    rows = ["filename,label"]
    for c in range(n_classes):
      wnid = f"n{split[:2]}{c:06d}"
      for i in range(per_class):
        name = f"{wnid}{i:08d}.jpg"
        size = 100 if (odd_size and i == 0) else 84
        files[name] = jpeg(rng, size)
        rows.append(f"{name},{wnid}")
    (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
  if layout == "zip":
    with zipfile.ZipFile(root / "images.zip", "w") as zf:
      for name, data in sorted(files.items()):
        zf.writestr(f"images/{name}", data)
  else:
    (root / "images").mkdir()
    for name, data in files.items():
      (root / "images" / name).write_bytes(data)
  return root
