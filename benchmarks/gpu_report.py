"""Gather what `benchmarks/gpu.sh` ran into one JSON: the card, the CUDA tests' outcome, the
benches' and the packed search's figures, each part's exit code and seconds.

    python benchmarks/gpu_report.py WORK_DIR OUT.json TOTAL_SECONDS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_part(work: Path, name: str) -> dict:
    """A part's exit code, seconds, and its stdout (parsed when it is JSON)."""
    rc_file = work / f"{name}.rc"
    if not rc_file.is_file():
        return {"ran": False}
    rc, seconds = (int(x) for x in rc_file.read_text().split())
    out = (work / f"{name}.out").read_text() if (work / f"{name}.out").is_file() else ""
    err = (work / f"{name}.err").read_text() if (work / f"{name}.err").is_file() else ""
    part: dict = {"ran": True, "exit_code": rc, "seconds": seconds, "timed_out": rc in (124, 137)}
    try:
        part["result"] = json.loads(out)
    except ValueError:
        part["output_tail"] = (out + err)[-2000:]
    return part


def card() -> dict:
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {"torch": torch.__version__, "cuda": None}
    return {"name": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}


def report(work: Path, total_seconds: int) -> dict:
    parts = {name: read_part(work, name) for name in ("tests", "bench_kd_dml", "bench_dml4", "pack", "pack_ops")}
    pack_json = work / "pack.json"
    if pack_json.is_file() and "result" not in parts["pack"]:
        parts["pack"]["result"] = json.loads(pack_json.read_text())
    return {"card": card(), "total_seconds": total_seconds,
            "ok": all(p.get("exit_code") == 0 for p in parts.values()), **parts}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    work, out, total = Path(args[0]), Path(args[1]), int(args[2])
    result = report(work, total)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}: {'all parts passed' if result['ok'] else 'some parts failed, see the file'} "
          f"in {total} s on {result['card'].get('name', 'no GPU')}")


if __name__ == "__main__":
    main()
