"""Functional models with explicit, task-batched parameters.

Every parameter carries a leading task axis ``B`` during adaptation (each task's adapted
copy), and every input a leading ``[B, n]``. Convolutions run all tasks in one grouped
convolution: activations are kept as ``[n, H, W, B*C]`` and task ``b`` owns channel group
``b``, so one meta-batch is one batched computation with static shapes: on CPU, graph mode
runs it with oneDNN's grouped convolutions, where a Python loop over tasks or ``tf.map_fn``
were 2-20x slower; the same static graph compiles under XLA for GPU/TPU. (XLA on CPU is not
fast for conv4: its convolution gradients measured ~80x slower, ``bench/bench_meta_step.py``;
hence ``--jit_compile=auto``.)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf
from absl import logging

NORMS = ("batch_norm", "layer_norm", "none")
KINDS = ("conv4", "resnet12", "mlp", "keras")
CONV_KINDS = ("conv4", "resnet12")  # built-in convolutional bodies (grouped-convolution layout)
LEAKY_SLOPE = 0.1  # ResNet-12's leaky ReLU (TADAM, MetaOptNet)
EPSILON = 1e-3  # tf.contrib.layers.batch_norm's default, as in the original MAML code


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """``conv4``: 4 x [3x3 conv, norm, ReLU, 2x2 down-sampling] + linear; ``resnet12``: the
  few-shot ResNet-12 of TADAM and MetaOptNet (4 residual blocks of ``widths``, each 3 x [3x3
  conv, norm, leaky ReLU 0.1] with a 1x1 conv + norm shortcut, then 2x2 max-pool) + linear;
  ``mlp``: dense layers; ``keras``: a user's Keras model (:mod:`trainer.keras_models`), named
  by ``keras``."""
  kind: str  # "conv4", "resnet12", "mlp" or "keras"
  input_shape: tuple[int, ...]  # per example: (H, W, C) for images, (d,) for vectors
  num_outputs: int
  num_filters: int = 64
  downsample: str = "stride"  # "stride" (stride-2 convs) or "maxpool" (2x2 max-pool)
  features: str = "mean"  # conv head input: "mean" over space (MAML Omniglot) or "flatten"
  widths: tuple[int, ...] = (64, 160, 320, 640)  # resnet12: each block's channels
  hidden_sizes: tuple[int, ...] = (40, 40)
  norm: str = "batch_norm"
  # The original MAML code's batch norm (tf.contrib.layers.batch_norm defaults) has an offset
  # but no scale; ours has both unless this is False.
  norm_scale: bool = True
  # Head initialisation: "glorot", or "normal" = N(0, 1), the original Omniglot code's w5.
  head_init: str = "glorot"
  # UNICORN-MAML's head (Ye & Chao, ICLR 2022): one meta-learned weight vector and bias shared
  # by all N outputs (out/kernel [d, 1], out/bias [1]), copied to every output at the start of
  # each task (:func:`expand_head`), so no class is tied to a row and the label order of an
  # episode cannot change its result.
  shared_head: bool = False
  # Per-step norm parameters (MAML++'s BNWB): 0 = one set shared by every inner step; n > 0 =
  # n sets, set s used by forward passes after s inner updates (the last set beyond n - 1).
  param_slots: int = 0
  # Running statistics (MAML++'s BNRS when n > 1): 0 = none, batch statistics at test time too
  # (the paper's transductive setting); n > 0 = n per-step sets tracked in training and used in
  # evaluation, so a prediction does not depend on the other query examples.
  stat_slots: int = 0
  # kind "keras": PATH_OR_MODULE:FUNCTION of the model builder; its own layers decide the rest
  # (the norm fields above do not apply).
  keras: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"model={self.kind!r}: must be one of {KINDS}")
    if (self.kind == "keras") != bool(self.keras):
      raise ValueError("a keras model needs its PATH_OR_MODULE:FUNCTION, and only it has one")
    if self.kind == "keras" and (self.param_slots or self.stat_slots):
      raise ValueError("per-step norm parameters and running statistics are not supported for "
                       "Keras models (the model's own batch norm uses batch statistics)")
    if self.norm not in NORMS:
      raise ValueError(f"norm={self.norm!r}: must be one of {NORMS}")
    if self.downsample not in ("stride", "maxpool"):
      raise ValueError(f"downsample={self.downsample!r}: must be stride or maxpool")
    if self.features not in ("mean", "flatten"):
      raise ValueError(f"features={self.features!r}: must be mean or flatten")
    if self.head_init not in ("glorot", "normal"):
      raise ValueError(f"head_init={self.head_init!r}: must be glorot or normal")
    if self.shared_head and self.kind == "keras":
      raise ValueError("a shared head is not yet supported for Keras models")
    if (self.param_slots or self.stat_slots) and self.norm == "none":
      raise ValueError("per-step norm parameters or running statistics need a norm")
    if self.stat_slots and self.norm != "batch_norm":
      raise ValueError(f"running statistics need norm=batch_norm, not {self.norm!r}")
    if len(self.widths) != 4 or min(self.widths) < 1:
      raise ValueError(f"widths={self.widths}: ResNet-12 needs four positive block widths")

  def norm_layers(self) -> list[tuple[str, int]]:
    """(name, width) of every normalised layer, in order (none of a Keras model is ours)."""
    if self.kind == "keras":
      return []
    if self.kind == "conv4":
      return [(f"conv{i}", self.num_filters) for i in range(4)]
    if self.kind == "resnet12":
      return [(f"block{i}/{layer}", width) for i, width in enumerate(self.widths)
              for layer in ("conv0", "conv1", "conv2", "shortcut")]
    return [(f"dense{i}", h) for i, h in enumerate(self.hidden_sizes)]


def is_norm_param(name: str) -> bool:
  return name.endswith("/scale") or name.endswith("/offset")


def init_stats(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Running statistics (zero means, unit variances), ``[stat_slots, width]`` per layer."""
  stats = {}
  for prefix, width in cfg.norm_layers() if cfg.stat_slots else []:
    stats[f"{prefix}/mean"] = np.zeros([cfg.stat_slots, width], np.float32)
    stats[f"{prefix}/variance"] = np.ones([cfg.stat_slots, width], np.float32)
  return stats


