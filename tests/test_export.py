"""The exported adapt-and-predict SavedModel and tools/predict.py, end to end.

A briefly trained model of each kind (original MAML settings, MAML++ with per-step norm
parameters and learned rates, ANIL with a narrow ResNet-12 and a shared head on 3-channel images,
a user's Keras model)
is exported with the command line, then
loaded in a fresh interpreter that cannot import this repository, and its predictions on test
episodes are checked against the trainer's own meta-test of the same episodes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import error_line, omniglot_png
from pipeline import imaging, streams
from trainer import config, learner, optim, supervised_config, tasks
from trainer import model_dir as guard

REPO = Path(__file__).resolve().parents[1]
EPISODES = 8
EVAL_BATCH = 4

CASES = {
    "omniglot_original": ("configs/omniglot_5w1s.cfg", "omniglot", ["--eval_inner_steps=3"]),
    "omniglot_mamlpp_running_stats": (
        "configs/mamlpp_omniglot_5w1s.cfg", "omniglot",
        ["--num_filters=16", "--inner_steps=2", "--eval_inner_steps=3", "--msl_iterations=4",
         "--eval_norm_stats=running"]),
    # ANIL (head-only adaptation on body features computed once) with the built-in ResNet-12,
    # narrow (widths 8-8-16-16), on MiniImagenet's 84 x 84 x 3, with UNICORN-MAML's shared head
    # (one vector copied to every output when a task starts).
    "mini_resnet12_anil": ("configs/anil_mini_5w1s.cfg", "miniimagenet",
                           ["--model=resnet12", "--resnet_widths=8,8,16,16", "--features=mean",
                            "--shared_head", "--meta_batch_size=2", "--eval_inner_steps=3"]),
    # A user's Keras model from a file outside the repository; moved away before the export
    # is loaded, so the export must stand without it.
    "omniglot_keras": ("configs/omniglot_5w1s.cfg", "omniglot",
                       ["--model=keras:{user_model}:small", "--per_step_inner_lr",
                        "--eval_inner_steps=2"]),
}
USER_MODEL = textwrap.dedent("""
    import keras

    def small(input_shape, n_way):
      inputs = keras.Input(input_shape)
      h = inputs
      for _ in range(2):
        h = keras.layers.Conv2D(8, 3, strides=2, padding="same")(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
      h = keras.layers.GlobalAveragePooling2D()(h)
      return keras.Model(inputs, keras.layers.Dense(n_way)(h))
""")


def run(*args, cwd=REPO, timeout=600):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                        timeout=timeout)


_TRAINED: dict[str, tuple] = {}


def train_and_export(case: str, request, tmp_path_factory) -> tuple:
  """(case, run folder, records, export folder) of a model trained for a few steps, once."""
  if case in _TRAINED:
    return _TRAINED[case]
  flagfile, dataset, extra = CASES[case]
  records = request.getfixturevalue("omniglot_records" if dataset == "omniglot"
                                    else "mini_records")
  root = tmp_path_factory.mktemp(case)
  model_dir, export_dir = root / "run", root / "export"
  user_model = root / "user_nets.py"
  user_model.write_text(USER_MODEL)
  extra = [a.format(user_model=user_model) for a in extra]
  result = run("-m", "trainer.main", f"--flagfile={flagfile}", f"--data_dir={records}",
               f"--model_dir={model_dir}", "--num_iterations=6", "--eval_every=3",
               "--checkpoint_every=3", "--log_every=3", "--val_episodes=4", "--eval_episodes=8",
               f"--eval_batch_size={EVAL_BATCH}", *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  kind = json.loads((model_dir / guard.RUN_RECORD).read_text())["model"]["kind"]
  assert kind == next((k for k in ("keras", "resnet12") if k in case), "conv4")
  result = run("-m", "trainer.export", f"--model_dir={model_dir}", f"--output={export_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "exported" in result.stdout and "meta-test test accuracy" in result.stdout, result.stdout
  _TRAINED[case] = (case, model_dir, records, export_dir)
  return _TRAINED[case]


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
  return train_and_export(request.param, request, tmp_path_factory)


@pytest.fixture(scope="module")
def omniglot_run(request, tmp_path_factory):
  """The original-settings Omniglot model: the one the input checks use."""
  return train_and_export("omniglot_original", request, tmp_path_factory)


def trainer_meta_test(model_dir: Path, records: Path):
  """The trainer's own meta-test of EPISODES test episodes: (episodes, losses, accuracies)."""
  record = json.loads((model_dir / guard.RUN_RECORD).read_text())
  model, meta = supervised_config.model_from_record(record)
  flags = record["flags"]
  task = tasks.FewShotClassification(records, model.num_outputs, flags["k_shot"],
                                     flags["k_query"], flags["eval_k_query"] or flags["k_query"],
                                     flags["meta_batch_size"], EVAL_BATCH, flags["seed"])
  meta_learner = learner.MetaLearner(
      tf.distribute.get_strategy(), model, meta, optim.AdamConfig(), seed=flags["seed"],
      meta_batch_size=flags["meta_batch_size"], eval_inner_steps=record["eval_inner_steps"],
      jit_compile=False, eval_batch_size=EVAL_BATCH,
      eval_running_stats=flags["eval_norm_stats"] == "running")
  best = tf.train.latest_checkpoint(str(model_dir / "best"))
  tf.train.Checkpoint(**meta_learner.checkpoint_items()).restore(best).expect_partial()
  dataset = task.eval_dataset("test", EPISODES, streams.Sharding())
  losses, metrics = meta_learner.evaluate(dataset)
  episodes = {}
  for batch in dataset:
    for i, episode in enumerate(batch["episode_id"].numpy()):
      episodes[int(episode)] = {k: batch[k][i].numpy() for k in
                                ("support_x", "support_y", "query_x", "query_y")}
  ordered = [episodes[k] for k in sorted(episodes)]
  steps = record["eval_inner_steps"]
  return ordered, losses[steps], metrics[steps], bool(record["records"]["invert"])


def raw_pixels(x: np.ndarray, invert: bool) -> np.ndarray:
  """Sampler floats back to the pixels of a source image (before the builder's inversion)."""
  pixels = np.round(x * 255.0).astype(np.uint8)
  return 255 - pixels if invert else pixels


# Runs in an interpreter that cannot import this repository: the export must stand alone.
STANDALONE = textwrap.dedent("""
    import sys
    class Blocked:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("trainer", "pipeline", "rl", "tools", "bench"):
          raise ImportError("the export imported repository code: " + name)
    sys.meta_path.insert(0, Blocked())
    sys.path = [p for p in sys.path if p not in ("", {repo!r})]
    import json
    import numpy as np
    import tensorflow as tf
    model = tf.saved_model.load({export!r})
    data = np.load({inputs!r})
    both, adapt, predict = (model.signatures[k] for k in ("serving_default", "adapt", "predict"))
    out = {{}}
    for e in range(int(data["count"])):
      support = dict(support_images=tf.constant(data[f"sx{{e}}"]),
                     support_labels=tf.constant(data[f"sy{{e}}"]))
      result = both(query_images=tf.constant(data[f"qx{{e}}"]), **support)
      out[f"p{{e}}"] = result["probabilities"].numpy()
      out[f"l{{e}}"] = result["labels"].numpy()
      flat = adapt(**support)["adapted_parameters"]
      again = predict(query_images=tf.constant(data[f"qx{{e}}"]), adapted_parameters=flat)
      out[f"p2_{{e}}"] = again["probabilities"].numpy()
    out["metadata"] = np.array(model.metadata().numpy().decode())
    np.savez({outputs!r}, **out)
    print("OK")
""")


@pytest.mark.slow
def test_export_predicts_what_the_trainer_meta_test_measured(trained, tmp_path):
  case, model_dir, records, export_dir = trained
  episodes, losses, accuracies, invert = trainer_meta_test(model_dir, records)
  inputs, outputs = tmp_path / "inputs.npz", tmp_path / "outputs.npz"
  arrays = {"count": len(episodes)}
  for e, ep in enumerate(episodes):
    arrays.update({f"sx{e}": raw_pixels(ep["support_x"], invert),
                   f"sy{e}": ep["support_y"].astype(np.int32),
                   f"qx{e}": raw_pixels(ep["query_x"], invert)})
  np.savez(inputs, **arrays)
  script = STANDALONE.format(repo=str(REPO), export=str(export_dir), inputs=str(inputs),
                             outputs=str(outputs))
  user_model = model_dir.parent / "user_nets.py"
  away = user_model.rename(model_dir.parent / "moved_away")
  try:
    result = run("-c", script, cwd=tmp_path)
  finally:
    away.rename(user_model)
  assert result.stdout.strip().endswith("OK"), result.stderr[-3000:]
  out = np.load(outputs)
  for e, ep in enumerate(episodes):
    probs, labels = out[f"p{e}"], out[f"l{e}"]
    n_way = probs.shape[1]
    assert probs.shape == (len(ep["query_y"]), n_way) and labels.dtype == np.int32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    loss = -np.mean(np.log(probs[np.arange(len(labels)), ep["query_y"]]))
    np.testing.assert_allclose(loss, losses[e], rtol=2e-3, atol=1e-4, err_msg=f"{case} ep {e}")
    assert np.mean(labels == ep["query_y"]) == pytest.approx(accuracies[e]), (case, e)
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))
    np.testing.assert_allclose(out[f"p2_{e}"], probs, rtol=1e-5, atol=1e-6)  # adapt + predict
  metadata = json.loads(str(out["metadata"]))
  assert metadata == json.loads((export_dir / "maml_export.json").read_text())
  report = json.loads((model_dir / ("eval_test_running.json" if "running" in case
                                    else "eval_test.json")).read_text())
  steps = metadata["inner_steps"]
  assert metadata["meta_test"]["mean"] == report["by_inner_steps"][str(steps)]["mean"]
  assert metadata["source"]["checkpoint"].endswith(Path(report["checkpoint"]).name)
  assert metadata["query_batch_dependent"] == ("running" not in case)


