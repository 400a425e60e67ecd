"""Export a meta-trained model as a SavedModel that adapts to a support set, then predicts.

``python -m trainer.export --model_dir=DIR [--checkpoint=best|latest] --output=EXPORT_DIR``

A MAML model is an initialisation, so using it means adapting on a few labelled examples of
the new classes first. The export does both in one graph and needs nothing of this repository:
``tf.saved_model.load(EXPORT_DIR)`` in a plain TensorFlow install gives

- ``adapt_and_predict(support_images, support_labels, query_images)`` -> ``probabilities
  [q, N]``, ``labels [q]`` (also ``serving_default``, for TF Serving);
- ``adapt(support_images, support_labels)`` -> ``adapted_parameters [P]`` and
  ``predict(query_images, adapted_parameters)``, to adapt once and predict many batches;
- ``preprocess(images)``: what the network sees (float ``[n, H, W, C]`` in [0, 1]);
- ``metadata()``: the JSON also written beside the model as ``maml_export.json``.

Images are uint8 ``[n, H, W, C]`` of any H and W with the trained channel count; inside, the
records builder's preprocessing (resize to the trained size, Omniglot's inversion, [0, 1]
scaling) and the trained test-time adaptation (number of steps, fixed or learned rates,
per-step norm parameters) run exactly as in the trainer's meta-test. With batch norm on batch
statistics (the paper's setting) a prediction depends on the whole query batch, as in
meta-test; the metadata says so (``query_batch_dependent``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from pipeline.errors import DataError, UsageError, first_line  # noqa: E402
from trainer import config, evaluation, family, maml, models  # noqa: E402
from trainer import supervised_config as sc  # noqa: E402
from trainer import model_dir as guard  # noqa: E402

FLAGS = flags.FLAGS
EXPORT_FORMAT = "maml-tf2 adapt-and-predict"
EXPORT_VERSION = 1
METADATA_NAME = "maml_export.json"
# tf.image.resize methods closest to the Pillow filters the records builder used.
RESIZE_METHODS = {"lanczos": "lanczos3", "bilinear": "bilinear", "box": "area",
                  "nearest": "nearest"}

flags.DEFINE_string("output", None, "Folder to write the SavedModel (and maml_export.json) to.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                  "best: the best-by-validation checkpoint (else the latest); latest.")
flags.DEFINE_enum("norm_stats", None, ["batch", "running"],
                  "Batch-norm statistics at prediction time (default: the run's "
                  "--eval_norm_stats). running needs statistics tracked in training.")
flags.DEFINE_boolean("overwrite", False, "Replace --output if it exists.")


def load_run_record(model_dir: Path, from_flags: bool) -> dict:
  """``<model_dir>/config.json``; for runs older than it, the trainer's flags (a flagfile)."""
  path = model_dir / guard.RUN_RECORD
  if path.exists():
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise UsageError(f"{path}: not valid JSON ({e})") from None
  if not from_flags:
    raise UsageError(f"--model_dir={model_dir} has no {guard.RUN_RECORD} (runs started "
                      f"before the trainer wrote one); pass the flags it was trained with, e.g. "
                      f"--flagfile=configs/<name>.cfg --data_dir=<records>")
  from trainer import supervised  # the trainer's own resolution of its flags
  values = config.flag_values()
  if family.family_of(values["dataset"]).name != "images":
    raise UsageError(f"--dataset={values['dataset']}: only image classifiers can be exported")
  task = supervised.image_task(values)
  model = sc.model_config(values, task.image_shape)
  return config.run_record(values, **sc.record_parts(values, model, sc.meta_config(values),
                                                     task.manifest))


def restore(model: models.ModelConfig, meta: maml.MetaConfig, checkpoint: str) -> dict:
  """The meta-learned arrays of ``checkpoint``: params, inner rates, running statistics."""
  init = models.init_params(model, 0)
  state = {
      "params": {k: tf.Variable(v) for k, v in init.items()},
      "inner_lrs": {k: tf.Variable(np.zeros(shape, np.float32))
                    for k, shape in maml.learned_rate_shapes(meta, init).items()},
      "stats": {k: tf.Variable(v) for k, v in models.init_stats(model).items()},
  }
  try:
    # The optimizer's moments are not needed; everything else must be there.
    tf.train.Checkpoint(**state).restore(checkpoint).expect_partial() \
        .assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    raise UsageError(f"{checkpoint}: does not hold this run's model ({first_line(e)})") from None
  return {group: {k: v.numpy() for k, v in values.items()} for group, values in state.items()}