def _conv_output_side(cfg: ModelConfig) -> int:
  side = cfg.input_shape[0]
  for _ in range(4):
    strided = cfg.kind == "conv4" and cfg.downsample == "stride"
    side = math.ceil(side / 2) if strided else side // 2
  return side


def init_params(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
  """Glorot-uniform weights (ResNet-12: He-normal), zero biases, unit scales; a pure function
  of ``seed``.

  A Keras model: its own initialisers, seeded by ``seed``."""
  if cfg.kind == "keras":
    return _keras().init_params(cfg.keras, cfg.input_shape, cfg.num_outputs, seed)
  rng = np.random.default_rng(seed)

  def glorot(shape, fan_in, fan_out):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype(np.float32)

  params: dict[str, np.ndarray] = {}

  def norm_params(prefix, width):
    if cfg.norm != "none":
      shape = [cfg.param_slots, width] if cfg.param_slots else [width]
      if cfg.norm_scale:
        params[f"{prefix}/scale"] = np.ones(shape, np.float32)
      params[f"{prefix}/offset"] = np.zeros(shape, np.float32)
    else:
      params[f"{prefix}/bias"] = np.zeros([width], np.float32)

  if cfg.kind == "conv4":
    channels = cfg.input_shape[-1]
    for i in range(4):
      params[f"conv{i}/kernel"] = glorot([3, 3, channels, cfg.num_filters], 9 * channels,
                                         9 * cfg.num_filters)
      norm_params(f"conv{i}", cfg.num_filters)
      channels = cfg.num_filters
  elif cfg.kind == "resnet12":
    # He-normal kernels (fan-out, gain sqrt(2)), as MetaOptNet's and UNICORN-MAML's code.
    he = lambda shape: rng.normal(0.0, math.sqrt(2.0 / (shape[0] * shape[1] * shape[3])),
                                  shape).astype(np.float32)
    channels = cfg.input_shape[-1]
    for i, width in enumerate(cfg.widths):
      for j in range(3):
        params[f"block{i}/conv{j}/kernel"] = he([3, 3, channels if j == 0 else width, width])
        norm_params(f"block{i}/conv{j}", width)
      params[f"block{i}/shortcut/kernel"] = he([1, 1, channels, width])
      norm_params(f"block{i}/shortcut", width)
      channels = width
  else:
    width = int(np.prod(cfg.input_shape))
    for i, hidden in enumerate(cfg.hidden_sizes):
      params[f"dense{i}/kernel"] = glorot([width, hidden], width, hidden)
      norm_params(f"dense{i}", hidden)
      width = hidden
  if cfg.kind in CONV_KINDS:
    side = _conv_output_side(cfg)
    width = body_width(cfg) * (side * side if cfg.features == "flatten" else 1)
  columns = 1 if cfg.shared_head else cfg.num_outputs
  if cfg.head_init == "normal":
    params["out/kernel"] = rng.normal(0.0, 1.0, [width, columns]).astype(np.float32)
  else:  # a shared vector at the scale of an N-output head
    params["out/kernel"] = glorot([width, columns], width, cfg.num_outputs)
  params["out/bias"] = np.zeros([columns], np.float32)
  return params


def expand_head(cfg: ModelConfig, params: dict) -> dict:
  """The parameters a task starts from: a shared head copied to all N outputs (else as is)."""
  if not cfg.shared_head:
    return params
  out = {"out/kernel": tf.tile(params["out/kernel"], [1, cfg.num_outputs]),
         "out/bias": tf.tile(params["out/bias"], [cfg.num_outputs])}
  return dict(params, **out)


def body_width(cfg: ModelConfig) -> int:
  """Channels of a built-in convolutional body's last layer."""
  return cfg.widths[-1] if cfg.kind == "resnet12" else cfg.num_filters


def _keras():
  """:mod:`trainer.keras_models`, imported when first used (it imports this module)."""
  from trainer import keras_models  # pylint: disable=import-outside-toplevel
  return keras_models


def exact_moments(x: tf.Tensor, axes: list[int]) -> tuple[tf.Tensor, tf.Tensor]:
  """Mean and variance, differentiable to second order.

  ``tf.nn.moments`` stops the gradient through the mean inside the variance: harmless for
  first derivatives, wrong for MAML's second-order ones (caught by the finite-difference test).
  """
  mean = tf.reduce_mean(x, axis=axes, keepdims=True)
  return mean, tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)


