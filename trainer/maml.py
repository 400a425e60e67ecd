"""MAML's inner and outer computations as pure functions of tensors.

Nothing here touches variables, so the same functions run eagerly (the tests' reference),
inside ``tf.function`` and under ``jit_compile``, per replica of any ``tf.distribute`` strategy.

The inner loop adapts all tasks at once: parameters are tiled to ``[B, ...]`` and the sum of the
tasks' support losses is differentiated, which yields each task's own gradient because task
``b``'s loss depends only on copy ``b``. Second order comes from recording that gradient
computation on the outer tape; ``first_order`` stops it.

Options beyond the paper, each off by default and each reducing to plain MAML when neutral:
Meta-SGD (per-entry learned rates), and MAML++ (Antoniou et al., ICLR 2019): per-layer
per-step learned rates (LSLR), the multi-step loss (MSL), derivative-order annealing (the
learner switches ``first_order`` by iteration); per-step norm parameters and statistics live in
:mod:`trainer.models`. ANIL (Raghu et al., ICLR 2020) is ``inner_adapt="head"``.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from trainer import models

ADAPT = ("all", "no_norm", "head")
REDUCTIONS = ("mean", "original")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# float16's static loss scale: losses are multiplied by it before each gradient (inner and
# outer) and the gradients divided after, so small gradients do not flush to zero in float16.
FLOAT16_LOSS_SCALE = 1024.0
MSL_MIN_WEIGHT = 0.03  # MAML++'s floor for the non-final steps' weights, times 1 / steps


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  inner_steps: int = 1
  inner_lr: float = 0.4
  first_order: bool = False
  learn_inner_lr: bool = False  # Meta-SGD: one meta-learned rate per parameter entry
  per_step_inner_lr: bool = False  # MAML++ LSLR: one learned rate per parameter tensor and step
  loss: str = "softmax"  # "softmax" (classification) or "mse" (regression)
  # "mean": every loss is the mean over a task's examples. "original": cbfinn/maml's
  # classification loss, each example's cross-entropy / K summed over the examples, so the
  # inner step is N x inner_lr on the mean loss (regression is a mean there too).
  loss_reduction: str = "mean"
  # Which parameters the inner loop adapts: "all"; "no_norm" (norm scale/offset are only
  # meta-learned, as in the original code); "head" (ANIL).
  inner_adapt: str = "all"
  # MAML++ MSL: the query loss after every inner step, weighted; weights anneal linearly from
  # uniform to the last step alone over this many iterations (0: last step only throughout).
  msl_iterations: int = 0
  # MAML++ derivative-order annealing: first order for this many iterations, then second.
  first_order_iterations: int = 0
  # Mixed precision: the meta-step's forward and backward passes in this dtype; the
  # meta-parameters, the losses and the meta-gradient stay float32.
  compute_dtype: str = "float32"
  # Memory: keep only each inner step's inputs for the backward pass and recompute the step's
  # activations (and its inner gradient) there, instead of keeping every step's alive.
  remat: bool = False

  def __post_init__(self):
    if self.inner_adapt not in ADAPT:
      raise ValueError(f"inner_adapt={self.inner_adapt!r}: must be one of {ADAPT}")
    if self.loss_reduction not in REDUCTIONS:
      raise ValueError(f"loss_reduction={self.loss_reduction!r}: must be one of {REDUCTIONS}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype={self.compute_dtype!r}: must be one of {COMPUTE_DTYPES}")
    if self.learn_inner_lr and self.per_step_inner_lr:
      raise ValueError("learn_inner_lr (Meta-SGD) and per_step_inner_lr (LSLR) exclude each "
                       "other")


def adapted_keys(meta: MetaConfig, params: dict) -> list[str]:
  """Names of the parameters the inner loop changes, in a fixed order."""
  if meta.inner_adapt == "head":
    return [k for k in params if k.startswith("out/")]
  if meta.inner_adapt == "no_norm":
    return [k for k in params if not models.is_norm_param(k)]
  return list(params)


def learned_rate_shapes(meta: MetaConfig, params: dict) -> dict[str, tuple]:
  """Shapes of the meta-learned inner rates, per adapted parameter (empty when rates are fixed)."""
  if meta.learn_inner_lr:
    return {k: tuple(params[k].shape) for k in adapted_keys(meta, params)}
  if meta.per_step_inner_lr:
    return {k: (meta.inner_steps,) for k in adapted_keys(meta, params)}
  return {}


def loss_scale(cfg: models.ModelConfig, meta: MetaConfig, n_examples: int,
               n_support: int) -> float:
  """Factor from a task's mean loss to the loss differentiated (see ``loss_reduction``)."""
  if meta.loss_reduction == "mean" or meta.loss != "softmax":
    return 1.0
  return n_examples * cfg.num_outputs / n_support  # n_examples / K


