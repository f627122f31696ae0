"""Checkpoints: written atomically, read safely (`weights_only`), checked against the node.

A node checkpoint is a dict `{"format": "dclang-node/1", "model": NAME, "num_classes": C,
"state_dict": {...}}`. A bare `state_dict` (what most training scripts save) is accepted too:
then it is checked by loading it into a freshly built model of the node's architecture.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

NODE_FORMAT = "dclang-node/1"


class CheckpointError(Exception):
    """A checkpoint that cannot serve: says which rule it broke and what to do."""

    def __init__(self, message: str, code: str = "E601", help: str = ""):
        super().__init__(message)
        self.code = code
        self.help = help


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file in the same folder, fsync, then a rename over `path`.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write bytes through a temporary file, fsync and a rename, like `atomic_save`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def load_safely(path: str | os.PathLike) -> Any:
    """torch.load with `weights_only=True`: a checkpoint can never run code."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError("holds Python objects other than tensors, which a safe load refuses", "E601",
                              "dclang never runs code from a checkpoint; save `model.state_dict()` instead") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot be read ({first})", "E601",
                              "the file is corrupt, truncated, or not a PyTorch checkpoint") from exc


def node_checkpoint(model_name: str, num_classes: int, state_dict: dict) -> dict:
    return {"format": NODE_FORMAT, "model": model_name, "num_classes": num_classes, "state_dict": state_dict}


def read_node_checkpoint(path: str | os.PathLike, *, model: str | None, num_classes: int | None,
                         in_channels: int = 3, image_size: int = 32) -> dict:
    """Load a node checkpoint and check it fits `model` with `num_classes`; returns the state_dict,
    without the FitNets connectors the node owned in the graph it was trained in (they belong
    to that graph's `hint` edges, not to the model)."""
    from dclang.models.connector import without_connectors

    obj = load_safely(path)
    if isinstance(obj, dict) and obj.get("format") == NODE_FORMAT:
        if model is not None and obj.get("model") != model:
            raise CheckpointError(f"holds a `{obj.get('model')}`, but the node is a `{model}`", "E602",
                                  "point `init` at a checkpoint of the same architecture")
        if num_classes is not None and obj.get("num_classes") != num_classes:
            raise CheckpointError(f"was trained for {obj.get('num_classes')} classes, but the dataset has "
                                  f"{num_classes}", "E602", "use a checkpoint trained on this dataset")
        return without_connectors(obj["state_dict"])
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        state = without_connectors(obj.get("state_dict", obj))
        if model is not None and num_classes is not None:
            from dclang.models import build_model

            net = build_model(model, num_classes, in_channels, image_size)
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                # torch's first line only names the class; the lines after it say what differs
                lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
                detail = "; ".join(lines[:2]) or str(exc).splitlines()[0]
                raise CheckpointError(f"does not fit a `{model}` with {num_classes} classes ({detail})", "E602",
                                      "point `init` at a checkpoint of the same architecture and dataset") from exc
        return state
    raise CheckpointError("is not a model checkpoint (expected a state_dict)", "E601",
                          "save one with `torch.save(model.state_dict(), path)`")
