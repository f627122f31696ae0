"""Checkpoints: written atomically with their content hash, read safely (`weights_only`),
checked against the node.

A node checkpoint is a dict `{"format": "dclang-node/1", "model": NAME, "num_classes": C,
"state_dict": {...}}`. A bare `state_dict` (what most training scripts save) is accepted too:
then it is checked by loading it into a freshly built model of the node's architecture.

Every checkpoint dclang writes carries the sha256 of its content in the comment field of
its zip archive (`torch.save`'s format), so the file stays an ordinary checkpoint that
`torch.load` reads, and a file changed after it was written (flipped bits, a partial copy)
is caught on load instead of resuming a run from wrong weights.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

NODE_FORMAT = "dclang-node/1"

#: the zip comment of a checkpoint dclang wrote: this prefix, then the hex sha256 of the file
#: as `torch.save` wrote it (with an empty comment)
HASH_PREFIX = b"dclang-sha256:"
_END_OF_ARCHIVE = b"PK\x05\x06"  # the zip end-of-central-directory record, 22 bytes plus the comment
_COMMENT_LENGTH = len(HASH_PREFIX) + 64
#: how torch.save's pre-1.6 (non-zip) format starts: the pickled magic number
_LEGACY_MAGIC = b"\x80\x02\x8a\n"


class CheckpointError(Exception):
    """A checkpoint that cannot serve: says which rule it broke and what to do."""

    def __init__(self, message: str, code: str = "E601", help: str = ""):
        super().__init__(message)
        self.code = code
        self.help = help


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, with the content hash in the archive's comment, through `atomic_write_bytes`.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(with_content_hash(buffer.getvalue()), path)


def with_content_hash(archive: bytes) -> bytes:
    """`archive` (torch.save's zip, whose comment is empty) with its sha256 as the comment."""
    if archive[-22:-18] != _END_OF_ARCHIVE or archive[-2:] != b"\x00\x00":
        raise ValueError("not a zip archive with an empty comment")
    digest = hashlib.sha256(archive).hexdigest().encode("ascii")
    return archive[:-2] + _COMMENT_LENGTH.to_bytes(2, "little") + HASH_PREFIX + digest


def _hash_state(data: bytes) -> bool | None:
    """None when `data` carries no dclang content hash, else whether the content matches it."""
    comment = data[-_COMMENT_LENGTH:]
    record = data[-_COMMENT_LENGTH - 22:-_COMMENT_LENGTH]
    if (not comment.startswith(HASH_PREFIX) or record[:4] != _END_OF_ARCHIVE
            or record[-2:] != _COMMENT_LENGTH.to_bytes(2, "little")):
        return None
    original = data[:-_COMMENT_LENGTH - 2] + b"\x00\x00"
    return hashlib.sha256(original).hexdigest().encode("ascii") == comment[len(HASH_PREFIX):]


def _umask() -> int:
    """The process's umask: from /proc on Linux (no window in which another thread would
    create files under a wrong one), else by setting it and putting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write bytes through a temporary file in the same folder, fsync, then a rename over `path`.

    A kill at any moment leaves either the old file or the new one, never a torn one; an
    OSError (a full disk) leaves the old file and no temporary one. The file gets the mode
    of the file it replaces, else the one the user's umask gives a new file (the temporary
    file alone is private while it is written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def load_safely(path: str | os.PathLike, *, require_hash: bool = False) -> Any:
    """torch.load with `weights_only=True` (a checkpoint can never run code), after checking
    the content hash when the file carries one. `require_hash`: a file dclang wrote itself
    (a run's checkpoint, a cached teacher) must carry one.

    Every way the file can be wrong is a `CheckpointError` saying what is wrong with it.
    """
    import io
    import pickle
    import struct

    import torch

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot be read ({exc.strerror or exc})", "E601",
                              "check that the file exists and is readable") from exc
    damaged = "the file is corrupt, truncated, or not a PyTorch checkpoint"
    if not data:
        raise CheckpointError("is empty (0 bytes)", "E601", damaged)
    if not data.startswith((b"PK\x03\x04", _LEGACY_MAGIC)):
        raise CheckpointError(f"is not a PyTorch checkpoint (it starts with {data[:8]!r}, not as torch.save "
                              "writes)", "E601", damaged)
    verified = _hash_state(data)
    if verified is False:
        raise CheckpointError("does not match the content hash it was written with: it was changed or damaged "
                              "after dclang wrote it", "E603", "the file cannot be trusted; use an intact copy")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError("holds Python objects other than tensors, which a safe load refuses", "E601",
                              "dclang never runs code from a checkpoint; save `model.state_dict()` instead") from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, AttributeError, TypeError,
            AssertionError, struct.error) as exc:  # what torch.load raises on damaged bytes: more than it documents
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        what = "is truncated or damaged" if data.startswith(b"PK") else "cannot be read"
        raise CheckpointError(f"{what} ({first})", "E601", damaged) from exc
    if verified is None and require_hash:  # checked after the load: a truncated file has lost its hash too
        raise CheckpointError("carries no content hash, so dclang did not write it", "E603",
                              "only a checkpoint dclang wrote can be resumed or used from the cache")
    return obj


def node_checkpoint(model_name: str, num_classes: int, state_dict: dict) -> dict:
    return {"format": NODE_FORMAT, "model": model_name, "num_classes": num_classes, "state_dict": state_dict}


def read_node_checkpoint(path: str | os.PathLike, *, model: str | None, num_classes: int | None,
                         in_channels: int = 3, image_size: int = 32, require_hash: bool = False) -> dict:
    """Load a node checkpoint and check it fits `model` with `num_classes`; returns the state_dict,
    without the FitNets connectors the node owned in the graph it was trained in (they belong
    to that graph's `hint` edges, not to the model). `require_hash` as for `load_safely`."""
    from dclang.models.connector import without_connectors

    obj = load_safely(path, require_hash=require_hash)
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
