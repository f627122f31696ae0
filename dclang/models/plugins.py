"""The user's own models, registered by an installed package under the entry-point group
`dclang.models`:

```toml
[project.entry-points."dclang.models"]
tiny_mixer = "my_models.nets:tiny_mixer"
```

`node s : tiny_mixer` then builds `my_models.nets.tiny_mixer(num_classes=..., in_channels=...,
image_size=..., **args)`, the three from the data and `args` as written in the `.kt` file
(`tiny_mixer(width=32)`). A `.kt` file can only name what an installed package registered:
listing the group reads the installed packages' metadata and imports nothing, and only the
registered module of a name the file uses is imported (to check its arguments, and to build).
Built-in names win over a plugin of the same name (`dclang models` marks it shadowed).
"""

from __future__ import annotations

import inspect
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from dclang.diagnostics import UserError

GROUP = "dclang.models"
#: what every factory receives from the data
SET_BY_DCLANG = ("num_classes", "in_channels", "image_size")


def registered() -> dict[str, EntryPoint]:
    """Every model an installed package registered, by name (reads metadata, imports nothing)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def factory(name: str) -> Callable[..., Any]:
    """The registered factory of `name`, imported; a package that fails to import is the
    user's to fix, so it is a message, not a traceback."""
    ep = registered()[name]
    try:
        return ep.load()
    except Exception as exc:  # whatever importing the user's package raises
        raise UserError(f"model `{name}` is registered as `{ep.value}`, which cannot be loaded: "
                        f"{type(exc).__name__}: {exc}",
                        f"fix or reinstall the package that registers it ({ep.dist.name if ep.dist else 'unknown'})"
                        ) from exc


def constructor_args(name: str) -> tuple[str, ...] | None:
    """The arguments `name`'s factory takes besides the three from the data; None when it
    takes any (`**kwargs`)."""
    params = inspect.signature(factory(name)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params
                 if p.name not in SET_BY_DCLANG and p.kind is not inspect.Parameter.VAR_POSITIONAL)


def argument_problems(name: str, args: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """{argument: (message, help)} for every argument `name`'s factory cannot take."""
    from dclang.diagnostics import did_you_mean

    takes = constructor_args(name)
    out = {}
    for key in args:
        if key in SET_BY_DCLANG:
            out[key] = (f"`{key}` is set by dclang", f"`{key}` comes from the data; leave it out")
        elif takes is not None and key not in takes:
            out[key] = (f"`{name}` takes no argument `{key}`",
                        did_you_mean(key, takes, "arguments") or "its factory takes no other arguments")
    return out


def build(name: str, args: dict[str, Any], num_classes: int, in_channels: int, image_size: int):
    """The registered model `name`, built for the data with `args`."""
    from torch import nn

    net = factory(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **args)
    if not isinstance(net, nn.Module):
        raise UserError(f"model `{name}`'s factory ({registered()[name].value}) returned a "
                        f"{type(net).__name__}, not a torch.nn.Module", "return the network from the factory")
    return net
