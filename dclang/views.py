"""Which augmented copy of each batch a network reads: its `view` (`[view=own]`).

By default every network of a graph reads the one shared augmented batch (`shared`). A
network marked `[view=own]` reads its own independent random augmentation of the same images
(same labels, same order), as KDCL and PCL train their peers; an edge into or out of it then
compares two predictions on differently augmented copies of each image. Ensembles have no
input: each member is computed on its own view. Evaluation augments nothing, so views do not
matter there.

A step's batch is then a tuple of views laid out by `view_keys`: `shared` first, when some
network reads it, then one own view per own-view network in declaration order; a graph that
needs one view only gets a plain tensor (what it got before views existed). This module
has no torch at import: the passes and the drawing read its names.
"""

from __future__ import annotations

import hashlib
from typing import Any

import networkx as nx

SHARED = "shared"
OWN = "own"
#: every value of the `view` attribute
VIEWS = (SHARED, OWN)


def reader(graph: nx.DiGraph, node: str) -> str:
    """The network whose view `node` reads: its own, or for a `branch(...)` its trunk's
    source's (the trunk is computed once, on that view), through a chain of branches."""
    spec, seen = graph.nodes[node]["spec"], {node}
    while spec.is_branch and spec.derived.source in graph and spec.derived.source not in seen:
        node = spec.derived.source
        seen.add(node)
        spec = graph.nodes[node]["spec"]
    return node


def view_keys(graph: nx.DiGraph) -> tuple[str, ...]:
    """The views a step of `graph` needs, in the order a batch holds them: `shared` when a
    network reads it, then the name of each network on its own view."""
    from dclang.ir import model_nodes

    nets = [(n, graph.nodes[n]["spec"].view) for n in dict.fromkeys(reader(graph, n) for n in model_nodes(graph))]
    return ((SHARED,) if any(v != OWN for _, v in nets) else ()) + tuple(n for n, v in nets if v == OWN)


def view_index(graph: nx.DiGraph) -> dict[str, int]:
    """Each network's position in the batch's tuple of views (`view_keys`)."""
    from dclang.ir import model_nodes

    keys = view_keys(graph)
    return {n: keys.index(r if graph.nodes[r]["spec"].view == OWN else SHARED)
            for n, r in ((n, reader(graph, n)) for n in model_nodes(graph))}


def as_views(images: Any, count: int) -> tuple:
    """A member's batch as its tuple of `count` views. A plain tensor stands for every view (a
    graph needing one view; or timing and planning, which read one batch for all views)."""
    if isinstance(images, tuple):
        if len(images) != count:
            raise ValueError(f"a batch of {len(images)} views for a step that reads {count}")
        return images
    return (images,) * count


def own_seed(seed: int, epoch: int, node: str) -> int:
    """The 64-bit seed of `node`'s own view in `epoch` of a run seeded with `seed`: a function
    of these three alone, so a node's augmentations do not change when other nodes are added,
    removed or reordered (renaming the node changes them). The name is hashed (SHA-256) and
    mixed with (seed, epoch) by NumPy's SeedSequence, like the epoch's own generator
    (`data.batches.epoch_generator`), from which it differs by the name's word."""
    import numpy as np

    word = int.from_bytes(hashlib.sha256(f"view:{node}".encode()).digest()[:8], "little")
    return int(np.random.SeedSequence([seed, epoch, word]).generate_state(1, dtype=np.uint64)[0])


def own_generator(seed: int, epoch: int, node: str, device):
    """The generator of `node`'s own view in `epoch` (`own_seed`), on `device`: it draws that
    view's crop offsets and flips, batch after batch, and nothing else."""
    import torch

    return torch.Generator(device=device).manual_seed(own_seed(seed, epoch, node))


__all__ = ["OWN", "SHARED", "VIEWS", "as_views", "own_generator", "own_seed", "view_index", "view_keys"]
