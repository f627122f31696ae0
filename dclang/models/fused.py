"""Horizontal fusion of K same-architecture models into one module (HFTA, Wang et al., MLSys 2021).

Every node of a knowledge transfer graph sees the same batch at each step, so K nodes of one
architecture can run as a single network whose layers are K times wider but block-diagonal:

- a convolution becomes one convolution with K*C_out channels and ``groups=K*g``; the first
  one reads the shared input (B, C, H, W) directly with K*C_out outputs and ``groups=1``,
  which computes what repeating the input K times and grouping would, without the copy;
- BatchNorm2d becomes BatchNorm2d(K*C): statistics, affine weights and running mean/var are
  per channel, so each node keeps its own; ``num_batches_tracked`` becomes a (K,) counter;
- ReLU, dropout, max/average/global pooling and flatten act per element or per channel and
  are kept as they are;
- option-A shortcuts subsample and zero-pad the channels of each node's block separately
  (unflatten to (B, K, C, H, W), pad C, flatten back);
- the classifier is a batched matmul with weight (K, out, in), giving logits (K, B, classes).

Why this is exact: channel block k of every activation depends only on channel block k of the
previous one and on node k's weights, so the fused network evaluates K independent functions
equal to the K models (the same arithmetic per output element; only the kernels' summation
order may differ, i.e. agreement to rounding). The gradient of a sum of per-node losses with
respect to node k's slice is therefore the gradient of node k's loss alone (sum each node's
own loss over ``logits[k]``; a mean over all K*B rows would scale every gradient by 1/K), and
the running statistics update per channel exactly as the K models' would. Dropout, where a model has it,
draws independent masks per element as K separate models do: equal in distribution, not
bitwise.

What an optimizer should see: ``FusedModel.parameters()``, the fused leaf Parameters. SGD
(momentum, Nesterov, weight decay), Adam and AdamW with one set of hyperparameters act per
element and keep per-tensor step counts that all K nodes share anyway (they step together),
so one optimizer over them, ``foreach`` or not, computes what K optimizers would. Not
equivalent: anything using a norm over a whole tensor or model (per-node gradient clipping,
LARS/LAMB) and per-node hyperparameters. Optimizer state is not fused: build the optimizer
after fusing (or stack its state the same way). ``node_state_dict(k)`` returns views of node k's
slices for reading, saving or logging; views of a Parameter are not leaves and must never be
handed to an optimizer.

Where it wins: on CUDA with many small models, where per-layer kernel launches and Python
overhead dominate; fusion replaces K launches per layer by one larger launch. On a CPU each
launch is cheap and grouped convolutions can be slower than K dense ones, so fusion may not
pay off there; the engine enables it only where a benchmark shows that it wins.

Supported: the CIFAR ResNets, the WRNs (any depth and width), ``mlp``, ``cnn_tiny``,
``cnn_small`` and torchvision's ResNets (``torchvision.resnet18`` ... ``resnet152``, also with
the small-image stem dclang gives them). Anything else raises NotImplementedError naming the architecture, so callers
can fall back to separate models. The set is an allowlist of module types, because fusion
reuses each container's own ``forward``: it deep-copies the first model and swaps its leaf
layers for fused ones, so the fused network's ``state_dict`` keys are the per-node keys.
Within these containers registration order is execution order, which is how the layer that
reads the shared input (the first weight layer) and the classifier (the last layer) are found.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cifar_resnet import BasicBlock, CifarResNet, ShortcutA
from .wide_resnet import PreActBlock, WideResNet

# Containers whose forward only composes children, so that swapping the leaves fuses them.
_CONTAINERS = (CifarResNet, BasicBlock, WideResNet, PreActBlock, nn.Sequential)
# torchvision's ResNets compose children the same way (stem, stages, pool, flatten, fc; blocks
# add a shortcut that is the identity or a 1x1 convolution and BatchNorm): named by module and
# class, so that fusing imports no library.
_LIBRARY_CONTAINERS = {("torchvision.models.resnet", name) for name in ("ResNet", "BasicBlock", "Bottleneck")}


def _is_container(module: nn.Module) -> bool:
    cls = type(module)
    return cls in _CONTAINERS or (cls.__module__, cls.__qualname__) in _LIBRARY_CONTAINERS
# Leaves acting per element or per channel: correct on the fused (B, K*C, ...) layout as is.
_ELEMENTWISE = (nn.ReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.Flatten)


class FusedLinear(nn.Module):
    """K independent Linear layers as one batched matmul: (B, K*in) -> (K, B, out).

    ``weight`` is (K, out, in) and ``bias`` (K, out), i.e. the K layers' tensors stacked, so
    slice k is node k's ``nn.Linear`` parameter unchanged.
    """

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool,
                 device: torch.device | str | None = None):
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.empty(k, out_features, device=device)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.unflatten(1, (self.k, self.in_features)).transpose(0, 1)  # (K, B, in)
        weight_t = self.weight.transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, weight_t)
        return torch.baddbmm(self.bias.unsqueeze(1), x, weight_t)

    def extra_repr(self) -> str:
        return (f"k={self.k}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class FusedInputLinear(FusedLinear):
    """The first Linear of K nodes that each read their own input: (B, K*in) -> (B, K*out),
    node k's features in block k as the rest of the fused network expects them."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).transpose(0, 1).flatten(1)


