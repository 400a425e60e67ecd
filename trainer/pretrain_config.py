"""``--mode=pretrain``'s flags: supervised pretraining of a backbone on all train classes.

Their defaults are the usual ones of few-shot pretraining (FEAT's and UNICORN-MAML's ResNet-12:
batch 128, SGD lr 0.1, Nesterov momentum 0.9, weight decay 5e-4; a cosine schedule here instead
of their steps). Read only in that mode; any of them given to another mode is refused.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
from absl import flags

from pipeline import labelled
from pipeline.errors import UsageError
from trainer import optim
from trainer.flag_groups import FlagGroup

PRETRAIN = FlagGroup("pretraining (--mode=pretrain)", __name__)
_SGD = optim.SGDConfig
_define = PRETRAIN.define

_define(flags.DEFINE_integer, "pretrain_batch_size", 128, "Images per pretraining step (all "
        "replicas together).", lower_bound=1)
_define(flags.DEFINE_float, "pretrain_lr", _SGD.learning_rate, "SGD learning rate, annealed "
        "by a cosine to 0 over --num_iterations.", lower_bound=0.0)
_define(flags.DEFINE_float, "pretrain_momentum", _SGD.momentum, "SGD's Nesterov momentum.",
        lower_bound=0.0)
_define(flags.DEFINE_float, "pretrain_weight_decay", _SGD.weight_decay, "L2 weight decay on "
        "kernels (not on biases and norm parameters).", lower_bound=0.0)
_define(flags.DEFINE_enum, "pretrain_augment", "standard", list(labelled.AUGMENTS),
        "standard: random crop of the image padded by 1/10.5 of its side, horizontal flip, "
        "colour jitter 0.4 (pipeline/labelled.py); none.")

_define(flags.DEFINE_float, "pretrain_dropblock_rate", 0.0, "ResNet-12 only: the rate of "
        "MetaOptNet's regulariser (dropout after blocks 0-1, DropBlock after blocks 2-3; "
        "FEAT and MetaOptNet use 0.1); 0 = none. Never in evaluation.",
        lower_bound=0.0, upper_bound=0.9)
_define(flags.DEFINE_integer, "pretrain_dropblock_size", 5, "DropBlock's square side (5 as "
        "MetaOptNet's at 84x84; a smaller map drops whole channels).", lower_bound=1)
_define(flags.DEFINE_integer, "pretrain_dropblock_warmup", 0, "Steps over which the rate "
        "rises linearly from 0 to --pretrain_dropblock_rate (MetaOptNet: 40,000 batches); "
        "0 = the full rate from the start.", lower_bound=0)


@dataclasses.dataclass(frozen=True)
class DropBlockConfig:
  """ResNet-12's training noise during pretraining (:class:`trainer.models.Dropout`), with the
  linear warm-up of its rate that MetaOptNet uses (DropBlock at full rate from the first step
  slows early training)."""
  rate: float = 0.0
  block_size: int = 5
  warmup: int = 0

  def rate_at(self, step: tf.Tensor) -> tf.Tensor:
    if not self.warmup:
      return tf.constant(self.rate, tf.float32)
    return self.rate * tf.minimum(tf.cast(step, tf.float32) / self.warmup, 1.0)


def dropblock_config(values: dict) -> DropBlockConfig:
  return DropBlockConfig(rate=values["pretrain_dropblock_rate"],
                         block_size=values["pretrain_dropblock_size"],
                         warmup=values["pretrain_dropblock_warmup"])


def sgd_config(values: dict) -> optim.SGDConfig:
  return optim.SGDConfig(learning_rate=values["pretrain_lr"],
                         momentum=values["pretrain_momentum"],
                         weight_decay=values["pretrain_weight_decay"],
                         decay_steps=max(1, values["num_iterations"]))


# Flags of meta-learning that pretraining would ignore (the model's and the episodes' it reads).
META_ONLY = ("inner_steps", "eval_inner_steps", "inner_lr", "first_order", "meta_lr",
             "learn_inner_lr", "per_step_inner_lr", "loss_reduction", "inner_adapt",
             "msl_iterations", "first_order_iterations", "meta_lr_schedule", "min_meta_lr",
             "clip_value", "compute_dtype", "task_chunk", "remat", "memory_budget",
             "eval_norm_stats")


def refuse_unless_pretraining(values: dict) -> None:
  """A pretraining flag set (to other than its default) for a mode that would ignore it, and
  a meta-learning flag set for pretraining, which would ignore it."""
  if values["mode"] == "pretrain":
    given = [name for name in META_ONLY if values[name] != flags.FLAGS[name].default]
    if given:
      raise UsageError(f"{', '.join('--' + n for n in given)}: meta-learning, which "
                       f"--mode=pretrain does not do; remove {'it' if len(given) == 1 else 'them'}"
                       f" here (pretraining's own are --pretrain_*)")
    return
  given = [name for name in PRETRAIN.names if values[name] != flags.FLAGS[name].default]
  if given:
    raise UsageError(f"{', '.join('--' + n for n in given)} "
                     f"{'applies' if len(given) == 1 else 'apply'} to --mode=pretrain only, not "
                     f"--mode={values['mode']}; remove {'it' if len(given) == 1 else 'them'}")
