"""``--init_from=MODEL_DIR``: start meta-training from another run's body, with a new head.

A few-shot learner starts better from a body that already extracts features: MAML from a
supervised-pretrained ResNet-12 gains about 16 points on MiniImagenet 5-way 1-shot over its
from-scratch figure (Ye & Chao, ICLR 2022). The head (``out/*``, the classifier of the source
run's own classes or ways) is never taken: it is the new run's own initialisation, so the source
may have any number of outputs. Everything else named in the new model must be in the source's
checkpoint with the same shape, or the run is refused in one line: a body half-loaded would
train without saying so. Only weights are taken: learned inner rates, running statistics and the
optimiser's moments start afresh, as for a new run.

Loaded once, when the run starts with no checkpoint of its own; a resumed run restores its own
checkpoint and never reads the source again (it may since have been deleted).
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from pipeline.errors import UsageError
from trainer import model_dir as guard

HEAD_PREFIX = "out/"


def source_checkpoint(source: str) -> str:
  """The checkpoint ``--init_from`` names: the run's best by validation, else its newest."""
  folder = Path(source)
  if not (folder / guard.RUN_RECORD).is_file():
    raise UsageError(f"--init_from={source}: not a run folder (no {guard.RUN_RECORD})")
  for sub in ("best", "ckpt"):
    found = guard.checkpoints(folder / sub)
    if found:
      return found[-1]
  raise UsageError(f"--init_from={source}: the run has no checkpoint yet (best/ and ckpt/ "
                   f"are empty)")


def check(source: str, model_dir: Path) -> None:
  """Refuses an unusable source of a run that will start afresh (one with no checkpoint)."""
  if not guard.checkpoints(Path(model_dir) / "ckpt"):
    source_checkpoint(source)


def body_names(params: dict) -> list[str]:
  return [k for k in params if not k.startswith(HEAD_PREFIX)]


def load_body(params: dict[str, tf.Variable], source: str) -> str:
  """Assigns every non-head weight of ``params`` from the source run; returns what it did."""
  prefix = source_checkpoint(source)
  body = {k: params[k] for k in body_names(params)}
  reader = tf.train.load_checkpoint(prefix)
  stored = reader.get_variable_to_shape_map()
  missing, wrong = [], []
  for name, variable in body.items():
    key = _key(name)
    if key not in stored:
      missing.append(name)
    elif tuple(stored[key]) != tuple(variable.shape):
      wrong.append(f"{name} {tuple(stored[key])} (here {tuple(variable.shape)})")
  if missing or wrong:
    kind = json.loads((Path(source) / guard.RUN_RECORD).read_text()).get("model", {}).get(
        "kind", "?")
    what = (f"lacks {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more"
                                                   if len(missing) > 3 else "")
            if missing else f"has other shapes: {', '.join(wrong[:3])}")
    raise UsageError(f"--init_from={source}: its model ({kind}) is not this body: it {what}")
  for name, variable in body.items():
    variable.assign(reader.get_tensor(_key(name)))
  return (f"initialised {len(body)} body weights from {prefix}; the head "
          f"({', '.join(k for k in params if k.startswith(HEAD_PREFIX))}) is this run's own")


def _key(name: str) -> str:
  """A learner weight's key in a checkpoint written by ``tf.train.Checkpoint(params=...)``."""
  return f"params/{name.replace('.', '..').replace('/', '.S')}/.ATTRIBUTES/VARIABLE_VALUE"
