"""Keep freed host memory in the process, so a CPU step does not page-fault its activations in.

A training step allocates and frees the same activation tensors every step. glibc's malloc
returns the free top of its heap to the OS once more than `M_TRIM_THRESHOLD` is free, and
serves blocks above `M_MMAP_THRESHOLD` with fresh mmaps; both thresholds adapt to the block
sizes it sees. The fused engine holds every node's activations at once (paper 3.4: each node
learns from the others' outputs before any update), so at the end of each step glibc handed
the freed peak back to the OS and the next step faulted it in again, zeroed page by page: on
`examples/kd_dml.kt` 35,000 to 90,000 minor page faults and ~8 % of the step on the CPU,
where a single model's smaller step saw none. Fixing both thresholds keeps the memory a step
used for the next one, as CUDA's caching allocator does on a GPU; the process's resident set
stays at its peak.

Process-wide and idempotent; a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks up to 32 MiB
#: come from the heap and are reused; larger ones are still mapped per allocation
_MMAP_THRESHOLD_MAX = 32 * 2**20
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim in practice


@functools.cache
def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds; True if glibc took both settings."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc, whose mallopt codes these are
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
