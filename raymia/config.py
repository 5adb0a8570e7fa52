"""One config tree for every raymia run: dataclasses <-> YAML presets.

A preset is a YAML file in ``raymia/presets`` (``orl`` is the default).  A preset
may name another preset under ``extends:`` and then only lists what differs.
Command-line overrides use dotted keys: ``--set target.epochs=3``.  Unknown keys
anywhere (preset, override, saved config) raise :class:`ConfigError` naming the
key and the keys that are valid at that level.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config key or value that raymia cannot use; the message says which."""


@dataclass
class RunCfg:
    name: str = "orl"            # results go to <out_root>/<name>/
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    out_root: str = "runs"
    threads: int = 0             # torch threads per process; 0 = leave as is


@dataclass
class DataCfg:
    name: str = "orl"            # orl | mnist5k | digits | imagefolder | celeba | mnist
    root: Optional[str] = None   # local path for user data sets (never downloaded)
    image_size: int = 32
    private_ids: int = 20        # identities of the victim R_T (private set D)
    train_per_id: int = 7        # R_T's training images per identity
    test_per_id: int = 3         # R_T's held-out images per identity
    eval_ids: int = 0            # identities of the evaluator R_E; 0 = all
    eval_test_per_id: int = 3    # R_E's held-out images per identity
    aux_lfw: bool = True         # add skimage's 100 LFW faces to the attacker's auxiliary set
    max_per_id: int = 0          # cap images per identity for large folders (0 = all)
    celeba_target: str = "identity"   # identity | attr
    celeba_attrs: list = field(default_factory=lambda: ["Male", "Smiling"])
    split_seed: int = 0


@dataclass
class ClassifierCfg:
    arch: str = "faceresnet"     # faceresnet | smallcnn | lenet5
    width: int = 32
    blocks: list = field(default_factory=lambda: [1, 1, 1])
    embed_dim: int = 128
    loss: str = "cosface"        # cosface | ce
    cos_s: float = 16.0
    cos_m: float = 0.2
    epochs: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 5e-4
    augment: bool = True
    dropout: float = 0.0


@dataclass
class GanCfg:
    latent_dim: int = 64
    ngf: int = 32
    ndf: int = 32
    iters: int = 1500
    batch_size: int = 32
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    diffaug: str = "color,translation,cutout"   # DiffAugment policy ("" = off)
    mbd_features: int = 16       # minibatch discrimination: B (0 = off)
    mbd_kernel: int = 8          # minibatch discrimination: C
    bn_calib_batches: int = 20   # batches used to re-estimate G's BatchNorm statistics


@dataclass
class DummyCfg:
    variant: str = "paper"       # paper | calibrated
    sigma2: float = 1.0          # z_i ~ N(0, sigma2 I)
    sigma_tilde2: float = 0.0625 # z_il ~ N(z_i, sigma_tilde2 I)
    m: int = 50                  # neighbours per anchor
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    calib_weight: float = 1.0    # weight of the uniform-on-real-faces term (calibrated only)


@dataclass
class AttackCfg:
    iters: int = 300
    lr: float = 0.05
    restarts: int = 3
    targets: list = field(default_factory=list)   # empty = every R_T identity
    latent_bound: float = 3.0    # latent kept in [-b, b] (prior's range)
    batch_rows: int = 256        # (target, restart, alpha) rows per attack call
    fredrikson_iters: int = 200
    fredrikson_lr: float = 0.1


@dataclass
class SweepCfg:
    alpha_start: float = 0.0
    alpha_stop: float = 1.0
    alpha_step: float = 0.05
    alphas: list = field(default_factory=list)    # explicit grid overrides start/stop/step
    variants: list = field(default_factory=lambda: ["paper", "calibrated"])
    grid_alphas: list = field(default_factory=lambda: [1.0, 0.7, 0.5, 0.25, 0.1])
    bootstrap: int = 1000
    accuracy_tolerance: float = 0.01


@dataclass
class ResourcesCfg:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.25       # used only when GPUs exist
    attack_workers: int = 0            # 0 = one per GPU, or 1 on CPU
    object_store_mb: int = 256


