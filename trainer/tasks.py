"""The tasks the trainer meta-learns, each a source of learner batches plus its model and metric.

A learner batch is ``support_x [b, n, ...]``, ``support_y``, ``query_x``, ``query_y`` (and in
evaluation ``valid`` and ``episode_id``); tasks map their pipeline's names onto these.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from pipeline import episodes, sinusoid, streams
from pipeline.errors import UsageError
from trainer.family import TrainData


def distributed(strategy: tf.distribute.Strategy, make) -> tf.distribute.DistributedDataset:
  """``make(sharding)``'s dataset spread over the strategy's replicas (one pipeline per
  worker, each feeding its replicas their shares of every global batch)."""
  return strategy.distribute_datasets_from_function(
      lambda ctx: make(streams.Sharding.from_input_context(ctx)))


def _rename(batch: dict, kind: str) -> dict:
  x, y = ("images", "labels") if kind == "images" else ("inputs", "targets")
  out = {"support_x": batch[f"support_{x}"], "support_y": batch[f"support_{y}"],
         "query_x": batch[f"query_{x}"], "query_y": batch[f"query_{y}"],
         "episode_id": batch["episode_id"]}
  if "valid" in batch:
    out["valid"] = batch["valid"]
  return out


class DeviceEpisodes:
  """Training episodes drawn on the device (``--sampler=device``).

  The split's uint8 images are placed on every replica's device once (a variable created under
  the strategy's scope: mirrored per GPU, replicated per TPU core); each replica then draws its
  share of a meta-batch inside the compiled step with the tf.data sampler's own stateless
  functions (:func:`pipeline.episodes.replica_meta_batch`), from the step counter alone: the
  same episodes as the host path, and exact resumption. The task hands the learner its
  ``replica_batch`` as :class:`trainer.family.TrainData`'s ``sample``.
  """

  def __init__(self, strategy: tf.distribute.Strategy, data: episodes.ClassIndexedImages,
               spec: episodes.EpisodeSpec, seed: int):
    if not data.decoded:
      raise UsageError("--sampler=device needs the split's images decoded in memory")
    self.spec, self.seed, self.replicas = spec, seed, strategy.num_replicas_in_sync
    self._data = data
    with strategy.scope():
      self.images = tf.Variable(data.images, trainable=False, name="episode_images",
                                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

  def replica_batch(self, step: tf.Tensor) -> dict:
    """This replica's meta-batch of ``step`` (call inside ``strategy.run``)."""
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    data = dataclasses.replace(self._data, images=tf.identity(self.images))
    return _rename(episodes.replica_meta_batch(data, self.spec, seed=self.seed, step=step,
                                               replica=replica, replicas=self.replicas),
                   "images")


@dataclasses.dataclass
class FewShotClassification:
  """N-way K-shot classification on a records folder built by tools/build_tfrecords.py."""
  data_dir: str  # a folder or a URL (gs://...)
  n_way: int
  k_shot: int
  k_query: int
  eval_k_query: int
  meta_batch_size: int
  eval_batch_size: int
  seed: int
  sampler: str = "host"  # "host": tf.data; "device": drawn inside the compiled step
  verify_records: bool = False  # check_data also hashes every shard (SHA-256)
  metric = "accuracy"
  higher_is_better = True
  small_sample = False

  def __post_init__(self):
    self.manifest = episodes.read_manifest(self.data_dir)
    shape = tuple(self.manifest["image_shape"])
    self.image_shape = shape
    for split, info in self.manifest["splits"].items():
      train = split == "train"
      episodes.check_episodes_fit(
          split, [(c["name"], c["count"]) for c in info["classes"]], self.n_way, self.k_shot,
          self.k_query if train else self.eval_k_query, "k_query" if train else "eval_k_query")

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.manifest["splits"])

  def check_data(self, splits: list[str]) -> None:
    """Before the first step: the shards of ``splits`` are whole (and hash right)."""
    for split in splits:
      episodes.verify_split(self.data_dir, split, sha256=self.verify_records)

  def train_data(self, strategy, start_step: int) -> TrainData:
    if self.sampler == "device":
      device = DeviceEpisodes(strategy, episodes.load_split(self.data_dir, "train"),
                              episodes.EpisodeSpec(self.n_way, self.k_shot, self.k_query,
                                                   self.meta_batch_size), self.seed)
      return TrainData(sample=device.replica_batch)
    return TrainData(batches=iter(distributed(
        strategy, lambda sharding: self.train_dataset(sharding, start_step))))

  def eval_data(self, strategy, split: str, episodes_: int):
    return distributed(strategy, lambda sharding: self.eval_dataset(split, episodes_, sharding))

  def train_dataset(self, sharding: streams.Sharding, start_step: int) -> tf.data.Dataset:
    data = episodes.load_split(self.data_dir, "train")
    spec = episodes.EpisodeSpec(self.n_way, self.k_shot, self.k_query, self.meta_batch_size)
    return episodes.meta_batches(data, spec, seed=self.seed, start_step=start_step,
                                 sharding=sharding).map(lambda b: _rename(b, "images"))

  def eval_dataset(self, split: str, num_episodes: int,
                   sharding: streams.Sharding) -> tf.data.Dataset:
    data = episodes.load_split(self.data_dir, split)
    spec = episodes.EpisodeSpec(self.n_way, self.k_shot, self.eval_k_query, self.eval_batch_size)
    return episodes.evaluation_batches(data, spec, seed=self.seed, num_episodes=num_episodes,
                                       sharding=sharding).map(lambda b: _rename(b, "images"))


@dataclasses.dataclass
class SinusoidRegression:
  """The paper's sinusoid tasks; "val" and "test" are two disjoint fixed streams of tasks."""
  k_shot: int
  k_query: int
  eval_k_query: int
  meta_batch_size: int
  eval_batch_size: int
  seed: int
  metric = "mse"
  higher_is_better = False
  small_sample = False
  splits = ("val", "test")  # two fixed task streams; training draws fresh tasks

  def check_data(self, splits: list[str]) -> None:
    del splits  # generated: nothing to check

  def train_data(self, strategy, start_step: int) -> TrainData:
    return TrainData(batches=iter(distributed(
        strategy, lambda sharding: self.train_dataset(sharding, start_step))))

  def eval_data(self, strategy, split: str, episodes_: int):
    return distributed(strategy, lambda sharding: self.eval_dataset(split, episodes_, sharding))

  def train_dataset(self, sharding: streams.Sharding, start_step: int) -> tf.data.Dataset:
    spec = sinusoid.SinusoidSpec(self.k_shot, self.k_query, self.meta_batch_size)
    return sinusoid.meta_batches(spec, seed=self.seed, start_step=start_step,
                                 sharding=sharding).map(lambda b: _rename(b, "sines"))

  def eval_dataset(self, split: str, num_episodes: int,
                   sharding: streams.Sharding) -> tf.data.Dataset:
    spec = sinusoid.SinusoidSpec(self.k_shot, self.eval_k_query, self.eval_batch_size)
    return sinusoid.evaluation_batches(spec, seed=self.seed, num_episodes=num_episodes,
                                       sharding=sharding, stream=f"eval:sinusoid:{split}"
                                       ).map(lambda b: _rename(b, "sines"))
