"""Resident memory of this process, for the memory planner (``--memory_budget``) and the
benchmarks (no framework imports: the PyTorch peer script loads this file by its path).

Why not ``getrusage``'s max RSS alone: it is a high-water mark since the process started, so
a transient while building the inputs (numpy's float64 draws before the float32 cast were
0.6 GB at MiniImagenet meta-batch 32) hides the step's own peak and makes "peak minus baseline"
read zero. The baseline here is the current RSS, and the peak is the high-water mark measured
from that moment on (Linux resets it through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import resource


def _status_mb(field: str) -> float | None:
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def start_peak_window() -> float:
  """The current RSS in MB, and the high-water mark restarted from it (where Linux allows)."""
  try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
      clear_refs.write("5")
  except OSError:
    pass
  current = _status_mb("VmRSS")
  return current if current is not None else max_rss_mb()


def max_rss_mb() -> float:
  """The high-water RSS in MB: since start_peak_window where it could restart it, else since
  the process started."""
  peak = _status_mb("VmHWM")
  return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