def _slot(values: tf.Tensor, slots: int, step: int, axis: int) -> tf.Tensor:
  """Set ``min(step, slots - 1)`` of per-step values (the last set serves longer evaluations)."""
  return tf.gather(values, min(step, slots - 1), axis=axis)


def _normalize(cfg: ModelConfig, h: tf.Tensor, params: dict, prefix: str, groups: int,
               ctx: "ForwardContext") -> tf.Tensor:
  """Norm over a grouped activation ``[n, ..., B*C]`` with per-task ``[B, C]`` parameters.

  batch_norm: statistics of the current batch of each task (the paper's transductive setting,
  used at test time too), unless ``ctx.stats`` holds running statistics to use instead.
  layer_norm: per example and task, over its features; no batch statistics, so predictions do
  not depend on the other examples.
  """
  if cfg.norm == "none":
    return h + tf.reshape(params[f"{prefix}/bias"], [-1])
  width = h.shape[-1]

  def per_task(name, default):
    if f"{prefix}/{name}" not in params:
      return tf.constant(default, h.dtype, [width])
    value = params[f"{prefix}/{name}"]  # [B, C] or [B, slots, C]
    if cfg.param_slots:
      value = _slot(value, cfg.param_slots, ctx.step, axis=1)
    return tf.reshape(value, [-1])

  scale, offset = per_task("scale", 1.0), per_task("offset", 0.0)
  # Fused batch norm takes float32 scale, offset and statistics for low-precision activations.
  fused_dtype = tf.float32 if h.dtype in (tf.bfloat16, tf.float16) else h.dtype
  if cfg.norm == "batch_norm" and ctx.stats is not None:
    mean, var = (tf.tile(_slot(tf.cast(ctx.stats[f"{prefix}/{name}"], h.dtype), cfg.stat_slots,
                               ctx.step, axis=0), [groups])
                 for name in ("mean", "variance"))
    if h.shape.rank == 4:
      cast = lambda t: tf.cast(t, fused_dtype)
      y, _, _ = tf.compat.v1.nn.fused_batch_norm(h, cast(scale), cast(offset), mean=cast(mean),
                                                 variance=cast(var), epsilon=EPSILON,
                                                 is_training=False)
      return y
    return (h - mean) * tf.math.rsqrt(var + EPSILON) * scale + offset
  if cfg.norm == "batch_norm" and h.shape.rank == 4 and h.dtype != tf.float64:
    # (float64, for finite-difference tests, has no fused kernel: the exact moments below.)
    # One fused kernel (and one for its gradient) instead of ~8 passes over the activations,
    # which dominate the step's time at these small convolutions. Its gradient of gradient is
    # registered, so second-order MAML works through it.
    y, batch_mean, batch_var = tf.compat.v1.nn.fused_batch_norm(
        h, tf.cast(scale, fused_dtype), tf.cast(offset, fused_dtype), epsilon=EPSILON,
        is_training=True)
    ctx.record(prefix, batch_mean, batch_var, groups)
    return y
  if cfg.norm == "batch_norm":
    axes = list(range(h.shape.rank - 1))
    mean, var = exact_moments(h, axes)
    ctx.record(prefix, tf.reshape(mean, [-1]), tf.reshape(var, [-1]), groups)
    h = (h - mean) * tf.math.rsqrt(var + EPSILON)
  else:
    shape = tf.shape(h)
    split = tf.concat([shape[:-1], [groups, -1]], axis=0)
    g = tf.reshape(h, split)  # [..., B, C]
    axes = list(range(1, h.shape.rank - 1)) + [h.shape.rank]
    mean, var = exact_moments(g, axes)
    h = tf.reshape((g - mean) * tf.math.rsqrt(var + EPSILON), shape)
  return h * scale + offset


