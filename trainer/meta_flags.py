"""The flags every meta-learning family reads: meta-batch, inner loop, meta learning rate, and
the width of the MLP (the sinusoid's regressor, an image MLP, the RL policy)."""

from __future__ import annotations

from absl import flags

from trainer import maml, models, optim
from trainer.flag_groups import FlagGroup

META = FlagGroup("meta-learning", __name__)
_META, _ADAM, _MODEL = maml.MetaConfig, optim.AdamConfig, models.ModelConfig

META.define(flags.DEFINE_integer, "meta_batch_size", 32, "Tasks per meta-step (global, over "
            "all replicas).", lower_bound=1)
META.define(flags.DEFINE_integer, "inner_steps", _META.inner_steps, "Adaptation steps in "
            "meta-training.", lower_bound=1)
META.define(flags.DEFINE_integer, "eval_inner_steps", None, "Adaptation steps in evaluation; "
            "metrics are reported after each (default: --inner_steps).", lower_bound=1)
META.define(flags.DEFINE_float, "inner_lr", _META.inner_lr, "Inner-loop learning rate "
            "(initial value with --learn_inner_lr).", lower_bound=0.0)
META.define(flags.DEFINE_boolean, "first_order", _META.first_order, "First-order MAML (no "
            "second derivatives).")
META.define(flags.DEFINE_float, "meta_lr", _ADAM.learning_rate, "Adam learning rate of the "
            "meta-update.", lower_bound=0.0)
META.define(flags.DEFINE_list, "hidden_sizes", [str(h) for h in _MODEL.hidden_sizes],
            "MLP hidden layer widths (--model=mlp, sinusoid, RL policies).")


def eval_inner_steps(values: dict) -> int:
  """--eval_inner_steps, resolved (default: --inner_steps)."""
  return values["eval_inner_steps"] or values["inner_steps"]


def hidden_sizes(values: dict) -> tuple[int, ...]:
  return tuple(int(h) for h in values["hidden_sizes"])
