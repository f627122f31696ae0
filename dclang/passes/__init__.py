"""The checks of the language, one module each, run in the order of `PASSES`.

Each pass is a function `(module, graph) -> list[Diagnostic]`: it reads the AST (for exact
spans) and the IR (for meaning), collects every problem it finds, and never raises. A
diagnostic from one pass never stops the next, so a user sees every mistake at once.
"""

from __future__ import annotations

from dclang.passes.check_branches import check_branches
from dclang.passes.check_checkpoints import check_checkpoints
from dclang.passes.check_data import check_data
from dclang.passes.check_ema import check_ema
from dclang.passes.check_ensembles import check_ensembles
from dclang.passes.check_inputs import check_inputs
from dclang.passes.check_layers import check_layers
from dclang.passes.check_learned_ensembles import check_learned_ensembles
from dclang.passes.check_names import check_names
from dclang.passes.check_reachability import check_reachability
from dclang.passes.check_structure import check_structure
from dclang.passes.check_values import check_values
from dclang.passes.check_views import check_views

PASSES = (check_names, check_values, check_structure, check_ensembles, check_learned_ensembles, check_ema,
          check_branches, check_inputs, check_layers, check_reachability, check_checkpoints, check_data, check_views)

__all__ = ["PASSES", "check_branches", "check_checkpoints", "check_data", "check_ema", "check_ensembles",
           "check_inputs", "check_layers", "check_learned_ensembles", "check_names", "check_reachability",
           "check_structure", "check_values", "check_views"]