def _require(condition: tf.Tensor, message: str) -> tf.Operation:
  return tf.debugging.Assert(condition, [message], name="check")


class AdaptAndPredict(tf.Module):
  """The exported module: meta-learned arrays as constants, test-time adaptation as graphs."""

  def __init__(self, model: models.ModelConfig, meta: maml.MetaConfig, steps: int,
               arrays: dict, *, invert: bool, resample: str, running_stats: bool,
               metadata: dict):
    super().__init__(name="maml")
    self._model, self._meta, self._steps = model, meta, steps
    self._invert, self._resize_method = invert, RESIZE_METHODS[resample]
    self._keys = sorted(arrays["params"])
    # Adapted parameters: a shared head is N columns once a task has started.
    started = models.expand_head(model, {k: tf.constant(v) for k, v in arrays["params"].items()})
    self._shapes = [tuple(started[k].shape) for k in self._keys]
    self.params = {k: tf.Variable(v, trainable=False) for k, v in arrays["params"].items()}
    self.inner_lrs = {k: tf.Variable(v, trainable=False)
                      for k, v in arrays["inner_lrs"].items()}
    self.stats = ({k: tf.Variable(v, trainable=False) for k, v in arrays["stats"].items()}
                  if running_stats else {})
    self._metadata = json.dumps(metadata, indent=1)
    height, width, channels = model.input_shape
    images = tf.TensorSpec([None, None, None, None], tf.uint8)
    labels = tf.TensorSpec([None], tf.int32)
    flat = tf.TensorSpec([sum(int(np.prod(s)) for s in self._shapes)], tf.float32)
    self.adapt = tf.function(self._adapt, input_signature=[images, labels])
    self.predict = tf.function(self._predict, input_signature=[images, flat])
    self.adapt_and_predict = tf.function(self._adapt_and_predict,
                                         input_signature=[images, labels, images])
    self.preprocess = tf.function(lambda images: self._preprocess(images, "images"),
                                  input_signature=[images])
    self.metadata = tf.function(lambda: tf.constant(self._metadata), input_signature=[])
    self._image_size = (height, width, channels)

  def signatures(self) -> dict:
    both = self.adapt_and_predict.get_concrete_function()
    return {"serving_default": both, "adapt_and_predict": both,
            "adapt": self.adapt.get_concrete_function(),
            "predict": self.predict.get_concrete_function()}

  def _preprocess(self, images: tf.Tensor, name: str) -> tf.Tensor:
    """uint8 pixels as the records builder would have stored them, then scaled to [0, 1]."""
    height, width, channels = self._image_size
    checks = [_require(tf.equal(tf.shape(images)[3], channels),
                       f"{name}: images must have {channels} channel(s), as the model was "
                       f"trained")]
    with tf.control_dependencies(checks):
      x = tf.cast(images, tf.float32)
    same = tf.logical_and(tf.equal(tf.shape(x)[1], height), tf.equal(tf.shape(x)[2], width))

    def resize():
      resized = tf.image.resize(x, [height, width], method=self._resize_method, antialias=True)
      return tf.clip_by_value(tf.round(resized), 0.0, 255.0)  # the builder stores uint8

    x = tf.ensure_shape(tf.cond(same, lambda: x, resize), [None, height, width, channels])
    if self._invert:
      x = 255.0 - x
    return x * (1.0 / 255.0)  # as the episode sampler scales

  def _check_support(self, images, labels) -> list:
    n_way = self._model.num_outputs
    counts = tf.math.bincount(labels, minlength=n_way, maxlength=n_way)
    return [
        _require(tf.equal(tf.shape(images)[0], tf.shape(labels)[0]),
                 "support_images and support_labels must have the same length"),
        _require(tf.reduce_all((labels >= 0) & (labels < n_way)),
                 f"support_labels must lie in [0, {n_way}): this model is {n_way}-way"),
        _require(tf.reduce_all(counts > 0),
                 f"support_labels: each of the {n_way} classes needs at least one support "
                 f"example (this model is {n_way}-way)"),
    ]

  def _stats(self):
    return {k: tf.identity(v) for k, v in self.stats.items()} if self.stats else None

  def _adapted(self, support_images, support_labels) -> dict:
    with tf.control_dependencies(self._check_support(support_images, support_labels)):
      x = self._preprocess(support_images, "support_images")
    params = {k: tf.identity(v) for k, v in self.params.items()}
    lrs = {k: tf.identity(v) for k, v in self.inner_lrs.items()} or None
    return maml.adapt(self._model, self._meta, params, lrs, x[None], support_labels[None],
                      self._steps, self._stats())

  def _outputs(self, fast: dict, query_images) -> dict:
    check = _require(tf.shape(query_images)[0] > 0, "query_images: no images to predict")
    with tf.control_dependencies([check]):
      x = self._preprocess(query_images, "query_images")
    logits = maml.adapted_logits(self._model, fast, x[None], self._steps, self._stats())[0]
    return {"probabilities": tf.nn.softmax(logits),
            "labels": tf.argmax(logits, axis=-1, output_type=tf.int32)}

  def _adapt(self, support_images, support_labels):
    fast = self._adapted(support_images, support_labels)
    return {"adapted_parameters": tf.concat([tf.reshape(fast[k][0], [-1]) for k in self._keys],
                                            axis=0)}

  def _predict(self, query_images, adapted_parameters):
    sizes = [int(np.prod(s)) for s in self._shapes]
    parts = tf.split(adapted_parameters, sizes)
    fast = {k: tf.reshape(p, s)[None] for k, p, s in zip(self._keys, parts, self._shapes)}
    return self._outputs(fast, query_images)

  def _adapt_and_predict(self, support_images, support_labels, query_images):
    return self._outputs(self._adapted(support_images, support_labels), query_images)


