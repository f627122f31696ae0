"""Model zoo: every network a node can be, built by name with `build_model`.

Three kinds of model: the built-in architectures of the experiments (`resnet32`, `wrn28_2`,
`cnn_tiny`, ...: `build`), a library's models (`torchvision.resnet18`, `timm.NAME`: `library`)
and the models installed packages register under the `dclang.models` entry points (`plugins`).

Python imports this package before any of its modules, and `dclang check` reads `library`
and `plugins` to validate names without torch; so the torch-based names are imported on
first use (PEP 562 module `__getattr__`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dclang.lazy import lazy_exports

if TYPE_CHECKING:  # the lazy names below, for type checkers and IDEs
    from dclang.models.build import BUILDERS, build_model, count_parameters, parameter_counts
    from dclang.models.cifar_resnet import CifarResNet
    from dclang.models.wide_resnet import WideResNet, parse_wrn_name

_LAZY = {
    "BUILDERS": "dclang.models.build", "build_model": "dclang.models.build",
    "count_parameters": "dclang.models.build", "parameter_counts": "dclang.models.build",
    "CifarResNet": "dclang.models.cifar_resnet", "WideResNet": "dclang.models.wide_resnet",
    "parse_wrn_name": "dclang.models.wide_resnet",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = sorted(_LAZY)
