"""Train R_T, R_E, the defender's GAN G (on the private set D) and the attacker's
generator F (on the auxiliary set) as concurrent Ray Tune trials.

    python jobs/train.py [--preset orl] [--set target.epochs=30]
    ray job submit --working-dir . -- python jobs/train.py

Artifacts whose config hash already exists are reused (a rerun retrains nothing)."""
import _bootstrap  # noqa: F401

import json
import shutil

from raymia import cli
from raymia.artifacts import artifact_exists, read_manifest, write_run_record
from raymia.distributed import init_ray, resolve_out_root, run_training
from raymia.training import KIND_SECTIONS, artifact_dir

BASE_KINDS = list(KIND_SECTIONS)


def train_base(cfg, address=None) -> dict:
    """Train whatever base artifact is missing; return {kind: artifact dir}."""
    dirs = {k: artifact_dir(cfg, k) for k in BASE_KINDS}
    missing = [k for k, d in dirs.items() if not artifact_exists(d)]
    for k, d in dirs.items():
        if k not in missing:
            print(f"[train] reusing {k}: {d}", flush=True)
    if missing:
        print(f"[train] training {', '.join(missing)} as Ray Tune trials", flush=True)
        init_ray(cfg, address)
        run_training(cfg, missing)
    return dirs


def main():
    args = cli.parser(__doc__.splitlines()[0]).parse_args()
    cfg = cli.config_from_args(args)
    root = resolve_out_root(cfg)
    run_dir = root / cfg.run.name
    write_run_record(run_dir / "train", cfg)
    dirs = train_base(cfg, args.address)
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


if __name__ == "__main__":
    cli.run_main(main)
