"""A node's `init` checkpoint must exist, load safely, and fit the node's model and classes.

Only a file that names `init` pays for importing torch; every other file is checked
without it. Paths are relative to the `.kt` file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

from dclang.diagnostics import Diagnostic, error, not_a_file
from dclang.ir import Open
from dclang.syntax import ast


def check_checkpoints(module: ast.Module, graph) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    base = Path(graph.graph.get("path") or ".").parent
    data = graph.graph.get("data")
    for decl in module.of(ast.NodeDecl):
        attr = decl.attribute("init")
        if attr is None or not isinstance(attr.value, ast.String) or decl.name.text not in graph or decl.is_ensemble:
            continue  # (an ensemble has no weights: check_ensembles says so)
        spec = graph.nodes[decl.name.text]["spec"]
        path = base / attr.value.value
        problem = not_a_file(path)
        if problem is not None:
            out.append(error("E600", f"checkpoint `{attr.value.value}` {problem}", attr.value.span,
                             f"looked for {path}", help="give the path of a checkpoint file, relative to this .kt "
                                                         "file"))
            continue
        from dclang.checkpoints import CheckpointError, read_node_checkpoint

        model = None if isinstance(spec.model, (Open, tuple)) else spec.model
        classes, shape = None, {}
        if data is not None and isinstance(data.dataset, str):
            from dclang.registry import dataset_info

            info = dataset_info(data.dataset)
            classes = info.num_classes if info is not None and info.num_classes else None
            if info is not None and info.channels and info.image_size:
                # a bare state_dict is checked by loading it into a model built for these images
                shape = {"in_channels": info.channels, "image_size": info.image_size}
        try:
            read_node_checkpoint(path, model=model, num_classes=classes, **shape)
        except CheckpointError as exc:
            out.append(error(exc.code, f"checkpoint `{attr.value.value}`: {_plain(str(exc))}", attr.value.span,
                             help=exc.help))
        except (RuntimeError, ValueError, KeyError, EOFError, OSError, AttributeError, TypeError,
                pickle.UnpicklingError) as exc:  # torch.load's kinds, more than it documents (KeyError on text)
            out.append(error("E601", f"checkpoint `{attr.value.value}`: cannot be read ({type(exc).__name__})",
                             attr.value.span, help="the file is corrupt, truncated, or not a PyTorch checkpoint"))
    return out


def _plain(message: str) -> str:
    """torch's own messages may carry terminal colour codes; a diagnostic is plain text."""
    return re.sub(r"\x1b\[[0-9;]*m", "", message)
