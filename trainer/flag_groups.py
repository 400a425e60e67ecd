"""Flags defined in groups that say who reads them and which may change when a run resumes.

The runner and every task family define their own flags in their own module, each through a
:class:`FlagGroup`. A group is the family's declaration: which flags it reads (a flag of
another family is refused at start-up instead of being silently ignored) and, at each flag's
definition, whether it may differ between the runs of one model_dir (how often, where, how to
compute) or is part of what the run is (everything else). The runner holds no list of names.
"""

from __future__ import annotations

from typing import Callable

from absl import flags


class FlagGroup:
  """``group.define(flags.DEFINE_integer, "n_way", 5, "Classes per episode.", lower_bound=1)``.

  The flags are absl flags of the defining module (``--helpfull`` lists them under it).
  """

  def __init__(self, title: str, module: str):
    self.title, self.module = title, module
    self.names: list[str] = []
    self.may_change: set[str] = set()

  def define(self, define: Callable, name: str, *args, may_change: bool = False, **kwargs):
    """Defines one flag with absl's ``define`` (``flags.DEFINE_string`` ...).

    ``may_change``: a resumed run of the same model_dir may give another value (it changes how
    or how often, never what is learned).
    """
    holder = define(name, *args, module_name=self.module, **kwargs)
    self.names.append(name)
    if may_change:
      self.may_change.add(name)
    return holder

  def values(self) -> dict:
    """The group's flags' current values."""
    return {name: flags.FLAGS[name].value for name in self.names}

  def defaults(self) -> dict:
    return {name: flags.FLAGS[name].default for name in self.names}
