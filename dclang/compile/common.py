"""What both engines share: the models, one forward of every node, statistics, checkpoints,
evaluation. The engines differ only in how losses become updates (`step`)."""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from dclang.crd import add_crd, crd_edge_loss
from dclang.ensembles import ensemble_order, ensemble_outputs
from dclang.feature_losses import layer_edge_loss
from dclang.ir import LABEL, EdgeSpec, frozen_nodes, live_edges, model_nodes, trainable_nodes
from dclang.loss_catalogue import LOSSES
from dclang.models import build_model
from dclang.models.connector import add_connectors, connector_of, load_node_state
from dclang.models.taps import LayerCapture


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
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        models = {n: build_model(graph.nodes[n]["spec"].model, num_classes, in_channels, image_size)
                  for n in names}
        add_connectors(graph, models, (in_channels, image_size, image_size))  # FitNets' regressors (hint)
        if train_size is not None:  # CRD's heads and memory banks over the training set
            add_crd(graph, models, (in_channels, image_size, image_size), num_classes, train_size)
    for name, state in (init_states or {}).items():
        load_node_state(models[name], state)
    for name in frozen_nodes(graph):
        models[name].requires_grad_(False).eval()
    return {name: model.to(device) for name, model in models.items()}


class TrainStep:
    """One training step of a compiled graph, plus what a training loop needs around it.

    Subclasses set `engine`, fill `optimizers` and `schedulers` (keyed by node, or by one
    name for a shared optimizer) and implement `step`.
    """

    engine: str

    @property
    def label(self) -> str:
        """What executes the step, fast paths named (`summary.json`'s `step`, the bench's names)."""
        return self.engine

    def __init__(self, graph: nx.DiGraph, models: dict[str, nn.Module], *, device: torch.device,
                 steps_per_epoch: int, epochs: int):
        self.models = models
        self.trainable = trainable_nodes(graph)
        self.frozen = frozen_nodes(graph)
        self.edges: list[EdgeSpec] = live_edges(graph)  # cutoff edges are never computed (eq. 5)
        self.ensembles = ensemble_order(graph)  # (name, members, combine), members first
        self.device = device
        self.epochs = epochs
        self.k_end = steps_per_epoch * epochs
        self.optimizers: dict[str, Optimizer] = {}
        self.schedulers: dict[str, LRScheduler] = {}
        # the layers edges compare, kept by forward hooks during the one forward (dclang.models.taps)
        self.layers = LayerCapture(models, self.layer_ends(), fused=self.fused_slices())
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

    def fused_slices(self) -> dict[str, tuple[nn.Module, int]]:
        """Nodes the step computes inside a fused network, with (that `FusedModel`, the
        node's slice): where their layers are captured (none here; HFTA has them)."""
        return {}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits of every model node on the same batch, each node forwarded once (paper 3.4).

        Every node runs, even one that feeds no live edge, because every node's accuracy is
        reported. Frozen nodes run without autograd: nothing flows back to them.
        """
        logits = {}
        for name, model in self.models.items():
            if name in self.frozen:
                with torch.inference_mode():
                    logits[name] = model(images)
            else:
                logits[name] = model(images)
        return logits

    def outputs(self, images: Tensor) -> dict[str, Tensor]:
        """`forward`'s logits, then every ensemble node's output computed from them
        (`dclang.ensembles`): what edges, gates and accuracies read, all from one forward."""
        return ensemble_outputs(self.forward(images), self.ensembles)

    def edge_inputs(self, edge: EdgeSpec, logits: dict[str, Tensor]) -> tuple[Tensor | None, Tensor]:
        """(source logits, target logits) of an edge; the source is None for `label`."""
        return (None if edge.source == LABEL else logits[edge.source]), logits[edge.target]

    def layer_edge_result(self, edge: EdgeSpec, logits: dict[str, Tensor], labels: Tensor, *, k: int,
                          indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L_{s,t}, gate weights) of an edge computed alone (`computed_alone`): between layers,
        from the layers the last forward captured, or a `crd` edge, on layers or logits, with
        the batch's `indices`; the target's connector (hint) or CRD module is its own submodule."""
        ends = [self.layers.features[(node, layer)] if edge.on_layers else logits[node]
                for node, layer in ((edge.source, edge.source_layer), (edge.target, edge.target_layer))]
        if edge.loss == "crd":
            if indices is None:
                raise ValueError(f"the `crd` edge {edge.key} needs the batch's positions in the training split")
            return crd_edge_loss(edge, *ends, logits[edge.source], labels, indices, self.models[edge.target],
                                 k=k, k_end=self.k_end)
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
        """Advance every learning-rate schedule by one epoch."""
        for scheduler in self.schedulers.values():
            scheduler.step()

    def lr(self) -> float:
        """The current learning rate of the first trainable node."""
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    def train(self) -> None:
        """Training mode for trainable nodes; frozen nodes stay in eval mode."""
        self.training = True
        for name, model in self.models.items():
            model.train(name not in self.frozen)

    def eval(self) -> None:
        self.training = False
        for model in self.models.values():
            model.eval()

    @torch.inference_mode()
    def evaluate(self, images: Tensor, labels: Tensor, batch_size: int,
                 loss_sums: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Top-1 correct count of every model node, then every ensemble (from the same
        forward), over `images`, in eval mode, `batch_size` samples at a time; counts stay on
        the device. The previous mode is restored.

        With `loss_sums` (a dict), each node's summed cross-entropy against the labels is added
        to its entry (float64, on the device): the validation loss. An ensemble's output is
        a log-probability (up to a constant), so its cross-entropy is its members' combined
        prediction's."""
        was_training = self.training
        self.eval()
        names = [*self.models, *(name for name, _, _ in self.ensembles)]
        correct = {name: torch.zeros((), dtype=torch.long, device=self.device) for name in names}
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(self.device, non_blocking=True)
            y = labels[start:start + batch_size].to(self.device, non_blocking=True)
            logits = ensemble_outputs({name: model(x) for name, model in self.models.items()}, self.ensembles)
            for name in names:
                correct[name] += (logits[name].argmax(dim=1) == y).sum()
            if loss_sums is not None:
                stacked = torch.stack([logits[name] for name in names])  # (nodes, B, C): one loss for all
                sums = F.cross_entropy(stacked.transpose(1, 2), y.expand(len(names), -1),
                                       reduction="none").sum(dim=1).double()
                for name, total in zip(names, sums.unbind(0)):
                    loss_sums[name] = loss_sums.get(name, torch.zeros((), dtype=torch.float64, device=self.device)) \
                        + total
        if was_training:
            self.train()
        return correct

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: every model (frozen ones too, so a checkpoint
        stands alone), optimizer and scheduler. Like `nn.Module.state_dict`, the tensors are
        the live ones: save them or `copy.deepcopy` them to keep a snapshot."""
        return {
            "engine": self.engine,
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "optimizers": {key: opt.state_dict() for key, opt in self.optimizers.items()},
            "schedulers": {key: sched.state_dict() for key, sched in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; optimizer state only fits the same engine."""
        if state["engine"] != self.engine:
            raise ValueError(f"a `{state['engine']}` engine state cannot resume the `{self.engine}` engine")
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        for key, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][key])
