"""Artifacts: checkpoints as safetensors (tensors only, never pickles) with a manifest
(kind, config, build arguments, metrics, sha256 of every file), and the run record
(resolved config, seed, package versions, git commit) written next to results."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch
import yaml

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, was modified after it was written, or is not tensors-only."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def save_artifact(directory, tensors: dict[str, dict[str, torch.Tensor]], meta: dict) -> Path:
    """Write ``{name: state_dict}`` as ``name.safetensors`` files plus ``manifest.json``.

    The directory is written under a temporary name and renamed at the end, so a killed
    writer never leaves a half-written artifact that looks complete.
    """
    from safetensors.torch import save_file
    final = Path(directory)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for name, sd in tensors.items():
        fname = f"{name}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / fname))
        files[fname] = sha256_file(tmp / fname)
    _write_json_atomic(tmp / MANIFEST, {**meta, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"no artifact at {directory} (missing {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def load_state(path) -> dict[str, torch.Tensor]:
    """Load one tensors-only file: ``.safetensors`` (no code can run) or ``.pt`` through
    ``torch.load(weights_only=True)``.  Anything else, or a file holding pickled
    objects, is refused with :class:`CheckpointError`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file ({e}); refused "
                                  "(raymia never unpickles checkpoints)") from None
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path} holds more than tensors (pickled code or objects): refused. "
                                  f"torch said: {first}") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} is not a state dict of tensors; refused")
        return obj
    raise CheckpointError(f"{path}: unsupported checkpoint type (use .safetensors or a tensors-only .pt)")


def load_artifact(directory) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Verify every file's sha256 against the manifest and load the tensors."""
    directory = Path(directory)
    man = read_manifest(directory)
    out = {}
    for fname, digest in man.get("files", {}).items():
        p = directory / fname
        if not p.exists():
            raise CheckpointError(f"artifact {directory}: file {fname} listed in the manifest is missing")
        actual = sha256_file(p)
        if actual != digest:
            raise CheckpointError(f"artifact {directory}: {fname} was modified after it was written "
                                  f"(sha256 {actual[:12]}… != manifest {digest[:12]}…); refused")
        out[Path(fname).stem] = load_state(p)
    return man, out


def artifact_exists(directory) -> bool:
    return (Path(directory) / MANIFEST).exists()


# ----------------------------------------------------------------------------- run record

_PACKAGES = ("raymia", "torch", "torchvision", "numpy", "scikit-image", "pandas", "ray", "scipy", "safetensors")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    out["machine"] = machine()
    return out


def machine() -> dict:
    """What the numbers' float arithmetic ran on: trained weights (a GAN's above all) are not
    bit-identical across CPUs whose kernels differ (torch picks its kernels by the CPU's
    vector extensions), so a record names the CPU and the capability torch used."""
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        cap = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"arch": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(), "torch_cpu_capability": cap, "gpu": gpu}


def git_commit(cwd: Optional[Path] = None) -> Optional[str]:
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("RAYMIA_GIT_COMMIT")


def write_run_record(out_dir, cfg, extra: Optional[dict] = None) -> dict:
    """Write ``config.yaml`` (resolved) and ``run.json`` (seed, versions, commit, command)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rec = {"seed": cfg.run.seed, "versions": versions(), "git_commit": git_commit(),
           "command": sys.argv, "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           **(extra or {})}
    _write_json_atomic(out_dir / "run.json", rec)
    return rec