@dataclasses.dataclass
class ForwardContext:
  """What a forward pass needs beyond parameters and inputs, and what it reports back.

  ``step``: inner updates made so far (selects per-step norm parameters and statistics).
  ``stats``: running statistics ``[stat_slots, C]`` per layer to normalise with, or None for
  batch statistics. ``moments``: if a dict, filled with each layer's batch mean and variance
  averaged over tasks (gradient stopped), for updating running statistics. ``dropout``:
  ResNet-12's training noise (:class:`Dropout`), or None for none (evaluation).
  """
  step: int = 0
  stats: dict | None = None
  moments: dict | None = None
  dropout: "Dropout | None" = None

  def record(self, prefix: str, mean: tf.Tensor, var: tf.Tensor, groups: int) -> None:
    if self.moments is None:
      return
    average = lambda t: tf.stop_gradient(tf.reduce_mean(
        tf.reshape(tf.cast(t, tf.float32) if t.dtype != tf.float64 else t, [groups, -1]), axis=0))
    self.moments[f"{prefix}/mean"] = average(mean)
    self.moments[f"{prefix}/variance"] = average(var)


@functools.cache
def native_grouped_convolutions(dtype: str = "float32") -> bool:
  """Whether this TensorFlow differentiates a grouped convolution of ``dtype`` in graph mode.

  oneDNN's CPU kernels, cuDNN and XLA do. TensorFlow's own CPU kernels compute the forward pass
  but refuse its gradients ("filter_size does not have enough elements"), and TensorFlow
  turns oneDNN off by default on x86 processors without AVX-512-class features (an AMD EPYC
  with AVX2 here), or when ``TF_ENABLE_ONEDNN_OPTS=0``; and oneDNN has bfloat16 kernels only
  where the processor has bfloat16 instructions. Probed once per dtype, on a tiny case.
  """
  @tf.function
  def backprops(x, w, dy):  # the two kernels a convolution's gradient runs
    kw = dict(strides=[1, 2, 2, 1], padding="SAME")
    return (tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(w), out_backprop=dy,
                                            **kw),
            tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=w, out_backprop=dy,
                                           **kw))

  with tf.init_scope():
    try:  # 2 groups of 2 channels
      backprops(tf.ones([1, 4, 4, 4], dtype), tf.ones([3, 3, 2, 4], dtype),
                tf.ones([1, 2, 2, 4], dtype))
      return True
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
      logging.warning("this TensorFlow cannot differentiate %s grouped convolutions (oneDNN "
                      "is off, TF_ENABLE_ONEDNN_OPTS=0, or has no such kernel here); conv4 runs "
                      "one convolution per task instead, which is slower", dtype)
      return False