@pytest.fixture(scope="module")
def omniglot_export(omniglot_run):
  return omniglot_run[3]


def test_export_refuses_bad_inputs_with_one_line_each(omniglot_export):
  model = tf.saved_model.load(str(omniglot_export))
  good = np.zeros([5, 28, 28, 1], np.uint8)
  labels = np.arange(5, dtype=np.int32)
  cases = [
      (dict(support_labels=np.array([0, 1, 2, 3, 5], np.int32)), "must lie in [0, 5)"),
      (dict(support_labels=np.array([0, 0, 1, 2, 3], np.int32)),
       "each of the 5 classes needs at least one support example"),
      (dict(support_images=np.zeros([5, 28, 28, 3], np.uint8)), "must have 1 channel(s)"),
      (dict(query_images=np.zeros([0, 28, 28, 1], np.uint8)), "no images to predict"),
      (dict(support_labels=np.arange(4, dtype=np.int32)), "the same length"),
  ]
  for change, message in cases:
    args = dict(support_images=good, support_labels=labels, query_images=good)
    args.update(change)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
      model.adapt_and_predict(**{k: tf.constant(v) for k, v in args.items()})
    assert message in error.value.message, (change, error.value.message[:500])


def test_export_resizes_any_image_size_as_the_builder_does(omniglot_export):
  """105 px source images through the graph's preprocessing give the builder's 28 px pixels."""
  model = tf.saved_model.load(str(omniglot_export))
  rng = np.random.default_rng(3)
  big = np.stack([np.asarray(Image.open(io.BytesIO(omniglot_png(rng))).convert("L"))
                  for _ in range(20)])[..., None]
  built = imaging.ImageSpec(size=28, channels=1, invert=True, resample="lanczos")
  stored = np.stack([imaging.prepare(imaging.encode_png(b), built).pixels for b in big])
  seen = model.preprocess(tf.constant(big)).numpy()
  assert seen.shape == (20, 28, 28, 1) and seen.dtype == np.float32
  difference = np.abs(seen * 255.0 - stored)
  # TensorFlow's antialiased Lanczos-3 against Pillow's LANCZOS: 0.03 levels on average
  # measured; a wrong filter, a missing inversion or scale is off by far more.
  assert difference.mean() < 0.1 and difference.max() <= 20, (difference.mean(), difference.max())
  same_size = model.preprocess(tf.constant(255 - stored)).numpy()  # already 28 px: untouched
  np.testing.assert_array_equal(same_size, stored.astype(np.float32) * np.float32(1 / 255))


