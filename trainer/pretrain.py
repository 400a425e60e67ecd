"""``--mode=pretrain``: a backbone trained as an ordinary classifier of every train class.

Why: MAML from a supervised-pretrained ResNet-12 is far ahead of MAML from scratch on
MiniImagenet (64.42 against the conv4's 48.70 for 5-way 1-shot; Ye & Chao, ICLR 2022). A
pretraining run is a run like any other (the same loop, checkpoints, resume, best-by-validation,
metrics and meta-test), whose learner is :class:`PretrainLearner` and whose task is
:class:`PretrainTask`; ``--init_from=<its model_dir>`` then starts meta-training from its body.

- Training: all images of the train split (MiniImagenet: 64-way), augmented
  (:mod:`pipeline.labelled`), cross-entropy through the built-in model's own head
  (``out/kernel [d, classes]``) and SGD with momentum on a cosine schedule (:mod:`trainer.optim`).
  The weights keep the names (and checkpoint keys) of the meta-learner's, so the body loads by name.
- Validation and meta-test: few-shot episodes of --n_way/--k_shot as the meta-learner's, each
  classified by the nearest class centroid of the body's features (squared Euclidean, the
  Prototypical Networks rule): it needs no adaptation, so it judges the features alone. Batch
  norm uses each support and query set's own statistics, as the meta-learner does.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow as tf

from pipeline import episodes, labelled
from pipeline.errors import UsageError
from trainer import family, init_from, models, optim
from trainer import pretrain_config as pc
from trainer import supervised_config as sc
from trainer.learner import SUM, collect_episodes, gather_replicas
from trainer.tasks import FewShotClassification, distributed


@dataclasses.dataclass
class PretrainTask:
  """The train split's labelled batches; the few-shot task's evaluation episodes."""
  few_shot: FewShotClassification
  batch_size: int
  augmentation: str
  metric = "accuracy"
  higher_is_better = True
  small_sample = False

  @property
  def splits(self) -> tuple[str, ...]:
    return self.few_shot.splits

  @property
  def num_classes(self) -> int:
    return len(self.few_shot.manifest["splits"]["train"]["classes"])

  def check_data(self, splits: list[str]) -> None:
    self.few_shot.check_data(splits)

  def train_dataset(self, sharding, start_step: int) -> tf.data.Dataset:
    data = episodes.load_split(self.few_shot.data_dir, "train")
    return labelled.batches(data, batch_size=self.batch_size, seed=self.few_shot.seed,
                            augmentation=self.augmentation, start_step=start_step,
                            sharding=sharding)

  def train_data(self, strategy, start_step: int) -> family.TrainData:
    return family.TrainData(batches=iter(distributed(
        strategy, lambda sharding: self.train_dataset(sharding, start_step))))

  def eval_data(self, strategy, split: str, episodes_: int):
    return self.few_shot.eval_data(strategy, split, episodes_)


def nearest_centroid(support: tf.Tensor, support_y: tf.Tensor, query: tf.Tensor,
                     query_y: tf.Tensor, n_way: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Per-episode query cross-entropy and accuracy ``[b]`` of the logits ``-|q - c_k|^2``,
  ``c_k`` the mean support feature of class k; features ``[b, n, d]``, labels ``[b, n]``."""
  onehot = tf.one_hot(support_y, n_way, dtype=support.dtype)  # [b, n, N]
  centroids = (tf.einsum("bnk,bnd->bkd", onehot, support)
               / tf.reduce_sum(onehot, axis=1)[:, :, None])
  logits = -(tf.reduce_sum(tf.square(query), -1, keepdims=True)
             - 2.0 * tf.einsum("bnd,bkd->bnk", query, centroids)
             + tf.reduce_sum(tf.square(centroids), -1)[:, None, :])
  loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(query_y, logits), -1)
  hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=query_y.dtype), query_y), tf.float32)
  return loss, tf.reduce_mean(hits, -1)


