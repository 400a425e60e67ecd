"""The meta-learner and its trainer (issue: compiled MAML meta-step)."""

from pipeline import runtime_env as _runtime_env

_runtime_env.prepare()  # before anything imports TensorFlow