@pytest.mark.slow
def test_export_command_refuses_bad_runs_with_one_line(omniglot_run, tmp_path):
  _, model_dir, _, export_dir = omniglot_run
  result = run("-m", "trainer.export", f"--model_dir={model_dir}", f"--output={export_dir}")
  assert result.returncode == 1 and "already exists; pass --overwrite" in result.stderr
  error_line(result.stderr, "export: error:")
  empty = tmp_path / "empty"
  empty.mkdir()
  result = run("-m", "trainer.export", f"--model_dir={empty}", f"--output={tmp_path / 'x'}")
  assert result.returncode == 1 and "has no config.json" in result.stderr
  assert not (tmp_path / "x").exists()
  result = run("-m", "trainer.export", f"--model_dir={model_dir}", f"--output={tmp_path / 'y'}",
               "--norm_stats=running")
  assert result.returncode == 1 and "tracked no running statistics" in result.stderr
  assert not list(tmp_path.glob(".y*"))  # nothing half-written


# --- tools/predict.py and tools/sample_episode.py ----------------------------------------------


def predict_tool(*args, cwd=REPO):
  return run("tools/predict.py", *args, cwd=cwd)


def image_tree(root: Path, classes: int, per_class: int, queries: int, seed: int = 0) -> Path:
  """support/<class>/<n>.png (105 px, Omniglot-like) and query/<n>.png."""
  rng = np.random.default_rng(seed)
  for c in range(classes):
    (root / "support" / f"class_{c}").mkdir(parents=True)
    for i in range(per_class):
      (root / "support" / f"class_{c}" / f"{i}.png").write_bytes(omniglot_png(rng))
  (root / "query").mkdir(parents=True)
  for i in range(queries):
    (root / "query" / f"q{i}.png").write_bytes(omniglot_png(rng))
  return root


