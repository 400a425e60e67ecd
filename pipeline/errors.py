"""The one exception type the data path raises for bad input."""


class DataError(ValueError):
  """Bad input data or arguments; the message names the file, row, flag or value at fault."""
