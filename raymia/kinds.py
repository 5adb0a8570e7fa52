"""The artifact-kind registry: every trained model raymia stores, in one table.

A kind names the config sections that determine it (besides ``data`` and ``run.seed``),
its seed, how it is trained and how it is loaded.  The artifact directory is keyed by
those sections (``<out_root>/<run.name>/artifacts/<kind>-<hash>/``), so a rerun with
the same config retrains nothing and any change to them trains a new one.

``target`` (R_T), ``evaluator`` (R_E), ``gan`` (the defender's G, on D),
``attacker_gan`` (the attacker's F, on the auxiliary set) and ``dummy-<variant>``
(R_dmy, one per variant of :data:`DUMMY_VARIANTS`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import Config
from .config import DUMMY_VARIANTS  # noqa: F401  (re-exported: the variants have kinds here)


@dataclass(frozen=True)
class Kind:
    name: str
    family: str              # classifier | generator | dummy: which trainer/loader
    sections: tuple          # config sections (besides data) that determine the artifact
    seed_offset: int         # seed = run.seed * 1000 + seed_offset
    variant: Optional[str] = None   # dummy kinds: the R_dmy variant
    needs: tuple = ()        # kinds whose artifacts training this one reads

    def config(self, cfg: Config) -> Config:
        """The config this kind is trained from (a dummy kind fixes its own variant)."""
        if self.variant is None:
            return cfg
        return dataclasses.replace(cfg, dummy=dataclasses.replace(cfg.dummy, variant=self.variant))

    def seed(self, run_seed: int, draw: int = 0) -> int:
        """``draw`` > 0: an independent redraw of the same kind (R_dmy's report draw)."""
        return int(run_seed) * 1000 + self.seed_offset + DRAW_STRIDE * int(draw)

    def key(self, cfg: Config) -> dict:
        """What determines the artifact: kind, seed and its sections, each reduced to the
        values that differ from the section's defaults (a field added to the config later,
        whose default keeps the old behaviour, leaves every existing key unchanged)."""
        c = self.config(cfg)
        d, default = c.to_dict(), Config().to_dict()
        key = {"seed": c.run.seed, "kind": self.name}
        for s in ("data",) + self.sections:
            key[s] = {k: v for k, v in d[s].items() if k not in default[s] or default[s][k] != v}
        return key

    def dir(self, cfg: Config) -> Path:
        h = hashlib.sha256(json.dumps(self.key(cfg), sort_keys=True).encode()).hexdigest()[:12]
        return Path(cfg.run.out_root) / cfg.run.name / "artifacts" / f"{self.name}-{h}"

    def train(self, cfg: Config, bundle=None, progress=None) -> Path:
        """Train and store this artifact unless it exists; returns its directory."""
        if self.family == "dummy":
            from .defenses.dummy import train_dummy_artifact
            return train_dummy_artifact(cfg, self.variant, bundle, progress)
        from .training import train_artifact
        return train_artifact(cfg, self.name, bundle, progress)

    def load(self, cfg: Config, device="cpu"):
        """The stored model, frozen on ``device`` (R_dmy: (model, anchors, manifest);
        the others: (model, manifest))."""
        from . import training
        if self.family == "dummy":
            from .defenses.dummy import load_dummy
            return load_dummy(self.dir(cfg), device)
        loader = training.load_classifier if self.family == "classifier" else training.load_generator
        return loader(self.dir(cfg), device)


BASE_KINDS = ("target", "evaluator", "gan", "attacker_gan")
DRAW_STRIDE = 7919       # seed step between independent draws (a prime: no collision with the offsets)
# seed offsets 1..4 follow the names' sorted order.  Every R_dmy variant shares offset 100:
# the variants are compared paired (same anchors, same neighbours, same seed); they differ
# only in their training objective.
KINDS: dict[str, Kind] = {
    "attacker_gan": Kind("attacker_gan", "generator", ("attacker_gan",), 1),
    "evaluator": Kind("evaluator", "classifier", ("evaluator",), 2),
    "gan": Kind("gan", "generator", ("gan",), 3),
    "target": Kind("target", "classifier", ("target",), 4),
    **{f"dummy-{v}": Kind(f"dummy-{v}", "dummy", ("target", "gan", "dummy"), 100, v, ("gan",)) for v in DUMMY_VARIANTS},
}


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown artifact kind {name!r}; known: {', '.join(KINDS)}") from None


def dummy_kind(variant: str) -> Kind:
    return kind(f"dummy-{variant}")


def artifact_dir(cfg: Config, name: str) -> Path:
    return kind(name).dir(cfg)


def missing(cfg: Config, names) -> list[str]:
    """The kinds among ``names`` whose artifact is not stored yet."""
    from .artifacts import artifact_exists
    return [n for n in names if not artifact_exists(kind(n).dir(cfg))]