def test_predict_command_prints_the_exports_prediction_per_query_file(omniglot_export,
                                                                      tmp_path):
  tree = image_tree(tmp_path / "tree", classes=5, per_class=2, queries=6)
  result = predict_tool(f"--export={omniglot_export}", f"--support={tree / 'support'}",
                        f"--query={tree / 'query'}", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [Path(r["file"]).name for r in rows] == [f"q{i}.png" for i in range(6)]
  # The same images, converted as the builder would and passed to the export directly.
  spec = imaging.ImageSpec(size=28, channels=1, invert=False, resample="lanczos")
  pixels = lambda paths: np.stack([imaging.prepare(p.read_bytes(), spec).pixels for p in paths])
  support = sorted((tree / "support").rglob("*.png"))
  model = tf.saved_model.load(str(omniglot_export))
  expected = model.adapt_and_predict(
      support_images=tf.constant(pixels(support)),
      support_labels=tf.constant([int(p.parent.name[-1]) for p in support], tf.int32),
      query_images=tf.constant(pixels([tree / "query" / f"q{i}.png" for i in range(6)])))
  probabilities = expected["probabilities"].numpy()
  for i, row in enumerate(rows):
    label = int(expected["labels"][i])
    assert row["class"] == f"class_{label}"
    assert row["probability"] == pytest.approx(probabilities[i, label], abs=1e-6)
  text = predict_tool(f"--export={omniglot_export}", f"--support={tree / 'support'}",
                      f"--query={tree / 'query' / 'q0.png'},{tree / 'query' / 'q1.png'}")
  lines = [line.split("\t") for line in text.stdout.strip().splitlines()]
  assert text.returncode == 0 and [len(line) for line in lines] == [3, 3], text.stdout


@pytest.mark.slow
def test_predict_command_refuses_bad_folders_with_one_line(omniglot_export, tmp_path):
  def tree(name, **kwargs):
    return image_tree(tmp_path / name, **{"classes": 5, "per_class": 1, "queries": 2, **kwargs})

  four = tree("four", classes=4)
  single = tree("single", classes=1)
  empty = tree("empty")
  for f in (empty / "support" / "class_3").iterdir():
    f.unlink()
  broken = tree("broken")
  (broken / "support" / "class_2" / "0.png").write_bytes(b"not an image")
  good = tree("good")
  (tmp_path / "no_queries").mkdir()
  cases = [
      (four / "support", good / "query", "4 class folders, but the export is 5-way"),
      (single / "support", good / "query", "1 class folder(s)"),
      (empty / "support", good / "query", "class_3: empty class folder"),
      (broken / "support", good / "query", "class_2/0.png: not a readable image"),
      (good / "support", tmp_path / "no_queries", "no query images"),
  ]
  for support, query, message in cases:
    result = predict_tool(f"--export={omniglot_export}", f"--support={support}",
                          f"--query={query}")
    assert result.returncode == 1 and message in result.stderr, (message, result.stderr[-800:])
    error_line(result.stderr, "predict: error:")


@pytest.mark.slow
def test_sample_episode_writes_source_images_that_predict_reads(omniglot_export,
                                                                 omniglot_records, tmp_path):
  out = tmp_path / "episode"
  result = run("tools/sample_episode.py", f"--data_dir={omniglot_records}", f"--output={out}",
               "--k_query=2", "--seed=1")
  assert result.returncode == 0, result.stderr[-2000:]
  classes = sorted(p.name for p in (out / "support").iterdir())
  queries = sorted((out / "query").iterdir())
  assert len(classes) == 5 and len(queries) == 10
  assert all(len(list((out / "support" / c).iterdir())) == 1 for c in classes)
  with Image.open(queries[0]) as img:
    assert img.size == (105, 105)  # the source file, not the 28 px record
  result = predict_tool(f"--export={omniglot_export}", f"--support={out / 'support'}",
                        f"--query={out / 'query'}", "--json")
  rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert len(rows) == 10 and {r["class"] for r in rows} <= set(classes), result.stderr[-2000:]
  again = run("tools/sample_episode.py", f"--data_dir={omniglot_records}", f"--output={out}")
  assert again.returncode == 1 and "already exists" in again.stderr
