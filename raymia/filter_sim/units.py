"""What the filter sweep simulates: the configurations (Table 1's ``paper-k``, their
SSIM data-range ablation ``paper-k-L255`` and the grid), the simulated sessions
(reported and calibration sessions, regular users under two protocols)
(:class:`Unit`) with their stable ids, and the seeds derived from a setting's key.

A unit's id (:meth:`Unit.uid`) names its result file under ``OUT/units/``: it hashes the
unit, the setting's key (:func:`setting_key`) and the parameters of its bank, so a rerun
with the same settings finds every finished unit and a changed setting recomputes."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..config import Config, ConfigError, FilterCfg, FilterSimCfg
from ..defenses.filter import FilterParams
from ..paper import PAPER_TABLE1

# ----------------------------------------------------------------------------- configurations

NO_FILTER = "none"


def paper_name(k: int) -> str:
    return f"paper-{k}"


def paper_k(name: str) -> int:
    """k for a Table 1 config's name ``paper-k``, else 0."""
    parts = name.split("-")
    return int(parts[1]) if len(parts) == 2 and parts[0] == "paper" and parts[1].isdigit() else 0


def is_ablation(name: str) -> bool:
    """Table 1 configs run with another SSIM data range (``paper-k-L255``) or SSIM window
    (``paper-k-G11``)."""
    parts = name.split("-")
    return len(parts) == 3 and parts[0] == "paper" and parts[2][:1] in ("L", "G")


def is_window_ablation(name: str) -> bool:
    """Table 1 configs run with another SSIM window (``paper-k-G11`` / ``paper-k-U7``):
    simulated in units of their own, so the units of the other configs keep their ids."""
    return is_ablation(name) and name.split("-")[2][:1] in ("G", "U")


WINDOW_TAG = {"gaussian11": "G11", "uniform7": "U7"}


def config_name(p: FilterParams) -> str:
    return f"nb{p.n_b}-s{p.t_ssim:g}-h{p.t_hash:g}-l{p.l_sp}"


def base_params(fc: FilterCfg) -> FilterParams:
    """The section's own filter (hash size and data range apply to every config)."""
    return FilterParams.from_config(fc)


def sweep_configs(cfg: Config) -> dict[str, FilterParams]:
    """Table 1's configurations (``paper-k``, sections ``filter_sweep`` and
    ``filter_sim.paper_setting``) and the grid, deduplicated (a grid point equal to a
    Table 1 config keeps the paper's name), in a stable order."""
    base = base_params(cfg.filter)
    sw, setting = cfg.filter_sweep, cfg.filter_sim.paper_setting
    out: dict[str, FilterParams] = {}
    for k in sw.paper_configs:
        out[paper_name(k)] = FilterParams.paper(k, setting, hash_size=base.hash_size,
                                                data_range=base.data_range)
    if sw.ablation_data_range:
        for k in sw.paper_configs:
            out[f"{paper_name(k)}-L{sw.ablation_data_range:g}"] = FilterParams.paper(
                k, setting, hash_size=base.hash_size, data_range=sw.ablation_data_range)
    win = sw.ablation_ssim_window
    if win and win != base.ssim_window:
        for k in sw.paper_configs:
            out[f"{paper_name(k)}-{WINDOW_TAG[win]}"] = FilterParams.paper(
                k, setting, hash_size=base.hash_size, data_range=base.data_range, ssim_window=win)
    seen = set(out.values())
    l_sps = list(sw.grid_l_sp) or [PAPER_TABLE1[0]["l_sp"][setting]]
    for n_b in sw.grid_n_b:
        for t_s in sw.grid_t_ssim:
            for t_h in sw.grid_t_hash:
                for l_sp in l_sps:
                    p = FilterParams(n_b=n_b, t_ssim=t_s, t_hash=t_h, l_sp=l_sp, hash_size=base.hash_size,
                                     data_range=base.data_range, ssim_window=base.ssim_window)
                    if p not in seen:
                        seen.add(p)
                        out[config_name(p)] = p
    return out


def _bank_key(bank: dict) -> list:
    return [[n, None if p is None else p.to_dict()] for n, p in sorted(bank.items())]


# ----------------------------------------------------------------------------- units