class FusedShortcutA(nn.Module):
    """Option-A shortcut of K nodes: subsample, then zero-pad each node's channel block."""

    def __init__(self, k: int, stride: int, extra_channels: int):
        super().__init__()
        self.k, self.stride, self.extra_channels = k, stride, extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride].unflatten(1, (self.k, -1))  # (B, K, C, H, W)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels)).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"k={self.k}, stride={self.stride}, extra_channels={self.extra_channels}"


def _leaves(module: nn.Module, arch: str) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, leaf) in registration order; unknown module types raise."""
    out = []
    for name, child in module.named_children():
        if _is_container(child):
            out += _leaves(child, arch)
        elif type(child) in (nn.Conv2d, nn.BatchNorm2d, nn.Linear, ShortcutA, *_ELEMENTWISE):
            out.append((module, name, child))
        else:
            raise NotImplementedError(f"cannot fuse {arch}: no fused form of {type(child).__name__}")
    return out


def _fused_leaf(leaf: nn.Module, k: int, *, shared_input: bool, classifier: bool,
                arch: str) -> nn.Module:
    """The fused counterpart of one leaf, with uninitialised (meta) tensors."""
    meta = torch.device("meta")
    if isinstance(leaf, nn.Conv2d):
        if shared_input and leaf.groups != 1:
            raise NotImplementedError(f"cannot fuse {arch}: grouped convolution on the input")
        return nn.Conv2d(
            leaf.in_channels * (1 if shared_input else k), leaf.out_channels * k, leaf.kernel_size,
            leaf.stride, leaf.padding, leaf.dilation, groups=leaf.groups * (1 if shared_input else k),
            bias=leaf.bias is not None, padding_mode=leaf.padding_mode, device=meta)
    if isinstance(leaf, nn.BatchNorm2d):
        if leaf.momentum is None:
            # The cumulative average divides by num_batches_tracked as one Python float.
            raise NotImplementedError(f"cannot fuse {arch}: BatchNorm2d with momentum=None")
        bn = nn.BatchNorm2d(leaf.num_features * k, leaf.eps, leaf.momentum, leaf.affine,
                            leaf.track_running_stats, device=meta)
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked = torch.zeros(k, dtype=torch.long, device=meta)
        return bn
    if isinstance(leaf, nn.Linear):
        if classifier:
            return FusedLinear(k, leaf.in_features, leaf.out_features, leaf.bias is not None, device=meta)
        if not shared_input:  # the first layer reading K inputs: block-diagonal, (B, K*in) -> (B, K*out)
            return FusedInputLinear(k, leaf.in_features, leaf.out_features, leaf.bias is not None, device=meta)
        # Only the first layer (shared input) reaches here: K*out outputs, weight (K*out, in).
        return nn.Linear(leaf.in_features, leaf.out_features * k, leaf.bias is not None, device=meta)
    if isinstance(leaf, ShortcutA):
        return FusedShortcutA(k, leaf.stride, leaf.extra_channels)
    return leaf


def _fuse_structure(model: nn.Module, k: int, shared_input: bool) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` whose leaves are fused for ``k`` nodes, tensors on the meta device;
    its first weight layer reads one shared input, or K inputs side by side (`shared_input`).
    Also the layout of every module's output (`_output_layouts`)."""
    arch = type(model).__name__
    if not _is_container(model):
        raise NotImplementedError(f"cannot fuse {arch}: not a supported architecture")
    net = copy.deepcopy(model)
    leaves = _leaves(net, arch)
    weighted = [i for i, (_, _, leaf) in enumerate(leaves) if isinstance(leaf, (nn.Conv2d, nn.Linear))]
    if not weighted or not isinstance(leaves[-1][2], nn.Linear) or weighted[0] == len(leaves) - 1:
        raise NotImplementedError(f"cannot fuse {arch}: needs a first weight layer and a final Linear")
    first = weighted[0]
    if any(not isinstance(leaf, _ELEMENTWISE) for _, _, leaf in leaves[:first]):
        raise NotImplementedError(f"cannot fuse {arch}: a stateful layer precedes the first weight layer")
    swapped = []
    for i, (parent, name, leaf) in enumerate(leaves):
        classifier = i == len(leaves) - 1
        if isinstance(leaf, nn.Linear) and i not in (first, len(leaves) - 1):
            raise NotImplementedError(f"cannot fuse {arch}: Linear layer inside the network")
        fused = _fused_leaf(leaf, k, shared_input=shared_input and i == first, classifier=classifier, arch=arch)
        fused.train(leaf.training)
        setattr(parent, name, fused)
        swapped.append(fused)
    return net, _output_layouts(net, classifier=swapped[-1], shared=swapped[:first] if shared_input else [])


