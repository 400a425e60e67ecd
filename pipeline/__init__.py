"""The data path: raw datasets -> class-indexed TFRecords (Beam) -> graph-mode episode sampler."""

from pipeline import runtime_env as _runtime_env

_runtime_env.prepare()  # before anything imports TensorFlow