def _meta_test_result(model_dir: Path, checkpoint: str, norm_stats: str, steps: int):
  """The trainer's meta-test of exactly this checkpoint and norm statistics, if it ran."""
  tail = Path(checkpoint).parts[-2:]
  found = []
  for path in sorted(model_dir.glob("eval_*.json")):
    try:
      summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
      continue
    if (Path(summary.get("checkpoint", "")).parts[-2:] != tail
        or summary.get("norm_stats", "batch") != norm_stats
        or str(steps) not in summary.get("by_inner_steps", {})):
      continue
    result = summary["by_inner_steps"][str(steps)]
    found.append({"split": summary["split"], "episodes": summary["episodes"],
                  "metric": summary["metric"], "mean": result["mean"], "ci95": result["ci95"],
                  "inner_steps": steps, "file": path.name})
  found.sort(key=lambda r: r["split"] != "test")
  return found[0] if found else None


def export(model_dir: str | os.PathLike, output: str | os.PathLike, *, checkpoint: str = "best",
           norm_stats: str | None = None, overwrite: bool = False,
           from_flags: bool = False) -> dict:
  """Writes the SavedModel and its metadata to ``output`` atomically; returns the metadata."""
  model_dir, output = Path(model_dir), Path(output)
  if not model_dir.is_dir():
    raise UsageError(f"--model_dir={model_dir}: no such folder")
  if output.exists() and not overwrite:
    raise UsageError(f"--output={output} already exists; pass --overwrite to replace it")
  record = load_run_record(model_dir, from_flags)
  if "model" not in record or "records" not in record:
    raise UsageError(f"{model_dir / guard.RUN_RECORD}: not an image classifier's run "
                      f"(dataset {record.get('dataset')!r}); only those can be exported")
  if "pretrain" in record:
    raise UsageError(f"--model_dir={model_dir}: a pretraining run (--mode=pretrain), which "
                     f"adapts nothing; meta-train from it (--init_from={model_dir}) and export "
                     f"that run")
  model, meta = sc.model_from_record(record)
  norm_stats = norm_stats or record["flags"].get("eval_norm_stats", "batch")
  if norm_stats == "running" and not model.stat_slots:
    raise UsageError("--norm_stats=running: this run tracked no running statistics "
                      "(--bn_running_stats=none)")
  path = guard.choose_checkpoint(model_dir, checkpoint, flag="--checkpoint")
  step = guard.checkpoint_step(path)
  arrays = restore(model, meta, path)
  steps = int(record["eval_inner_steps"])
  images = record["records"]
  batch_dependent = model.norm == "batch_norm" and norm_stats == "batch"
  flags_used = record["flags"]
  metadata = {
      "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION,
      "dataset": images["dataset"],
      "n_way": model.num_outputs,
      "k_shot_trained": flags_used.get("k_shot"),
      "image": {"height": model.input_shape[0], "width": model.input_shape[1],
                "channels": model.input_shape[2], "input": "uint8 [n, H, W, C], any H and W",
                "invert": bool(images.get("invert", False)),
                "resample": images.get("resample", "lanczos"),
                "trained_pixels": images.get("pixel_values", "")},
      "inner_steps": steps,
      "inner_rates": ("meta_sgd" if meta.learn_inner_lr else
                      "per_step_learned" if meta.per_step_inner_lr else "fixed"),
      "inner_lr": meta.inner_lr,
      "inner_adapt": meta.inner_adapt,
      "loss_reduction": meta.loss_reduction,
      "norm": model.norm,
      "norm_statistics": norm_stats if model.norm == "batch_norm" else "none",
      "query_batch_dependent": batch_dependent,
      "prediction_note": (
          "batch norm normalises with the statistics of the batch passed in, as in the "
          "paper's meta-test: each query image's prediction depends on the other query images "
          "of the call; pass them together, as the episode's query set was"
          if batch_dependent else "each query image is predicted on its own"),
      "source": {"model_dir": str(model_dir.resolve()), "checkpoint": path,
                 "checkpoint_choice": checkpoint, "step": step,
                 "code_version": record.get("code_version", "unknown")},
      "meta_test": _meta_test_result(model_dir, path, norm_stats, steps),
      "signatures": {
          "adapt_and_predict": "(support_images uint8 [n,H,W,C], support_labels int32 [n], "
                               "query_images uint8 [q,H,W,C]) -> probabilities float32 [q,N], "
                               "labels int32 [q]; also serving_default",
          "adapt": "(support_images, support_labels) -> adapted_parameters float32 [P]",
          "predict": "(query_images, adapted_parameters) -> probabilities, labels",
      },
  }
  module = AdaptAndPredict(model, meta, steps, arrays, invert=metadata["image"]["invert"],
                           resample=metadata["image"]["resample"],
                           running_stats=norm_stats == "running", metadata=metadata)
  output.parent.mkdir(parents=True, exist_ok=True)
  partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
  shutil.rmtree(partial, ignore_errors=True)
  try:
    tf.saved_model.save(module, str(partial), signatures=module.signatures())
    evaluation.write_json(partial / METADATA_NAME, metadata)
    if output.exists():
      old = output.with_name(f".{output.name}.old-{os.getpid()}")
      os.replace(output, old)
      os.replace(partial, output)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(partial, output)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return metadata


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.model_dir or not FLAGS.output:
    print("export: error: --model_dir and --output are required", file=sys.stderr)
    return 1
  # Any trainer flag given (directly or in a flagfile) describes a run without config.json.
  from_flags = any(FLAGS[name].present for name in config.flag_names() if name != "model_dir")
  try:
    metadata = export(FLAGS.model_dir, FLAGS.output, checkpoint=FLAGS.checkpoint,
                      norm_stats=FLAGS.norm_stats, overwrite=FLAGS.overwrite,
                      from_flags=from_flags)
  except (UsageError, DataError, OSError) as e:
    print(f"export: error: {first_line(e)}", file=sys.stderr)
    return 1
  result = metadata["meta_test"]
  accuracy = (f"meta-test {result['split']} accuracy {100 * result['mean']:.2f} ± "
              f"{100 * result['ci95']:.2f}% ({result['episodes']} episodes)" if result else
              "no meta-test of this checkpoint found (run the trainer with --mode=eval)")
  print(f"exported {metadata['dataset']} {metadata['n_way']}-way, step "
        f"{metadata['source']['step']}, {metadata['inner_steps']} inner steps, {accuracy} "
        f"-> {FLAGS.output}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
