"""The episode sampler: shapes, sampling without replacement, determinism, sharding, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from helpers import TWO_CPUS, mirrored_over_two_cpus
from pipeline import episodes, streams
from pipeline.episodes import ClassIndexedImages, EpisodeSpec
from pipeline.errors import DataError


def numbered_split(counts) -> ClassIndexedImages:
  """Images whose two first pixels spell their own global index, classes of given sizes."""
  total = int(sum(counts))
  ids = np.arange(total)
  images = np.zeros((total, 4, 4, 1), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = ids // 256, ids % 256
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return ClassIndexedImages(images=tf.constant(images), offsets=tf.constant(offsets),
                            counts=tf.constant(np.asarray(counts, np.int32)),
                            image_shape=(4, 4, 1),
                            class_names=tuple(f"c{i}" for i in range(len(counts))),
                            split="synthetic", decoded=True)


def image_ids(images: np.ndarray) -> np.ndarray:
  pixels = np.rint(images[..., 0, 0, 0] * 255).astype(int), np.rint(images[..., 0, 1, 0] * 255).astype(int)
  return pixels[0] * 256 + pixels[1]


def take(ds, n):
  return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


COUNTS = [7, 5, 9, 5, 6, 12, 5, 8]  # uneven, some exactly k_shot + k_query


def test_episodes_draw_distinct_classes_and_distinct_examples():
  data = numbered_split(COUNTS)
  spec = EpisodeSpec(n_way=5, k_shot=2, k_query=3, meta_batch_size=8)
  class_of = np.repeat(np.arange(len(COUNTS)), COUNTS)
  for batch in take(episodes.meta_batches(data, spec, seed=3), 25):
    s_ids, q_ids = image_ids(batch["support_images"]), image_ids(batch["query_images"])
    for e in range(8):
      all_ids = np.concatenate([s_ids[e], q_ids[e]])
      assert len(set(all_ids)) == len(all_ids)  # no example twice within an episode
      labels = np.concatenate([batch["support_labels"][e], batch["query_labels"][e]])
      label_to_class = {}
      for i, lab in zip(all_ids, labels):
        assert label_to_class.setdefault(lab, class_of[i]) == class_of[i]
      assert len(set(label_to_class.values())) == 5  # five distinct classes, one per label
      np.testing.assert_array_equal(batch["support_labels"][e], np.repeat(np.arange(5), 2))
      np.testing.assert_array_equal(batch["query_labels"][e], np.repeat(np.arange(5), 3))


def test_classes_and_label_assignment_are_uniform():
  data = numbered_split([6] * 10)
  spec = EpisodeSpec(n_way=5, k_shot=1, k_query=1, meta_batch_size=50)
  chosen = np.zeros(10)
  label0 = np.zeros(10)
  for batch in take(episodes.meta_batches(data, spec, seed=0), 40):  # 2000 episodes
    classes = image_ids(batch["support_images"]) // 6  # [50, 5], label order
    np.add.at(chosen, classes.ravel(), 1)
    np.add.at(label0, classes[:, 0], 1)
  assert np.all(np.abs(chosen / 1000 - 1) < 0.12), chosen  # each class in half the episodes
  assert np.all(np.abs(label0 / 200 - 1) < 0.35), label0  # label 0 lands on any class


def test_examples_within_a_class_are_uniform():
  data = numbered_split([10, 10])
  spec = EpisodeSpec(n_way=2, k_shot=1, k_query=2, meta_batch_size=100)
  seen = np.zeros(20)
  for batch in take(episodes.meta_batches(data, spec, seed=1), 20):  # 2000 episodes
    np.add.at(seen, image_ids(batch["support_images"]).ravel(), 1)
    np.add.at(seen, image_ids(batch["query_images"]).ravel(), 1)
  assert np.all(np.abs(seen / 600 - 1) < 0.12), seen


def test_evaluation_episodes_depend_only_on_seed_and_index():
  data = numbered_split(COUNTS)
  small = EpisodeSpec(4, 1, 2, meta_batch_size=3)
  big = EpisodeSpec(4, 1, 2, meta_batch_size=8)
  a = take(episodes.evaluation_batches(data, small, seed=7, num_episodes=10), 100)
  b = take(episodes.evaluation_batches(data, small, seed=7, num_episodes=10), 100)
  assert_same_batches(a, b)
  assert len(a) == 4 and a[-1]["valid"].tolist() == [True, False, False]
  c = take(episodes.evaluation_batches(data, big, seed=7, num_episodes=10), 100)
  flat_a = np.concatenate([x["support_images"] for x in a])[:10]
  flat_c = np.concatenate([x["support_images"] for x in c])[:10]
  np.testing.assert_array_equal(flat_a, flat_c)  # episode i is the same whatever the batching
  other = take(episodes.evaluation_batches(data, small, seed=8, num_episodes=10), 1)
  assert not np.array_equal(other[0]["support_images"], a[0]["support_images"])


def test_resumed_training_stream_equals_uninterrupted_one():
  data = numbered_split(COUNTS)
  spec = EpisodeSpec(5, 1, 3, meta_batch_size=4)
  full = take(episodes.meta_batches(data, spec, seed=11), 6)
  resumed = take(episodes.meta_batches(data, spec, seed=11, start_step=3), 3)
  assert_same_batches(full[3:], resumed)
  assert full[4]["episode_id"].tolist() == [16, 17, 18, 19]


def test_replica_shards_together_equal_the_single_device_meta_batch():
  data = numbered_split(COUNTS)
  spec = EpisodeSpec(3, 2, 2, meta_batch_size=6)
  single = take(episodes.meta_batches(data, spec, seed=5), 2)
  # 2 workers x 3 local replicas: each pipeline yields its replicas' batches in order per step.
  parts = [take(episodes.meta_batches(
      data, spec, seed=5, sharding=streams.Sharding(2, p, 3)), 6) for p in range(2)]
  for step in range(2):
    merged = [parts[p][step * 3 + l] for p in range(2) for l in range(3)]
    for key in single[step]:
      np.testing.assert_array_equal(np.concatenate([m[key] for m in merged]), single[step][key])
  with pytest.raises(ValueError, match="not divisible"):
    episodes.meta_batches(data, EpisodeSpec(3, 2, 2, 5), seed=0,
                          sharding=streams.Sharding(1, 0, 2))


def test_impossible_specs_are_rejected_naming_the_value():
  data = numbered_split(COUNTS)
  with pytest.raises(DataError, match="n_way=9: split 'synthetic' has only 8 classes"):
    episodes.meta_batches(data, EpisodeSpec(9, 1, 1, 2), seed=0)
  with pytest.raises(DataError, match="--k_shot \\+ --k_query = 6: class c1 "):
    episodes.meta_batches(data, EpisodeSpec(2, 3, 3, 2), seed=0)
  with pytest.raises(DataError, match="k_shot=0"):
    EpisodeSpec(5, 0, 1, 1)


def test_pipeline_is_graph_only():
  data = numbered_split(COUNTS)
  ds = episodes.meta_batches(data, EpisodeSpec(5, 1, 1, 2), seed=0)
  graph = ds._as_serialized_graph().numpy()  # pylint: disable=protected-access
  for op in (b"PyFunc", b"EagerPyFunc", b"GeneratorDataset"):
    assert op not in graph


# --- on real records ---------------------------------------------------------------------------


def test_omniglot_batches_have_the_documented_shapes(omniglot_records):
  data = episodes.load_split(omniglot_records, "train")
  assert data.images.shape == (88000, 28, 28, 1) and data.num_classes == 4400
  for spec in (EpisodeSpec(5, 1, 15, 32), EpisodeSpec(20, 1, 1, 16), EpisodeSpec(20, 5, 5, 16)):
    batch = take(episodes.meta_batches(data, spec, seed=0), 1)[0]
    n, k, q, b = spec.n_way, spec.k_shot, spec.k_query, spec.meta_batch_size
    assert batch["support_images"].shape == (b, n * k, 28, 28, 1)
    assert batch["query_images"].shape == (b, n * q, 28, 28, 1)
    assert batch["support_images"].dtype == np.float32
    assert batch["support_labels"].dtype == np.int32
    assert 0.0 <= batch["query_images"].min() and batch["query_images"].max() <= 1.0
    assert batch["query_labels"].min() == 0 and batch["query_labels"].max() == n - 1
  # Ink is high and sparse, as MAML feeds Omniglot.
  assert 0.02 < batch["support_images"].mean() < 0.3


def test_rotated_classes_are_sampled_as_rotations(omniglot_records):
  data = episodes.load_split(omniglot_records, "val")
  base = data.images[0:20].numpy()  # class 0 = rot000, class 1 = rot090 of the same character
  np.testing.assert_array_equal(data.images[20:40].numpy(), np.rot90(base, 1, axes=(1, 2)))
  assert data.class_names[1].endswith("/rot090")


def test_miniimagenet_memory_and_per_episode_decoding_agree(mini_records):
  spec = EpisodeSpec(5, 1, 15, 4)
  in_memory = episodes.load_split(mini_records, "test")
  encoded = episodes.load_split(mini_records, "test", decode="per_episode")
  assert in_memory.images.shape == (2000, 84, 84, 3) and encoded.images.shape == (2000,)
  a = take(episodes.evaluation_batches(in_memory, spec, seed=1, num_episodes=8), 2)
  b = take(episodes.evaluation_batches(encoded, spec, seed=1, num_episodes=8), 2)
  assert_same_batches(a, b)
  assert a[0]["support_images"].shape == (4, 5, 84, 84, 3)
  assert a[0]["query_images"].shape == (4, 75, 84, 84, 3)


def test_records_with_fewer_images_than_the_manifest_promises_are_named(tmp_path, mini_records):
  broken = tmp_path / "broken"
  shutil.copytree(mini_records, broken)
  manifest = json.loads((broken / "manifest.json").read_text())
  shard = manifest["splits"]["val"]["shards"][0]["file"]
  kept = list(tf.data.TFRecordDataset(str(broken / shard)))
  del kept[150]  # one record of class 1
  with tf.io.TFRecordWriter(str(broken / shard)) as w:
    for r in kept:
      w.write(r.numpy())
  name = manifest["splits"]["val"]["classes"][1]["name"]
  with pytest.raises(DataError, match=f"{shard}: class {name} \\(label 1\\) has 99 records, "
                                      "the manifest promises 100"):
    episodes.load_split(broken, "val")


def test_missing_manifest_or_split_is_a_clear_error(tmp_path, mini_records):
  with pytest.raises(DataError, match="no manifest; build the records"):
    episodes.load_split(tmp_path, "train")
  with pytest.raises(DataError, match="no split 'dev'"):
    episodes.load_split(mini_records, "dev")


def test_distribute_datasets_from_function_feeds_replicas_their_share(mini_records):
  data = episodes.load_split(mini_records, "train")
  spec = episodes.EpisodeSpec(5, 1, 2, meta_batch_size=4)
  strategy = mirrored_over_two_cpus()
  dist = strategy.distribute_datasets_from_function(lambda ctx: episodes.meta_batches(
      data, spec, seed=2, sharding=streams.Sharding.from_input_context(ctx)))
  single = next(iter(episodes.meta_batches(data, spec, seed=2)))
  per_replica = next(iter(dist))
  local = strategy.experimental_local_results
  ids = [t.numpy().tolist() for t in local(per_replica["episode_id"])]
  images = np.concatenate([t.numpy() for t in local(per_replica["query_images"])])
  assert ids == [[0, 1], [2, 3]], ids
  np.testing.assert_array_equal(images, single["query_images"].numpy())
