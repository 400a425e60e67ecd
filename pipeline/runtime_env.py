"""TensorFlow's process-wide settings, made before TensorFlow is imported.

TensorFlow reads these environment variables once, when it is imported, so they are set by this
package's ``__init__`` (and ``trainer``'s), which every entry point imports first. A value the
user exported is always kept.

- ``TF_ENABLE_ONEDNN_OPTS=1``: TensorFlow turns oneDNN off by default on x86 processors without
  AVX-512-class features (an AMD EPYC with AVX2, for one). oneDNN's kernels are what make the
  grouped convolutions of the task-batched conv4 fast (1.5x per Omniglot meta-step there;
  ``bench/bench_meta_step.py``); without them the model takes a slower, equally exact path
  (:func:`trainer.models.grouped_conv2d`).
- ``TF_CPP_MIN_LOG_LEVEL=3`` unless the command line asks for logs (``--verbosity``, ``-v``,
  ``--debug``): TensorFlow's C++ start-up lines (CUDA probes on a CPU machine, CPU features,
  oneDNN notices) say nothing to act on; errors still reach the user as Python exceptions.
"""

from __future__ import annotations

import os
import sys

VERBOSE_FLAGS = ("--verbosity", "-v", "--v=", "--debug")


def wants_tensorflow_logs(argv: list[str] | None = None) -> bool:
  """Whether the command line asks for TensorFlow's own log lines."""
  args = sys.argv[1:] if argv is None else argv
  return any(a == f or a.startswith(f + "=") or (f == "-v" and a.startswith("-v"))
             for a in args for f in VERBOSE_FLAGS if a != "--nodebug")


def prepare(argv: list[str] | None = None) -> None:
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
  if wants_tensorflow_logs(argv) or "tensorflow" in sys.modules:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # A few lines (the CUDA probe's) are written before TensorFlow's log settings are read and
  # obey no variable: TensorFlow is imported once here with the process's stderr set aside.
  # An import that fails still raises, and its traceback is printed after stderr is back.
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def quiet_python_logger() -> None:
  """TensorFlow's Python INFO lines off (e.g. the checkpoint saver's "Sharding callback
  duration" at every save, logged through absl like our own lines), unless the command line
  asks for logs; call once absl's logging is set up (in ``main``)."""
  if wants_tensorflow_logs():
    return
  import logging  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  tf.get_logger().setLevel("WARNING")
  package = os.path.dirname(tf.__file__)
  handler = absl_logging.get_absl_handler()
  handler.addFilter(lambda record: record.levelno >= logging.WARNING
                    or not record.pathname.startswith(package))