def _output_layouts(net: nn.Module, *, classifier: nn.Module, shared: list[nn.Module]) -> dict[str, str]:
    """How each module of a fused network lays out the K nodes in its output, by module path:
    `classifier` (K, B, ...) for the classifier and every container ending with it (forward
    order is registration order here); `shared` for the element-wise layers before the first
    weight layer when the nodes share their input (every node's output is the same); `blocked`
    otherwise: node k's channels or features are block k of dimension 1."""
    shared_ids = {id(m) for m in shared}
    layouts = {}
    for path, module in net.named_modules():
        inside = [m for m in module.modules() if not _is_container(m)]
        if any(m is classifier for m in inside):
            layouts[path] = "classifier"
        elif inside and all(id(m) in shared_ids for m in inside):
            layouts[path] = "shared"
        else:
            layouts[path] = "blocked"
    return layouts


def _signature(model: nn.Module) -> tuple:
    """What must agree between models for them to fuse: layer hyperparameters (via repr),
    tensor names, shapes, dtypes, devices, requires_grad and every module's train/eval mode."""
    tensors = [(n, t.shape, t.dtype, t.device, t.requires_grad)
               for n, t in model.state_dict(keep_vars=True).items()]
    return type(model), repr(model), tensors, [m.training for m in model.modules()]


