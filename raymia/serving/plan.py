"""The serving plan: which artifacts (R_T, R_dmy of one variant) and which alpha an app
serves, where its filter state lives, and the released model built from it.

:func:`resolve_plan` finds the artifacts and the alpha (explicit ``serve.alpha`` or the
alpha sweep's ``recommendation.json``) and fails with one message naming the command
that creates what is missing; :func:`load_serving_model` builds the released model (the
combined model R', or R_T alone for benchmarks) from a plan."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import Config, ConfigError, config_from_dict, load_config

RECOMMENDATION = "recommendation.json"


class ServeSetupError(ConfigError):
    """Something the served config points at does not exist yet (artifacts, alpha
    recommendation); the message names the command that creates it."""


@dataclass
class ServingPlan:
    """What one app serves; everything resolved to absolute paths."""
    target_dir: str
    dummy_dir: Optional[str]           # None when serve.model == "target"
    variant: Optional[str]
    alpha: Optional[float]
    alpha_source: str                  # "serve.alpha" | path of recommendation.json | "none"
    state_path: str                    # the filter states: a SQLite file, or serve.state_url (PostgreSQL)
    model: str                         # combined | target
    combine: Optional[dict] = None     # the config's combine section (rule, gate_tau, gate_temp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def creation_command(preset: str = "orl") -> str:
    """The command that trains the artifacts of a preset and writes its recommendation."""
    return "make demo" if preset == "orl" else f"make demo ARGS='--preset {preset}'"


def recommendation_path(cfg: Config) -> Path:
    s = cfg.serve.recommendation
    return Path(s) if s else Path(cfg.run.out_root) / cfg.run.name / "alpha_sweep" / RECOMMENDATION


def state_path(cfg: Config) -> Path:
    s = cfg.serve.state_path
    return Path(s) if s else Path(cfg.run.out_root) / cfg.run.name / "serve" / "filter_state.sqlite"


def state_locator(cfg: Config) -> str:
    """Where the filter states live: ``serve.state_url`` (PostgreSQL) when set, else the
    absolute path of the SQLite file."""
    return cfg.serve.state_url or str(state_path(cfg).resolve())


def _missing(cfg: Config, what: list[str], where: Path, preset: str) -> ServeSetupError:
    serve_cmd = "make serve" if preset == "orl" else f"make serve ARGS='--preset {preset}' SERVE_ARGS='preset={preset}'"
    return ServeSetupError(
        f"nothing to serve yet: no {', '.join(what)} for run '{cfg.run.name}' under {where}. "
        f"Create them with `{creation_command(preset)}` (trains the models and runs the alpha sweep), "
        f"or run `{serve_cmd}` to train and serve in one command")


def _pick_variant(rec: dict, path: Path) -> tuple[str, float]:
    """``auto``: the variant whose recommended alpha has the lowest MIA success."""
    cands = [(r.get("mia_success_top5", math.inf), v, r["alpha"])
             for v, r in (rec.get("variants") or {}).items() if isinstance(r, dict) and r.get("alpha") is not None]
    if not cands:
        raise ServeSetupError(f"{path} recommends no alpha for any variant; set serve.variant and serve.alpha")
    _, v, a = min(cands, key=lambda c: (c[0], c[1]))
    return v, float(a)


def _check_rec_matches(cfg: Config, rec_path: Path, variant: str, preset: str) -> None:
    """Refuse a recommendation that the alpha sweep computed for other models."""
    from ..defenses.dummy import dummy_artifact_dir
    from ..kinds import artifact_dir
    sweep_cfg_path = rec_path.parent / "config.yaml"
    if not sweep_cfg_path.exists():
        return
    import yaml
    try:
        sweep_cfg = config_from_dict(yaml.safe_load(sweep_cfg_path.read_text()))
    except (ConfigError, yaml.YAMLError):
        return   # an older or hand-edited config: nothing to compare with
    ours = (artifact_dir(cfg, "target").name, dummy_artifact_dir(cfg, variant).name)
    theirs = (artifact_dir(sweep_cfg, "target").name, dummy_artifact_dir(sweep_cfg, variant).name)
    if ours != theirs:
        raise ServeSetupError(
            f"{rec_path} was computed for other models ({theirs[0]}, {theirs[1]}) than the ones this config "
            f"serves ({ours[0]}, {ours[1]}); rerun the alpha sweep with this config (`{creation_command(preset)}`) "
            "or set serve.alpha explicitly")
    if sweep_cfg.combine != cfg.combine:
        raise ServeSetupError(
            f"{rec_path} was computed for the combination rule {dataclasses.asdict(sweep_cfg.combine)}, this config "
            f"serves {dataclasses.asdict(cfg.combine)}; rerun the alpha sweep with this config "
            f"(`{creation_command(preset)}`) or set serve.alpha explicitly")


def resolve_plan(cfg: Config, preset: str = "orl") -> ServingPlan:
    """Locate the models and alpha for ``cfg`` (``run.out_root`` must be absolute, see
    :func:`raymia.runtime.resolve_out_root`); raise :class:`ServeSetupError` naming
    the command that creates whatever is missing."""
    from ..artifacts import artifact_exists
    from ..defenses.dummy import dummy_artifact_dir
    from ..kinds import artifact_dir
    s = cfg.serve
    root = Path(cfg.run.out_root) / cfg.run.name / "artifacts"
    target = artifact_dir(cfg, "target")
    sp = state_locator(cfg)
    if s.model == "target":
        if not artifact_exists(target):
            raise _missing(cfg, ["target model R_T"], root, preset)
        return ServingPlan(str(target.resolve()), None, None, None, "none", sp, "target")
    variant, alpha, source = s.variant, s.alpha, "serve.alpha"
    rec_path = recommendation_path(cfg)
    if alpha is None or variant == "auto":
        if not rec_path.exists():
            if s.recommendation:
                raise ServeSetupError(f"serve.recommendation: {rec_path} does not exist")
            missing = [] if artifact_exists(target) else ["target model R_T"]
            raise _missing(cfg, missing + [f"alpha recommendation ({rec_path})"], root.parent, preset)
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ServeSetupError(f"{rec_path} is not a readable recommendation ({e}); "
                                  f"rerun `{creation_command(preset)}`") from None
        if variant == "auto":
            variant, rec_alpha = _pick_variant(rec, rec_path)
        else:
            r = (rec.get("variants") or {}).get(variant)
            if not isinstance(r, dict) or r.get("alpha") is None:
                raise ServeSetupError(f"{rec_path} has no recommended alpha for variant '{variant}'"
                                      + (f" ({r['reason']})" if isinstance(r, dict) and r.get("reason") else "")
                                      + "; set serve.alpha or another serve.variant")
            rec_alpha = float(r["alpha"])
        if alpha is None:
            alpha, source = rec_alpha, str(rec_path.resolve())
            _check_rec_matches(cfg, rec_path, variant, preset)
    dummy = dummy_artifact_dir(cfg, variant)
    missing = [n for n, d in (("target model R_T", target), (f"dummy model R_dmy ({variant})", dummy))
               if not artifact_exists(d)]
    if missing:
        raise _missing(cfg, missing, root, preset)
    return ServingPlan(str(target.resolve()), str(dummy.resolve()), variant, float(alpha), source, sp, "combined",
                       dataclasses.asdict(cfg.combine))


def load_serving_model(plan: ServingPlan, device="cpu", fold_bn: bool = False):
    """The released model of ``plan``: :class:`~raymia.defenses.dummy.CombinedModel`
    (R_T and R_dmy at the plan's alpha) or R_T alone as softmax, frozen; with ``fold_bn``
    its BatchNorms are folded into the preceding layers (inference only).  Returns
    (model, n_classes, image_shape)."""
    from ..defenses.dummy import CombinedModel, load_dummy
    from ..models import ProbModel, fold_batchnorm, freeze
    from ..training import load_classifier
    rt, man = load_classifier(plan.target_dir, device)
    if plan.model == "target":
        model = ProbModel(rt)
    else:
        dm, _, _ = load_dummy(plan.dummy_dir, device)
        model = CombinedModel(rt, dm, plan.alpha, **(plan.combine or {}))
    model = freeze(model.to(device))
    return (fold_batchnorm(model) if fold_bn else model), int(man["n_classes"]), tuple(man["image_shape"])


def filter_params(cfg: Config):
    """The detector Serve runs (``filter.kind``): Algorithm 2's
    :class:`~raymia.defenses.filter.FilterParams` from the ``filter`` section, or the robust
    detector's :class:`~raymia.defenses.filter.robust.RobustParams` from ``robust_filter``."""
    from ..defenses.filter import FilterParams
    from ..defenses.filter.robust import RobustParams
    if cfg.filter.kind == "robust":
        return RobustParams.from_config(cfg.robust_filter)
    return FilterParams.from_config(cfg.filter)


def config_from_serve_args(args: Mapping[str, Any]) -> Config:
    """``serve run serve.app [preset=NAME|PATH.yaml] [section.key=value ...]``."""
    args = dict(args or {})
    preset = str(args.pop("preset", "orl"))
    return load_config(preset, [f"{k}={v}" for k, v in args.items()])
