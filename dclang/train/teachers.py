"""Initial weights of the nodes: `init` checkpoints, and pre-trained teachers, cached.

A frozen node is a teacher trained on labels only, on the same data with the same training
settings (paper 3.4). With `init` it is loaded from that checkpoint. With a library's
pre-trained weights that fit the data (`torchvision.resnet18(weights=...)` on ImageNet-shaped
data) it uses them as they are; weights whose head or stem had to be replaced
(`dclang.models.library.adaptations`) are fine-tuned exactly as a teacher without weights is
trained, starting from them. Otherwise it is trained as the 1-node graph
`label -> node : through` and its final weights are cached, so a search whose trials share a
teacher pre-trains it once. The cache key (`teacher_key`) is the hash of everything the
weights depend on, the data's content and the pre-trained weights' included.

This module keeps the cache; it does not train. The training loop hands `init_states` a
`pretrain` function (itself, on the 1-node graph), so the loop depends on this module and
never the other way round.

Cache layout, under `teacher_cache` (default `$DCLANG_CACHE/teachers`, else
`~/.cache/dclang/teachers`):

```
<key>.pt     the teacher's final weights as a node checkpoint (its presence is the cache hit)
<key>/       the teacher's own run directory (metrics, summary; resumed if a worker died)
<key>.lock   held (fcntl.flock) while one process trains it; the others wait, then load
```
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import networkx as nx

from dclang.checkpoints import CheckpointError, atomic_save, node_checkpoint, read_node_checkpoint
from dclang.diagnostics import UserError
from dclang.ir import LABEL, EdgeSpec, NodeSpec, model_nodes
from dclang.train.metrics import say
from dclang.train.rundir import RunDir, graph_text

TEACHER_NAME = "teacher"

#: `pretrain(teacher_graph, run_dir=..., resume=...)` trains a checked 1-node graph into
#: `run_dir` and returns its `RunResult` (the training loop's `train_graph`)
Pretrain = Callable[..., object]


def default_cache() -> Path:
    env = os.environ.get("DCLANG_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "dclang") / "teachers"


def teacher_graph(graph: nx.DiGraph, model: str) -> nx.DiGraph:
    """The 1-node graph `label -> teacher : through` with `graph`'s (resolved) data and train
    settings. The node is always called `teacher`, so the cache key depends on the model, not
    on what the node is called in the graph that needs it."""
    name = re.sub(r"\W+", "_", model).strip("_")  # a graph's name is one word: `torchvision.x(weights=...)`
    g = nx.DiGraph(name=f"pretrain_{name}", data=graph.graph["data"], train=graph.graph["train"],
                   target=TEACHER_NAME, sites=(), path=graph.graph.get("path", "<pretrain>"))
    g.add_node(LABEL, spec=NodeSpec(LABEL, None))
    g.add_node(TEACHER_NAME, spec=NodeSpec(TEACHER_NAME, model, target=True))
    g.add_edge(LABEL, TEACHER_NAME, spec=EdgeSpec(LABEL, TEACHER_NAME, "through", "ce"))
    return g


def teacher_key(teacher: nx.DiGraph) -> str:
    """The cache key of a teacher: the sha256 of everything its weights depend on.

    - `graph`: the 1-node graph's canonical text, its data path left out: the model, the
      dataset and every data setting, the train block (optimizer, schedule, batch), the
      epochs and the seed;
    - `data`: the content of the user's data (`data_fingerprint`), so a file regenerated at
      the same path is another teacher, and the same file moved elsewhere is the same one.

    Left out, as they change the weights by rounding at most: the node's name (always
    `teacher`), the device, the engine, where a downloaded dataset is stored. To make the
    key depend on more, add an entry to `parts`.
    """
    data = teacher.graph["data"]
    unplaced = teacher.copy()
    unplaced.graph["data"] = dataclasses.replace(data, path=None)
    parts = {"graph": graph_text(unplaced), "data": data_fingerprint(data.path),
             "weights": weights_fingerprint(teacher.nodes[TEACHER_NAME]["spec"].model)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def weights_fingerprint(model: str) -> str | None:
    """The sha256 of the pre-trained weights file a library model starts from (its name is
    in the model's text already; the content tells two files of one name apart). None for a
    model without such a file, or whose file is missing (building it says so)."""
    from dclang.models import library

    path = library.pretrained_file(model)
    return _sha256_file(path) if path is not None and path.is_file() else None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(path: str | None) -> str | None:
    """What the user's data is: the sha256 of a file (an `.npz`), or of a folder's file list
    with each file's size and modification time (an image folder: hashing every image would
    cost as much as reading them). None for a named dataset, which its name identifies."""
    if path is None:
        return None
    root = Path(path)
    digest = hashlib.sha256()
    try:
        if root.is_file():
            return _sha256_file(root)
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            info = file.stat()
            digest.update(f"{file.relative_to(root)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    except OSError as exc:
        raise UserError(f"cannot read the data at {root} to key the teacher cache: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def init_states(graph: nx.DiGraph, *, dataset, cache: Path | None, pretrain: Pretrain) -> dict[str, dict]:
    """State dicts for every model node that does not start from random weights.

    `graph` is resolved (absolute `init` paths, epochs and seed of this run filled in), so
    the teacher inherits exactly this run's settings; `pretrain` trains a teacher the cache
    lacks.
    """
    from dclang.models import library

    states: dict[str, dict] = {}
    for name in model_nodes(graph):
        spec = graph.nodes[name]["spec"]
        if spec.init is not None:
            try:
                states[name] = read_node_checkpoint(spec.init, model=spec.model, num_classes=dataset.num_classes,
                                                    in_channels=dataset.channels, image_size=dataset.image_size)
            except CheckpointError as exc:
                raise UserError(f"node `{name}`: checkpoint {spec.init} {exc}", exc.help) from exc
        elif spec.frozen and not library.pretrained_fits(spec.model, dataset.num_classes, dataset.channels,
                                                         dataset.image_size):
            changes = library.adaptations(spec.model, dataset.num_classes, dataset.channels, dataset.image_size)
            if changes:
                say(f"teacher `{name}`: {', '.join(changes)} of its pre-trained weights start fresh for "
                    f"{dataset.name}; fine-tuning it on labels first")
            states[name] = pretrained(graph, name, dataset=dataset, cache=cache or default_cache(),
                                      pretrain=pretrain)
    return states


def pretrained(graph: nx.DiGraph, name: str, *, dataset, cache: Path, pretrain: Pretrain) -> dict:
    """The cached weights of frozen node `name`, training them first if no process has."""
    from dclang.api import check
    from dclang.diagnostics import render_all

    model = graph.nodes[name]["spec"].model
    teacher = teacher_graph(graph, model)
    text = graph_text(teacher)
    key = teacher_key(teacher)
    weights, run = cache / f"{key}.pt", cache / key
    where = f"{model} on {dataset.name}"
    fresh = f"delete {weights} and {run} to pre-train it again"

    def hit() -> dict | None:
        if not weights.is_file():
            return None
        try:
            state = read_node_checkpoint(weights, model=model, num_classes=dataset.num_classes,
                                         in_channels=dataset.channels, image_size=dataset.image_size,
                                         require_hash=True)
            summary = RunDir(run).read_summary()
        except CheckpointError as exc:
            raise UserError(f"teacher `{name}`: the cached checkpoint {weights} {exc}", fresh) from exc
        except UserError as exc:
            raise UserError(f"teacher `{name}`: its cached run {exc.message}", fresh) from exc
        node = summary["nodes"].get(TEACHER_NAME) if summary else None
        acc = node.get("final_test_acc") if isinstance(node, dict) else None
        shown = f"test acc {100 * acc:.1f}%" if isinstance(acc, float) else "no summary"
        say(f"teacher `{name}`: cached {where} (key {key[:12]}…, {shown})")
        return state

    if (state := hit()) is not None:
        return state
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f"{key}.lock", "w")
    except OSError as exc:
        raise UserError(f"cannot write the teacher cache {cache}: {exc.strerror or exc}",
                        "set DCLANG_CACHE to a folder you can write to") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (state := hit()) is not None:  # another process trained it while this one waited
            return state
        epochs = graph.graph["train"].epochs
        say(f"teacher `{name}`: pre-training {where} on labels for {epochs} epoch{'s' * (epochs != 1)} "
            f"(key {key[:12]}…, in {run})")
        checked = check(text, graph.graph.get("path", "<pretrain>"))
        if not checked.ok:  # a bug, not a user mistake: the graph is generated
            raise RuntimeError("the generated teacher graph does not check:\n"
                               + render_all(checked.diagnostics, text, "<teacher>"))
        try:
            result = pretrain(checked.graph, run_dir=run, resume=RunDir(run).last.is_file())
            final = RunDir(run).load_last()["train_step"]["models"][TEACHER_NAME]
        except UserError as exc:
            raise UserError(f"pre-training teacher `{name}` ({where}): {exc.message}", exc.hint) from exc
        try:
            atomic_save(node_checkpoint(model, dataset.num_classes, final), weights)
        except OSError as exc:
            raise UserError(f"cannot write the teacher cache {weights}: {exc.strerror or exc}",
                            "set DCLANG_CACHE to a folder you can write to (the teacher's run in "
                            f"{run} is kept and resumed)") from exc
        acc = result.summary["nodes"][TEACHER_NAME]["final_test_acc"]
        say(f"teacher `{name}`: pre-trained {where}, test acc {100 * acc:.1f}% (cached as {weights})")
        return final


__all__ = ["data_fingerprint", "default_cache", "init_states", "pretrained", "teacher_graph", "teacher_key"]
