"""What both engines share: the models, one forward of every node, statistics, checkpoints,
evaluation. The engines differ only in how losses become updates (`step`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from dclang.compile.ema import start_ema
from dclang.compile.optim import Schedule
from dclang.crd import add_crd, crd_edge_loss
from dclang.ema import ema_sources
from dclang.ensembles import ensemble_order, ensemble_outputs, trained_ensembles
from dclang.feature_losses import layer_edge_loss
from dclang.ir import LABEL, EdgeSpec, frozen_nodes, live_edges, model_nodes, trainable_nodes
from dclang.learned_ensembles import learned_weights
from dclang.loss_catalogue import LOSSES
from dclang.models import build_model
from dclang.models.branch import forward_order, share_trunks, source_buffers_kept, tapes_of
from dclang.models.connector import add_connectors, connector_of, load_node_state
from dclang.models.taps import LayerCapture
from dclang.views import as_views, view_index, view_keys


@dataclass
class StepStats:
    """What one step measured. Tensors stay on the device: the loop reads them once per
    epoch, because reading one back to the host waits for the whole step to finish."""

    node_loss: dict[str, Tensor]  # L_t (eq. 3) per trainable node, detached
    node_correct: dict[str, Tensor]  # top-1 correct samples in the batch, every model and ensemble node
    edge_loss: dict[str, Tensor]  # "s->t": L_{s,t} (eq. 2), detached, live edges only
    edge_gate: dict[str, Tensor]  # mean gate weight over the batch
    edge_pass: dict[str, Tensor]  # fraction of samples whose gate weight is nonzero

    def keys(self) -> list[tuple[str, str]]:
        """(field, name) of every statistic, in the order of `vectors`: the counts, then the
        batch means."""
        return [(f, name) for f in ("node_correct", *MEAN_FIELDS) for name in getattr(self, f)]

    def vectors(self) -> tuple[Tensor, Tensor]:
        """The counts and the batch means, each stacked into one vector: what the epoch sums,
        data-parallel runs all-reduce and a CUDA graph keeps, in two operations whatever the
        graph's size."""
        means = [value for f in MEAN_FIELDS for value in getattr(self, f).values()]
        return torch.stack(list(self.node_correct.values())), torch.stack(means)

    @classmethod
    def from_vectors(cls, keys: list[tuple[str, str]], counts: Tensor, means: Tensor) -> StepStats:
        """The StepStats whose `keys()` and `vectors()` these are."""
        out: dict[str, dict[str, Tensor]] = {f: {} for f in ("node_correct", *MEAN_FIELDS)}
        for (f, name), value in zip(keys, [*counts.unbind(0), *means.unbind(0)]):
            out[f][name] = value
        return cls(**out)


def computed_alone(edge: EdgeSpec) -> bool:
    """An edge between layers (its layers' shapes are its own) or a `crd` edge (its module is
    its own) is computed alone (`TrainStep.layer_edge_result`), never in a group of edges."""
    return edge.on_layers or LOSSES[edge.loss].needs_indices


#: StepStats fields that are batch means (weighted by batch size when summed); `node_correct` is a count
MEAN_FIELDS = ("node_loss", "edge_loss", "edge_gate", "edge_pass")


