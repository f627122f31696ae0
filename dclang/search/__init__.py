"""Search over a template's `choice(...)` sites with Optuna and ASHA (paper 3.5).

`space` turns a template into named parameters and a parameter assignment into a concrete,
checked graph; `study` holds the Optuna study and its upkeep; `worker` trains trials;
`output` writes the output folder; `command` is `dclang search`. This package imports
neither torch nor optuna, so `dclang check` stays fast: the modules that need them import
them.
"""

from dclang.search.space import (
           Parameter,
           Realized,
           drop_dead_nodes,
           graph_key,
           prepare_template,
           realize,
           sample,
           search_space,
)

#: the samplers and pruners a study can be created with (`--sampler`, `--pruner`)
SAMPLERS = ("random", "tpe")
PRUNERS = ("asha", "hyperband", "none")

__all__ = ["PRUNERS", "SAMPLERS", "Parameter", "Realized", "drop_dead_nodes", "graph_key", "prepare_template",
           "realize", "sample", "search_space"]
