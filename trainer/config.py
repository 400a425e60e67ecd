"""Every flag of ``python -m trainer.main``, and their translation into plain config objects.

Flags are documentation: ``--helpfull`` lists them all, and each ``configs/*.cfg`` flagfile
sets the paper's values for one experiment. Everything below the flags works on the frozen
dataclasses built here, so tests and other entry points never touch absl.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from absl import flags

from pipeline import paths
from rl.maml_rl import TRPOConfig  # TensorFlow only: the RL extra is not needed
from trainer import distribute, maml, models, optim
from trainer import family as family_registry

_MODEL, _META, _ADAM, _TRPO = models.ModelConfig, maml.MetaConfig, optim.AdamConfig, TRPOConfig

FLAGS = flags.FLAGS

# --- what to learn ---
flags.DEFINE_string("dataset", "omniglot",
                    "Task: an image dataset whose records --data_dir holds (omniglot, "
                    "miniimagenet, folder, cifarfs, fc100, tfds:NAME[:CONFIG]: what "
                    "tools/build_tfrecords.py was given); sinusoid (generated); rl (a policy "
                    "meta-trained on --env; needs the 'rl' extra).")
flags.register_validator(
    "dataset", lambda v: any(f.serves(v) for f in family_registry.FAMILIES),
    "must be omniglot, miniimagenet, folder, cifarfs, fc100, tfds:NAME[:CONFIG], sinusoid or rl")
flags.DEFINE_string("data_dir", None, "Records folder from tools/build_tfrecords.py "
                    "(default data/records/<dataset>). Unused for sinusoid.")
flags.DEFINE_integer("n_way", 5, "Classes per episode.", lower_bound=1)
flags.DEFINE_integer("k_shot", 1, "Support examples per class (sinusoid: points per task).",
                     lower_bound=1)
flags.DEFINE_integer("k_query", 15, "Query examples per class in training.", lower_bound=1)
flags.DEFINE_integer("eval_k_query", None, "Query examples per class in evaluation "
                     "(default: --k_query).", lower_bound=1)
flags.DEFINE_integer("meta_batch_size", 32, "Tasks per meta-step (global, over all replicas).",
                     lower_bound=1)
flags.DEFINE_integer("eval_batch_size", None, "Tasks per evaluation batch "
                     "(default: --meta_batch_size).", lower_bound=1)

# --- model ---
flags.DEFINE_enum("model", "conv4", ["conv4", "mlp"], "Backbone.")
flags.DEFINE_integer("num_filters", _MODEL.num_filters, "conv4 filters per layer (paper: 64 Omniglot, 32 Mini).",
                     lower_bound=1)
flags.DEFINE_enum("downsample", _MODEL.downsample, ["stride", "maxpool"],
                  "conv4 down-sampling: stride-2 convs (Omniglot) or 2x2 max-pool (Mini).")
flags.DEFINE_enum("features", _MODEL.features, ["mean", "flatten"],
                  "conv4 head input: spatial mean (original Omniglot code) or flattened map.")
flags.DEFINE_list("hidden_sizes", [str(h) for h in _MODEL.hidden_sizes], "mlp hidden layer widths.")
flags.DEFINE_enum("norm", _MODEL.norm, list(models.NORMS),
                  "batch_norm: current-batch statistics at train and test time (the paper's "
                  "transductive setting); layer_norm: per-example, not transductive; none.")
flags.DEFINE_boolean("norm_scale", _MODEL.norm_scale, "Give the norm a learned scale. The original MAML "
                     "code's batch norm has an offset only (--nonorm_scale).")
flags.DEFINE_enum("head_init", _MODEL.head_init, ["glorot", "normal"], "Output layer initialisation; "
                  "normal = N(0, 1), the original code's Omniglot head.")
flags.DEFINE_boolean("per_step_bn_params", False, "MAML++ BNWB: a separate norm scale/offset "
                     "for each inner step (forward passes after s updates use set s).")
flags.DEFINE_enum("bn_running_stats", "none", ["none", "shared", "per_step"],
                  "Track running batch-norm statistics in training (per_step: one set per "
                  "inner step, MAML++ BNRS). Used in evaluation only with "
                  "--eval_norm_stats=running.")
flags.DEFINE_enum("eval_norm_stats", "batch", ["batch", "running"],
                  "Batch-norm statistics in evaluation: batch = each task's current batch "
                  "(transductive: the paper's and MAML++'s code); running = the tracked "
                  "running statistics, so a prediction does not depend on the other query "
                  "examples. Writes eval_<split>_running.json instead of eval_<split>.json.")

# --- meta-learning ---
flags.DEFINE_integer("inner_steps", _META.inner_steps, "Adaptation steps in meta-training.", lower_bound=1)
flags.DEFINE_integer("eval_inner_steps", None, "Adaptation steps in evaluation; metrics are "
                     "reported after each (default: --inner_steps).", lower_bound=1)
flags.DEFINE_float("inner_lr", _META.inner_lr, "Inner-loop learning rate (initial value with "
                   "--learn_inner_lr).", lower_bound=0.0)
flags.DEFINE_boolean("first_order", _META.first_order, "First-order MAML (no second derivatives).")
flags.DEFINE_boolean("learn_inner_lr", _META.learn_inner_lr, "Meta-SGD: meta-learn one inner rate per "
                     "parameter entry.")
flags.DEFINE_boolean("per_step_inner_lr", _META.per_step_inner_lr, "MAML++ LSLR: meta-learn one inner rate per "
                     "parameter tensor and inner step (initial value --inner_lr).")
flags.DEFINE_enum("loss_reduction", _META.loss_reduction, list(maml.REDUCTIONS),
                  "mean: losses are per-task means. original: cbfinn/maml's classification "
                  "loss, per-example cross-entropy / K summed over examples, so the inner step "
                  "is N x --inner_lr on the mean (also scales the meta-loss, which matters for "
                  "--clip_value).")
flags.DEFINE_enum("inner_adapt", _META.inner_adapt, list(maml.ADAPT),
                  "Parameters the inner loop adapts: all; no_norm (norm scale/offset only "
                  "meta-learned, as in the original code); head (ANIL).")
flags.DEFINE_integer("msl_iterations", _META.msl_iterations, "MAML++ multi-step loss: weight the query loss "
                     "after every inner step, annealing towards the last step over this many "
                     "iterations (0: off).", lower_bound=0)
flags.DEFINE_integer("first_order_iterations", _META.first_order_iterations, "MAML++ derivative-order annealing: first "
                     "order for this many iterations, then second order.", lower_bound=0)
flags.DEFINE_float("meta_lr", _ADAM.learning_rate, "Adam learning rate of the meta-update.", lower_bound=0.0)
flags.DEFINE_enum("meta_lr_schedule", _ADAM.schedule, ["constant", "cosine"],
                  "cosine: MAML++'s annealing from --meta_lr to --min_meta_lr over "
                  "--num_iterations.")
flags.DEFINE_float("min_meta_lr", _ADAM.min_learning_rate, "Final meta learning rate of the cosine schedule.",
                   lower_bound=0.0)
flags.DEFINE_enum("compute_dtype", _META.compute_dtype, list(maml.COMPUTE_DTYPES),
                  "Mixed precision: the meta-step's passes in bfloat16 (TPU's native type; "
                  "same range as float32) or float16 (GPU; static loss scale "
                  f"{maml.FLOAT16_LOSS_SCALE:g}), with float32 weights, losses and "
                  "meta-gradient. Evaluation stays float32.")
flags.DEFINE_integer("task_chunk", 0, "Memory: compute each replica's meta-gradient this many "
                     "tasks at a time (summed: the same meta-gradient), so only one chunk's "
                     "activations are alive at once; must divide the tasks per replica. "
                     "0: all at once (fastest).", lower_bound=0)
flags.DEFINE_enum("sampler", "host", ["host", "device"], "Training episodes: host = the tf.data "
                  "pipeline; device = the split's images placed on the accelerator once and "
                  "each meta-batch drawn inside the compiled step (the same episodes; no input "
                  "crosses from the host per step).")
flags.DEFINE_boolean("remat", _META.remat, "Memory: keep only each inner step's inputs for the "
                     "backward pass and recompute its activations there (the same "
                     "meta-gradient; one more forward and inner gradient per step).")
flags.DEFINE_float("clip_value", _ADAM.clip_value, "Clip each meta-gradient entry to [-c, c] (paper: 10 on "
                   "MiniImagenet); 0 disables.", lower_bound=0.0)

# --- meta-reinforcement learning (--dataset=rl) ---
flags.DEFINE_string("env", "2DNavigation-v0", "RL task family: 2DNavigation-v0, Bandit-K5-v0, "
                    "Bandit-K10-v0, Bandit-K50-v0, TabularMDP-v0, HalfCheetahVel-v5, "
                    "HalfCheetahDir-v5, AntVel-v5, AntDir-v5, AntGoal-v5.")
flags.DEFINE_string("env_kwargs", "{}", "JSON object of options for the task family, e.g. "
                    "'{\"reward\": \"squared\"}' for 2DNavigation-v0's squared-distance reward "
                    "(default: minus the distance, as the original code).")
flags.DEFINE_integer("rollouts_per_task", 20, "Episodes per task and per adaptation round.",
                     lower_bound=1)
flags.DEFINE_integer("eval_rollouts_per_task", None, "Episodes per task and per adaptation "
                     "round in validation and meta-test (default: --rollouts_per_task). The "
                     "original code's RL test scripts sampled 40 (twice its training's 20); "
                     "must divide --meta_batch_size * --rollouts_per_task, the sampler's "
                     "environments.", lower_bound=1)
flags.DEFINE_float("eval_later_lr_scale", 1.0, "Validation and meta-test take adaptation steps "
                   "after the first at --inner_lr times this (1: every step at --inner_lr). The "
                   "original code's RL test scripts used 0.5 (0.5, then 0.25).",
                   lower_bound=0.0)
flags.DEFINE_integer("horizon", 0, "Episode length (0: the task family's: 100 navigation, "
                     "200 locomotion, 10 bandits/MDPs).", lower_bound=0)
flags.DEFINE_float("gamma", 0.99, "Discount.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("gae_lambda", 1.0, "GAE lambda.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("outer_optimizer", "trpo", ["trpo", "adam"], "Meta-optimizer for RL.")
flags.DEFINE_float("max_kl", _TRPO.max_kl, "TRPO KL bound.", lower_bound=0.0)
flags.DEFINE_integer("cg_iters", _TRPO.cg_iters, "TRPO conjugate-gradient iterations.", lower_bound=1)
flags.DEFINE_float("cg_damping", _TRPO.cg_damping, "TRPO damping added to the Fisher-vector products.",
                   lower_bound=0.0)
flags.DEFINE_integer("ls_max_steps", _TRPO.ls_max_steps, "TRPO line-search halvings.", lower_bound=1)
flags.DEFINE_float("ls_backtrack_ratio", _TRPO.ls_backtrack_ratio, "TRPO line-search step ratio.", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_integer("num_workers", 0, "Rollout worker processes (0: in-process).",
                     lower_bound=0)

# --- run ---
flags.DEFINE_enum("mode", "train_eval", ["train", "eval", "train_eval"],
                  "train; eval (the best-by-val checkpoint, else the latest); or both.")
flags.DEFINE_string("model_dir", None, "Checkpoints, metrics.jsonl, TensorBoard and eval JSON. "
                    "Re-running the same command resumes. Default: runs/<flagfile name>.")
flags.DEFINE_integer("num_iterations", 60000, "Meta-steps to train.", lower_bound=0)
flags.DEFINE_integer("eval_every", 1000, "Validate every this many steps (0: only at the end).",
                     lower_bound=0)
flags.DEFINE_integer("val_episodes", 300, "Validation episodes each time.", lower_bound=1)
flags.DEFINE_integer("eval_episodes", 600, "Meta-test episodes.", lower_bound=1)
flags.DEFINE_string("eval_split", "test", "Split to meta-test on.")
flags.DEFINE_string("eval_checkpoint", "best", "Checkpoint to meta-test: best by validation, "
                    "the latest (the original code's choice; writes eval_<split>_latest.json), "
                    "or a step number whose checkpoint is kept (equal-step comparisons; writes "
                    "eval_<split>_step<N>.json).")
flags.register_validator("eval_checkpoint", lambda v: v in ("best", "latest") or v.isdigit(),
                         "must be best, latest or a step number")
flags.DEFINE_integer("checkpoint_every", 1000, "Checkpoint every this many steps.", lower_bound=1)
flags.DEFINE_integer("log_every", 100, "Write training metrics every this many steps.",
                     lower_bound=1)
flags.DEFINE_integer("steps_per_loop", 10, "Meta-steps per compiled loop (fewer host round "
                     "trips); clipped to the next log/eval/checkpoint boundary.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seeds initialization and every episode stream.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "XLA-compile the meta-step. auto: on with a GPU/TPU; on CPU only for MLPs "
                  "(1.6x faster), not for conv4, whose XLA convolution gradients measured "
                  "~80x slower there (bench/bench_meta_step.py).")
flags.DEFINE_enum("strategy", "auto", list(distribute.STRATEGIES),
                  "auto: mirrored over several GPUs, else one device. multi_worker reads "
                  "TF_CONFIG; tpu uses --tpu.")
flags.DEFINE_string("tpu", "", "TPU name or grpc:// address for --strategy=tpu.")
flags.DEFINE_boolean("verify_records", False, "At start-up, also check every shard the run "
                     "reads against the manifest's SHA-256 (files and record counts are always "
                     "checked).")
flags.DEFINE_boolean("debug", False, "Show Python tracebacks instead of one-line errors.")
flags.DEFINE_boolean("deterministic", False, "Enable TF op determinism (bitwise-reproducible "
                     "runs and resumes; slower on GPU).")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How long and how often; no defaults here: the flags' are the only ones."""
  model_dir: Path
  mode: str
  num_iterations: int
  eval_every: int
  val_episodes: int
  eval_episodes: int
  eval_split: str
  eval_checkpoint: str
  checkpoint_every: int
  log_every: int
  steps_per_loop: int
  seed: int


