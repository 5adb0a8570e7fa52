"""Training pipeline: R_T, R_E, the defender's G (on D) and the attacker's F (on the
auxiliary set) as concurrent Ray Tune trials; existing artifacts are reused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from ..artifacts import read_manifest, write_run_record
from ..config import Config
from ..kinds import BASE_KINDS
from ..runtime import out_dir


def run(cfg: Config, out: Optional[str] = None, address: Optional[str] = None) -> Path:
    """Train whatever base artifact is missing; writes ``train_summary.json`` and the
    generators' sample grids to the run directory (``out``: default <out_root>/<run.name>)."""
    from ..distributed.training import ensure_artifacts
    run_dir = out_dir(cfg, out, "train").parent if out is None else Path(out).expanduser().resolve()
    write_run_record(run_dir / "train", cfg)
    dirs = ensure_artifacts(cfg, BASE_KINDS, address)
    summary = {}
    for k, d in dirs.items():
        man = read_manifest(d)
        summary[k] = {"artifact": str(d), **man.get("metrics", {})}
        if (d / "samples.png").exists():
            shutil.copy(d / "samples.png", run_dir / f"samples_{k}.png")
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    for k, m in summary.items():
        acc = f"test accuracy {m['test_acc']:.3f}" if "test_acc" in m else f"{m.get('seconds', 0):.0f}s"
        print(f"[train] {k:13s} {acc}  ({m['artifact']})")
    print(f"[train] outputs: {run_dir}")
    return run_dir
