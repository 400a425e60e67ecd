"""The meta-learner's state and its compiled, strategy-aware train and eval steps.

State (meta-parameters, Meta-SGD rates, Adam moments) lives in variables created under the
strategy's scope. The heavy part — :func:`trainer.maml.meta_gradients` — is a pure function of
tensors, optionally XLA-compiled; variables are read outside it and passed in, which is what
lets ``jit_compile`` work with mirrored variables. Each replica computes its tasks' share of the
meta-objective (already divided by the global meta-batch size), the shares are all-reduced by
SUM, and every replica applies the same Adam update.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from trainer import init_from, maml, models, optim

SUM = tf.distribute.ReduceOp.SUM
STATS_DECAY = 0.9  # running statistics' decay per meta-step (PyTorch's momentum 0.1, as MAML++)
# The meta-step's sums (trainer/maml.py), in the order the learner reports them.
_SUMS = ("query_loss_post", "query_metric_post", "support_loss_pre", "support_metric_pre")


class MetaLearner:
  def __init__(self, strategy: tf.distribute.Strategy, model: models.ModelConfig,
               meta: maml.MetaConfig, adam: optim.AdamConfig, *, seed: int,
               meta_batch_size: int, eval_inner_steps: int, jit_compile: bool,
               eval_batch_size: int | None = None, eval_running_stats: bool = False,
               task_chunk: int = 0, body_from: str | None = None,
               eval_measured_steps: tuple[int, ...] | None = None):
    if eval_running_stats and not model.stat_slots:
      raise ValueError("evaluating with running statistics needs them tracked "
                       "(--bn_running_stats=shared or per_step)")
    self.strategy, self.model, self.meta = strategy, model, meta
    self.body_from = body_from  # --init_from: the run folder a new run takes its body from
    # Normalise evaluation batches with the running statistics (per example, inductive)
    # instead of each task's batch statistics (transductive, the paper's and MAML++'s way).
    self.eval_running_stats = eval_running_stats
    self.meta_batch_size = meta_batch_size
    replicas = strategy.num_replicas_in_sync
    self._train_per_replica = meta_batch_size // replicas
    self._eval_per_replica = (eval_batch_size or meta_batch_size) // replicas
    # Memory: the meta-gradient of a replica's tasks computed task_chunk tasks at a time in a
    # loop (summed, so exact), so only one chunk's activations are alive at once.
    self.task_chunk = task_chunk if 0 < task_chunk < self._train_per_replica else 0
    if self.task_chunk and self._train_per_replica % self.task_chunk:
      raise ValueError(f"--task_chunk={task_chunk} does not divide the {self._train_per_replica}"
                       f" tasks each replica computes (meta_batch_size {meta_batch_size} over "
                       f"{replicas} replicas)")
    with strategy.scope():
      init = models.init_params(model, seed)
      self.params = {k: tf.Variable(v, name=k, aggregation=optim.ONLY_FIRST)
                     for k, v in init.items()}
      self.inner_lrs = {k: tf.Variable(np.full(shape, meta.inner_lr, np.float32),
                                       name=f"lr/{k}", aggregation=optim.ONLY_FIRST)
                        for k, shape in maml.learned_rate_shapes(meta, init).items()}
      self.trainables = dict(self.params, **{f"lr/{k}": v for k, v in self.inner_lrs.items()})
      self.optimizer = optim.Adam(adam, self.trainables)
      # Running statistics (MAML++'s BNRS): tracked from training batches, used in evaluation.
      self.stats = {k: tf.Variable(v, name=f"stats/{k}", trainable=False,
                                   aggregation=optim.ONLY_FIRST)
                    for k, v in models.init_stats(model).items()}
    # One compiled meta-gradient per training phase (see train_loop): derivative-order
    # annealing needs both orders, and the multi-step loss is dropped (not just weighted zero)
    # once it has annealed away, so later steps pay nothing for it. Each is traced when used.
    orders = {meta.first_order}
    if meta.first_order_iterations and not meta.first_order:
      orders.add(True)
    msl = {False, True} if meta.msl_iterations else {False}
    self._grads = {(order, m): tf.function(
        functools.partial(maml.meta_gradients, model, meta, global_batch=meta_batch_size,
                          first_order=order, multi_step_loss=m), jit_compile=jit_compile)
        for order in orders for m in msl}
    # The step counts an evaluation reports (rows of its [S, n] results), ascending.
    self.measured_steps = eval_measured_steps or tuple(range(eval_inner_steps + 1))
    self._evaluate = tf.function(
        functools.partial(maml.evaluate, model, meta, steps=eval_inner_steps,
                          measured=eval_measured_steps), jit_compile=jit_compile)

  def fresh_start(self) -> str | None:
    """Called by the loop when the run has no checkpoint of its own: ``--init_from``'s body."""
    return init_from.load_body(self.params, self.body_from) if self.body_from else None

  @property
  def step(self) -> tf.Variable:
    return self.optimizer.iterations

  def eval_variant(self) -> tuple[str, dict]:
    running = self.eval_running_stats
    return ("_running" if running else ""), {"norm_stats": "running" if running else "batch"}

  def checkpoint_items(self) -> dict:
    return {"params": self.params, "inner_lrs": self.inner_lrs,
            "optimizer": self.optimizer.state(), "stats": self.stats}

  def _values(self):
    params = {k: tf.identity(v) for k, v in self.params.items()}
    lrs = {k: tf.identity(v) for k, v in self.inner_lrs.items()} if self.inner_lrs else None
    return params, lrs

  @staticmethod
  def _inputs(batch, per_replica: int) -> dict:
    """The learner's four tensors with a static task axis (MultiWorker's iterators drop it)."""
    return {k: tf.ensure_shape(batch[k], [per_replica] + batch[k].shape[1:])
            for k in ("support_x", "support_y", "query_x", "query_y")}

  def _phase(self, step: int) -> tuple[bool, bool]:
    """(first order, multi-step loss) of the meta-step taken at ``step``."""
    meta = self.meta
    return (meta.first_order or step < meta.first_order_iterations,
            bool(meta.msl_iterations) and step < meta.msl_iterations)

  def _meta_gradients(self, phase, params, lrs, inputs, iteration):
    """The replica's meta-gradient and metric sums, all tasks at once or chunk by chunk."""
    grads_fn = functools.partial(self._grads[phase], iteration=iteration)
    if not self.task_chunk:
      return grads_fn(params, lrs, inputs)
    chunks = self._train_per_replica // self.task_chunk
    split = {k: tf.reshape(v, [chunks, self.task_chunk] + v.shape[1:])
             for k, v in inputs.items()}
    add = lambda a, b: tf.nest.map_structure(tf.add, a, b)
    first = grads_fn(params, lrs, {k: v[0] for k, v in split.items()})

    def body(i, total):
      # The chunk's inputs wait for the running total: without this dependency the next
      # chunk (which does not need the total) would start alongside the previous one and the
      # memory would not drop.
      with tf.control_dependencies(tf.nest.flatten(total)):
        chunk = {k: tf.gather(v, i) for k, v in split.items()}
      return i + 1, add(total, grads_fn(params, lrs, chunk))

    # A while loop (not a Python loop) runs the chunks one after another (one iteration at a
    # time): only one chunk's forward and backward intermediates are alive at once. Static
    # shapes: XLA compiles it.
    _, (grads, sums) = tf.while_loop(lambda i, _: i < chunks, body, (tf.constant(1), first),
                                     parallel_iterations=1)
    # Batch moments are per-chunk task averages: their sum over equal chunks / chunks.
    sums = {k: v / chunks if k.startswith("moments/") else v for k, v in sums.items()}
    return grads, sums

  def _replica_device_step(self, sample, phase):
    """A training step whose meta-batch is drawn here, on the device, for this very step."""
    return self._replica_train_step(sample(tf.identity(self.step)), phase)

  def _replica_train_step(self, batch, phase):
    params, lrs = self._values()
    inputs = self._inputs(batch, self._train_per_replica)
    grads, sums = self._meta_gradients(phase, params, lrs, inputs, tf.identity(self.step))
    ctx = tf.distribute.get_replica_context()
    grads, sums = ctx.all_reduce(SUM, (grads, sums))
    for k, var in self.stats.items():
      # Replicas' task-averaged moments, averaged; then an exponential moving average.
      batch = sums.pop(f"moments/{k}") / ctx.num_replicas_in_sync
      var.assign(STATS_DECAY * var + (1.0 - STATS_DECAY) * batch)
    self.optimizer.apply(self.trainables, grads)
    return sums

  def train_loop(self, data, num_steps) -> dict:
    """``num_steps`` meta-steps on ``data`` (a :class:`trainer.family.TrainData`); returns
    the means over them of the query loss and metric after adaptation and the support's
    before (``query_loss_post``, ``query_accuracy_post`` or ``query_mse_post``, ...).

    The steps run in one compiled loop per training phase: a loop that would cross a phase
    boundary (derivative-order annealing, the end of the multi-step loss) is split there on
    the host, so each phase's graph is static (no ``tf.cond`` between compiled functions).
    """
    step = int(self.step.numpy())
    end = step + int(num_steps)
    bounds = [b for b in (self.meta.first_order_iterations, self.meta.msl_iterations) if b]
    totals = {k: 0.0 for k in _SUMS}
    while step < end:
      stop = min([end] + [b for b in bounds if b > step])
      means = self._train_phase(data.batches, data.sample, tf.constant(stop - step),
                                self._phase(step))
      totals = {k: totals[k] + means[k] * (stop - step) for k in _SUMS}
      step = stop
    metric = "accuracy" if self.meta.loss == "softmax" else self.meta.loss
    return {k.replace("metric", metric): v / int(num_steps) for k, v in totals.items()}

  @tf.function
  def _train_phase(self, batches, sample, num_steps: tf.Tensor, phase: tuple[bool, bool]):
    totals = {k: tf.constant(0.0) for k in _SUMS}
    for _ in tf.range(num_steps):
      if sample is not None:  # the device sampler: each replica draws its own share here
        sums = self.strategy.run(functools.partial(self._replica_device_step, sample,
                                                   phase=phase))
      else:
        sums = self.strategy.run(functools.partial(self._replica_train_step, phase=phase),
                                 (next(batches),))
      sums = self.strategy.experimental_local_results(sums)[0]  # identical after all-reduce
      totals = {k: totals[k] + sums[k] for k in _SUMS}
    scale = 1.0 / (tf.cast(num_steps, tf.float32) * self.meta_batch_size)
    return {k: v * scale for k, v in totals.items()}

  def _replica_eval_step(self, batch):
    params, lrs = self._values()
    inputs = self._inputs(batch, self._eval_per_replica)
    stats = ({k: tf.identity(v) for k, v in self.stats.items()} if self.eval_running_stats
             else None)
    losses, metrics = self._evaluate(params, lrs, inputs, stats=stats)
    # int32: collectives cannot gather booleans.
    return losses, metrics, tf.cast(batch["valid"], tf.int32), batch["episode_id"]

  @tf.function
  def eval_step(self, batch):
    return gather_replicas(self.strategy, self._replica_eval_step, batch)

  def evaluate(self, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode query loss and metric after each of ``measured_steps`` (by default
    0..eval_inner_steps), ``[len(measured_steps), n]``."""
    return collect_episodes(self.eval_step, dataset)


def gather_replicas(strategy: tf.distribute.Strategy, replica_step, batch):
  """``replica_step(batch)``'s (losses, metrics ``[S+1, b]``, valid, episode ids) of every
  replica, on every worker (``gather`` crosses workers too)."""
  losses, metrics, valid, ids = strategy.run(replica_step, (batch,))
  return (strategy.gather(losses, axis=1), strategy.gather(metrics, axis=1),
          strategy.gather(valid, axis=0), strategy.gather(ids, axis=0))


def collect_episodes(eval_step, dataset) -> tuple[np.ndarray, np.ndarray]:
  """Runs ``eval_step`` (-> losses and metrics ``[S+1, b]``, ``valid``, ``episode_id``, every
  replica's gathered) over ``dataset``; the valid episodes' results in episode order."""
  losses, metrics, ids = [], [], []
  for batch in dataset:
    loss, metric, valid, episode = (t.numpy() for t in eval_step(batch))
    valid = valid.astype(bool)
    losses.append(loss[:, valid])
    metrics.append(metric[:, valid])
    ids.append(episode[valid])
  order = np.argsort(np.concatenate(ids), kind="stable")
  return np.concatenate(losses, axis=1)[:, order], np.concatenate(metrics, axis=1)[:, order]