@dataclass
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    target: ClassifierCfg = field(default_factory=ClassifierCfg)
    evaluator: ClassifierCfg = field(default_factory=ClassifierCfg)
    gan: GanCfg = field(default_factory=GanCfg)
    attacker_gan: GanCfg = field(default_factory=GanCfg)
    dummy: DummyCfg = field(default_factory=DummyCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    sweep: SweepCfg = field(default_factory=SweepCfg)
    resources: ResourcesCfg = field(default_factory=ResourcesCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Stable short hash of the named sections (used to key artifacts)."""
        d = self.to_dict()
        payload = {n: d[n] for n in names}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- building

def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = get_origin(typ)
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    if typ is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return list(value)
    return value


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {updates!r}")
    hints = get_type_hints(type(obj))
    valid = {f.name for f in fields(obj)}
    for k, v in updates.items():
        key = prefix + str(k)
        if k not in valid:
            raise ConfigError(
                f"unknown config key '{key}'; valid keys here: {', '.join(sorted(valid))}")
        cur = getattr(obj, k)
        if is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_layers(name: str, seen: tuple = ()) -> list[dict]:
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(available_presets())} "
                          "(or a path to a .yaml file)")
    if str(path) in seen:
        raise ConfigError(f"preset '{name}' extends itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a mapping")
    parent = data.pop("extends", None)
    layers = _preset_layers(parent, seen + (str(path),)) if parent else []
    return layers + [data]


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(preset: str = "orl", overrides: Optional[list[str]] = None) -> Config:
    """Build a :class:`Config` from a preset and ``key=value`` overrides."""
    cfg = Config()
    for layer in _preset_layers(preset):
        _apply(cfg, layer)
    for item in overrides or []:
        key, value = parse_override(item)
        _apply(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _apply(cfg, d)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Reject values no stage could use, with the key in the message."""
    d = cfg.data
    _check(d.name in ("orl", "mnist5k", "digits", "imagefolder", "celeba", "mnist"),
           f"data.name must be one of orl, mnist5k, digits, imagefolder, celeba, mnist; got {d.name!r}")
    _check(d.image_size >= 8 and d.image_size & (d.image_size - 1) == 0,
           f"data.image_size must be a power of two >= 8, got {d.image_size}")
    _check(d.private_ids >= 2, "data.private_ids must be >= 2")
    _check(d.train_per_id >= 1 and d.test_per_id >= 1, "data.train_per_id and data.test_per_id must be >= 1")
    for sec in ("target", "evaluator"):
        c: ClassifierCfg = getattr(cfg, sec)
        _check(c.arch in ("faceresnet", "smallcnn", "lenet5"), f"{sec}.arch must be faceresnet, smallcnn or lenet5")
        _check(c.loss in ("cosface", "ce"), f"{sec}.loss must be cosface or ce")
        _check(c.epochs >= 1 and c.batch_size >= 1 and c.lr > 0, f"{sec}: epochs, batch_size and lr must be positive")
    for sec in ("gan", "attacker_gan"):
        g: GanCfg = getattr(cfg, sec)
        _check(g.latent_dim >= 1 and g.iters >= 1 and g.batch_size >= 2, f"{sec}: latent_dim, iters >= 1, batch_size >= 2")
    dm = cfg.dummy
    _check(dm.variant in ("paper", "calibrated"), f"dummy.variant must be paper or calibrated, got {dm.variant!r}")
    _check(dm.sigma2 > 0 and dm.sigma_tilde2 > 0, "dummy.sigma2 and dummy.sigma_tilde2 must be > 0")
    _check(dm.m >= 1, "dummy.m must be >= 1")
    _check(cfg.attack.restarts >= 1 and cfg.attack.iters >= 1, "attack.restarts and attack.iters must be >= 1")
    for v in cfg.sweep.variants:
        _check(v in ("paper", "calibrated"), f"sweep.variants: unknown variant {v!r} (paper, calibrated)")
    alpha_grid(cfg.sweep)  # raises on a bad grid


def alpha_grid(s: SweepCfg) -> list[float]:
    """The α values of a sweep, validated: all in [0, 1], at least one."""
    if s.alphas:
        grid = []
        for a in s.alphas:
            if isinstance(a, bool) or not isinstance(a, (int, float)):
                raise ConfigError(f"sweep.alphas: {a!r} is not a number")
            grid.append(float(a))
    else:
        if not (0.0 <= s.alpha_start <= 1.0 and 0.0 <= s.alpha_stop <= 1.0):
            raise ConfigError("sweep.alpha_start and sweep.alpha_stop must lie in [0, 1]")
        if s.alpha_step <= 0:
            raise ConfigError("sweep.alpha_step must be > 0")
        if s.alpha_stop < s.alpha_start:
            raise ConfigError("sweep.alpha_stop must be >= sweep.alpha_start")
        n = int(round((s.alpha_stop - s.alpha_start) / s.alpha_step))
        grid = [round(s.alpha_start + i * s.alpha_step, 6) for i in range(n + 1)]
        if grid[-1] < s.alpha_stop - 1e-9:
            grid.append(float(s.alpha_stop))
    bad = [a for a in grid if not (0.0 <= a <= 1.0)]
    if bad:
        raise ConfigError(f"sweep.alphas: values outside [0, 1]: {bad}")
    if not grid:
        raise ConfigError("sweep.alphas is empty")
    return sorted(set(grid), reverse=True)


def add_cli_args(parser) -> None:
    parser.add_argument("--preset", default="orl",
                        help=f"config preset ({', '.join(available_presets())}) or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set target.epochs=3 (repeatable)")