def default_model_dir(flagfile: str | None) -> Path:
  name = Path(flagfile).stem if flagfile else "default"
  return paths.REPO_ROOT / "runs" / name


def flagfile_of(argv: list[str]) -> str | None:
  """The last ``--flagfile`` on a command line (absl reads it but keeps no flag for it)."""
  found = None
  for i, arg in enumerate(argv):
    if arg.startswith("--flagfile="):
      found = arg.split("=", 1)[1]
    elif arg == "--flagfile" and i + 1 < len(argv):
      found = argv[i + 1]
  return found


# Below, ``values`` is ``FLAGS.flag_values_dict()``: only trainer/main.py (and the export's
# fallback for old runs) reads the flags; these translations are pure.


def model_config(values: dict, image_shape: tuple | None) -> models.ModelConfig:
  slots = values["inner_steps"] + 1  # forward passes after 0..S inner updates
  common = dict(hidden_sizes=tuple(int(h) for h in values["hidden_sizes"]), norm=values["norm"],
                norm_scale=values["norm_scale"], head_init=values["head_init"],
                param_slots=slots if values["per_step_bn_params"] else 0,
                stat_slots={"none": 0, "shared": 1, "per_step": slots}[
                    values["bn_running_stats"]])
  if values["dataset"] == "sinusoid":
    return models.ModelConfig("mlp", (1,), 1, **common)
  return models.ModelConfig(values["model"], tuple(image_shape), values["n_way"],
                            num_filters=values["num_filters"], downsample=values["downsample"],
                            features=values["features"], **common)


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


