"""Initial weights of the nodes: `init` checkpoints, and pre-trained teachers, cached.

A frozen node is a teacher trained on labels only, on the same data with the same training
settings (paper 3.4). With `init` it is loaded from that checkpoint. With a library's
pre-trained weights that fit the data (`torchvision.resnet18(weights=...)` on ImageNet-shaped
data) it uses them as they are; weights whose head or stem had to be replaced
(`dclang.models.library.adaptations`) are fine-tuned exactly as a teacher without weights is
trained, starting from them (the weights' name is in the model's text, so in the cache key).
Otherwise dclang trains it itself as the 1-node graph `label -> node : through` and caches
the final weights, so a search whose trials share a teacher pre-trains it once. The cache key is the sha256 of that
1-node graph's canonical text, which holds exactly what determines the weights: the model,
the dataset and its settings, the train block, the epochs and the seed.

Cache layout, under `teacher_cache` (default `$DCLANG_CACHE/teachers`, else
`~/.cache/dclang/teachers`):

```
<key>.pt     the teacher's final weights as a node checkpoint (its presence is the cache hit)
<key>/       the teacher's own run directory (metrics, summary; resumed if a worker died)
<key>.lock   held (fcntl.flock) while one process trains it; the others wait, then load
```
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from pathlib import Path

import networkx as nx

from dclang.checkpoints import CheckpointError, atomic_save, load_safely, node_checkpoint, read_node_checkpoint
from dclang.diagnostics import UserError
from dclang.ir import LABEL, EdgeSpec, NodeSpec, model_nodes
from dclang.train.metrics import say
from dclang.train.rundir import RunDir, graph_text

TEACHER_NAME = "teacher"


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


def init_states(graph: nx.DiGraph, *, dataset, device: str, engine: str, cache: Path | None,
                data_dir: str | None, progress: bool) -> dict[str, dict]:
    """State dicts for every model node that does not start from random weights.

    `graph` is resolved (absolute `init` paths, epochs and seed of this run filled in), so
    the teacher inherits exactly this run's settings.
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
            states[name] = pretrained(graph, name, dataset=dataset, device=device, engine=engine,
                                      cache=cache or default_cache(), data_dir=data_dir, progress=progress)
    return states


def pretrained(graph: nx.DiGraph, name: str, *, dataset, device: str, engine: str, cache: Path,
               data_dir: str | None, progress: bool) -> dict:
    """The cached weights of frozen node `name`, training them first if no process has."""
    from dclang.api import check
    from dclang.diagnostics import render_all

    model = graph.nodes[name]["spec"].model
    text = graph_text(teacher_graph(graph, model))
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()
    weights, run = cache / f"{key}.pt", cache / key
    where = f"{model} on {dataset.name}"

    def hit() -> dict | None:
        if not weights.is_file():
            return None
        try:
            state = read_node_checkpoint(weights, model=model, num_classes=dataset.num_classes,
                                         in_channels=dataset.channels, image_size=dataset.image_size)
        except CheckpointError as exc:
            raise UserError(f"teacher `{name}`: the cached checkpoint {weights} {exc}",
                            f"delete {weights} and {run} to pre-train it again") from exc
        summary = RunDir(run).read_summary()
        acc = summary["nodes"][TEACHER_NAME]["final_test_acc"] if summary else None
        shown = f"test acc {100 * acc:.1f}%" if acc is not None else "no summary"
        say(f"teacher `{name}`: cached {where} (key {key[:12]}…, {shown})")
        return state

    if (state := hit()) is not None:
        return state
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (state := hit()) is not None:  # another process trained it while this one waited
            return state
        epochs = graph.graph["train"].epochs
        say(f"teacher `{name}`: pre-training {where} on labels for {epochs} epoch{'s' * (epochs != 1)} (key {key[:12]}…, in {run})")
        checked = check(text, graph.graph.get("path", "<pretrain>"))
        if not checked.ok:  # a bug, not a user mistake: the graph is generated
            raise RuntimeError("the generated teacher graph does not check:\n"
                               + render_all(checked.diagnostics, text, "<teacher>"))
        from dclang.train.loop import train_graph

        try:
            result = train_graph(checked.graph, run_dir=run, device=device, engine=engine, data_dir=data_dir,
                                 resume=RunDir(run).last.is_file(), progress=progress, dataset=dataset)
        except UserError as exc:
            raise UserError(f"pre-training teacher `{name}` ({where}): {exc.message}", exc.hint) from exc
        final = load_safely(RunDir(run).last)["train_step"]["models"][TEACHER_NAME]
        atomic_save(node_checkpoint(model, dataset.num_classes, final), weights)
        acc = result.summary["nodes"][TEACHER_NAME]["final_test_acc"]
        say(f"teacher `{name}`: pre-trained {where}, test acc {100 * acc:.1f}% (cached as {weights})")
        return final


__all__ = ["default_cache", "init_states", "pretrained", "teacher_graph"]
