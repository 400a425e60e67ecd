"""A user's Keras model as a function of explicit parameters, with a task axis.

MAML differentiates through an inner update of the weights, so the network must run on weights
passed in as tensors rather than on its variables. Keras 3's ``model.stateless_call(trainable,
non_trainable, x, training=True)`` does exactly that for any Keras model; ``tf.vectorized_map``
over the task axis then runs a meta-batch of tasks, each with its own adapted weights, as the
built-in models' batched layout does (``trainer.models``). Batch norm layers run with
``training=True``: each task's current batch statistics, as the built-in models' inner loop
uses; the moving averages they return are dropped. Keras's TensorFlow backend computes those
statistics with ``tf.nn.moments``, which stops the gradient through the mean inside the
variance: right to first order, wrong for MAML's second-order meta-gradient (off by half the
gradient's size in conv4's first layer). The forward pass therefore runs with that one function
replaced by the exact moments (:func:`exact_batch_moments`).

A model is named by ``PATH_OR_MODULE:FUNCTION``: ``FUNCTION(input_shape, n_way)`` returns a
``keras.Model`` from images ``[n, H, W, C]`` in [0, 1] to logits ``[n, n_way]``, and is found in a
``.py`` file or an importable module. A model that cannot be meta-trained is refused here, in
one line naming the function, shape or layer at fault.

Weights are named by position, not by Keras's automatic layer names (which count the layers
built earlier in the process, so a second build of the same model would not find its
checkpoint): ``<index>_<layer class>/<weight>``, e.g. ``00_conv2d/kernel``, with batch and layer
norms' ``gamma``/``beta`` as ``scale``/``offset`` (so ``--inner_adapt=no_norm`` finds them) and the
head, the layer named ``head`` or else the last layer with weights, as ``out/kernel``,
``out/bias`` (so ``--inner_adapt=head``, ANIL, adapts it). ``--model=keras:SPEC`` reaches here
through :class:`trainer.models.ModelConfig` (kind ``keras``): the learner, checkpoints,
evaluation and export call :func:`trainer.models.apply` as for the built-in models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import random
import re
import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from pipeline.errors import UsageError
from trainer import models


@functools.cache
def load_builder(spec: str) -> Callable:
  """``PATH_OR_MODULE:FUNCTION`` -> the function (``path/to/file.py:make`` or ``pkg.mod:make``)."""
  source, sep, name = spec.rpartition(":")
  if not sep or not source or not name:
    raise UsageError(f"--model=keras:{spec}: expected PATH_OR_MODULE:FUNCTION, e.g. "
                     f"keras:my_nets.py:make_model")
  if source.endswith(".py"):
    path = Path(source)
    if not path.is_file():
      raise UsageError(f"--model=keras:{spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(source)
    except ImportError as e:
      raise UsageError(f"--model=keras:{spec}: cannot import {source} ({e})") from e
  builder = getattr(module, name, None)
  if not callable(builder):
    raise UsageError(f"--model=keras:{spec}: {source} has no function {name}")
  return builder


@contextlib.contextmanager
def exact_batch_moments():
  """Keras's batch statistics differentiable to second order while tracing a forward pass.

  Keras 3.x's TensorFlow backend routes ``keras.ops.moments`` (batch norm's statistics)
  through ``keras.src.backend.tensorflow.nn._compute_moments``, i.e. ``tf.nn.moments``; this
  replaces it with :func:`trainer.models.exact_moments`, the built-in models' own. A Keras
  without that function is refused rather than run with wrong second derivatives.
  """
  from keras.src.backend.tensorflow import nn as backend_nn  # pylint: disable=import-outside-toplevel
  original = getattr(backend_nn, "_compute_moments", None)
  if original is None:
    import keras  # pylint: disable=import-outside-toplevel
    raise UsageError(f"keras {keras.__version__}: its batch statistics are no longer computed "
                     f"where trainer/keras_models.py makes them second-order exact")

  def moments(x, axes, keepdims):
    mean, variance = models.exact_moments(x, axes)
    if not keepdims:
      mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance

  backend_nn._compute_moments = moments  # pylint: disable=protected-access
  try:
    yield
  finally:
    backend_nn._compute_moments = original  # pylint: disable=protected-access


def _grouped_conv2d_converter(original: Callable) -> Callable:
  """A pfor converter of ``Conv2D`` for per-task filters: the tasks' convolutions as one grouped
  convolution (the built-in conv4's layout, :func:`trainer.models.grouped_conv2d`).

  TensorFlow's own converter vectorizes ``Conv2D`` only for a filter shared by every iteration;
  with one filter per task, as in MAML's inner loop, ``tf.vectorized_map`` falls back to a
  ``while_loop`` over the tasks, forward and backward. Here the stacked input ``[T, n, H, W, C]``
  becomes ``[n, H, W, T*C]``, the filters ``[T, kh, kw, C, O]`` become ``[kh, kw, C, T*O]``, and
  the output goes back to ``[T, n, H', W', O]``: the same convolutions, whose derivatives of any
  order are the grouped convolution's own. Anything else (a shared filter, NCHW, explicit
  padding, no differentiable grouped kernel here) goes to ``original``.
  """
  from tensorflow.python.ops.parallel_for import pfor as pfor_lib  # pylint: disable=import-outside-toplevel

  def convert(pfor_input):
    x, x_stacked, _ = pfor_input.input(0)
    w, w_stacked, _ = pfor_input.input(1)
    data_format = pfor_input.get_attr("data_format")
    data_format = data_format.decode() if isinstance(data_format, bytes) else data_format
    padding = pfor_input.get_attr("padding")
    padding = padding.decode() if isinstance(padding, bytes) else padding
    if (not w_stacked or data_format != "NHWC" or padding not in ("SAME", "VALID")
        or not models.native_grouped_convolutions(w.dtype.name)):
      return original(pfor_input)
    if not x_stacked:
      pfor_input.stack_inputs(stack_indices=[0])
      x = pfor_input.stacked_input(0)
    tasks = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
    n, height, width, cin = (x.shape[i] if x.shape[i] is not None else tf.shape(x)[i]
                             for i in range(1, 5))
    kh, kw, _, cout = w.shape[1:]
    h = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), [n, height, width, tasks * cin])
    kernel = tf.reshape(tf.transpose(w, [1, 2, 3, 0, 4]), [kh, kw, cin, tasks * cout])
    y = tf.nn.conv2d(h, kernel, strides=pfor_input.get_attr("strides"), padding=padding,
                     dilations=pfor_input.get_attr("dilations"))
    shape = tf.shape(y)
    y = tf.reshape(y, tf.stack([shape[0], shape[1], shape[2], tasks, cout]))
    return [pfor_lib.wrap(tf.transpose(y, [3, 0, 1, 2, 4]), True)]

  return convert


@contextlib.contextmanager
def grouped_task_convolutions():
  """``tf.vectorized_map`` traced inside runs per-task convolutions as one grouped convolution
  (:func:`_grouped_conv2d_converter`); outside, TensorFlow's converter is back. Without
  TensorFlow's (private) converter registry, nothing changes: the while loop, slower."""
  try:
    from tensorflow.python.ops.parallel_for import pfor as pfor_lib  # pylint: disable=import-outside-toplevel
    registry = pfor_lib._pfor_converter_registry  # pylint: disable=protected-access
    original = registry["Conv2D"]
  except (ImportError, AttributeError, KeyError):
    yield
    return
  registry["Conv2D"] = _grouped_conv2d_converter(original)
  try:
    yield
  finally:
    registry["Conv2D"] = original