def task_losses(cfg: models.ModelConfig, meta: MetaConfig, params: dict, x: tf.Tensor,
                y: tf.Tensor, ctx: models.ForwardContext | None = None
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """Per-task mean loss ``[B]`` and per-task metric ``[B]`` (accuracy, or MSE for regression).

  With :func:`body_is_fixed`, ``x`` holds body features and only the head is applied.
  """
  if body_is_fixed(cfg, meta) and x.shape.rank == 3 and cfg.kind in models.CONV_KINDS:
    out = models.head(x, params)
  else:
    out = models.apply(cfg, params, x, ctx)
  out = tf.cast(out, tf.float32) if out.dtype in (tf.bfloat16, tf.float16) else out  # losses
  if y.dtype in (tf.bfloat16, tf.float16):
    y = tf.cast(y, tf.float32)
  if meta.loss == "mse":
    mse = tf.reduce_mean(tf.square(out - y), axis=[1, 2])
    return mse, mse
  losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
  correct = tf.cast(tf.equal(tf.argmax(out, axis=-1, output_type=y.dtype), y), out.dtype)
  return tf.reduce_mean(losses, axis=1), tf.reduce_mean(correct, axis=1)


def body_is_fixed(cfg: models.ModelConfig, meta: MetaConfig) -> bool:
  """ANIL on a built-in conv body that does not change with the step: its features are
  computed once.

  (Per-step norm parameters or statistics make the body step-dependent, so those recompute.)
  """
  return (meta.inner_adapt == "head" and cfg.kind in models.CONV_KINDS and not cfg.param_slots
          and not cfg.stat_slots)


def body_features(cfg, meta, params: dict, batch: dict, stats: dict | None = None) -> dict:
  """``batch`` with images replaced by body features when :func:`body_is_fixed`, else as is."""
  if not body_is_fixed(cfg, meta):
    return batch
  ctx = models.ForwardContext(stats=stats)
  return dict(batch, support_x=models.features(cfg, params, batch["support_x"], ctx),
              query_x=models.features(cfg, params, batch["query_x"], ctx))


def tile(params: dict, tasks: int) -> dict:
  return {k: tf.tile(v[None], [tasks] + [1] * v.shape.rank) for k, v in params.items()}


def task_start(cfg: models.ModelConfig, params: dict, tasks: int) -> dict:
  """Every task's copy ``[B, ...]`` of the meta-parameters, the head expanded if shared."""
  return tile(models.expand_head(cfg, params), tasks)


def step_rates(meta: MetaConfig, params: dict, lrs: dict | None, step: int) -> dict:
  """Each adapted parameter's inner rate at ``step``, broadcastable to its ``[B, ...]`` copy."""
  keys = adapted_keys(meta, params)
  if meta.learn_inner_lr:
    return {k: lrs[k][None] for k in keys}
  if meta.per_step_inner_lr:
    return {k: lrs[k][min(step, meta.inner_steps - 1)] for k in keys}
  return {k: tf.constant(meta.inner_lr, params[k].dtype) for k in keys}


def sgd_step(fast: dict, total_loss, rates: dict, *, first_order: bool, scale: float = 1.0):
  """One inner SGD step of every task at once, shared by supervised MAML and MAML-RL.

  ``total_loss(fast) -> (scalar, aux)`` sums the tasks' losses, so differentiating it gives
  each task's own gradient w.r.t. its copy (task b's loss depends on copy b only). Only the
  keys of ``rates`` move; ``first_order`` stops the gradient from being differentiated again.
  ``scale`` multiplies the loss before differentiation and divides the gradient after (float16
  loss scaling). Returns ``(new fast parameters, aux)``.
  """
  with tf.GradientTape() as tape:
    watched = {k: fast[k] for k in rates}
    tape.watch(list(watched.values()))
    total, aux = total_loss(fast)
    if scale != 1.0:
      total = total * scale
  grads = tape.gradient(total, watched)
  if scale != 1.0:
    grads = {k: g / scale for k, g in grads.items()}
  if first_order:
    grads = {k: tf.stop_gradient(g) for k, g in grads.items()}
  new = dict(fast)
  new.update({k: fast[k] - tf.cast(rates[k], fast[k].dtype) * grads[k] for k in rates})
  return new, aux


def inner_update(cfg, meta, fast: dict, rates: dict, x, y, *, first_order: bool,
                 ctx: models.ForwardContext | None = None):
  """One adaptation step of every task; returns (new fast params, support loss, metric)."""
  scale = loss_scale(cfg, meta, 1, 1)  # the support set itself: N, whatever its size

  def total(params):
    losses, metric = task_losses(cfg, meta, params, x, y, ctx)
    return tf.reduce_sum(losses) * scale, (losses, metric)

  new, (losses, metric) = sgd_step(fast, total, rates, first_order=first_order,
                                   scale=loss_scaling(meta))
  return new, losses, metric


def rematerialized_inner_update(cfg, meta, fast: dict, rates: dict, x, y, *, first_order: bool,
                                ctx: models.ForwardContext):
  """:func:`inner_update` whose intermediates are recomputed in the backward pass.

  The backward pass of the meta-gradient needs each inner step's activations and the
  intermediates of its inner gradient. Kept, they grow with inner steps x tasks; here a custom
  gradient keeps only the step's inputs (the fast weights, rates, support images) and, when the
  meta-gradient reaches this step, runs the step again under a tape and differentiates that
  (second order: the recomputed inner gradient is itself recorded). Exact: the same ops on the
  same inputs. ``tf.recompute_grad`` cannot do this: it stops recording in its forward pass, so
  the inner tape inside gets no gradient.
  """
  keys, rate_keys = sorted(fast), sorted(rates)
  inputs = [fast[k] for k in keys] + [tf.convert_to_tensor(rates[k]) for k in rate_keys]
  x_is_input = x.dtype.is_floating  # ANIL's body features: the meta-gradient goes through them
  if x_is_input:
    inputs.append(x)

  def run(flat, context):
    f = dict(zip(keys, flat[:len(keys)]))
    r = dict(zip(rate_keys, flat[len(keys):len(keys) + len(rate_keys)]))
    new, losses, metric = inner_update(cfg, meta, f, r, flat[-1] if x_is_input else x, y,
                                       first_order=first_order, ctx=context)
    return [new[k] for k in keys] + [losses, metric]

  @tf.custom_gradient
  def step(*flat):
    outputs = run(list(flat), ctx)

    def backward(*upstream):
      upstream = [tf.zeros_like(o) if u is None else u for u, o in zip(upstream, outputs)]
      # Inputs re-read only once the upstream gradient exists: otherwise the graph optimiser
      # merges the recomputation with the forward pass (same ops, same inputs), and the
      # forward's activations stay alive until here after all.
      with tf.control_dependencies(upstream):
        again_in = [tf.identity(t) for t in flat]
      with tf.GradientTape() as tape:
        tape.watch(again_in)
        again = run(again_in, models.ForwardContext(step=ctx.step, stats=ctx.stats))
      return tape.gradient(again[:len(keys) + 1], again_in,
                           output_gradients=upstream[:len(keys) + 1],
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)

    return outputs, backward

  outputs = step(*inputs)
  return dict(zip(keys, outputs[:len(keys)])), outputs[-2], outputs[-1]


def loss_scaling(meta: MetaConfig) -> float:
  return FLOAT16_LOSS_SCALE if meta.compute_dtype == "float16" else 1.0


def msl_weights(meta: MetaConfig, iteration: tf.Tensor) -> tf.Tensor:
  """Weights ``[inner_steps]`` of the query losses after steps 1..S at ``iteration``.

  Uniform at iteration 0; each non-final weight falls linearly to ``0.03 / S`` (MAML++'s floor)
  and the final one takes up the rest, reaching the floor at ``msl_iterations``; after that
  only the last step counts. Without MSL: ``[0, ..., 0, 1]``.
  """
  steps = meta.inner_steps
  last = tf.one_hot(steps - 1, steps)
  if not meta.msl_iterations or steps == 1:
    return last
  progress = tf.minimum(tf.cast(iteration, tf.float32) / meta.msl_iterations, 1.0)
  floor = MSL_MIN_WEIGHT / steps
  early = 1.0 / steps - progress * (1.0 / steps - floor)
  weights = early * (1.0 - last)
  weights += last * (1.0 - tf.reduce_sum(weights))
  return tf.where(tf.cast(iteration, tf.float32) >= meta.msl_iterations, last, weights)


def meta_loss(cfg, meta, params: dict, lrs: dict | None, batch: dict, global_batch: int, *,
              first_order: bool | None = None, step_weights: tf.Tensor | None = None,
              moments: dict | None = None):
  """This replica's share of the meta-objective: its tasks' weighted query losses / global B.

  ``batch`` holds ``support_x [B, n, ...]``, ``support_y``, ``query_x``, ``query_y``.
  ``step_weights [inner_steps]`` weights the query loss after each step (MSL); None: the last
  step only. ``moments``, if a dict, receives the batch statistics of every per-step slot
  (support at step s -> slot s, query after S steps -> slot S) for running statistics.
  Returns the scalar and metric sums (divide by ``global_batch`` after summing over replicas).
  """
  first_order = meta.first_order if first_order is None else first_order
  tasks = batch["support_x"].shape[0]
  n_support, n_query = batch["support_x"].shape[1], batch["query_x"].shape[1]
  query_scale = loss_scale(cfg, meta, n_query, n_support)
  fast = task_start(cfg, params, tasks)
  batch = body_features(cfg, meta, fast, batch)
  if step_weights is not None:
    low = batch["query_x"].dtype in (tf.bfloat16, tf.float16)  # losses are float32 then
    step_weights = tf.cast(step_weights, tf.float32 if low else batch["query_x"].dtype)
  objective = 0.0
  support_loss = support_metric = None
  for step in range(meta.inner_steps):
    ctx = models.ForwardContext(step=step, moments={} if moments is not None else None)
    update = rematerialized_inner_update if meta.remat else inner_update
    fast, losses, metric = update(cfg, meta, fast, step_rates(meta, params, lrs, step),
                                  batch["support_x"], batch["support_y"],
                                  first_order=first_order, ctx=ctx)
    if moments is not None and step < cfg.stat_slots:
      moments[step] = ctx.moments
    if support_loss is None:
      support_loss, support_metric = losses, metric  # before adaptation, for free
    if step_weights is not None and step < meta.inner_steps - 1:
      query_loss, _ = task_losses(cfg, meta, fast, batch["query_x"], batch["query_y"],
                                  models.ForwardContext(step=step + 1))
      objective += step_weights[step] * tf.reduce_sum(query_loss)
  ctx = models.ForwardContext(step=meta.inner_steps,
                              moments={} if moments is not None else None)
  query_loss, query_metric = task_losses(cfg, meta, fast, batch["query_x"], batch["query_y"], ctx)
  if moments is not None and meta.inner_steps < cfg.stat_slots:
    moments[meta.inner_steps] = ctx.moments
  last_weight = 1.0 if step_weights is None else step_weights[-1]
  objective += last_weight * tf.reduce_sum(query_loss)
  objective = objective * query_scale / global_batch
  sums = {"support_loss_pre": tf.reduce_sum(support_loss),
          "support_metric_pre": tf.reduce_sum(support_metric),
          "query_loss_post": tf.reduce_sum(query_loss),
          "query_metric_post": tf.reduce_sum(query_metric)}
  return objective, sums


def stack_moments(cfg: models.ModelConfig, moments: dict) -> dict:
  """Per-slot moments -> ``[stat_slots, C]`` per statistic (training visits slots 0..S)."""
  slots = [moments[s] for s in sorted(moments)]
  while len(slots) < cfg.stat_slots:
    slots.append(slots[-1])
  return {k: tf.stack([m[k] for m in slots]) for k in slots[0]}


def meta_gradients(cfg, meta, params: dict, lrs: dict | None, batch: dict, global_batch: int,
                   *, first_order: bool | None = None, iteration: tf.Tensor | None = None,
                   multi_step_loss: bool = True):
  """Gradients of :func:`meta_loss` w.r.t. params (and rates when learned), plus metric sums.

  ``iteration`` (the meta-step about to be taken) sets the MSL weights; ``multi_step_loss=False``
  skips MSL (what its weights reduce to once annealed). With running statistics, the sums also
  hold this step's batch moments (``moments/<layer>/<stat>``, averaged over the replica's tasks).
  """
  watched = dict(params)
  if lrs:
    watched.update({f"lr/{k}": v for k, v in lrs.items()})
  step_weights = None
  if meta.msl_iterations and multi_step_loss:
    step_weights = msl_weights(meta, 0 if iteration is None else iteration)
  moments = {} if cfg.stat_slots else None
  dtype = tf.as_dtype(meta.compute_dtype)
  # Only a low-precision compute dtype casts (float64 references stay float64).
  low = (lambda t: tf.cast(t, dtype) if t.dtype.is_floating else t) if dtype in (
      tf.bfloat16, tf.float16) else (lambda t: t)
  scale = loss_scaling(meta)
  with tf.GradientTape() as tape:
    tape.watch(list(watched.values()))
    # Mixed precision: float32 master weights cast in here, so the casts' gradients bring the
    # meta-gradient back to float32.
    p = {k: low(watched[k]) for k in params}
    r = {k: low(watched[f"lr/{k}"]) for k in lrs} if lrs else None
    objective, sums = meta_loss(cfg, meta, p, r, {k: low(v) for k, v in batch.items()},
                                global_batch, first_order=first_order,
                                step_weights=step_weights, moments=moments)
    scaled = objective * scale if scale != 1.0 else objective
  grads = tape.gradient(scaled, watched)
  grads = {k: tf.zeros_like(v) if grads[k] is None else grads[k] / scale if scale != 1.0
           else grads[k] for k, v in watched.items()}
  if moments is not None:
    sums.update({f"moments/{k}": v for k, v in stack_moments(cfg, moments).items()})
  return grads, sums


def evaluate(cfg, meta, params: dict, lrs: dict | None, batch: dict, steps: int,
             stats: dict | None = None, measured: tuple[int, ...] | None = None):
  """Query loss and metric of each task after 0..steps adaptation steps: two ``[steps+1, B]``.

  ``stats``: running statistics to normalise with (models with ``stat_slots``); None: batch
  statistics, transductive as in the paper. ``measured``: only these step counts (ascending),
  two ``[len(measured), B]``: the query's forward passes dominate a wide network's evaluation
  (ResNet-12 5w1s: 75 query images against 5 support images per step), so measuring only the
  last step is several times cheaper and adapts exactly the same way.
  """
  tasks = batch["support_x"].shape[0]
  fast = task_start(cfg, params, tasks)
  batch = body_features(cfg, meta, fast, batch, stats)
  losses, metrics = [], []
  measured = range(steps + 1) if measured is None else measured
  for step in range(steps + 1):
    ctx = models.ForwardContext(step=step, stats=stats)
    if step in measured:
      loss, metric = task_losses(cfg, meta, fast, batch["query_x"], batch["query_y"], ctx)
      losses.append(loss)
      metrics.append(metric)
    if step < steps:
      fast, _, _ = inner_update(cfg, meta, fast, step_rates(meta, params, lrs, step),
                                batch["support_x"], batch["support_y"], first_order=True,
                                ctx=ctx)
  return tf.stack(losses), tf.stack(metrics)



def adapt(cfg, meta, params: dict, lrs: dict | None, support_x: tf.Tensor,
          support_y: tf.Tensor, steps: int, stats: dict | None = None) -> dict:
  """Each task's parameters after ``steps`` inner updates on its support set (``[B, ...]``).

  Test-time adaptation, as :func:`evaluate` does it, for callers that predict afterwards
  (:mod:`trainer.export`). The example count may be dynamic.
  """
  fast = task_start(cfg, params, support_x.shape[0])
  if body_is_fixed(cfg, meta):
    support_x = models.features(cfg, fast, support_x, models.ForwardContext(stats=stats))
  for step in range(steps):
    fast, _, _ = inner_update(cfg, meta, fast, step_rates(meta, params, lrs, step), support_x,
                              support_y, first_order=True,
                              ctx=models.ForwardContext(step=step, stats=stats))
  return fast


def adapted_logits(cfg, fast: dict, query_x: tf.Tensor, steps: int,
                   stats: dict | None = None) -> tf.Tensor:
  """Outputs ``[B, n, N]`` of parameters adapted by ``steps`` updates (per-step norm slot)."""
  return models.apply(cfg, fast, query_x, models.ForwardContext(step=steps, stats=stats))