#: regular-user protocols: ``paper`` -- per trial one random held-out test image of the
#: label (the paper's section 4.5), the trials of a setting sent in one client session;
#: ``sequence`` -- a user session of several distinct images of the label (stronger)
USER_PROTOCOLS = ("paper", "sequence")
REPORT, CALIB = "report", "calib"
#: attack trials of the calibration sessions: rep = CALIB_REP0 + r (other seeds than the report's reps)
CALIB_REP0 = 1000


@dataclass(frozen=True)
class Unit:
    setting: str                 # preset the unit belongs to (one trained R_T / R_E)
    kind: str                    # attack | user | noise | sybil | population
    label: int = -1
    rep: int = 0
    noise: float = 0.0
    k: int = 1                   # sybil: client ids; paper-protocol users: trials per label
    bank: tuple = ()             # config names simulated together
    protocol: str = ""           # users: "" = sequence (the original sessions) | "paper"
    role: str = ""               # "" = reported sessions | "calib" = calibration sessions

    def uid(self, cfg_key: str, configs: dict) -> str:
        """Stable id; the fields added later (``protocol``, ``role``) enter only when set,
        so the units that existed before them keep their ids (and cached results)."""
        bank = {n: configs.get(n) for n in self.bank}
        u = {k: v for k, v in asdict(self).items() if not (k in ("protocol", "role") and v == "")}
        payload = json.dumps({"unit": u, "cfg": cfg_key, "bank": _bank_key(bank)}, sort_keys=True)
        return f"{self.setting}-{self.kind}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"

    @property
    def user_protocol(self) -> str:
        return self.protocol or "sequence"

    @property
    def session_role(self) -> str:
        return self.role or REPORT


#: ``filter_sim`` fields that a unit's rows do not depend on (they choose which units
#: exist, and every unit carries its own noise level and k)
_NOT_IN_KEY = ("noise_grid", "sybil_k", "actors", "user_protocol", "judge_at_stop")


#: fields of ``data`` and of the model sections (``target``, ``evaluator``) added after the
#: key was introduced: left out at their default, so that the keys of earlier runs stay the
#: same (a non-default value changes the key)
_LATER_DEFAULTS = {"fold": 0, "adv_eps": 0.0, "adv_steps": 5, "adv_step": 0.0}


def _without_later_defaults(section: dict) -> dict:
    return {k: v for k, v in section.items() if not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])}


def setting_key(cfg: Config) -> str:
    """Hash of everything a setting's units depend on (data, models, seed, simulation
    parameters; not the sweep grid, which enters through each unit's bank).

    The hashed ``filter`` entry is the flat dict of the config's single ``filter``
    section before it was split into ``filter`` / ``filter_sim`` / ``filter_sweep``
    (hash_size, data_range, the simulation settings and ablation_data_range), so the
    keys -- and every unit id and result file under ``OUT/units/`` -- stay those of
    earlier runs with the same settings.  Fields added to ``data`` or to the model
    sections later (:data:`_LATER_DEFAULTS`) enter only when they differ from their defaults."""
    d = cfg.to_dict()
    f = {"hash_size": d["filter"]["hash_size"], "data_range": d["filter"]["data_range"],
         **{k: v for k, v in d["filter_sim"].items() if k not in _NOT_IN_KEY},
         "ablation_data_range": d["filter_sweep"]["ablation_data_range"]}
    payload = {"data": _without_later_defaults(d["data"]), "target": _without_later_defaults(d["target"]),
               "evaluator": _without_later_defaults(d["evaluator"]), "seed": cfg.run.seed,
               "lr": cfg.attack.fredrikson_lr, "filter": f}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def derive_seed(*parts) -> int:
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def resolve_labels(sim: FilterSimCfg, n_classes: int) -> list[int]:
    labels = list(sim.labels) or list(range(n_classes))
    bad = [x for x in labels if not 0 <= x < n_classes]
    if bad:
        raise ConfigError(f"filter_sim.labels: unknown label(s) {bad}; R_T has classes 0..{n_classes - 1}")
    return sorted(set(labels))


def user_protocols(sim: FilterSimCfg) -> list[str]:
    """The regular-user protocols of ``filter_sim.user_protocol`` (``both``: paper, sequence)."""
    return list(USER_PROTOCOLS) if sim.user_protocol == "both" else [sim.user_protocol]


