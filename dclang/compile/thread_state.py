"""Put back what a failed torch.compile leaves in this thread's torch state: `restored_on_failure`.

torch.compile traces a step with dispatch keys and modes entered as C++ guards; a trace cut
short by an error can leave some of them behind (seen with torch 2.11 on an H200: the Python
dispatcher's key still included, so that every later operation failed with "PythonDispatcherTLS
was not set", and an eager retry failed like the compiled step). dclang falls back to the
eager step when compiling fails (`AcceleratedStep`), and `dclang bench` goes on with the other
variants when one fails, so both first put back autograd's mode and the dispatch keys this
thread included and excluded as they were before the attempt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def restored_on_failure() -> Iterator[None]:
    """Run the block; if it raises, restore this thread's grad mode and its locally included and
    excluded dispatch keys to what they were on entry, then let the exception go on."""
    grad, (include, exclude) = torch.is_grad_enabled(), _local_keys()
    try:
        yield
    except BaseException:
        torch.set_grad_enabled(grad)
        now_include, now_exclude = _local_keys()
        for key in torch._C.DispatchKey.__members__.values():
            with contextlib.suppress(RuntimeError):  # alias keys are in no set, and cannot be set
                if now_include.has(key) != include.has(key):
                    torch._C._dispatch_tls_set_dispatch_key_included(key, include.has(key))
                if now_exclude.has(key) != exclude.has(key):
                    torch._C._dispatch_tls_set_dispatch_key_excluded(key, exclude.has(key))
        raise


def _local_keys():
    """(included, excluded): the dispatch keys this thread adds to or removes from every call."""
    return torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()


__all__ = ["restored_on_failure"]
