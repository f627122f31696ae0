"""Models of other libraries by name: `torchvision.resnet18`, `timm.mobilenetv3_small_100`.

A node's model `LIB.NAME(args)` is built by the library's own constructor with the
arguments written in the `.kt` file; what dclang knows from the data it sets itself:

- the number of classes (`num_classes`) and, for timm, the input channels (`in_chans`);
- for torchvision, the input channels by replacing the first convolution (the stem) with one
  that reads the data's channels, and for 32x32 images or smaller, the ResNets' ImageNet stem
  (a 7x7 stride-2 convolution and a max-pool, which would shrink an 8x8 digit to 2x2 before
  the first block) by the CIFAR one (a 3x3 stride-1 convolution, no max-pool);
- where a constructor takes `image_size` (torchvision's ViTs), the data's image size.

Pre-trained weights (`weights="IMAGENET1K_V1"` for torchvision, `pretrained=true` for timm)
are loaded into every tensor that still fits; a replaced head or stem starts fresh
(`adaptations` says which), and a frozen teacher whose head was replaced is fine-tuned on the
graph's data first (dclang/train/teachers.py). dclang never downloads: weights must already be
in the library's cache, else `WeightsMissing` names the file and where it goes.

Nothing here imports torch or a library at module import: `dclang check` asks `installed`
without importing anything, and imports a library only when a file names one of its models.
Only the libraries of `LIBRARIES` are ever imported; no other name in a `.kt` file is.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dclang.diagnostics import UserError, did_you_mean


@dataclass(frozen=True)
class Library:
    name: str
    extra: str | None  # the dclang extra that installs it; None: a dependency of dclang
    description: str
    set_by_dclang: tuple[str, ...]  # constructor arguments that come from the data

    @property
    def install(self) -> str:
        return f'pip install "dclang[{self.extra}]"' if self.extra else f"pip install {self.name}"


LIBRARIES: dict[str, Library] = {
    "torchvision": Library("torchvision", None, "torchvision's image classification models",
                           ("num_classes", "image_size")),
    "timm": Library("timm", "timm", "PyTorch Image Models (timm)", ("num_classes", "in_chans")),
}

#: torchvision builder arguments dclang handles itself (`progress`: nothing is downloaded)
_HIDDEN = {"self", "progress", "kwargs"}

#: largest image side for which torchvision ResNets get the CIFAR stem
SMALL_IMAGE = 32


class WeightsMissing(UserError):
    """Pre-trained weights that are not on this machine (dclang never downloads them)."""


#: the torch and torchvision dclang is tested with
TESTED = ("2.14.1", "0.29.1")


class BrokenLibrary(UserError):
    """A library that is installed but cannot be imported (most often a torchvision built for
    another torch: "operator torchvision::nms does not exist")."""


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def import_library(module: str):
    """`import module` for a library's module (`torchvision.models`, `timm`); a broken install
    becomes a `BrokenLibrary` naming the installed versions and the matching pair to install,
    never the library's traceback."""
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError, OSError, AttributeError) as exc:
        library = module.partition(".")[0]
        torch_version, version = _version("torch"), _version(library)
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrokenLibrary(f"{library} {version} cannot be imported with torch {torch_version}: {cause}",
                            _fix(library, torch_version)) from exc


def _fix(library: str, torch_version: str) -> str:
    """What to install: a torchvision of torch's own release (torch 2.N pairs with
    torchvision 0.(N+15)), or the tested pair."""
    tested = f"`pip install torch=={TESTED[0]} torchvision=={TESTED[1]}`"
    if library != "torchvision":
        return (f"reinstall it for torch {torch_version} (`pip install --force-reinstall {library}`); "
                f"dclang is tested with torch {TESTED[0]} and torchvision {TESTED[1]}")
    release = torch_version.split("+")[0].split(".")
    index = " --index-url https://download.pytorch.org/whl/cpu" if torch_version.endswith("+cpu") else ""
    if len(release) >= 2 and release[0] == "2" and release[1].isdigit():
        match = f"0.{int(release[1]) + 15}.*"
        return (f"torch and torchvision must be built for each other: keep torch {torch_version} with "
                f"`pip install \"torchvision=={match}\"{index}`, or install the pair dclang is tested with, "
                f"{tested}{index}")
    return ("torch and torchvision must be built for each other: install the pair dclang is tested with, "
            f"{tested}{index}")


def split(name: str) -> tuple[str, str] | None:
    """("torchvision", "resnet18") for `torchvision.resnet18`; None for a name without a dot."""
    library, dot, model = name.partition(".")
    return (library, model) if dot else None


def installed(library: str) -> bool:
    """Whether the library can be imported, found without importing it."""
    return importlib.util.find_spec(library) is not None


@lru_cache(maxsize=None)
def model_names(library: str) -> tuple[str, ...]:
    """Every classification model the library builds by name (imports the library)."""
    if library == "torchvision":
        models = import_library("torchvision.models")
        return tuple(sorted(models.list_models(module=models)))
    return tuple(import_library("timm").list_models())


def _builder(library: str, model: str):
    if library == "torchvision":
        return import_library("torchvision.models").get_model_builder(model)
    return import_library("timm.models").model_entrypoint(model)


