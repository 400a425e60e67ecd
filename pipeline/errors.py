"""The two exception types of bad input, and the one line a command prints for an error.

``DataError``: the data is wrong (a file, a row, a record, a folder's contents). ``UsageError``:
the command is (a flag's value, a combination of flags, a device or dtype the machine cannot
run, a model_dir used against its own settings). Both carry a message that names what is at
fault, and every entry point prints either as one line, with :func:`first_line`.
"""

from __future__ import annotations


class DataError(ValueError):
  """Bad input data; the message names the file, row, folder or value at fault."""


class UsageError(ValueError):
  """A command that cannot work as given; the message names the flag, folder or value."""


def first_line(error: BaseException) -> str:
  """The first non-empty line of an error's message (its type's name if it has none).

  TensorFlow's ``OpError`` keeps its own text in ``.message``; ``str()`` adds a traceback.
  """
  text = getattr(error, "message", None)
  if not isinstance(text, str):
    text = str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__
