"""A data block's `path` must be what its dataset reads: a file for `npz`, a folder for `imagefolder`,
and no `path` at all for the datasets dclang finds itself (`--data-dir` says where those are).

A path that exists but is the wrong kind (a folder named `data.npz`, `/dev/zero`, a file
where the image folders should be) is reported here, at the string, before anything is
loaded. A path that does not exist yet is left to `dclang run`, which reads the data: a
template may name a file a script writes before the search starts. Paths are relative to
the `.kt` file, as `dclang run` reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

from dclang import registry
from dclang.diagnostics import Diagnostic, error, not_a_file, not_a_folder
from dclang.syntax import ast

#: what each dataset that reads a `path` needs it to be
_WANTED = {"npz": (not_a_file, "an .npz file"), "imagefolder": (not_a_folder, "a folder of train/ and test/ folders")}


def check_data(module: ast.Module, graph) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    base = Path(graph.graph.get("path") or ".").parent
    for block in module.of(ast.DataBlock)[:1]:
        dataset = block.dataset.text
        setting = next((s for s in block.settings if s.key.text == "path"), None)
        if setting is not None and dataset not in _WANTED and registry.dataset_info(dataset) is not None:
            out.append(error("E604", f"`{dataset}` reads no `path`", setting.key.span,
                             "only `npz` and `imagefolder` read one",
                             help=f"leave `path` out; `dclang run --data-dir DIR` says where {dataset} is stored"))
            continue
        if dataset not in _WANTED or setting is None or not isinstance(setting.value, ast.String):
            continue
        problem_of, wanted = _WANTED[dataset]
        path = base / setting.value.value
        problem = problem_of(path)
        if problem is not None and os.path.lexists(path):
            out.append(error("E604", f"data path `{setting.value.value}` {problem}", setting.value.span,
                             f"`{dataset}` reads {wanted}", help=f"looked at {path}; give the path of {wanted}, "
                                                                    "relative to this .kt file"))
    return out
