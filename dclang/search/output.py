"""What a search leaves in its output folder, all derived from the study's trials.

```
OUT/
  trials/NNNN.kt     every sampled graph (trial NNNN), its outcome in a header comment
  best/R_trialNNNN.kt  the top-k COMPLETE graphs, best first, as trained (dead nodes dropped):
                     each passes `dclang check` and re-runs with `dclang run`
  best.svg           the best graph, drawn (needs Graphviz's `dot`)
  leaderboard.csv    one row per trial: rank, state, target val accuracy, epochs, parameters
  summary.json       counts, the budget used, the rungs, the best trial
```

Nothing here is the source of truth: the study is. The files are rewritten from it at the end
of every `dclang search` (also an interrupted one), so they always describe the whole study.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from dclang.checkpoints import atomic_write_text
from dclang.search.study import StudyConfig, interrupted

_STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3,
                TrialState.FAIL: 4}


def epochs_reported(trial: FrozenTrial) -> int:
    """The last epoch with a validation accuracy (reported or, for a duplicate, copied)."""
    return max(trial.intermediate_values, default=0)


def trained_epochs(trial: FrozenTrial) -> int:
    """Epochs this trial trained itself: a duplicate trained none, a killed trial some."""
    return 0 if "duplicate_of" in trial.user_attrs else len(trial.intermediate_values)


def val_accuracy(trial: FrozenTrial) -> float | None:
    if trial.state == TrialState.COMPLETE:
        return trial.value
    return trial.intermediate_values.get(epochs_reported(trial))


def note(trial: FrozenTrial) -> str:
    """Why a trial is what it is, in a few words (the leaderboard's last column)."""
    attrs = trial.user_attrs
    parts = []
    if "retry_of" in attrs:
        parts.append(f"retry of trial {attrs['retry_of']}")
    if "duplicate_of" in attrs:
        renamed = ", ".join(f"{a} as {b}" for a, b in attrs.get("renamed", {}).items())
        parts.append(f"same graph as trial {attrs['duplicate_of']}" + (f" with {renamed}" if renamed else "")
                     + ", not trained again")
    if "invalid" in attrs:
        parts.append("invalid: " + attrs["invalid"].splitlines()[0])
    if "error" in attrs:
        parts.append("error: " + attrs["error"].splitlines()[0])
    if "failed" in attrs:
        parts.append("failed: " + attrs["failed"])
    if attrs.get("dropped"):
        parts.append("dead nodes not trained: " + ", ".join(attrs["dropped"]))
    return "; ".join(parts)


def leaderboard(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials by validation accuracy (best first), then PRUNED by how far they got,
    then the rest by number. Pruned trials stopped at different epochs, so their accuracies
    rank them only within one epoch."""
    def key(t: FrozenTrial):
        acc = val_accuracy(t)
        acc = -acc if acc is not None else 0.0
        if t.state == TrialState.COMPLETE:
            return (0, acc, t.number)
        if t.state == TrialState.PRUNED:
            return (1, -epochs_reported(t), acc, t.number)
        return (1 + _STATE_ORDER.get(t.state, 5), t.number)

    return sorted(trials, key=key)


def top_graphs(trials: list[FrozenTrial], k: int) -> list[FrozenTrial]:
    """The first k COMPLETE trials of the leaderboard with distinct graphs (a duplicate is
    the same graph as its original, so it is skipped)."""
    out, seen = [], set()
    for t in leaderboard(trials):
        if t.state != TrialState.COMPLETE or len(out) == k:
            break
        if t.user_attrs.get("graph") in seen:
            continue
        seen.add(t.user_attrs.get("graph"))
        out.append(t)
    return out


def trained_text(kt: str) -> tuple[str, list[str]]:
    """A trial's sampled text without its dead nodes: the graph that was trained."""
    from dclang.api import check
    from dclang.search.space import drop_dead_nodes
    from dclang.syntax.format import format_module

    checked = check(kt)
    module, dropped = drop_dead_nodes(checked.module, checked.graph)
    return (format_module(module) if dropped else kt), dropped


def renamed(text: str, suffix: str) -> str:
    """`text` with `suffix` added to its graph's name: `dclang run` puts a graph into
    runs/<its name>, so each best graph, named after its trial, gets a run folder of its own."""
    from dataclasses import replace

    from dclang.api import parse
    from dclang.syntax import ast
    from dclang.syntax.format import format_module

    module = parse(text)
    items = tuple(replace(item, name=replace(item.name, text=item.name.text + suffix))
                  if isinstance(item, ast.GraphDecl) else item
                  for item in module.items)
    return format_module(replace(module, items=items))


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def rung_table(trials: list[FrozenTrial], config: StudyConfig) -> list[dict[str, int]]:
    """Per rung: how many trials that trained reached its epoch, and how many the pruner
    stopped there. The last line is the last epoch: trials that completed."""
    trained = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               and "duplicate_of" not in t.user_attrs]
    rungs = config.rungs()
    rows = []
    for i, epoch in enumerate(rungs):
        upto = rungs[i + 1] if i + 1 < len(rungs) else config.epochs
        rows.append({"epoch": epoch, "reached": sum(epochs_reported(t) >= epoch for t in trained),
                     "stopped": sum(t.state == TrialState.PRUNED and epoch <= epochs_reported(t) < upto
                                    for t in trained)})
    rows.append({"epoch": config.epochs, "reached": sum(epochs_reported(t) >= config.epochs for t in trained),
                 "stopped": 0})
    return rows


def summarize(trials: list[FrozenTrial], config: StudyConfig, *, study: str) -> dict[str, Any]:
    """summary.json (without the files written, which `write_outputs` adds)."""
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    failed = by_state[TrialState.FAIL]
    finished = len(by_state[TrialState.COMPLETE]) + len(by_state[TrialState.PRUNED])
    used = sum(trained_epochs(t) for t in trials)
    full = config.trials * config.epochs
    best = top_graphs(trials, 1)
    return {
        "study": study,
        "template": config.template_path,
        "config": {k: getattr(config, k) for k in ("sampler", "seed", "pruner", "eta", "min_resource", "epochs",
                                                    "trials")},
        "trials": {
            "finished": finished,
            "complete": len(by_state[TrialState.COMPLETE]),
            "pruned": len(by_state[TrialState.PRUNED]),
            "failed": len(failed),
            "invalid": sum("invalid" in t.user_attrs for t in failed),
            "errors": sum("error" in t.user_attrs for t in failed),
            "interrupted": sum(interrupted(t) for t in failed),
            "worker_died": sum("failed" in t.user_attrs and not interrupted(t) for t in failed),
            "duplicates": sum("duplicate_of" in t.user_attrs for t in trials),
            "retries": sum("retry_of" in t.user_attrs for t in trials),
            "running": len(by_state[TrialState.RUNNING]),
            "waiting": len(by_state[TrialState.WAITING]),
        },
        "budget": {"epochs_trained": used, "trials_x_epochs": full, "fraction": used / full if full else None,
                   "note": "epochs trained by the trials themselves (killed trials included, duplicates "
                           "not); pre-training frozen teachers is not counted"},
        "rungs": rung_table(trials, config),
        "best": None if not best else {"trial": best[0].number, "val_acc": best[0].value, "params": best[0].params},
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The printed summary: counts, budget, rungs, best."""
    t, b, cfg = summary["trials"], summary["budget"], summary["config"]
    line = (f"search `{summary['study']}`: {t['finished']} of {cfg['trials']} trials finished "
            f"({t['complete']} complete, {t['pruned']} pruned"
            + (f"; {t['duplicates']} of them duplicates, not trained again" if t["duplicates"] else "") + ")")
    why = [f"{t[k]} {k.replace('_', ' ')}" for k in ("invalid", "errors", "interrupted", "worker_died") if t[k]]
    if t["failed"]:
        line += f", {t['failed']} failed ({', '.join(why)})" if why else f", {t['failed']} failed"
    line += "".join(f", {t[k]} {k}" for k in ("retries", "running", "waiting") if t[k])
    lines = [line]
    fraction = f" ({100 * b['fraction']:.0f}%)" if b["fraction"] is not None else ""
    lines.append(f"budget: {b['epochs_trained']} epochs trained of {cfg['trials']} trials × {cfg['epochs']} "
                 f"epochs = {b['trials_x_epochs']}{fraction}")
    rungs = summary["rungs"]
    parts = [f"epoch {r['epoch']}: {r['reached']} reached, {r['stopped']} stopped" for r in rungs[:-1]]
    parts.append(f"epoch {rungs[-1]['epoch']}: {rungs[-1]['reached']} completed")
    lines.append("rungs: " + " | ".join(parts))
    best = summary["best"]
    if best is None:
        lines.append("best: none yet (no trial completed)")
    else:
        where = f" -> {summary['files']['best'][0]}" if summary.get("files", {}).get("best") else ""
        lines.append(f"best: trial {best['trial']}, target val accuracy {_percent(best['val_acc'])}{where}")
    return lines


def write_outputs(trials: list[FrozenTrial], config: StudyConfig, out: Path, *, study: str,
                  top_k: int) -> dict[str, Any]:
    """Write every file of the output folder from the trials; returns the summary."""
    from dclang.api import check, parse
    from dclang.draw import render
    from dclang.search.space import search_space

    out = Path(out)
    for t in trials:
        if "kt" in t.user_attrs:
            acc = val_accuracy(t)
            head = [f"# trial {t.number} of study `{study}`: {t.state.name}"
                    + (f", target val accuracy {_percent(acc)} at epoch {epochs_reported(t)}" if acc is not None
                       else "")]
            if note(t):
                head.append(f"# {note(t)}")
            atomic_write_text("\n".join(head) + "\n" + t.user_attrs["kt"], out / "trials" / f"{t.number:04d}.kt")

    if (out / "best").is_dir():
        shutil.rmtree(out / "best")  # a resumed study may rank other graphs best
    best_files = []
    best_graph = None
    for rank, t in enumerate(top_graphs(trials, top_k), start=1):
        text, dropped = trained_text(t.user_attrs["kt"])
        text = renamed(text, f"_trial{t.number:04d}")
        head = [f"# best {rank} of study `{study}`: trial {t.number}, target val accuracy {_percent(t.value)} "
                f"after {epochs_reported(t)} epochs",
                f"# sampled graph: trials/{t.number:04d}.kt"
                + (f" (dead nodes not trained, left out here: {', '.join(dropped)})" if dropped else "")]
        path = out / "best" / f"{rank}_trial{t.number:04d}.kt"
        atomic_write_text("\n".join(head) + "\n" + text, path)
        best_files.append(str(path))
        if rank == 1:
            best_graph = check(text, str(path)).graph

    params = [p.name for p in search_space(parse(config.template))]  # the template's order
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "trial", "state", "val_acc", "epochs", "trained_epochs", "graph", "same_as", *params,
                     "note"])
    rank = 0
    for t in leaderboard(trials):
        acc = val_accuracy(t)
        rank += t.state == TrialState.COMPLETE
        writer.writerow([rank if t.state == TrialState.COMPLETE else "", t.number, t.state.name,
                         "" if acc is None else f"{acc:.4f}", epochs_reported(t), trained_epochs(t),
                         t.user_attrs.get("graph", "")[:12], t.user_attrs.get("duplicate_of", ""),
                         *[t.params.get(p, "") for p in params], note(t)])
    atomic_write_text(buffer.getvalue(), out / "leaderboard.csv")

    summary = summarize(trials, config, study=study)
    files: dict[str, Any] = {"leaderboard": str(out / "leaderboard.csv"), "trials": str(out / "trials"),
                             "best": best_files}
    if best_graph is not None:
        if shutil.which("dot") is None:
            files["best_svg"] = None
            summary["notes"] = ["best.svg not drawn: Graphviz's `dot` is not installed"]
        else:
            files["best_svg"] = str(render(best_graph, out / "best.svg"))
    summary["files"] = files
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    return summary


__all__ = ["epochs_reported", "leaderboard", "note", "rung_table", "summarize", "summary_lines", "top_graphs",
           "trained_epochs", "val_accuracy", "write_outputs"]
