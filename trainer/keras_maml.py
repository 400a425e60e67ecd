"""MAML for a Keras model from your own training loop: ``MAML(model)``.

The command line trains through :mod:`trainer.learner`; this is the same inner step
(:func:`trainer.maml.sgd_step`) and the same forward pass on explicit per-task weights
(:class:`trainer.keras_models.KerasBackbone`) for a loop of one's own::

    learner = keras_maml.MAML(model, inner_lr=0.4)
    with tf.GradientTape() as tape:
      fast = learner.adapt(support_x, support_y, steps=1)  # [tasks, ...] weights
      loss = learner.loss(fast, query_x, query_y)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)

Inputs carry a task axis: ``support_x [tasks, n, H, W, C]``, labels ``[tasks, n]`` (int).
``adapt`` starts every task from the model's variables, so the tape differentiates through the
inner steps back to them: second order unless ``first_order=True``. Batch norm layers use each
task's batch statistics (their second derivatives exact, see :mod:`trainer.keras_models`).
The model is checked as ``--model=keras:`` models are (one-line refusals).
"""

from __future__ import annotations

import tensorflow as tf

from trainer import keras_models, maml


class MAML:
  """A Keras classifier ``[n, ...] -> logits [n, N]`` made adaptable per task."""

  def __init__(self, model, inner_lr: float = 0.4, first_order: bool = False,
               adapt: str = "all"):
    if adapt not in ("all", "head"):
      raise ValueError(f"adapt={adapt!r}: must be all or head (ANIL)")
    n_way = int(model.output_shape[-1])
    self.model = model
    self.backbone = keras_models.wrap(model, tuple(model.input_shape[1:]), n_way)
    self.inner_lr, self.first_order = inner_lr, first_order
    names = self.backbone.names
    self._adapted = [k for k in names if adapt == "all" or k.startswith("out/")]

  def weights(self) -> dict[str, tf.Tensor]:
    """The model's current weights by the positional names the trainer uses."""
    return {k: v.value for k, v in zip(self.backbone.names, self.model.trainable_variables)}

  def adapt(self, support_x, support_y, steps: int = 1) -> dict[str, tf.Tensor]:
    """Each task's weights after ``steps`` SGD steps on its support set: ``[tasks, ...]``."""
    fast = maml.tile(self.weights(), support_x.shape[0])
    rates = {k: tf.constant(self.inner_lr, fast[k].dtype) for k in self._adapted}

    def total(params):
      return tf.reduce_sum(self.task_losses(params, support_x, support_y)), None

    for _ in range(steps):
      fast, _ = maml.sgd_step(fast, total, rates, first_order=self.first_order)
    return fast

  def logits(self, fast: dict, x) -> tf.Tensor:
    """``[tasks, n, N]`` logits of ``x [tasks, n, ...]`` under each task's weights."""
    return self.backbone.apply(fast, tf.convert_to_tensor(x, tf.float32))

  def task_losses(self, fast: dict, x, y) -> tf.Tensor:
    """Each task's mean cross-entropy, ``[tasks]``."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(y, tf.int32), logits=self.logits(fast, x)), axis=1)

  def loss(self, fast: dict, x, y) -> tf.Tensor:
    """The meta-objective: the tasks' query losses, averaged."""
    return tf.reduce_mean(self.task_losses(fast, x, y))