def grouped_conv2d(h: tf.Tensor, kernel: tf.Tensor, groups: int, stride: int) -> tf.Tensor:
  """``[n, H, W, groups*cin]`` convolved with ``[k, k, cin, groups*cout]``, group by group.

  One grouped convolution where TensorFlow differentiates it; otherwise one ordinary
  convolution per group (the same function, differentiable to any order everywhere).
  """
  if groups == 1 or native_grouped_convolutions(h.dtype.name):
    return tf.nn.conv2d(h, kernel, strides=stride, padding="SAME")
  return tf.concat([tf.nn.conv2d(x, w, strides=stride, padding="SAME")
                    for x, w in zip(tf.split(h, groups, axis=-1),
                                    tf.split(kernel, groups, axis=-1))], axis=-1)


def head(features: tf.Tensor, params: dict) -> tf.Tensor:
  """The linear output layer on body features ``[B, n, d]``."""
  return tf.einsum("bnd,bdk->bnk", features, params["out/kernel"]) + params["out/bias"][:, None, :]


def apply(cfg: ModelConfig, params: dict[str, tf.Tensor], x: tf.Tensor,
          ctx: ForwardContext | None = None) -> tf.Tensor:
  """Outputs ``[B, n, num_outputs]`` for inputs ``[B, n, *input_shape]`` and params ``[B, ...]``."""
  if cfg.kind == "keras":
    return _keras().backbone(cfg.keras, cfg.input_shape, cfg.num_outputs).apply(params, x)
  return head(features(cfg, params, x, ctx), params)


def features(cfg: ModelConfig, params: dict[str, tf.Tensor], x: tf.Tensor,
             ctx: ForwardContext | None = None) -> tf.Tensor:
  """The body's output ``[B, n, d]``: what the head sees (built-in models only)."""
  ctx = ctx or ForwardContext()
  B = x.shape[0]  # static; the example count n may be dynamic (exported models)
  if cfg.kind == "mlp":
    h = tf.reshape(x, [B, -1, int(np.prod(cfg.input_shape))])
    for i in range(len(cfg.hidden_sizes)):
      h = tf.einsum("bnd,bdk->bnk", h, params[f"dense{i}/kernel"])
      width = h.shape[-1]
      g = tf.reshape(tf.transpose(h, [1, 0, 2]), [-1, B * width])  # grouped layout [n, B*C]
      g = tf.nn.relu(_normalize(cfg, g, params, f"dense{i}", B, ctx))
      h = tf.transpose(tf.reshape(g, [-1, B, width]), [1, 0, 2])
    return h
  H, W, C = cfg.input_shape
  h = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), [-1, H, W, B * C])
  if cfg.kind == "resnet12":
    for i in range(4):
      h = _residual_block(cfg, params, h, f"block{i}", B, ctx)
  else:
    for i in range(4):
      stride = 2 if cfg.downsample == "stride" else 1
      h = grouped_conv2d(h, _grouped_kernel(params[f"conv{i}/kernel"]), B, stride)
      h = tf.nn.relu(_normalize(cfg, h, params, f"conv{i}", B, ctx))
      if cfg.downsample == "maxpool":
        h = tf.nn.max_pool2d(h, 2, 2, padding="VALID")
  side_h, side_w, width = h.shape[1], h.shape[2], body_width(cfg)
  h = tf.reshape(h, [-1, side_h, side_w, B, width])
  if cfg.features == "mean":
    return tf.transpose(tf.reduce_mean(h, axis=[1, 2]), [1, 0, 2])
  return tf.reshape(tf.transpose(h, [3, 0, 1, 2, 4]), [B, -1, side_h * side_w * width])