def classification_sums(model: models.ModelConfig, params: dict, images: tf.Tensor,
                        labels: tf.Tensor, dropout: models.Dropout | None = None
                        ) -> tuple[tf.Tensor, tf.Tensor]:
  """Summed cross-entropy and correct count of one batch ``[b, H, W, C]`` (one model)."""
  logits = models.apply(model, {k: v[None] for k, v in params.items()}, images[None],
                        models.ForwardContext(dropout=dropout))[0]
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
  correct = tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels)
  return tf.reduce_sum(loss), tf.reduce_sum(tf.cast(correct, tf.float32))


def _gradients(model, params, images, labels, noise=None, *, global_batch: int,
               block_size: int = 0):
  """``noise``: None, or the ``(rate, seed)`` tensors of this step's :class:`models.Dropout`."""
  dropout = models.Dropout(noise[0], block_size, noise[1]) if noise is not None else None
  with tf.GradientTape() as tape:
    tape.watch(params)
    loss, correct = classification_sums(model, params, images, labels, dropout)
    objective = loss / global_batch  # this replica's share of the global mean
  return tape.gradient(objective, params), loss, correct


def _features(model, params, x):
  """Body features ``[b, n, d]`` of ``b`` episodes' images ``[b, n, ...]``, one task each."""
  b = x.shape[0]
  tiled = {k: tf.tile(v[None], [b] + [1] * v.shape.rank) for k, v in params.items()}
  return models.features(model, tiled, x)


