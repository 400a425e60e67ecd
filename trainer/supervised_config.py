"""The supervised families' flags (few-shot images, sinusoid regression) and their configs.

``SUPERVISED``: what both read (episodes, the MAML variants, the meta-optimizer, memory and
compilation choices, batch norm). ``IMAGES``: what only image tasks read (the records, N-way,
the conv4 backbone, the sampler). Every default of an evaluation setting (``--eval_k_query``,
``--eval_batch_size``, ``--eval_inner_steps``) is resolved here, once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from absl import flags

from pipeline.errors import UsageError
from trainer import maml, meta_flags, models, optim
from trainer.flag_groups import FlagGroup

SUPERVISED = FlagGroup("supervised meta-learning", __name__)
IMAGES = FlagGroup("few-shot images", __name__)
_MODEL, _META, _ADAM = models.ModelConfig, maml.MetaConfig, optim.AdamConfig
_define, _images = SUPERVISED.define, IMAGES.define

# --- episodes ---
_images(flags.DEFINE_string, "data_dir", None, "Records folder from tools/build_tfrecords.py "
        "(default data/records/<dataset>).", may_change=True)
_images(flags.DEFINE_integer, "n_way", 5, "Classes per episode.", lower_bound=1)
_define(flags.DEFINE_integer, "k_shot", 1, "Support examples per class (sinusoid: points per "
        "task).", lower_bound=1)
_define(flags.DEFINE_integer, "k_query", 15, "Query examples per class in training.",
        lower_bound=1)
_define(flags.DEFINE_integer, "eval_k_query", None, "Query examples per class in evaluation "
        "(default: --k_query).", lower_bound=1)
_define(flags.DEFINE_integer, "eval_batch_size", None, "Tasks per evaluation batch "
        "(default: --meta_batch_size).", lower_bound=1, may_change=True)
_define(flags.DEFINE_list, "eval_measured_steps", [], "Evaluate the query only after these "
        "numbers of adaptation steps, e.g. 0 or 0,5 (the last, --eval_inner_steps, is always "
        "measured; default: after every step). Adaptation is unchanged; a wide network's "
        "evaluation is dominated by the query's forward passes, so ResNet-12 5w1s with 15 steps "
        "evaluates about 4x faster measuring only 0 and 15.", may_change=True)
flags.register_validator("eval_measured_steps", lambda v: all(s.isdigit() for s in v),
                         "must be non-negative integers, e.g. 0,5")
_images(flags.DEFINE_enum, "sampler", "host", ["host", "device"], "Training episodes: host = "
        "the tf.data pipeline; device = the split's images placed on the accelerator once and "
        "each meta-batch drawn inside the compiled step (the same episodes; no input crosses "
        "from the host per step).", may_change=True)
_images(flags.DEFINE_boolean, "verify_records", False, "At start-up, also check every shard "
        "the run reads against the manifest's SHA-256 (files and record counts are always "
        "checked).", may_change=True)

# --- model ---
_define(flags.DEFINE_string, "model", "conv4", "Backbone: conv4, resnet12 (TADAM/MetaOptNet's "
        "ResNet-12, --resnet_widths), mlp, or "
        "keras:PATH_OR_MODULE:FUNCTION, your own Keras model: FUNCTION(input_shape, n_way) "
        "returns a keras.Model from images [n, H, W, C] in [0, 1] to logits [n, n_way] "
        "(docs/training.md). Sinusoid: always an MLP of --hidden_sizes.")
flags.register_validator(
    "model", lambda v: (v in models.KINDS and v != "keras") or (
        v.startswith("keras:") and v.count(":") >= 2),
    "must be conv4, resnet12, mlp or keras:PATH_OR_MODULE:FUNCTION")
_images(flags.DEFINE_list, "resnet_widths", [str(w) for w in _MODEL.widths], "ResNet-12 "
        "channels of its four blocks (TADAM/MetaOptNet: 64,160,320,640).")
flags.register_validator(
    "resnet_widths", lambda v: len(v) == 4 and all(w.isdigit() and int(w) > 0 for w in v),
    "must be four positive integers, e.g. 64,160,320,640")
_define(flags.DEFINE_string, "init_from", None, "Start from the body (every weight but the "
        "head out/*) of this run folder's best checkpoint (else its newest), e.g. a run of "
        "another way count or dataset; the head is this run's own. Read once, when the run "
        "starts without a checkpoint of its own (trainer/init_from.py).")
_images(flags.DEFINE_integer, "num_filters", _MODEL.num_filters, "conv4 filters per layer "
        "(paper: 64 Omniglot, 32 Mini).", lower_bound=1)
_images(flags.DEFINE_enum, "downsample", _MODEL.downsample, ["stride", "maxpool"],
        "conv4 down-sampling: stride-2 convs (Omniglot) or 2x2 max-pool (Mini).")
_images(flags.DEFINE_enum, "features", _MODEL.features, ["mean", "flatten"],
        "conv4/resnet12 head input: spatial mean (original Omniglot code) or flattened map.")
_define(flags.DEFINE_enum, "norm", _MODEL.norm, list(models.NORMS),
        "batch_norm: current-batch statistics at train and test time (the paper's "
        "transductive setting); layer_norm: per-example, not transductive; none.")
_define(flags.DEFINE_boolean, "norm_scale", _MODEL.norm_scale, "Give the norm a learned "
        "scale. The original MAML code's batch norm has an offset only (--nonorm_scale).")
_define(flags.DEFINE_enum, "head_init", _MODEL.head_init, ["glorot", "normal"], "Output layer "
        "initialisation; normal = N(0, 1), the original code's Omniglot head.")
_define(flags.DEFINE_boolean, "shared_head", _MODEL.shared_head, "UNICORN-MAML: meta-learn "
        "one head vector and bias shared by all N outputs, copied to each at the start of every "
        "task, so the order of an episode's labels does not matter.")
_define(flags.DEFINE_boolean, "per_step_bn_params", False, "MAML++ BNWB: a separate norm "
        "scale/offset for each inner step (forward passes after s updates use set s).")
_define(flags.DEFINE_enum, "bn_running_stats", "none", ["none", "shared", "per_step"],
        "Track running batch-norm statistics in training (per_step: one set per inner step, "
        "MAML++ BNRS). Used in evaluation only with --eval_norm_stats=running.")
_define(flags.DEFINE_enum, "eval_norm_stats", "batch", ["batch", "running"],
        "Batch-norm statistics in evaluation: batch = each task's current batch "
        "(transductive: the paper's and MAML++'s code); running = the tracked running "
        "statistics, so a prediction does not depend on the other query examples. Writes "
        "eval_<split>_running.json instead of eval_<split>.json.", may_change=True)

# --- meta-learning ---
_define(flags.DEFINE_boolean, "learn_inner_lr", _META.learn_inner_lr, "Meta-SGD: meta-learn "
        "one inner rate per parameter entry.")
_define(flags.DEFINE_boolean, "per_step_inner_lr", _META.per_step_inner_lr, "MAML++ LSLR: "
        "meta-learn one inner rate per parameter tensor and inner step (initial value "
        "--inner_lr).")
_define(flags.DEFINE_enum, "loss_reduction", _META.loss_reduction, list(maml.REDUCTIONS),
        "mean: losses are per-task means. original: cbfinn/maml's classification loss, "
        "per-example cross-entropy / K summed over examples, so the inner step is N x "
        "--inner_lr on the mean (also scales the meta-loss, which matters for --clip_value).")
_define(flags.DEFINE_enum, "inner_adapt", _META.inner_adapt, list(maml.ADAPT),
        "Parameters the inner loop adapts: all; no_norm (norm scale/offset only meta-learned, "
        "as in the original code); head (ANIL).")
_define(flags.DEFINE_integer, "msl_iterations", _META.msl_iterations, "MAML++ multi-step "
        "loss: weight the query loss after every inner step, annealing towards the last step "
        "over this many iterations (0: off).", lower_bound=0)
_define(flags.DEFINE_integer, "first_order_iterations", _META.first_order_iterations,
        "MAML++ derivative-order annealing: first order for this many iterations, then second "
        "order.", lower_bound=0)
_define(flags.DEFINE_enum, "meta_lr_schedule", _ADAM.schedule, ["constant", "cosine"],
        "cosine: MAML++'s annealing from --meta_lr to --min_meta_lr over --num_iterations "
        "(a resumed run must keep its --num_iterations).")
_define(flags.DEFINE_float, "min_meta_lr", _ADAM.min_learning_rate, "Final meta learning rate "
        "of the cosine schedule.", lower_bound=0.0)
_define(flags.DEFINE_float, "clip_value", _ADAM.clip_value, "Clip each meta-gradient entry to "
        "[-c, c] (paper: 10 on MiniImagenet); 0 disables.", lower_bound=0.0)

# --- how to compute ---
_define(flags.DEFINE_enum, "compute_dtype", _META.compute_dtype, list(maml.COMPUTE_DTYPES),
        "Mixed precision: the meta-step's passes in bfloat16 (TPU's native type; same range "
        "as float32) or float16 (GPU; static loss scale "
        f"{maml.FLOAT16_LOSS_SCALE:g}), with float32 weights, losses and meta-gradient. "
        "Evaluation stays float32.")
_define(flags.DEFINE_integer, "task_chunk", 0, "Memory: compute each replica's meta-gradient "
        "this many tasks at a time (summed: the same meta-gradient), so only one chunk's "
        "activations are alive at once; must divide the tasks per replica. 0: all at once "
        "(fastest).", lower_bound=0, may_change=True)
_define(flags.DEFINE_string, "memory_budget", "", "Memory: before training, measure task "
        "chunks and --remat on the device at hand (a probe step each, on one replica's shapes) "
        "and take the fastest whose peak fits this size (e.g. 16GB, 800MB, 1.5GiB; CPU: the "
        "process's peak net of its baseline); logs the choice and records it in config.json. "
        "Excludes --task_chunk and --remat.", may_change=True)
_define(flags.DEFINE_boolean, "remat", _META.remat, "Memory: keep only each inner step's "
        "inputs for the backward pass and recompute its activations there (the same "
        "meta-gradient; one more forward and inner gradient per step).", may_change=True)
_define(flags.DEFINE_enum, "jit_compile", "auto", ["auto", "true", "false"],
        "XLA-compile the meta-step. auto: on with a GPU/TPU; on CPU only for MLPs (1.6x "
        "faster), not for conv4, whose XLA convolution gradients measured ~80x slower there "
        "(bench/bench_meta_step.py).", may_change=True)


@dataclasses.dataclass(frozen=True)
class Episodes:
  """Episode sizes, with the evaluation defaults resolved."""
  k_shot: int
  k_query: int
  eval_k_query: int
  meta_batch_size: int
  eval_batch_size: int


def episodes(values: dict) -> Episodes:
  return Episodes(values["k_shot"], values["k_query"], values["eval_k_query"] or values["k_query"],
                  values["meta_batch_size"],
                  values["eval_batch_size"] or values["meta_batch_size"])


def fixed_on_resume(stored: dict, training: bool) -> frozenset[str]:
  """Runner flags a resumed run must keep: the cosine schedule (meta-training's if chosen,
  pretraining's always) anneals over --num_iterations,
  so a longer or shorter training run would silently follow another schedule from the
  restored step on. Meta-testing alone trains nothing and may name another length."""
  cosine = stored.get("meta_lr_schedule") == "cosine" or stored.get("mode") == "pretrain"
  return frozenset({"num_iterations"}) if training and cosine else frozenset()


def model_config(values: dict, image_shape: tuple | None) -> models.ModelConfig:
  """The model of the flags: an MLP regressor for sinusoid, else --model on ``image_shape``."""
  slots = values["inner_steps"] + 1  # forward passes after 0..S inner updates
  common = dict(hidden_sizes=meta_flags.hidden_sizes(values), norm=values["norm"],
                norm_scale=values["norm_scale"], head_init=values["head_init"],
                shared_head=values["shared_head"],
                param_slots=slots if values["per_step_bn_params"] else 0,
                stat_slots={"none": 0, "shared": 1, "per_step": slots}[
                    values["bn_running_stats"]])
  if image_shape is None:
    return models.ModelConfig("mlp", (1,), 1, **common)
  if values["model"].startswith("keras:"):
    return models.ModelConfig("keras", tuple(image_shape), values["n_way"],
                              keras=keras_spec(values["model"]), **common)
  return models.ModelConfig(values["model"], tuple(image_shape), values["n_way"],
                            num_filters=values["num_filters"], downsample=values["downsample"],
                            features=values["features"],
                            widths=tuple(int(w) for w in values["resnet_widths"]), **common)


def keras_spec(flag: str) -> str:
  """``keras:PATH_OR_MODULE:FUNCTION`` -> the spec, a file path made absolute (so resuming or
  exporting from another directory finds the same file)."""
  source, _, function = flag[len("keras:"):].rpartition(":")
  if source.endswith(".py"):
    source = str(Path(source).expanduser().resolve())
  return f"{source}:{function}"


def meta_config(values: dict) -> maml.MetaConfig:
  return maml.MetaConfig(
      inner_steps=values["inner_steps"], inner_lr=values["inner_lr"],
      first_order=values["first_order"], learn_inner_lr=values["learn_inner_lr"],
      per_step_inner_lr=values["per_step_inner_lr"],
      loss="mse" if values["dataset"] == "sinusoid" else "softmax",
      loss_reduction=values["loss_reduction"], inner_adapt=values["inner_adapt"],
      msl_iterations=values["msl_iterations"],
      first_order_iterations=values["first_order_iterations"],
      compute_dtype=values["compute_dtype"], remat=values["remat"])


def adam_config(values: dict) -> optim.AdamConfig:
  return optim.AdamConfig(learning_rate=values["meta_lr"], clip_value=values["clip_value"],
                          schedule=values["meta_lr_schedule"],
                          min_learning_rate=values["min_meta_lr"],
                          decay_steps=values["num_iterations"])


def model_from_record(record: dict) -> tuple[models.ModelConfig, maml.MetaConfig]:
  """The configs a run record stored (JSON lists back to tuples)."""
  model = dict(record["model"])
  model["input_shape"] = tuple(model["input_shape"])
  model["hidden_sizes"] = tuple(model["hidden_sizes"])
  if "widths" in model:
    model["widths"] = tuple(model["widths"])
  return models.ModelConfig(**model), maml.MetaConfig(**record["meta"])


def eval_measured_steps(values: dict) -> tuple[int, ...] | None:
  """--eval_measured_steps, resolved: ascending step counts ending with --eval_inner_steps, or
  None (every step)."""
  if not values["eval_measured_steps"]:
    return None
  steps = meta_flags.eval_inner_steps(values)
  chosen = sorted({int(s) for s in values["eval_measured_steps"]} | {steps})
  if chosen[-1] > steps:
    raise UsageError(f"--eval_measured_steps={','.join(values['eval_measured_steps'])}: "
                     f"{chosen[-1]} is beyond the {steps} evaluation steps (--eval_inner_steps)")
  return tuple(chosen)


def record_parts(values: dict, model: models.ModelConfig, meta: maml.MetaConfig,
                 manifest: dict | None) -> dict:
  """What the run record keeps beside the flags: the resolved configs and the records' image
  spec (enough for the export to rebuild the model)."""
  parts = {"eval_inner_steps": meta_flags.eval_inner_steps(values),
           "model": dataclasses.asdict(model), "meta": dataclasses.asdict(meta)}
  if manifest is not None:
    build = manifest.get("build", {})
    parts["records"] = {
        "dataset": manifest["dataset"],
        "image_shape": list(manifest["image_shape"]),
        "pixel_values": manifest.get("pixel_values", ""),
        **{k: build[k] for k in ("image_size", "channels", "invert", "resample") if k in build}}
  return parts