@dataclasses.dataclass(frozen=True)
class Dropout:
  """MetaOptNet's ResNet-12 regulariser (Lee et al., CVPR 2019; FEAT and UNICORN-MAML pretrain
  with it): after each block's max-pool, dropout at ``rate`` in blocks 0-1 and DropBlock
  (Ghiasi et al., NeurIPS 2018) in blocks 2-3, which drops ``block_size`` squares of a channel,
  so that neighbouring activations (which carry the same information) go together. ``rate``
  may be a scalar tensor (a schedule); ``seed`` is a stateless ``[2]`` int seed, so a step's
  noise is a function of the seed and compiles for XLA (whose generator draws other numbers
  from the same seed than TensorFlow's kernels do)."""
  rate: float | tf.Tensor
  block_size: int
  seed: tf.Tensor

  def apply(self, h: tf.Tensor, block: int, groups: int) -> tf.Tensor:
    seed = tf.random.experimental.stateless_fold_in(self.seed, block)
    if block < 2:
      return tf.nn.experimental.stateless_dropout(h, tf.cast(self.rate, h.dtype), seed)
    return dropblock(h, self.rate, self.block_size, seed, groups)


def dropblock_seeds_probability(rate, block_size: int, height: int, width: int):
  """DropBlock's gamma: the probability of a block's seed at each position where a whole block
  fits, such that about ``rate`` of the map is dropped (overlaps make it a little less)."""
  return (rate / block_size ** 2 * (height * width)
          / ((height - block_size + 1) * (width - block_size + 1)))


def dropblock_mask(seeds: tf.Tensor, block_size: int) -> tf.Tensor:
  """1 where kept, 0 in the ``block_size`` square whose top-left corner is each seed:
  ``seeds`` ``[n, H-s+1, W-s+1, C]`` (1 = a block starts here) -> ``[n, H, W, C]``."""
  pad = block_size - 1
  padded = tf.pad(seeds, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  return 1.0 - tf.nn.max_pool2d(padded, block_size, 1, padding="VALID")


def dropblock(h: tf.Tensor, rate, block_size: int, seed: tf.Tensor, groups: int) -> tf.Tensor:
  """DropBlock on a grouped activation ``[n, H, W, B*C]``: each channel of each example drops
  its own blocks; the kept ones are scaled by dropped-and-kept over kept, per task group, so
  the sum of each task's activations is what it was in expectation and one task's draw does not
  scale another's."""
  n, height, width, channels = h.shape
  size = min(block_size, height, width)  # a map smaller than a block drops whole maps
  gamma = dropblock_seeds_probability(tf.cast(rate, h.dtype), size, height, width)
  shape = tf.stack([tf.shape(h)[0], height - size + 1, width - size + 1, channels])
  seeds = tf.cast(tf.random.stateless_uniform(shape, seed, dtype=h.dtype) < gamma, h.dtype)
  mask = dropblock_mask(seeds, size)
  grouped = lambda t: tf.reshape(t, tf.concat([tf.shape(t)[:-1], [groups, -1]], axis=0))
  kept = tf.reduce_sum(grouped(mask), axis=[0, 1, 2, 4])  # [B]
  total = tf.cast(tf.size(mask) // groups, h.dtype)
  scale = tf.repeat(total / tf.maximum(kept, 1.0), channels // groups)
  return h * mask * scale


def _grouped_kernel(kernel: tf.Tensor) -> tf.Tensor:
  """Per-task kernels ``[B, k, k, cin, cout]`` -> one grouped kernel ``[k, k, cin, B*cout]``."""
  B, k, _, cin, cout = kernel.shape
  return tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]), [k, k, cin, B * cout])


def _residual_block(cfg: ModelConfig, params: dict, h: tf.Tensor, prefix: str, groups: int,
                    ctx: ForwardContext) -> tf.Tensor:
  """One ResNet-12 block on the grouped layout ``[n, H, W, B*cin]`` -> ``[n, H/2, W/2, B*w]``."""
  conv = lambda x, name: _normalize(cfg, grouped_conv2d(
      x, _grouped_kernel(params[f"{prefix}/{name}/kernel"]), groups, 1), params,
      f"{prefix}/{name}", groups, ctx)
  y = h
  for j in range(3):
    y = conv(y, f"conv{j}")
    if j < 2:
      y = tf.nn.leaky_relu(y, LEAKY_SLOPE)
  y = tf.nn.leaky_relu(y + conv(h, "shortcut"), LEAKY_SLOPE)
  y = tf.nn.max_pool2d(y, 2, 2, padding="VALID")
  if ctx.dropout is not None:
    y = ctx.dropout.apply(y, int(prefix[len("block"):]), groups)
  return y