class FusedModel(nn.Module):
    """K same-architecture models computed as one: ``forward(x)`` returns (K, B, classes).

    Build it with ``fuse_models(models)`` (= ``FusedModel.from_models``). ``net`` holds the
    fused layers; its ``state_dict`` has the per-node keys, each tensor being the K nodes'
    tensors stacked (``fused.view(K, *node_shapes[key])[k]`` is node k's).
    """

    def __init__(self, net: nn.Module, k: int, node_shapes: dict[str, torch.Size],
                 output_layouts: dict[str, str] | None = None):
        super().__init__()
        self.net = net
        self.k = k
        self.node_shapes = node_shapes  # state_dict key -> that tensor's shape in one node
        self.output_layouts = output_layouts or {}  # module path -> `_output_layouts`
        self.training = net.training  # not train(): that would reset each layer's own mode

    @classmethod
    def from_models(cls, models: list[nn.Module], *, shared_input: bool = True) -> FusedModel:
        """Fuse ``models`` (copying their parameters, buffers, requires_grad and train/eval
        modes in); raises NotImplementedError for unsupported architectures and ValueError
        when the models differ in architecture, dtype, device, requires_grad or mode.

        With ``shared_input`` (the default) every node reads the same batch (B, C, H, W);
        without, node k reads its own, the K batches side by side in channels (B, K*C, H, W)
        (``stack_inputs``): the first layer is then grouped like every other."""
        models = list(models)
        if not models:
            raise ValueError("fuse_models needs at least one model")
        reference = _signature(models[0])
        for i, model in enumerate(models[1:], start=1):
            if _signature(model) != reference:
                raise ValueError(f"model {i} differs from model 0 in architecture, dtype, device, "
                                 "requires_grad or train/eval mode; only identical ones fuse")
        k = len(models)
        net, layouts = _fuse_structure(models[0], k, shared_input)
        shapes = {name: t.shape for name, t in net.state_dict(keep_vars=True).items()}
        states = [m.state_dict() for m in models]
        stacked = {name: torch.stack([s[name] for s in states]).reshape(shape)
                   for name, shape in shapes.items()}
        node_shapes = {name: t.shape for name, t in states[0].items()}
        net.load_state_dict(stacked, assign=True)
        grads = {name: p.requires_grad for name, p in models[0].named_parameters()}
        for name, p in net.named_parameters():
            p.requires_grad_(grads[name])
        return cls(net, k, node_shapes, layouts)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of all K nodes, (K, B, classes), for the shared batch ``x`` or, fused
        without a shared input, for the K batches ``stack_inputs`` laid side by side."""
        return self.net(x)

    def node_output(self, path: str, output: Tensor, k: int) -> Tensor:
        """Node ``k``'s part of what the module at ``path`` of ``net`` returned: what that
        layer of node k's own model returns (a view: gradients flow to node k's slice only)."""
        layout = self.output_layouts.get(path, "blocked")
        if layout == "classifier":
            return output[k]
        if layout == "shared":
            return output
        return output.unflatten(1, (self.k, -1))[:, k]

    def node_state_dict(self, k: int) -> dict[str, Tensor]:
        """Node ``k``'s parameters and buffers as views into the fused tensors, keyed and
        shaped like the separate model's ``state_dict`` (detached: not for an optimizer)."""
        if not 0 <= k < self.k:
            raise IndexError(f"node {k} out of range for {self.k} fused models")
        return {name: t.view(self.k, *self.node_shapes[name])[k]
                for name, t in self.net.state_dict().items()}

    def unfuse_into(self, models: list[nn.Module]) -> None:
        """Copy each node's parameters and buffers into the K separate ``models`` (exact)."""
        if len(models) != self.k:
            raise ValueError(f"{len(models)} models given for {self.k} fused ones")
        for k, model in enumerate(models):
            model.load_state_dict(self.node_state_dict(k))


def fuse_models(models: list[nn.Module], *, shared_input: bool = True) -> FusedModel:
    """Fuse K models of one architecture; see ``FusedModel.from_models``."""
    return FusedModel.from_models(models, shared_input=shared_input)


def stack_inputs(inputs: list[Tensor]) -> Tensor:
    """K batches of one shape (B, C, ...) side by side in channels, (B, K*C, ...): the input of
    a model fused without a shared input, node k reading ``inputs[k]`` (one concatenation,
    which keeps the batches' memory format)."""
    return torch.cat(inputs, dim=1)
