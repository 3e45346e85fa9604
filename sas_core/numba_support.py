"""numba set-up shared by the CPU kernels (imported only by the modules that have kernels).

* The threading layer: OpenMP first (unless the user chose one with ``NUMBA_THREADING_LAYER`` or
  ``NUMBA_THREADING_LAYER_PRIORITY``), so that an old TBB library never prints a warning.
* :func:`launch_threads`: starting numba's OpenMP pool sets the OpenMP thread count of the process
  to the number of cores, which also resets torch's ``torch.set_num_threads`` choice (torch's
  intra-op pool is an OpenMP one). The pool is started once, explicitly, and torch's count put back.
"""

from __future__ import annotations

import functools
import os
import sys

__all__ = ["import_numba", "launch_threads"]


def import_numba():
    """The numba module with our threading-layer priority set, or None when not importable."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is in the pinned environment
        return None
    if not os.environ.get("NUMBA_THREADING_LAYER") and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    return numba


@functools.lru_cache(maxsize=None)
def launch_threads() -> None:
    """Start numba's thread pool now (idempotent), keeping torch's thread count."""
    numba = import_numba()
    if numba is None:  # pragma: no cover
        return
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    from numba.np.ufunc.parallel import _launch_threads

    _launch_threads()
    if torch is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