class PretrainLearner:
  """Weights (named as the meta-learner's), SGD state, the compiled step and evaluation."""

  def __init__(self, strategy: tf.distribute.Strategy, model: models.ModelConfig,
               sgd: optim.SGDConfig, *, seed: int, batch_size: int, n_way: int,
               eval_batch_size: int, jit_compile: bool, body_from: str | None = None,
               dropblock: pc.DropBlockConfig = pc.DropBlockConfig()):
    self.strategy, self.model, self.n_way = strategy, model, n_way
    self.dropblock, self.seed = dropblock, seed
    self.body_from = body_from
    self.batch_size = batch_size
    replicas = strategy.num_replicas_in_sync
    self._per_replica = batch_size // replicas
    self._eval_per_replica = eval_batch_size // replicas
    with strategy.scope():
      self.params = {k: tf.Variable(v, name=k, aggregation=optim.ONLY_FIRST)
                     for k, v in models.init_params(model, seed).items()}
      self.optimizer = optim.SGD(sgd, self.params)
    self._grads = tf.function(functools.partial(_gradients, model, global_batch=batch_size,
                                                block_size=dropblock.block_size),
                              jit_compile=jit_compile)
    self._evaluate = tf.function(functools.partial(self._episodes, model),
                                 jit_compile=jit_compile)

  @property
  def step(self) -> tf.Variable:
    return self.optimizer.iterations

  def fresh_start(self) -> str | None:
    return init_from.load_body(self.params, self.body_from) if self.body_from else None

  def checkpoint_items(self) -> dict:
    return {"params": self.params, "optimizer": self.optimizer.state()}

  def eval_variant(self) -> tuple[str, dict]:
    return "", {"classifier": "nearest centroid of the body's features (no adaptation)"}

  def _replica_train_step(self, batch):
    params = {k: tf.identity(v) for k, v in self.params.items()}
    images = tf.ensure_shape(batch["images"], [self._per_replica] + batch["images"].shape[1:])
    grads, loss, correct = self._grads(params, images, batch["labels"], self._noise())
    grads, loss, correct = tf.distribute.get_replica_context().all_reduce(
        SUM, (grads, loss, correct))
    rate = self.optimizer.cfg.rate(self.optimizer.iterations)
    self.optimizer.apply(self.params, grads)
    return {"loss": loss, "accuracy": correct, "learning_rate": rate}

  def _noise(self) -> tuple[tf.Tensor, tf.Tensor] | None:
    """This step's dropout rate and seed; the seed a function of the run's seed, the step and
    the replica, so a resumed run draws what an uninterrupted one would."""
    if not self.dropblock.rate:
      return None
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    seed = tf.stack([tf.constant(self.seed, tf.int64), self.optimizer.iterations])
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int64))
    return self.dropblock.rate_at(self.optimizer.iterations), seed

  @tf.function
  def _train(self, batches, num_steps: tf.Tensor):
    loss, correct, rate = tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)
    for _ in tf.range(num_steps):
      out = self.strategy.run(self._replica_train_step, (next(batches),))
      out = self.strategy.experimental_local_results(out)[0]  # identical after all-reduce
      loss, correct, rate = loss + out["loss"], correct + out["accuracy"], out["learning_rate"]
    examples = tf.cast(num_steps, tf.float32) * self.batch_size
    return {"loss": loss / examples, "accuracy": correct / examples, "learning_rate": rate}

  def train_loop(self, data: family.TrainData, num_steps) -> dict[str, float]:
    """``num_steps`` SGD steps; the mean training loss and accuracy over them, and the
    learning rate of the last."""
    return self._train(data.batches, tf.constant(num_steps))

  @staticmethod
  def _episodes(model, params, inputs, n_way):
    support = _features(model, params, inputs["support_x"])
    query = _features(model, params, inputs["query_x"])
    return nearest_centroid(support, inputs["support_y"], query, inputs["query_y"], n_way)

  def _replica_eval_step(self, batch):
    params = {k: tf.identity(v) for k, v in self.params.items()}
    inputs = {k: tf.ensure_shape(batch[k], [self._eval_per_replica] + batch[k].shape[1:])
              for k in ("support_x", "support_y", "query_x", "query_y")}
    loss, accuracy = self._evaluate(params, inputs, n_way=self.n_way)
    return loss[None], accuracy[None], tf.cast(batch["valid"], tf.int32), batch["episode_id"]

  @tf.function
  def eval_step(self, batch):
    return gather_replicas(self.strategy, self._replica_eval_step, batch)

  def evaluate(self, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode nearest-centroid query loss and accuracy, ``[1, episodes]``."""
    return collect_episodes(self.eval_step, dataset)


def build(values: dict, strategy: tf.distribute.Strategy,
          few_shot: FewShotClassification, jit_compile: bool) -> family.Built:
  """The pretraining run of the flags on ``few_shot``'s records."""
  ep = sc.episodes(values)
  model = sc.model_config(values, few_shot.image_shape)
  if model.kind not in models.CONV_KINDS + ("mlp",):
    raise UsageError(f"--model={values['model']}: --mode=pretrain trains the built-in models "
                     f"(conv4, resnet12, mlp) only")
  for flag, on in (("shared_head", model.shared_head), ("per_step_bn_params", model.param_slots),
                   ("bn_running_stats", model.stat_slots)):
    if on:
      raise UsageError(f"--{flag}: a meta-training option; --mode=pretrain trains one "
                       f"classifier of all train classes (drop it here, give it when "
                       f"meta-training with --init_from)")
  task = PretrainTask(few_shot, values["pretrain_batch_size"], values["pretrain_augment"])
  model = dataclasses.replace(model, num_outputs=task.num_classes)
  for name, size in (("--pretrain_batch_size", values["pretrain_batch_size"]),
                     ("--eval_batch_size", ep.eval_batch_size)):
    if size % strategy.num_replicas_in_sync:
      raise UsageError(f"{name}={size} is not divisible by the "
                       f"{strategy.num_replicas_in_sync} replicas in sync")
  sgd = pc.sgd_config(values)
  dropblock = pc.dropblock_config(values)
  if dropblock.rate and model.kind != "resnet12":
    raise UsageError(f"--pretrain_dropblock_rate={dropblock.rate}: ResNet-12's regulariser "
                     f"(--model=resnet12), not --model={model.kind}'s")
  learner = PretrainLearner(strategy, model, sgd, seed=values["seed"],
                            batch_size=values["pretrain_batch_size"], n_way=values["n_way"],
                            eval_batch_size=ep.eval_batch_size, jit_compile=jit_compile,
                            body_from=values["init_from"], dropblock=dropblock)
  record = sc.record_parts(values, model, sc.meta_config(values), few_shot.manifest)
  for key in ("meta", "eval_inner_steps"):  # a pretraining run meta-learns nothing
    record.pop(key)
  record["pretrain"] = dict(dataclasses.asdict(sgd), batch_size=values["pretrain_batch_size"],
                            augment=values["pretrain_augment"], classes=task.num_classes,
                            dropblock=dataclasses.asdict(dropblock))
  return family.Built(task, learner, jit_compile, record)