class StatSums:
    """Epoch sums of the step statistics of one or several trainings (an engine's members), in
    one device vector, each member's block laid out as its `StepStats.keys()` (counts, then
    batch means weighted by batch size), with the first update each became non-finite. The
    one statistics path: `dclang.train.metrics.EpochStats` is the sums of one training, an
    engine of several members keeps one for all. No host sync until `read`."""

    def __init__(self, keys: list[list[tuple[str, str]]], device: torch.device,
                 carried: list[tuple[Tensor, Tensor, int] | None] | None = None):
        self.keys = keys
        sizes = [len(k) for k in keys]
        self.offsets = [sum(sizes[:m]) for m in range(len(sizes) + 1)]
        total = self.offsets[-1]
        self.sums = torch.zeros(total, dtype=torch.float64, device=device)
        self.first_bad = torch.zeros(total, dtype=torch.long, device=device)
        self.samples = [0] * len(keys)
        self.is_mean = torch.tensor([f != "node_correct" for ks in keys for f, _ in ks], device=device)
        self.sizes = torch.tensor(sizes, device=device)
        self.total = total
        for m, given in enumerate(carried or []):
            if given is not None:
                sums, bad, samples = given
                self.sums[self.offsets[m]:self.offsets[m + 1]] = sums
                self.first_bad[self.offsets[m]:self.offsets[m + 1]] = bad
                self.samples[m] = samples
        self._weights: dict[tuple[int, ...], Tensor] = {}
        self._orders: dict[tuple[int, ...], Tensor] = {}

    def _per_slot(self, values: Sequence[int], dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype).to(self.sums.device, non_blocking=True).repeat_interleave(
            self.sizes, output_size=self.total)

    def add(self, values: Tensor, batch_sizes: list[int], ks: list[int]) -> None:
        """Add one step's statistics (member order, float64); no host sync."""
        key = tuple(batch_sizes)
        if key not in self._weights:
            self._weights[key] = torch.where(self.is_mean, self._per_slot(batch_sizes, torch.float64), 1.0)
        k = ks[0] if len(set(ks)) == 1 else self._per_slot(ks, torch.long)  # one update number: no copy
        self.first_bad = torch.where(~torch.isfinite(values) & (self.first_bad == 0), k, self.first_bad)
        self.sums += values * self._weights[key]
        for m, b in enumerate(batch_sizes):
            self.samples[m] += b

    def take(self, m: int) -> tuple[Tensor, Tensor, int]:
        """Member m's sums, first non-finite updates and sample count so far; its block reset."""
        block = slice(self.offsets[m], self.offsets[m + 1])
        out = (self.sums[block].clone(), self.first_bad[block].clone(), self.samples[m])
        self.sums[block] = 0
        self.first_bad[block] = 0
        self.samples[m] = 0
        return out

    def peek(self, m: int) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], int]]:
        """Member m's epoch so far: (means / accuracies per (field, name), first non-finite
        update per key); one host sync."""
        block = slice(self.offsets[m], self.offsets[m + 1])
        return self._means(m, self.sums[block], self.first_bad[block], self.samples[m])

    def read(self, m: int) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], int]]:
        """`peek`, and member m's block reset for its next epoch."""
        return self._means(m, *self.take(m))

    def _means(self, m: int, sums: Tensor, bad: Tensor, samples: int):
        means = {key: s / samples for key, s in zip(self.keys[m], sums.tolist())}
        return means, {key: b for key, b in zip(self.keys[m], bad.tolist()) if b}

    def reorder(self, pieces: list[Tensor], order: list[int]) -> list[Tensor]:
        """Pieces holding several members' blocks each (in `order`) as one vector in member order."""
        flat = torch.cat(pieces)
        key = tuple(order)
        if key not in self._orders:  # one permutation per arrangement of the members (few): kept
            starts, at = {}, 0
            for m in order:
                starts[m] = at
                at += self.offsets[m + 1] - self.offsets[m]
            perm = [starts[m] + i for m in range(len(order)) for i in range(self.offsets[m + 1] - self.offsets[m])]
            self._orders[key] = torch.tensor(perm, device=flat.device)
        return [flat.index_select(0, self._orders[key])]