@dataclasses.dataclass(frozen=True)
class KerasBackbone:
  """A built Keras model with the order of its trainable weights fixed by name (``path``)."""
  model: object  # keras.Model
  names: tuple[str, ...]
  # Its non-trainable weights' values, fed as constants: only batch norm's moving statistics
  # are non-trainable here (build() refuses anything else), and training=True never reads
  # them. Captured variables would also tie an exported graph to this Python object.
  fixed: tuple[np.ndarray, ...] = ()

  def init_params(self) -> dict[str, np.ndarray]:
    """The model's own initial trainable weights, by name."""
    return {name: np.asarray(v.numpy(), np.float32)
            for name, v in zip(self.names, self.model.trainable_variables)}

  def apply(self, params: dict[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """Logits ``[B, n, n_way]`` for inputs ``[B, n, H, W, C]`` and weights ``[B, ...]`` by name."""
    fixed = [tf.constant(v) for v in self.fixed]

    def one_task(args):
      weights, images = args
      logits, _ = self.model.stateless_call(list(weights), fixed, images, training=True)
      return logits

    with exact_batch_moments(), grouped_task_convolutions():
      return tf.vectorized_map(one_task, ([params[k] for k in self.names], x))


def _snake(name: str) -> str:
  return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower()


NORM_RENAMES = {"gamma": "scale", "beta": "offset"}


def weight_names(model) -> tuple[str, ...]:
  """Positional names of ``model.trainable_variables``, in their order (module docstring)."""
  owner = {}
  for layer in model._flatten_layers(include_self=True, recursive=True):  # pylint: disable=protected-access
    for w in layer.trainable_weights:
      owner[id(w)] = layer  # parents come first: the innermost layer that holds it wins
  layers = []
  for v in model.trainable_variables:
    if owner[id(v)] not in layers:
      layers.append(owner[id(v)])
  named_head = [layer for layer in layers if layer.name == "head"]
  head = named_head[0] if named_head else layers[-1]
  names = []
  for v in model.trainable_variables:
    layer = owner[id(v)]
    short = v.name.split("/")[-1]
    if layer is head:
      names.append(f"out/{short}")
    else:
      names.append(f"{layers.index(layer):02d}_{_snake(type(layer).__name__)}/"
                   f"{NORM_RENAMES.get(short, short)}")
  return tuple(names)


def _seeded_build(builder: Callable, input_shape: tuple, n_way: int, seed: int):
  """The user's model with initial weights that depend on ``seed`` alone.

  Keras's initialisers draw from its global seed; Python's and NumPy's global generators,
  which ``keras.utils.set_random_seed`` also reseeds, are restored afterwards.
  """
  import keras  # pylint: disable=import-outside-toplevel
  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    keras.utils.set_random_seed(seed)
    return builder(tuple(input_shape), n_way)
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)


def init_model(spec: str, input_shape: tuple, n_way: int, seed: int):
  """A new instance of the user's model with the initial weights of ``seed``."""
  return _seeded_build(load_builder(spec), input_shape, n_way, seed)


def init_params(spec: str, input_shape: tuple, n_way: int, seed: int) -> dict[str, np.ndarray]:
  """The model's own initial weights for ``seed``, by positional name (the model checked)."""
  backbone(spec, tuple(input_shape), n_way)
  model = init_model(spec, input_shape, n_way, seed)
  return {name: np.asarray(v.numpy(), np.float32)
          for name, v in zip(weight_names(model), model.trainable_variables)}


@functools.cache
def backbone(spec: str, input_shape: tuple, n_way: int) -> "KerasBackbone":
  """One checked model per spec and shape, for its structure: weights come in as tensors.

  First asked for eagerly (:func:`init_params` does, before any step is traced): its checks
  differentiate the model, which a tape cannot do from inside a trace.
  """
  if not tf.executing_eagerly():
    raise RuntimeError("keras_models.backbone: build it eagerly first (init_params does)")
  return build(spec, input_shape, n_way)


def build(spec: str, input_shape: tuple[int, ...], n_way: int) -> KerasBackbone:
  """Builds the user's model and refuses, in one line, one that cannot be meta-trained."""
  import keras  # pylint: disable=import-outside-toplevel
  model = init_model(spec, input_shape, n_way, seed=0)
  if not isinstance(model, keras.Model):
    raise UsageError(f"--model=keras:{spec}: returned {type(model).__name__}, not a keras.Model")
  return wrap(model, tuple(input_shape), n_way, f"--model=keras:{spec}")


def wrap(model, input_shape: tuple[int, ...], n_way: int, label: str = "the model"
         ) -> KerasBackbone:
  """A built ``keras.Model`` as a :class:`KerasBackbone`, or a one-line refusal (``label: ...``)."""
  if not model.trainable_variables:
    raise UsageError(f"{label}: the model has no trainable weights")
  names = weight_names(model)
  for layer in model._flatten_layers(include_self=True, recursive=True):  # pylint: disable=protected-access
    if getattr(layer, "seed_generator", None) is not None:
      raise UsageError(f"{label}: layer {layer.name} ({type(layer).__name__}) "
                       f"draws random numbers in training, which the meta-step cannot "
                       f"replay per task (nor XLA compile); remove it")
  for v in model.non_trainable_variables:
    if not v.name.startswith("moving_"):
      raise UsageError(f"{label}: non-trainable weight {v.path}: frozen weights "
                       f"are not supported yet (make the layer trainable)")
  out = model(np.zeros((2, *input_shape), np.float32), training=False)
  if tuple(out.shape) != (2, n_way):
    raise UsageError(f"{label}: outputs {tuple(out.shape)} for 2 images of "
                     f"{tuple(input_shape)}; expected (2, {n_way}) logits")
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(model(np.ones((2, *input_shape), np.float32), training=True))
  grads = tape.gradient(loss, model.trainable_variables)
  for name, g in zip(names, grads):
    if g is None:
      raise UsageError(f"{label}: weight {name} gets no gradient from the "
                       f"logits (a layer not on the path to the output?)")
  return KerasBackbone(model, names,
                       tuple(np.asarray(v.numpy()) for v in model.non_trainable_variables))
