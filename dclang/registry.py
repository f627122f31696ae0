"""Names the language knows: models, gates, losses, optimizers, schedules, settings.

This module imports nothing heavy, so `dclang check` can validate every name in a file
without loading torch. The networks themselves live in `dclang.models` and are looked up by
the same names; `tests/test_registry.py` keeps the two lists in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dclang import loss_catalogue, ranges

# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    description: str


_RESNET_DEPTHS = (20, 32, 44, 56, 110)

MODELS: dict[str, ModelInfo] = {
    **{f"resnet{d}": ModelInfo(f"resnet{d}", "cifar_resnet", f"CIFAR ResNet-{d} (He et al. 2016, option A shortcuts)")
       for d in _RESNET_DEPTHS},
    **{f"resnet{d}_tiny": ModelInfo(f"resnet{d}_tiny", "cifar_resnet",
                                    f"ResNet-{d} for 64x64 Tiny-ImageNet (first conv stride 1)")
       for d in (32, 110)},
    **{f"wrn{d}_{k}": ModelInfo(f"wrn{d}_{k}", "wide_resnet", f"WideResNet-{d}-{k}")
       for d, k in ((16, 1), (16, 2), (16, 4), (28, 2), (28, 4), (28, 10), (40, 2))},
    "wrn28_2_tiny": ModelInfo("wrn28_2_tiny", "wide_resnet", "WideResNet-28-2 for 64x64 Tiny-ImageNet"),
    "mlp": ModelInfo("mlp", "small", "one hidden layer of 128 units (tests)"),
    "cnn_tiny": ModelInfo("cnn_tiny", "small", "two 3x3 conv layers, 8 and 16 channels (tests)"),
    "cnn_small": ModelInfo("cnn_small", "small", "conv 32-64-128, ~100k parameters (quickstart)"),
}

_WRN = re.compile(r"^wrn(\d+)_(\d+)$")


def is_model(name: str) -> bool:
    """A registered name, or any WideResNet `wrn{d}_{k}` with (d - 4) divisible by 6."""
    if name in MODELS:
        return True
    m = _WRN.match(name)
    return bool(m) and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(1)) >= 10 and int(m.group(2)) >= 1


def model_ref(text: str) -> tuple[str, dict[str, Any]]:
    """A node's model as the IR holds it, its canonical text (`resnet32`,
    `torchvision.resnet18(weights="DEFAULT")`), split into the name and the constructor's
    arguments as Python values (lists as lists)."""
    if "(" not in text:
        return text, {}
    from dclang.ir import plain
    from dclang.syntax import ast
    from dclang.syntax.parser import parse_module

    module, _ = parse_module(f"node _ : {text}\n")
    call = module.of(ast.NodeDecl)[0].model if module is not None else None
    if not isinstance(call, ast.Call):
        raise ValueError(f"not a model: {text!r}")

    def value(v: Any) -> Any:
        return [value(i) for i in v] if isinstance(v, tuple) else v

    return call.name.text, {a.name.text: value(plain(a.value, a.name.text)) for a in call.args}


# ---------------------------------------------------------------- gates and losses

GATES: dict[str, str] = {
    "through": "passes every sample's loss unchanged (eq. 4)",
    "cutoff": "the edge contributes nothing and is never computed (eq. 5)",
    "linear": "weights the loss by k / k_end, the fraction of training done (eq. 6)",
    "correct": "keeps only samples whose source top-1 equals the label (eq. 7)",
}

#: loss name -> its options, from the typed catalogue (`dclang.loss_catalogue`): `ce` from
#: `label` (eq. 1), `kl` between nodes (eq. 2), further logit and layer losses
LOSSES: dict[str, tuple[str, ...]] = {name: tuple(info.args) for name, info in loss_catalogue.LOSSES.items()}
LABEL = "label"

# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Option:
    """One setting or argument: its type (for messages and conversion), default, and the
    range a number (or each number of a list) must lie in (`dclang.ranges`)."""

    type: str  # int | float | bool | str | name | int_list | number
    default: Any = None
    help: str = ""
    range: ranges.Range | ranges.CountOrFraction | None = None


@dataclass(frozen=True)
class OptimizerKind:
    """One optimizer, the one place it is described: what a `.kt` file may set (`args`), the
    `torch.optim` class that runs it, torch's other hyperparameters as dclang always sets them
    (`fixed`: written out, so that no torch version's defaults decide which packed trials can
    share an update, `dclang.compile.sliced_optim.rule_of`), and its per-element state by
    torch's names (the sliced optimizer keeps the same, so states translate both ways)."""

    torch_class: str
    args: dict[str, Option]
    fixed: dict[str, Any]
    state: tuple[str, ...]