def main_units(setting: str, sim: FilterSimCfg, n_classes: int, bank: list[str]) -> list[Unit]:
    """The paper's simulations (the reported sessions): attack trials per label, then the
    regular users of each protocol -- ``sequence``: one session of distinct images per
    (label, rep), ids as before the protocols existed; ``paper``: one unit holding the
    setting's per-trial single test images (``user_trials_per_label`` per label)."""
    labels = resolve_labels(sim, n_classes)
    protos = user_protocols(sim)
    units = [Unit(setting, "attack", lab, r, float(sim.noise_std), 1, tuple(bank))
             for lab in labels for r in range(sim.trials_per_label)]
    if "sequence" in protos:
        units += [Unit(setting, "user", lab, r, 0.0, 1, tuple(bank))
                  for lab in labels for r in range(sim.user_trials_per_label)]
    if "paper" in protos and sim.user_trials_per_label:
        units.append(Unit(setting, "user", -1, 0, 0.0, int(sim.user_trials_per_label), tuple(bank), "paper"))
    return units


def calib_units(setting: str, sim: FilterSimCfg, sweep, n_classes: int, bank: list[str]) -> list[Unit]:
    """Calibration sessions, disjoint from the reported ones: ``filter_sweep.calib_trials_per_label``
    attack trials per label with other seeds (rep = CALIB_REP0 + r), and per protocol
    ``filter_sweep.calib_user_trials_per_label`` regular users per label -- sequence
    users rep = user_trials_per_label + r (the label's next disjoint slice of images when
    the pool allows it), paper-protocol trials drawn from the other half of each label's
    held-out images (rep 1).  Empty when calibration uses the reported sessions."""
    labels = resolve_labels(sim, n_classes)
    b = tuple(bank)
    units = [Unit(setting, "attack", lab, CALIB_REP0 + r, float(sim.noise_std), 1, b, "", CALIB)
             for lab in labels for r in range(sweep.calib_trials_per_label)]
    nu = sweep.calib_user_trials_per_label
    protos = user_protocols(sim)
    if "sequence" in protos:
        units += [Unit(setting, "user", lab, sim.user_trials_per_label + r, 0.0, 1, b, "", CALIB)
                  for lab in labels for r in range(nu)]
    if "paper" in protos and nu:
        units.append(Unit(setting, "user", -1, 1, 0.0, int(nu), b, "paper", CALIB))
    return units


def sequence_slice(pool_size: int, sim: FilterSimCfg, rep: int) -> tuple[int, bool]:
    """(images per sequence session, whether user ``rep`` gets its own disjoint slice of
    the label's seeded order) -- the rule of :meth:`SimContext.user_session`."""
    users = max(1, sim.user_trials_per_label)
    n = min(sim.user_queries, pool_size)
    if pool_size // users >= 2:
        n = min(n, pool_size // users)
        if (rep + 1) * n <= pool_size:
            return n, True
    return n, False


def calib_images_disjoint(sim: FilterSimCfg, sweep, pool_sizes: dict, test_sizes: dict) -> dict:
    """Per protocol: do the calibration users send images no reported user sends?"""
    out = {}
    nu = sweep.calib_user_trials_per_label
    if nu and "sequence" in user_protocols(sim):
        out["sequence"] = all(sequence_slice(n, sim, 0)[1] and
                              all(sequence_slice(n, sim, sim.user_trials_per_label + r)[1] for r in range(nu))
                              for n in pool_sizes.values())
    if nu and "paper" in user_protocols(sim):
        out["paper"] = all(n >= 2 for n in test_sizes.values())
    return out


def extra_units(setting: str, sim: FilterSimCfg, n_classes: int, bank: list[str]) -> list[Unit]:
    """Beyond the paper: noise sweep, Sybil attacker, cross-client false positives."""
    labels = resolve_labels(sim, n_classes)[:sim.extra_labels]
    b = tuple(bank)
    units = [Unit(setting, "noise", lab, 0, float(s), 1, b + (NO_FILTER,)) for s in sim.noise_grid for lab in labels]
    units += [Unit(setting, "sybil", lab, 0, float(sim.noise_std), int(k), b) for k in sim.sybil_k for lab in labels]
    if sim.user_trials_per_label:
        units.append(Unit(setting, "population", -1, 0, 0.0, 1, b))
    return units