@lru_cache(maxsize=None)
def constructor_args(library: str, model: str) -> tuple[str, ...]:
    """The arguments `model`'s constructor takes: the builder's own and, where the builder
    passes `**kwargs` on, those of the class it returns (its return annotation)."""
    signature = inspect.signature(_builder(library, model))
    names = [n for n, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    cls = signature.return_annotation
    if passes_on and isinstance(cls, type):
        names += list(inspect.signature(cls.__init__).parameters)
    return tuple(dict.fromkeys(n for n in names if n not in _HIDDEN))


def weight_names(model: str) -> tuple[str, ...]:
    """The names torchvision's `weights=` takes for `model` (`IMAGENET1K_V1`, `DEFAULT`, ...)."""
    models = import_library("torchvision.models")
    try:
        return tuple(models.get_model_weights(model).__members__)
    except ValueError:
        return ()


def argument_problems(library: str, model: str, args: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """{argument: (message, help)} for every argument `model` cannot take as written."""
    lib = LIBRARIES[library]
    takes = constructor_args(library, model)
    out = {}
    for key, value in args.items():
        if key in lib.set_by_dclang:
            out[key] = (f"`{key}` is set by dclang", f"`{key}` comes from the data; leave it out")
        elif key not in takes:
            out[key] = (f"`{library}.{model}` takes no argument `{key}`",
                        did_you_mean(key, [t for t in takes if t not in lib.set_by_dclang], "arguments"))
        elif library == "torchvision" and key == "weights":
            known = weight_names(model)
            if not isinstance(value, str) or value.rpartition(".")[2] not in known:
                out[key] = (f"`{library}.{model}` has no weights `{value}`",
                            did_you_mean(str(value), known, "weights") if known else "it has no pre-trained weights")
    return out


# ---------------------------------------------------------------- what changes for the data


def pretrained_classes(library: str, model: str, args: dict[str, Any]) -> int | None:
    """The class count of the pre-trained weights `args` ask for; None without weights."""
    if library == "torchvision":
        if args.get("weights") is None:
            return None
        return len(_torchvision_weights(model, args["weights"]).meta["categories"])
    if not args.get("pretrained"):
        return None
    cfg = import_library("timm.models").get_pretrained_cfg(model)
    return cfg.num_classes if cfg is not None else None


def _small_stem(model: str, image_size: int) -> bool:
    """Whether torchvision's `model` gets the CIFAR stem: a ResNet (its builder returns one)
    on images of at most `SMALL_IMAGE` pixels a side."""
    resnet = import_library("torchvision.models").ResNet
    returns = inspect.signature(_builder("torchvision", model)).return_annotation
    return image_size <= SMALL_IMAGE and isinstance(returns, type) and issubclass(returns, resnet)


def adaptations(name: str, num_classes: int, in_channels: int, image_size: int) -> list[str]:
    """What of `name`'s pre-trained weights does not fit the data and starts fresh: empty
    when there are no weights or they fit as they are (then a frozen teacher needs no
    fine-tuning)."""
    from dclang.registry import model_ref

    base, args = model_ref(name)
    parts = split(base)
    if parts is None or parts[0] not in LIBRARIES:
        return []
    library, model = parts
    classes = pretrained_classes(library, model, args)
    if classes is None:
        return []
    out = []
    if classes != num_classes:
        out.append(f"the head ({classes} -> {num_classes} classes)")
    if in_channels != 3:
        out.append(f"the stem ({in_channels}-channel input)")
    elif library == "torchvision" and _small_stem(model, image_size):
        out.append(f"the stem (3x3 stride 1, no max-pool, for {image_size}x{image_size} images)")
    return out


def pretrained_fits(name: str, num_classes: int, in_channels: int, image_size: int) -> bool:
    """Whether `name` is a library model whose pre-trained weights fit the data as they are:
    then a frozen node uses them directly instead of being (pre- or fine-)trained first."""
    from dclang.registry import model_ref

    base, args = model_ref(name)
    parts = split(base)
    if parts is None or parts[0] not in LIBRARIES or pretrained_classes(*parts, args) is None:
        return False
    return not adaptations(name, num_classes, in_channels, image_size)


def pretrained_file(name: str) -> Path | None:
    """The file of pre-trained weights a model's text asks for, where the library keeps it
    (whether it is there or not); None without weights."""
    from dclang.registry import model_ref

    base, args = model_ref(name)
    parts = split(base)
    if parts is None or parts[0] not in LIBRARIES or pretrained_classes(*parts, args) is None:
        return None
    library, model = parts
    if library == "torchvision":
        return weights_file(_torchvision_weights(model, args["weights"]))
    return _timm_weights_file(model)


# ---------------------------------------------------------------- building


def build(name: str, args: dict[str, Any], num_classes: int, in_channels: int, image_size: int, *,
          pretrained: bool = True):
    """The library's `name` (`torchvision.resnet18`) with `args`, fitted to the data; without
    its pre-trained weights when `pretrained` is False (shapes and sizes need none)."""
    library, model = split(name)
    if not installed(library):
        raise UserError(f"`{name}` needs {library}, which is not installed", LIBRARIES[library].install)
    if not pretrained:
        args = {k: v for k, v in args.items() if k not in ("weights", "pretrained")}
    if library == "torchvision":
        return _torchvision(model, dict(args), num_classes, in_channels, image_size)
    return _timm(model, dict(args), num_classes, in_channels)


def _call(builder, name: str, **kwargs):
    """A library constructor; its complaints about arguments are the user's to fix."""
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"`{name}` cannot be built with these arguments: {exc}",
                        "see the library's documentation of the model's arguments") from exc


def _torchvision_weights(model: str, weights: str):
    return import_library("torchvision.models").get_model_weights(model).verify(weights.rpartition(".")[2])


def weights_file(weights) -> Path:
    """Where torchvision looks for a weights enum's file: torch hub's cache, `checkpoints/`."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _torchvision(model: str, args: dict, num_classes: int, in_channels: int, image_size: int):
    import torch
    from torch import nn

    builder = _builder("torchvision", model)
    name = f"torchvision.{model}"
    if "image_size" in constructor_args("torchvision", model):
        args["image_size"] = image_size
    weights = args.pop("weights", None)
    net = _call(builder, name, num_classes=num_classes, weights=None, progress=False, **args)
    if _small_stem(model, image_size):
        net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        _replace_first_conv(net, in_channels)
    if weights is None:
        return net
    enum = _torchvision_weights(model, weights)
    path = weights_file(enum)
    if not path.is_file():
        raise WeightsMissing(
            f"`{name}(weights=\"{weights}\")` needs the file {path.name}, which is not on this machine "
            "(dclang never downloads)",
            f"download {enum.url} on a machine with network access and put it in {path.parent} "
            "(torch hub's cache: $TORCH_HOME/hub/checkpoints)")
    with torch.random.fork_rng(devices=[]):  # the reference build draws no numbers from the seed's stream
        pretrained = _call(builder, name, weights=enum, progress=False,
                           **{k: v for k, v in args.items() if k != "image_size"})
    load_fitting(net, pretrained.state_dict())
    return net


def _replace_first_conv(net, in_channels: int) -> None:
    """Swap the first 3-channel convolution for one reading `in_channels` (same hyperparameters)."""
    from torch import nn

    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            owner, _, attr = name.rpartition(".")
            setattr(net.get_submodule(owner), attr, nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode))
            return


def load_fitting(net, state: dict) -> list[str]:
    """Copy every tensor of `state` whose name and shape fit `net`; for a 1-channel stem, the
    sum over a 3-channel kernel's input channels (what a gray image's RGB copy would see).
    Returns the names left as initialised."""
    import torch

    own = net.state_dict()
    fresh = []
    with torch.no_grad():
        for key, tensor in own.items():
            source = state.get(key)
            if source is not None and source.shape == tensor.shape:
                tensor.copy_(source)
            elif (source is not None and source.dim() == 4 and tensor.shape[1] == 1 and source.shape[1] == 3
                  and source.shape[0] == tensor.shape[0] and source.shape[2:] == tensor.shape[2:]):
                tensor.copy_(source.sum(dim=1, keepdim=True))
            else:
                fresh.append(key)
    return fresh


def _timm(model: str, args: dict, num_classes: int, in_channels: int):
    timm = import_library("timm")
    name = f"timm.{model}"
    if args.get("pretrained"):
        _check_timm_cache(model)
    return _call(timm.create_model, name, model_name=model, num_classes=num_classes, in_chans=in_channels, **args)


_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm_weights_file(model: str) -> Path | None:
    """timm's weights: a file in Hugging Face's cache, or in torch hub's for old URLs."""
    cfg = import_library("timm.models").get_pretrained_cfg(model)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id = "/".join(cfg.hf_hub_id.split("/", 2)[:2])
        found = [try_to_load_from_cache(repo_id, f) for f in _HF_FILES]
        return next((Path(f) for f in found if isinstance(f, str)), None)
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url or "")


def _check_timm_cache(model: str) -> None:
    """The weights `timm.create_model(pretrained=True)` loads must be in a cache already."""
    cfg = import_library("timm.models").get_pretrained_cfg(model)
    if cfg is None:
        raise UserError(f"`timm.{model}` has no pre-trained weights", "leave out `pretrained=true`")
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        repo_id = "/".join(cfg.hf_hub_id.split("/", 2)[:2])
        if _timm_weights_file(model) is None:
            raise WeightsMissing(
                f"`timm.{model}(pretrained=true)` needs the weights of {repo_id}, which are not on this machine "
                "(dclang never downloads)",
                f"fetch them on a machine with network access (`huggingface-cli download {repo_id}`) and copy "
                f"the cache folder models--{repo_id.replace('/', '--')} into {constants.HF_HUB_CACHE}")
        return
    path = _timm_weights_file(model)
    if not path.is_file():
        raise WeightsMissing(f"`timm.{model}(pretrained=true)` needs the file {path.name}, which is not on this "
                             "machine (dclang never downloads)",
                             f"download {cfg.url} and put it in {path.parent}")