def flag_names() -> list[str]:
  """The trainer's flags (absl's own are not among them)."""
  return [f.name for f in FLAGS.get_flags_for_module(sys.modules[__name__])]


def default_values() -> dict:
  """Every trainer flag's default: the ``values`` of a command line that sets nothing (for
  benchmarks and tests that build configs without parsing one)."""
  return {f.name: f.default for f in FLAGS.get_flags_for_module(sys.modules[__name__])}


def eval_inner_steps(values: dict) -> int:
  return values["eval_inner_steps"] or values["inner_steps"]


def run_config(values: dict, argv: list[str]) -> RunConfig:
  return RunConfig(
      model_dir=(Path(values["model_dir"]) if values["model_dir"]
                 else default_model_dir(flagfile_of(argv))),
      **{f.name: values[f.name] for f in dataclasses.fields(RunConfig) if f.name != "model_dir"})


RUN_RECORD_VERSION = 1


def code_version() -> str:
  """The git commit of the running code (``+dirty`` when edited), else the package version."""
  try:
    commit = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "rev-parse", "HEAD"],
                            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True, timeout=10,
                           check=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    try:
      return metadata.version("maml-tf2")
    except metadata.PackageNotFoundError:
      return "unknown"


def run_record(values: dict, model: models.ModelConfig | None = None,
               meta: maml.MetaConfig | None = None, manifest: dict | None = None) -> dict:
  """What defines a run, written once to ``<model_dir>/config.json``.

  Besides every flag's value, the resolved model and meta-learning configs and the records'
  image spec: enough for :mod:`trainer.export` to rebuild the model without the flags.
  """
  names = set(flag_names())
  record = {
      "schema_version": RUN_RECORD_VERSION,
      "code_version": code_version(),
      "dataset": values["dataset"],
      "flags": {k: v for k, v in values.items() if k in names},
      "eval_inner_steps": eval_inner_steps(values),
  }
  if model is not None:
    record["model"] = dataclasses.asdict(model)
  if meta is not None:
    record["meta"] = dataclasses.asdict(meta)
  if manifest is not None:
    build = manifest.get("build", {})
    record["records"] = {
        "dataset": manifest["dataset"],
        "image_shape": list(manifest["image_shape"]),
        "pixel_values": manifest.get("pixel_values", ""),
        **{k: build[k] for k in ("image_size", "channels", "invert", "resample") if k in build}}
  return record


def model_from_record(record: dict) -> tuple[models.ModelConfig, maml.MetaConfig]:
  """The configs :func:`run_record` stored (JSON lists back to tuples)."""
  model = dict(record["model"])
  model["input_shape"] = tuple(model["input_shape"])
  model["hidden_sizes"] = tuple(model["hidden_sizes"])
  return models.ModelConfig(**model), maml.MetaConfig(**record["meta"])