_ADAM_FIXED = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "maximize": False}

OPTIMIZER_KINDS: dict[str, OptimizerKind] = {
    "sgd": OptimizerKind("SGD", {
        "lr": Option("float", 0.1, range=ranges.LR), "momentum": Option("float", 0.9, range=ranges.MOMENTUM),
        "nesterov": Option("bool", True), "weight_decay": Option("float", 5e-4, range=ranges.WEIGHT_DECAY),
    }, {"dampening": 0.0, "maximize": False}, ("momentum_buffer",)),
    "adam": OptimizerKind("Adam", {"lr": Option("float", 1e-3, range=ranges.LR),
                                    "weight_decay": Option("float", 0.0, range=ranges.WEIGHT_DECAY)},
                          _ADAM_FIXED, ("exp_avg", "exp_avg_sq")),
    "adamw": OptimizerKind("AdamW", {"lr": Option("float", 1e-3, range=ranges.LR),
                                      "weight_decay": Option("float", 1e-2, range=ranges.WEIGHT_DECAY)},
                           _ADAM_FIXED, ("exp_avg", "exp_avg_sq")),
}

#: each optimizer's settings, as the passes and the IR read them (a view of `OPTIMIZER_KINDS`)
OPTIMIZERS: dict[str, dict[str, Option]] = {name: kind.args for name, kind in OPTIMIZER_KINDS.items()}

SCHEDULES: dict[str, dict[str, Option]] = {
    "step": {"milestones": Option("int_list", (), range=ranges.MILESTONE),
             "gamma": Option("float", 0.1, range=ranges.GAMMA)},
    "cosine": {"eta_min": Option("float", 0.0, range=ranges.Range(0, ranges.LR.high))},
    "constant": {},
}

AUGMENTS: dict[str, str] = {
    "pad_crop_flip": "reflect pad, random crop back to size, random horizontal flip (the paper's)",
    "pad_crop": "reflect pad and random crop, no flip (for digits and text-like images)",
    "flip": "random horizontal flip only",
    "none": "no augmentation",
}

DATA_SETTINGS: dict[str, Option] = {
    "val_split": Option("number", 0.1, "images held out of train for model selection: a count or a fraction",
                        ranges.VAL_SPLIT),
    "split_seed": Option("int", 0, "seed of the validation split (fixed across runs of a study)", ranges.SEED),
    "augment": Option("name", None, "one of " + ", ".join(AUGMENTS)),
    "pad": Option("int", 4, "pixels of reflect padding before the random crop", ranges.PAD),
    "path": Option("str", None, "file or folder for `npz` and `imagefolder` data"),
}

TRAIN_SETTINGS: dict[str, Option] = {
    "epochs": Option("int", 200, range=ranges.EPOCHS),
    "batch": Option("int", 64, range=ranges.BATCH),
    "optimizer": Option("call", "sgd"),
    "schedule": Option("call", "constant"),
    "seed": Option("int", 0, range=ranges.SEED),
}

NODE_ATTRIBUTES: dict[str, str] = {
    "target": "the node whose accuracy is reported first and maximised by search",
    "frozen": "a pre-trained teacher: loaded or pre-trained on labels, never updated",
    "init": "a checkpoint (.pt) to initialise the node from",
    "combine": "how an ensemble averages its members: `mean_logits` (default) or `mean_probs`",
    "view": "the augmented batch a network reads: `shared` (default) or `own`, its own augmentation",
}


def dataset_names() -> list[str]:
    from dclang.data.catalog import DATASETS

    return sorted(DATASETS)


def dataset_info(name: str):
    from dclang.data.catalog import DATASETS

    return DATASETS.get(name)
