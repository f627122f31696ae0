"""A graph's part of the fused engine: its models, schedule, statistics layout and evaluation.

The fused engine (`dclang.compile.engine.Engine`) does one forward, one backward and one
optimizer step per batch for all the graphs it holds (one for `dclang run`, K packed trials
for a search worker). Summing every node's loss into one scalar and calling backward once
gives each node exactly the gradient of its own loss, because every edge detaches its source
(paper 3.1): node t's parameters only appear in L_t. One optimizer with a single parameter
group then updates all trainable nodes of a graph with multi-tensor (`foreach`) kernels. A
single group is exact, not an approximation: the `train` block gives every node the same
hyperparameters, and SGD, Adam and AdamW keep their state (momentum, moments, step count)
per parameter, so one optimizer over all nodes computes what one optimizer per node does.

`FusedStep` is what the engine holds per graph: everything of a `TrainStep` but the update,
which is the engine's (it has no optimizer of its own and no `step`).
"""

from __future__ import annotations

from torch import Tensor

from dclang.compile.common import StepStats, TrainStep


class FusedStep(TrainStep):
    engine = "fused"

    def step(self, images: Tensor, labels: Tensor, k: int) -> StepStats:
        raise TypeError("a graph of the fused engine is stepped by its engine (`dclang.compile.engine.Engine`)")
