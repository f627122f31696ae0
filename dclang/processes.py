"""Python processes that dclang starts run the dclang of the process that starts them.

`python -m dclang` and `python -c CODE` put the working directory first on the import path,
so a folder named `dclang/` where the user works would shadow the installed package in every
search worker. The alternatives and why they are not used:

- `python -P` (no working directory on the path) exists from Python 3.11 on; dclang runs on 3.10;
- running a script by its path puts the script's own folder first instead: for a script inside
  the package, dclang's modules (`report`, `draw`, ...) would shadow same-named packages;
- starting the child in another working directory would change what the user's relative paths
  (`-o runs/x`, `--data-dir`) mean;
- PYTHONPATH entries come after that first entry, so they cannot win over it.

So the child runs `python -c CODE`, and CODE's first act is to drop the entry `-c` put first
(the empty string, the working directory) before it imports anything; with PYTHONSAFEPATH
set, `-c` puts nothing there and nothing is dropped. The rest of the path is the parent's
(site-packages, an editable install's finder, PYTHONPATH), so the child imports what the
parent imported.
"""

from __future__ import annotations

import sys

_UNSHADOW = "import sys\nif sys.path and sys.path[0] == '':\n    del sys.path[0]\n"


def python_argv(code: str, *args: str) -> list[str]:
    """The command line of a Python running `code` (with `args` as sys.argv[1:]) on the
    parent's interpreter, without the working directory on its import path."""
    return [sys.executable, "-c", _UNSHADOW + code, *args]


def dclang_argv(*args: str) -> list[str]:
    """The command line of `dclang ARGS` on the parent's interpreter and dclang."""
    return python_argv("from dclang.cli import main\nmain(prog_name='dclang')", *args)


__all__ = ["dclang_argv", "python_argv"]
