"""The runner's flags (those of every run), and what a run is: its config and its record.

The runner knows only what every run has: the task (``--dataset``), the mode, the model_dir,
the length, logging, checkpoints, the strategy and the seed. Each task family defines and
resolves its own flags (:mod:`trainer.family` lists the families; ``--helpfull`` shows each
family's flags under its module). Everything below the flags works on plain values, so tests
and other entry points never touch absl.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from absl import flags

from pipeline import paths
from trainer import distribute
from trainer import family as family_registry
from trainer.flag_groups import FlagGroup

FLAGS = flags.FLAGS
RUN = FlagGroup("every run", __name__)

RUN.define(flags.DEFINE_string, "dataset", "omniglot",
           "Task: an image dataset whose records --data_dir holds (omniglot, miniimagenet, "
           "folder, cifarfs, fc100, tfds:NAME[:CONFIG]: what tools/build_tfrecords.py was "
           "given); sinusoid (generated); rl (a policy meta-trained on --env; needs the 'rl' "
           "extra).")
flags.register_validator(
    "dataset", lambda v: any(f.serves(v) for f in family_registry.FAMILIES),
    "must be omniglot, miniimagenet, folder, cifarfs, fc100, tfds:NAME[:CONFIG], sinusoid or rl")
RUN.define(flags.DEFINE_enum, "mode", "train_eval", ["train", "eval", "train_eval", "pretrain"],
           "train; eval (the best-by-val checkpoint, else the latest); or both. pretrain "
           "(image datasets): train the backbone as a classifier of every train class, "
           "validated and tested by nearest-centroid episodes; then meta-train from it with "
           "--init_from (docs/training.md).",
           may_change=True)
RUN.define(flags.DEFINE_string, "model_dir", None, "Checkpoints, metrics.jsonl, TensorBoard and "
           "eval JSON. Re-running the same command resumes. Default: runs/<flagfile name>.",
           may_change=True)
# A task family whose training depends on the length (the cosine schedule) refuses another
# length on resume itself (Family.fixed_on_resume).
RUN.define(flags.DEFINE_integer, "num_iterations", 60000, "Meta-steps to train.", lower_bound=0,
           may_change=True)
RUN.define(flags.DEFINE_integer, "eval_every", 1000, "Validate every this many steps (0: only "
           "at the end).", lower_bound=0, may_change=True)
RUN.define(flags.DEFINE_integer, "val_episodes", 300, "Validation episodes each time.",
           lower_bound=1, may_change=True)
RUN.define(flags.DEFINE_integer, "eval_episodes", 600, "Meta-test episodes.", lower_bound=1,
           may_change=True)
RUN.define(flags.DEFINE_string, "eval_split", "test", "Split to meta-test on.", may_change=True)
RUN.define(flags.DEFINE_string, "eval_checkpoint", "best", "Checkpoint to meta-test: best by "
           "validation, the latest (the original code's choice; writes "
           "eval_<split>_latest.json), or a step number whose checkpoint is kept (equal-step "
           "comparisons; writes eval_<split>_step<N>.json).", may_change=True)
flags.register_validator("eval_checkpoint", lambda v: v in ("best", "latest") or v.isdigit(),
                         "must be best, latest or a step number")
RUN.define(flags.DEFINE_integer, "checkpoint_every", 1000, "Checkpoint every this many steps.",
           lower_bound=1, may_change=True)
RUN.define(flags.DEFINE_integer, "keep_checkpoint_every", 0, "Also keep the checkpoint of every "
           "step that is a multiple of this, for good (in <model_dir>/kept/; only the newest 3 "
           "of ckpt/ are kept), so that --eval_checkpoint=N can meta-test those steps later. "
           "0: none.", lower_bound=0, may_change=True)
RUN.define(flags.DEFINE_integer, "log_every", 100, "Write training metrics every this many "
           "steps.", lower_bound=1, may_change=True)
RUN.define(flags.DEFINE_integer, "steps_per_loop", 10, "Meta-steps per compiled loop (fewer "
           "host round trips); clipped to the next log/eval/checkpoint boundary.",
           lower_bound=1, may_change=True)
RUN.define(flags.DEFINE_integer, "seed", 0, "Seeds initialization and every episode stream.")
RUN.define(flags.DEFINE_enum, "strategy", "auto", list(distribute.STRATEGIES),
           "auto: mirrored over several GPUs, else one device. multi_worker reads TF_CONFIG; "
           "tpu uses --tpu.", may_change=True)
RUN.define(flags.DEFINE_string, "tpu", "", "TPU name or grpc:// address for --strategy=tpu.",
           may_change=True)
RUN.define(flags.DEFINE_boolean, "debug", False, "Show Python tracebacks instead of one-line "
           "errors.", may_change=True)
RUN.define(flags.DEFINE_boolean, "deterministic", False, "Enable TF op determinism "
           "(bitwise-reproducible runs and resumes; slower on GPU).", may_change=True)

family_registry.define_flags()  # every family's flags, so that absl parses them all


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
  keep_checkpoint_every: int
  log_every: int
  steps_per_loop: int
  seed: int

  @property
  def training(self) -> bool:
    return self.mode in ("train", "train_eval", "pretrain")

  @property
  def evaluating(self) -> bool:
    return self.mode in ("eval", "train_eval", "pretrain")


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


# Below, ``values`` maps flag names to values (``flag_values()``): only the entry points read
# absl's FLAGS; these translations are pure.


def flag_names() -> list[str]:
  """Every trainer flag: the runner's, then each family's (absl's own are not among them)."""
  return list(dict.fromkeys(RUN.names + [n for f in family_registry.FAMILIES
                                         for n in f.flag_names()]))


def flag_values() -> dict:
  """The parsed value of every trainer flag."""
  return {name: FLAGS[name].value for name in flag_names()}


def default_values() -> dict:
  """Every trainer flag's default: the ``values`` of a command line that sets nothing (for
  benchmarks and tests that build configs without parsing one)."""
  return {name: FLAGS[name].default for name in flag_names()}


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


def run_record(values: dict, **resolved) -> dict:
  """What defines a run, written once to ``<model_dir>/config.json``: every flag's value, and
  what the family resolved from them (``resolved``: for the image family the model and
  meta-learning configs and the records' image spec, enough for :mod:`trainer.export` to
  rebuild the model without the flags)."""
  names = set(flag_names())
  return {
      "schema_version": RUN_RECORD_VERSION,
      "code_version": code_version(),
      "dataset": values["dataset"],
      "flags": {k: v for k, v in values.items() if k in names},
      **resolved,
  }