def build_models(graph: nx.DiGraph, *, num_classes: int, in_channels: int, image_size: int,
                 device: torch.device, init_states: dict[str, dict] | None, seed: int,
                 train_size: int | None = None) -> dict[str, nn.Module]:
    """Every model node, built in declaration order from one seed, so two engines (or two runs)
    start from identical weights; then `init_states` loaded over them; frozen nodes made
    frozen (no grad, eval mode: their BatchNorm statistics never change).

    The seed is applied in a forked CPU generator: building models does not move the global
    random stream that data loading and augmentation draw from.
    """
    names = model_nodes(graph)
    unknown = sorted(set(init_states or {}) - set(names))
    if unknown:
        raise ValueError(f"init_states names {unknown}, which are not model nodes; model nodes: {names}")
    ema = ema_sources(graph)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        built = {n: build_model(graph.nodes[n]["spec"].model, num_classes, in_channels, image_size)
                 for n in names if n not in ema}
        # an EMA node is its source's network copied (before any connector joins the source):
        # it draws no random number, so the other nodes start as they would without it
        models = {n: copy.deepcopy(built[ema[n][0]]) if n in ema else built[n] for n in names}
        share_trunks(graph, models)  # a branch's trunk modules become its source's (dclang.models.branch)
        add_connectors(graph, models, (in_channels, image_size, image_size))  # FitNets' regressors (hint)
        if train_size is not None:  # CRD's heads and memory banks over the training set
            add_crd(graph, models, (in_channels, image_size, image_size), num_classes, train_size)
    for name, state in (init_states or {}).items():
        load_node_state(models[name], state)
    for name in frozen_nodes(graph):
        models[name].requires_grad_(False).eval()
    start_ema(models, ema)
    return {name: model.to(device) for name, model in models.items()}


def frozen_forward(model: nn.Module, images: Tensor) -> Tensor:
    """A frozen node's logits inside a training step: without autograd, as ordinary tensors.

    Not `torch.inference_mode`: its outputs are inference tensors, which autograd refuses to
    save for backward, and inside torch.compile's traced region (AOTAutograd) inference mode
    breaks tracing ("Inference tensors cannot be saved for backward" with torch 2.11 on CUDA);
    a failed trace there can leave the dispatcher's thread-local state behind, so that even the
    eager retry failed. `no_grad` records nothing either, and its outputs are safe everywhere:
    eager, compiled, captured in a CUDA graph. Evaluation, which no step ever sees, keeps
    inference mode."""
    with torch.no_grad():
        return model(images)


class TrainStep:
    """One training step of a compiled graph, plus what a training loop needs around it.

    Subclasses set `engine`, fill `optimizers` (keyed by node, or by one name for a shared
    optimizer) and implement `step`. The learning rate follows `schedule` over the epochs
    done; `end_epoch` writes it into every optimizer.
    """

    engine: str

    @property
    def label(self) -> str:
        """What executes the step, fast paths named (`summary.json`'s `step`, the bench's names)."""
        return self.engine

    def __init__(self, graph: nx.DiGraph, models: dict[str, nn.Module], *, num_classes: int, device: torch.device,
                 steps_per_epoch: int, epochs: int):
        self.models = models
        self.num_classes = num_classes  # every output's last dimension
        self.trainable = trainable_nodes(graph)
        self.frozen = frozen_nodes(graph)
        self.ema = ema_sources(graph)  # {EMA node: (source, decay)}: updated after each optimizer update
        self.detached = {*self.frozen, *self.ema}  # run without autograd, in eval mode, inside the step
        self.edges: list[EdgeSpec] = live_edges(graph)  # cutoff edges are never computed (eq. 5)
        # a learned ensemble's w (`dclang.learned_ensembles`), its combine in `ensembles`
        self.ensemble_weights = learned_weights(graph, device)
        self.ensembles = ensemble_order(graph, self.ensemble_weights)  # (name, members, combine), members first
        self.learned = trained_ensembles(graph)  # learned ensembles whose w trains
        self.loss_nodes = [*self.trainable, *self.learned]  # every node with a loss L_t (eq. 3), in this order
        # the augmented views of each batch (`dclang.views`): how many, and which one each network reads
        self.view_count, self.view_index = len(view_keys(graph)), view_index(graph)
        self.device = device
        self.epochs = epochs
        self.k_end = steps_per_epoch * epochs
        self.optimizers: dict[str, Optimizer] = {}
        train = graph.graph["train"]
        self.optimizer_spec = train.optimizer
        self.schedule = Schedule(train.schedule, train.optimizer.args["lr"], epochs)
        self.epochs_done = 0
        # the layers edges compare, kept by forward hooks during the one forward (dclang.models.taps)
        self.layers = LayerCapture(models, self.layer_ends())
        # shared trunks (dclang.models.branch): the sources' tapes, each branch forwarded after its source
        self.tapes = tapes_of(models.values())
        self.order = forward_order(models)
        self.train()

    def step(self, images: Tensor, labels: Tensor, k: int, indices: Tensor | None = None) -> StepStats:
        """Update every trainable node once on this batch; `k` is the 1-based update number;
        `indices` the samples' positions in the training split, for the edges that read them
        (`needs_indices`)."""
        raise NotImplementedError

    @property
    def needs_indices(self) -> bool:
        """Whether an edge reads each batch's positions in the training split (`crd`'s memory bank)."""
        return any(LOSSES[e.loss].needs_indices for e in self.edges)

    def layer_ends(self) -> list[tuple[str, str]]:
        """(node, layer) of both ends of every live edge between layers: what `layers` keeps."""
        return [end for e in self.edges if e.on_layers
                for end in ((e.source, e.source_layer), (e.target, e.target_layer))]

    def forward(self, images: Tensor | tuple[Tensor, ...]) -> dict[str, Tensor]:
        """Logits of every model node on the same batch, each node forwarded once (paper 3.4),
        each on its view of the batch (`images`: a tensor, or the tuple of views `dclang.views`
        lays out).

        Every node runs, even one that feeds no live edge, because every node's accuracy is
        reported. Frozen and EMA nodes run without autograd: nothing flows back to them. A
        branch runs its whole forward through its source's trunk modules, leaving their
        BatchNorm statistics as the source's forward left them (`source_buffers_kept`), so the
        trunk tracks each batch once.
        """
        views = as_views(images, self.view_count)
        out = {}
        for name, model in self.models.items():
            x = views[self.view_index[name]]
            with source_buffers_kept(model):
                out[name] = frozen_forward(model, x) if name in self.detached else model(x)
        return out

    def outputs(self, images: Tensor) -> dict[str, Tensor]:
        """`forward`'s logits, then every ensemble node's output computed from them
        (`dclang.ensembles`): what edges, gates and accuracies read, all from one forward."""
        return ensemble_outputs(self.forward(images), self.ensembles)

    def edge_inputs(self, edge: EdgeSpec, logits: dict[str, Tensor]) -> tuple[Tensor | None, Tensor]:
        """(source logits, target logits) of an edge; the source is None for `label`."""
        return (None if edge.source == LABEL else logits[edge.source]), logits[edge.target]

    def layer_edge_result(self, edge: EdgeSpec, logits: dict[str, Tensor], labels: Tensor, *, k: int,
                          indices: Tensor | None = None, update: int | None = None) -> tuple[Tensor, Tensor]:
        """(L_{s,t}, gate weights) of an edge computed alone (`computed_alone`): between layers,
        from the layers the last forward captured, or a `crd` edge, on layers or logits, with
        the batch's `indices` and the negatives of `update` (k when None); the target's
        connector (hint) or CRD module is its own submodule."""
        ends = [self.layers.features[(node, layer)] if edge.on_layers else logits[node]
                for node, layer in ((edge.source, edge.source_layer), (edge.target, edge.target_layer))]
        if edge.loss == "crd":
            if indices is None:
                raise ValueError(f"the `crd` edge {edge.key} needs the batch's positions in the training split")
            return crd_edge_loss(edge, *ends, logits[edge.source], labels, indices, self.models[edge.target],
                                 k=k, k_end=self.k_end, update=update)
        return layer_edge_loss(edge, *ends, logits[edge.source], labels, k=k, k_end=self.k_end,
                               connector=connector_of(self.models[edge.target], edge))

    def stats(self, logits: dict[str, Tensor], labels: Tensor, node_loss: dict[str, Tensor],
              edge_results: dict[str, tuple[Tensor, Tensor]]) -> StepStats:
        """StepStats from the step's logits, node losses and (edge loss, gate weights) pairs.

        Each statistic is computed for all nodes or all edges at once on stacked tensors, so
        its operation count does not grow with the graph."""
        with torch.no_grad():
            correct = (torch.stack(list(logits.values())).argmax(dim=-1) == labels).sum(dim=-1)
            losses = torch.stack(list(node_loss.values())).unbind(0)
            stats = StepStats(node_loss=dict(zip(node_loss, losses)), node_correct=dict(zip(logits, correct.unbind(0))),
                              edge_loss={}, edge_gate={}, edge_pass={})
            if edge_results:
                weights = torch.stack([w for _, w in edge_results.values()])
                for field, values in (("edge_loss", torch.stack([loss for loss, _ in edge_results.values()])),
                                      ("edge_gate", weights.mean(dim=-1)),
                                      ("edge_pass", (weights != 0).to(weights.dtype).mean(dim=-1))):
                    getattr(stats, field).update(zip(edge_results, values.unbind(0)))
        return stats

    def end_epoch(self) -> None:
        """Advance the learning-rate schedule by one epoch."""
        self.epochs_done += 1
        self._set_lr()

    def _set_lr(self) -> None:
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = self.lr()

    def lr(self) -> float:
        """The current learning rate (every trainable node's: one `train` block)."""
        return self.schedule(self.epochs_done)

    def train(self) -> None:
        """Training mode for trainable nodes; frozen and EMA nodes stay in eval mode."""
        self.training = True
        for name, model in self.models.items():
            model.train(name not in self.detached)

    def eval(self) -> None:
        self.training = False
        for model in self.models.values():
            model.eval()

    def fused_slices(self) -> dict[str, tuple[nn.Module, int]]:
        """Nodes computed inside a fused network, with (that `FusedModel`, the node's slice):
        none for a graph's own step (an engine's HFTA groups have them, `Engine.fused_slices`)."""
        return {}

    def evaluate(self, images: Tensor, labels: Tensor, batch_size: int) -> dict[str, Tensor]:
        """Top-1 correct count of every model node, then every ensemble, over `images`, in
        eval mode, `batch_size` samples at a time; counts stay on the device. The previous
        mode is restored. One fused forward per batch (`dclang.compile.evaluate`)."""
        from dclang.compile.evaluate import evaluate_nodes, tensor_batches

        names = [*self.models, *(name for name, _, _ in self.ensembles)]
        sums = evaluate_nodes(self, tensor_batches(images, labels, batch_size, self.device), names)
        return dict(zip(names, sums.correct.unbind(0)))

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: every model (frozen ones too, so a checkpoint
        stands alone), optimizer, and the epochs done (the schedule's position). Like
        `nn.Module.state_dict`, the tensors are the live ones: save them or `copy.deepcopy`
        them to keep a snapshot."""
        state = {
            "engine": self.engine,
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "optimizers": {key: opt.state_dict() for key, opt in self.optimizers.items()},
            "epochs_done": self.epochs_done,
        }
        if self.ensemble_weights:
            state["ensembles"] = {name: w.state_dict() for name, w in self.ensemble_weights.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; optimizer state only fits the same engine."""
        if state["engine"] != self.engine:
            raise ValueError(f"a `{state['engine']}` engine state cannot resume the `{self.engine}` engine")
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        for name, weights in self.ensemble_weights.items():  # in place: an optimizer keeps holding w
            weights.load_state_dict(state["ensembles"][name])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        # a checkpoint written when torch's schedulers kept the count holds it as their last_epoch
        self.epochs_done = state["epochs_done"] if "epochs_done" in state else max(
            (sched["last_epoch"] for sched in state["schedulers"].values()), default=0)
        self._set_lr()
