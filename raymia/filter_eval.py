"""Simulations and metrics of the similarity-filter paper (Raha et al., sections 4.5-5),
plain torch/numpy (``raymia.distributed`` spreads the units over Ray actors).

A *unit* is one simulated session, run live query by query through a *bank* of filter
configurations at once (each configuration has its own :class:`ClientFilterState`, so
the result for one configuration is exactly what a server running only that
configuration would have done: the attacker's queries do not depend on the filter's
answers until it is refused):

* ``attack``     Fredrikson's attack on R_T for one label, Gaussian noise added before
                 every query, until every configuration of the bank has blocked it or
                 ``filter.max_iters`` queries were answered;
* ``user``       a regular user sending distinct images of one label, no noise;
* ``noise``      the attack with another noise level (the adaptive attacker);
* ``sybil``      the attack spread round-robin over ``k`` client ids, with and without
                 the cross-client :class:`GlobalIndex`;
* ``population`` every regular user of a setting at once (interleaved), with the
                 cross-client check on: its false-positive cost.

Metrics (Eqs. 2-5): an attack trial is a positive, a regular-user trial a negative;
TP = attack trials blocked, FN = attack trials never blocked within ``max_iters``,
FP = users blocked, TN = users never blocked.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .attacks.fredrikson import fredrikson_attack
from .config import Config, ConfigError, FilterCfg
from .defenses.filter import PAPER_TABLE1, ClientFilterState, FilterParams, MultiClientFilter, mean_hash, ssim_batch

# ----------------------------------------------------------------------------- the paper's numbers

#: Table 2 (MNIST): max iterations before detection per label '0'..'9'
PAPER_TABLE2 = {1: [390, 845, 1324, 652, 1015, 1142, 895, 727, 1115, 1162],
                2: [1275, 1178, 584, 936, 961, 878, 1060, 911, 1235, 1005],
                3: [68, 308, 52, 57, 83, 43, 71, 133, 80, 82]}
#: Table 3 (CelebA, 4 attribute classes): max iterations before detection
PAPER_TABLE3 = {1: [1478, 1462, 1127, 1698], 2: [1581, 2552, 1733, 1561], 3: [305, 124, 948, 1489]}
PAPER_CELEBA_LABELS = ["Male", "Female", "Bangs", "Eyeglasses"]
#: Tables 4 and 5: false detections of regular users per label (3 users per label)
PAPER_TABLE4 = {1: [0, 0, 0, 2, 0, 0, 2, 0, 1, 1], 2: [1, 0, 1, 0, 1, 0, 0, 0, 1, 1], 3: [1, 0, 0, 0, 0, 2, 1, 1, 1, 1]}
PAPER_TABLE5 = {1: [0, 1, 0, 0], 2: [0, 0, 0, 0], 3: [0, 1, 1, 0]}
#: Table 6: accuracy, precision, recall, F1 (%) per configuration
PAPER_TABLE6 = {"mnist": {1: (90.00, 83.33, 100.00, 90.91), 2: (91.67, 85.71, 100.00, 92.31),
                          3: (88.33, 81.08, 100.00, 89.55)},
                "celeba": {1: (95.83, 92.31, 100.00, 96.00), 2: (100.00, 100.00, 100.00, 100.00),
                           3: (91.67, 85.71, 100.00, 92.31)}}
#: attack / regular-user trials behind Table 6 (3 per label)
PAPER_TRIALS = {"mnist": 30, "celeba": 12}


def paper_reference(setting: str) -> dict:
    """The paper's per-config numbers for ``mnist`` or ``celeba`` (our face setting is
    compared with CelebA, the paper's face data)."""
    t_iter, t_fp = (PAPER_TABLE2, PAPER_TABLE4) if setting == "mnist" else (PAPER_TABLE3, PAPER_TABLE5)
    out = {}
    for k in (1, 2, 3):
        acc, prec, rec, f1 = PAPER_TABLE6[setting][k]
        n = PAPER_TRIALS[setting]
        out[k] = {"accuracy": acc / 100, "precision": prec / 100, "recall": rec / 100, "f1": f1 / 100,
                  "fp": sum(t_fp[k]), "fpr": sum(t_fp[k]) / n, "iters_max": max(t_iter[k]),
                  "iters_median_of_label_max": float(np.median(t_iter[k])), "per_label_max": t_iter[k],
                  "per_label_fp": t_fp[k]}
    return out


# ----------------------------------------------------------------------------- configurations

NO_FILTER = "none"


def paper_name(k: int) -> str:
    return f"paper-{k}"


def paper_k(name: str) -> int:
    """k for a Table 1 config's name ``paper-k``, else 0."""
    parts = name.split("-")
    return int(parts[1]) if len(parts) == 2 and parts[0] == "paper" and parts[1].isdigit() else 0


def is_ablation(name: str) -> bool:
    """Table 1 configs run with another SSIM data range (``paper-k-L255``)."""
    parts = name.split("-")
    return len(parts) == 3 and parts[0] == "paper" and parts[2].startswith("L")


def config_name(p: FilterParams) -> str:
    return f"nb{p.n_b}-s{p.t_ssim:g}-h{p.t_hash:g}-l{p.l_sp}"


def base_params(fc: FilterCfg) -> FilterParams:
    """The section's own filter (hash size and data range apply to every config)."""
    return FilterParams.from_obj(fc)


def sweep_configs(fc: FilterCfg) -> dict[str, FilterParams]:
    """Table 1's configurations (``paper-k``) and the grid, deduplicated (a grid point
    equal to a Table 1 config keeps the paper's name), in a stable order."""
    base = base_params(fc)
    out: dict[str, FilterParams] = {}
    for k in fc.paper_configs:
        out[paper_name(k)] = FilterParams.paper(k, fc.paper_setting, hash_size=base.hash_size,
                                                data_range=base.data_range)
    if fc.ablation_data_range:
        for k in fc.paper_configs:
            out[f"{paper_name(k)}-L{fc.ablation_data_range:g}"] = FilterParams.paper(
                k, fc.paper_setting, hash_size=base.hash_size, data_range=fc.ablation_data_range)
    seen = set(out.values())
    l_sps = list(fc.grid_l_sp) or [PAPER_TABLE1[0]["l_sp"][fc.paper_setting]]
    for n_b in fc.grid_n_b:
        for t_s in fc.grid_t_ssim:
            for t_h in fc.grid_t_hash:
                for l_sp in l_sps:
                    p = FilterParams(n_b=n_b, t_ssim=t_s, t_hash=t_h, l_sp=l_sp, hash_size=base.hash_size,
                                     data_range=base.data_range)
                    if p not in seen:
                        seen.add(p)
                        out[config_name(p)] = p
    return out


def params_table(configs: dict[str, FilterParams]) -> pd.DataFrame:
    return pd.DataFrame([{"config": n, "paper": paper_k(n), "ablation": is_ablation(n),
                          "n_b": p.n_b, "t_ssim": p.t_ssim, "t_hash": p.t_hash, "l_sp": p.l_sp}
                         for n, p in configs.items()])


def _bank_key(bank: dict) -> list:
    return [[n, None if p is None else p.to_dict()] for n, p in sorted(bank.items())]


# ----------------------------------------------------------------------------- units

@dataclass(frozen=True)
class Unit:
    setting: str                 # preset the unit belongs to (one trained R_T / R_E)
    kind: str                    # attack | user | noise | sybil | population
    label: int = -1
    rep: int = 0
    noise: float = 0.0
    k: int = 1
    bank: tuple = ()             # config names simulated together

    def uid(self, cfg_key: str, configs: dict) -> str:
        bank = {n: configs.get(n) for n in self.bank}
        payload = json.dumps({"unit": asdict(self), "cfg": cfg_key, "bank": _bank_key(bank)}, sort_keys=True)
        return f"{self.setting}-{self.kind}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def setting_key(cfg: Config) -> str:
    """Hash of everything a setting's units depend on (data, models, seed, simulation
    parameters; not the sweep grid, which enters through each unit's bank)."""
    d = cfg.to_dict()
    f = dict(d["filter"])
    for k in ("paper_configs", "grid_n_b", "grid_t_ssim", "grid_t_hash", "grid_l_sp", "fpr_target",
              "noise_grid", "sybil_k", "actors", "n_b", "t_ssim", "t_hash", "l_sp"):
        f.pop(k, None)
    payload = {"data": d["data"], "target": d["target"], "evaluator": d["evaluator"], "seed": cfg.run.seed,
               "lr": cfg.attack.fredrikson_lr, "filter": f}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def derive_seed(*parts) -> int:
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def resolve_labels(fc: FilterCfg, n_classes: int) -> list[int]:
    labels = list(fc.labels) or list(range(n_classes))
    bad = [x for x in labels if not 0 <= x < n_classes]
    if bad:
        raise ConfigError(f"filter.labels: unknown label(s) {bad}; R_T has classes 0..{n_classes - 1}")
    return sorted(set(labels))


def main_units(setting: str, fc: FilterCfg, n_classes: int, bank: list[str]) -> list[Unit]:
    """The paper's simulations: attack and regular-user trials per label."""
    labels = resolve_labels(fc, n_classes)
    units = [Unit(setting, "attack", lab, r, float(fc.noise_std), 1, tuple(bank))
             for lab in labels for r in range(fc.trials_per_label)]
    units += [Unit(setting, "user", lab, r, 0.0, 1, tuple(bank))
              for lab in labels for r in range(fc.user_trials_per_label)]
    return units


def extra_units(setting: str, fc: FilterCfg, n_classes: int, bank: list[str]) -> list[Unit]:
    """Beyond the paper: noise sweep, Sybil attacker, cross-client false positives."""
    labels = resolve_labels(fc, n_classes)[:fc.extra_labels]
    b = tuple(bank)
    units = [Unit(setting, "noise", lab, 0, float(s), 1, b + (NO_FILTER,)) for s in fc.noise_grid for lab in labels]
    units += [Unit(setting, "sybil", lab, 0, float(fc.noise_std), int(k), b) for k in fc.sybil_k for lab in labels]
    if fc.user_trials_per_label:
        units.append(Unit(setting, "population", -1, 0, 0.0, 1, b))
    return units


# ----------------------------------------------------------------------------- simulation context

class SimContext:
    """What one setting's simulations need: R_T (attacked, softmax outputs), R_E
    (judges reconstructions), the regular users' image pools and the filter section."""

    def __init__(self, cfg: Config, device="cpu", bundle=None, target=None, evaluator=None):
        """``target`` / ``evaluator``: logit classifiers; loaded from the config's
        artifacts when not given."""
        from .data import load_bundle
        from .models import ProbModel
        from .training import artifact_dir, load_classifier
        self.cfg, self.fc, self.device = cfg, cfg.filter, torch.device(device)
        b = bundle or load_bundle(cfg.data)
        rt = target if target is not None else load_classifier(artifact_dir(cfg, "target"), self.device)[0]
        self.target = ProbModel(rt.to(self.device)).eval()
        self.evaluator = (evaluator if evaluator is not None else
                          load_classifier(artifact_dir(cfg, "evaluator"), self.device)[0]).to(self.device).eval()
        self.private_to_eval = b.private_to_eval
        self.shape = tuple(b.private_train.x.shape[1:])
        self.n_classes = b.n_private
        self.class_names = list(b.class_names)
        if self.fc.user_pool == "all":
            xs, ys = torch.cat([b.private_train.x, b.private_test.x]), torch.cat([b.private_train.y, b.private_test.y])
        else:
            xs, ys = b.private_test.x, b.private_test.y
        self.pools = {int(c): xs[ys == c].numpy().astype(np.float32) for c in torch.unique(ys).tolist()}
        self.key = setting_key(cfg)

    def seed(self, *parts) -> int:
        return derive_seed(self.key, *parts)

    def user_session(self, label: int, rep: int) -> np.ndarray:
        """Distinct images of ``label`` for regular user ``rep``: the label's pool in a
        seeded order, users of a label taking disjoint slices when the pool allows it
        (else each user draws its own distinct images)."""
        pool = self.pools[label]
        users = max(1, self.fc.user_trials_per_label)
        n = min(self.fc.user_queries, len(pool))
        if len(pool) // users >= 2:
            n = min(n, len(pool) // users)
            order = np.random.default_rng(self.seed("users", label)).permutation(len(pool))
            return pool[order[rep * n:(rep + 1) * n]]
        order = np.random.default_rng(self.seed("user", label, rep)).permutation(len(pool))
        return pool[order[:n]]

    @torch.no_grad()
    def judge(self, images: list, label: int) -> tuple[np.ndarray, np.ndarray]:
        """R_T confidence in ``label`` and R_E top-1 == label for attacker images."""
        if not images:
            return np.zeros(0), np.zeros(0, bool)
        x = torch.stack(images).to(self.device)
        conf = self.target(x)[:, label].float().cpu().numpy()
        top1 = (self.evaluator(x).argmax(1).cpu() == int(self.private_to_eval[label])).numpy()
        return conf, top1


# ----------------------------------------------------------------------------- attack sessions

class _Bank:
    """Several independent "servers" watching the same attacker's query stream; the
    gate refuses (ending the attack) only when every server has refused."""

    def __init__(self, servers: dict, keep_going: bool):
        self.servers = servers            # name -> callable(q: np.ndarray) -> bool (safe)
        self.active = dict(servers)
        self.keep_going = keep_going      # a no-filter reference runs to max_iters
        self.it = 0
        self.blocked_at: dict = {}
        self.x_at_stop: dict = {}
        self.x = None
        self.conf: list = []

    def observer(self, it, x, conf) -> None:
        self.x = x.cpu()
        self.conf.append(conf)

    def gate(self, q: torch.Tensor) -> bool:
        self.it += 1
        arr = q.numpy()
        for name, safe in list(self.active.items()):
            if not safe(arr):
                self.blocked_at[name] = self.it
                self.x_at_stop[name] = self.x
                del self.active[name]
        return bool(self.active) or self.keep_going


def _run_attack(ctx: SimContext, label: int, noise: float, seed: int, bank: _Bank):
    x0 = torch.full(ctx.shape, 0.5)
    bank.x = x0.clone()
    return fredrikson_attack(ctx.target, label, ctx.shape, iters=ctx.fc.max_iters, lr=ctx.cfg.attack.fredrikson_lr,
                             noise_std=noise, x0=x0, seed=seed, gate=bank.gate, device=ctx.device,
                             observer=bank.observer)


def _attack_rows(ctx: SimContext, unit: Unit, bank: _Bank, res, extra: Optional[dict] = None) -> list[dict]:
    """One row per server: when it blocked the attack and how far the attack had got."""
    fc = ctx.fc
    conf = np.asarray(bank.conf)
    hit = np.flatnonzero(conf >= fc.success_conf)
    first_success = int(hit[0]) + 1 if hit.size else math.nan
    names = list(bank.servers)
    xs = [bank.x_at_stop.get(n, res.image.cpu()) for n in names]
    conf_x, top1_x = ctx.judge(xs, unit.label)
    rows = []
    for i, n in enumerate(names):
        det = n in bank.blocked_at
        answered = bank.blocked_at[n] - 1 if det else res.queries
        rows.append({
            "setting": unit.setting, "kind": unit.kind, "config": n, "label": unit.label, "rep": unit.rep,
            "noise": unit.noise, "k": unit.k, "detected": det, "blocked_at": bank.blocked_at.get(n, math.nan),
            "iters_before_detection": answered if det else math.nan, "answered": answered,
            "max_iters": fc.max_iters, "first_success_query": first_success,
            "reached_target": bool(hit.size and first_success <= answered),
            "query_conf_at_stop": float(conf[answered - 1]) if answered >= 1 else math.nan,
            "x_conf_at_stop": float(conf_x[i]), "re_top1_at_stop": bool(top1_x[i]), **(extra or {}).get(n, {})})
    return rows


def attack_unit(ctx: SimContext, unit: Unit, configs: dict[str, FilterParams]) -> list[dict]:
    """``attack`` / ``noise`` units: one client, every config of the bank (and, for
    ``none``, no filter at all) on the same query stream."""
    servers = {}
    for n in unit.bank:
        if n == NO_FILTER:
            continue
        st = ClientFilterState(configs[n])
        servers[n] = lambda q, st=st: st.check(q).safe
    extra = {}
    if NO_FILTER in unit.bank:
        trace, prev = [], []

        def reference(q):       # no filter; records SSIM and hash distance to the previous query
            if prev:
                trace.append((float(ssim_batch(q[0], prev[0][0], data_range=ctx.fc.data_range)[0]),
                              abs(mean_hash(q, ctx.fc.hash_size) - mean_hash(prev[0], ctx.fc.hash_size))))
                prev[0] = q
            else:
                prev.append(q)
            return True
        servers[NO_FILTER] = reference
        extra[NO_FILTER] = {"ssim_prev": trace, "hash_diff_prev": trace}
    bank = _Bank(servers, keep_going=NO_FILTER in unit.bank)
    res = _run_attack(ctx, unit.label, unit.noise, ctx.seed("attack", unit.label, unit.rep, unit.noise), bank)
    if NO_FILTER in unit.bank:
        tr = np.asarray(extra[NO_FILTER]["ssim_prev"], np.float64).reshape(-1, 2)
        extra[NO_FILTER] = {"ssim_prev": tr[:, 0].tolist(), "hash_diff_prev": tr[:, 1].tolist()}
    return _attack_rows(ctx, unit, bank, res, extra)


def sybil_unit(ctx: SimContext, unit: Unit, configs: dict[str, FilterParams]) -> list[dict]:
    """The attacker spreads its queries round-robin over ``k`` client ids and, when an id
    is refused, retries the same query with the next live id (dropping the blocked
    one); it is stopped only when every id is blocked.  Each config runs twice: per
    client only, and with the cross-client index."""
    fc = ctx.fc
    bank = _Bank({}, keep_going=False)
    servers, info = bank.servers, {}
    for n in unit.bank:
        for glob in (False, True):
            srv = MultiClientFilter(configs[n], fc.global_size if glob else 0, fc.global_l_sp or None)
            live = list(range(unit.k))
            rec = {"first_id_blocked_at": math.nan, "ids_blocked": 0, "by_global": 0}
            name = f"{n}+global" if glob else n

            def safe(q, srv=srv, live=live, rec=rec, name=name):
                while live:
                    cid = live[0]
                    ok, who = srv.check(cid, q)
                    if ok:
                        live.append(live.pop(0))
                        return True
                    live.pop(0)
                    rec["ids_blocked"] += 1
                    rec["by_global"] += who == "global"
                    if math.isnan(rec["first_id_blocked_at"]):
                        rec["first_id_blocked_at"] = bank.it
                return False
            servers[name] = safe
            info[name] = {"base_config": n, "global": glob, "_rec": rec}
    bank.active = dict(servers)
    res = _run_attack(ctx, unit.label, unit.noise, ctx.seed("attack", unit.label, unit.rep, unit.noise), bank)
    extra = {n: {"base_config": v["base_config"], "global": v["global"], **v["_rec"]} for n, v in info.items()}
    return _attack_rows(ctx, unit, bank, res, extra)


def user_unit(ctx: SimContext, unit: Unit, configs: dict[str, FilterParams]) -> list[dict]:
    """A regular user's session through every config of the bank."""
    imgs = ctx.user_session(unit.label, unit.rep)
    rows = []
    for n in unit.bank:
        st = ClientFilterState(configs[n])
        flagged_at, peak = math.nan, 0
        for j, im in enumerate(imgs):
            r = st.check(im)
            peak = max(peak, r.matches)
            if not r.safe:
                flagged_at = j + 1
                break
        rows.append({"setting": unit.setting, "kind": "user", "config": n, "label": unit.label, "rep": unit.rep,
                     "noise": 0.0, "k": 1, "flagged": not math.isnan(flagged_at), "flagged_at": flagged_at,
                     "n_queries": len(imgs), "max_matches": peak, "count": st.count})
    return rows


def population_unit(ctx: SimContext, unit: Unit, configs: dict[str, FilterParams]) -> list[dict]:
    """Every regular user of the setting at once, interleaved round-robin, through one
    server per config with the cross-client index on: who gets blocked, and by what."""
    fc = ctx.fc
    labels = resolve_labels(fc, ctx.n_classes)
    sessions = {(lab, r): ctx.user_session(lab, r) for lab in labels for r in range(fc.user_trials_per_label)}
    rows = []
    for n in unit.bank:
        srv = MultiClientFilter(configs[n], fc.global_size, fc.global_l_sp or None)
        who_blocked: dict = {}
        longest = max(len(s) for s in sessions.values())
        for j in range(longest):
            for cid, s in sessions.items():
                if j < len(s) and cid not in who_blocked:
                    ok, who = srv.check(cid, s[j])
                    if not ok:
                        who_blocked[cid] = who
        rows.append({"setting": unit.setting, "kind": "population", "config": n, "users": len(sessions),
                     "queries": sum(len(s) for s in sessions.values()),
                     "blocked_client": sum(v == "client" for v in who_blocked.values()),
                     "blocked_global": sum(v == "global" for v in who_blocked.values()),
                     "fpr_with_global": len(who_blocked) / max(1, len(sessions))})
    return rows


RUNNERS = {"attack": attack_unit, "noise": attack_unit, "sybil": sybil_unit, "user": user_unit,
           "population": population_unit}


def run_unit(ctx: SimContext, unit: Unit, configs: dict[str, FilterParams]) -> pd.DataFrame:
    return pd.DataFrame(RUNNERS[unit.kind](ctx, unit, configs))


# ----------------------------------------------------------------------------- metrics

def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def detection_metrics(attack: pd.DataFrame, users: pd.DataFrame) -> dict:
    """Eqs. 2-5 plus the false-positive rate and iterations before detection."""
    det = attack["detected"].astype(bool) if len(attack) else pd.Series(dtype=bool)
    tp = int(det.sum())
    fn = len(attack) - tp
    fp = int(users["flagged"].astype(bool).sum()) if len(users) else 0
    tn = len(users) - fp
    prec, rec = _div(tp, tp + fp), _div(tp, tp + fn)
    it = attack.loc[det, "iters_before_detection"] if len(attack) else pd.Series(dtype=float)
    return {"attack_trials": len(attack), "user_trials": len(users), "tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "accuracy": _div(tp + tn, tp + tn + fp + fn), "precision": prec, "recall": rec,
            "f1": _div(2 * prec * rec, prec + rec) if tp else (0.0 if len(attack) else math.nan),
            "fpr": _div(fp, fp + tn),
            "iters_max": float(it.max()) if len(it) else math.nan,
            "iters_median": float(it.median()) if len(it) else math.nan,
            "iters_min": float(it.min()) if len(it) else math.nan,
            "reached_target_before_block": float(attack["reached_target"].astype(float).mean()) if len(attack) else math.nan,
            "re_top1_at_stop": float(attack["re_top1_at_stop"].astype(float).mean()) if len(attack) else math.nan}


METRIC_KEYS = tuple(detection_metrics(pd.DataFrame({"detected": [True], "iters_before_detection": [1.0],
                                                     "reached_target": [True], "re_top1_at_stop": [True]}),
                                       pd.DataFrame({"flagged": [False]})))


def summarize(trials: pd.DataFrame, configs: dict[str, dict[str, FilterParams]]) -> pd.DataFrame:
    """One row per (setting, config) of the main simulations."""
    rows = []
    for setting, cfgs in configs.items():
        t = trials[trials["setting"] == setting]
        for name, p in cfgs.items():
            a = t[(t["kind"] == "attack") & (t["config"] == name)]
            u = t[(t["kind"] == "user") & (t["config"] == name)]
            rows.append({"setting": setting, "config": name, "paper": paper_k(name), "ablation": is_ablation(name),
                         "n_b": p.n_b, "t_ssim": p.t_ssim, "t_hash": p.t_hash, "l_sp": p.l_sp,
                         **detection_metrics(a, u)})
    return pd.DataFrame(rows)


def calibrate(summary: pd.DataFrame, fpr_target: float) -> dict:
    """Per setting: among configs with FPR <= target, the one that detects every attack
    trial soonest (rank: recall high, worst-case iterations before detection low,
    median low, FPR low).  None when no config meets the FPR target."""
    out = {}
    for setting, g in summary.groupby("setting", sort=False):
        ok = g[(g["fpr"] <= fpr_target + 1e-12) & ~g["config"].map(is_ablation)].copy()
        if ok.empty:
            out[setting] = {"config": None, "reason": f"no configuration has FPR <= {fpr_target:.0%}"}
            continue
        ok["_max"] = ok["iters_max"].fillna(math.inf)
        ok["_med"] = ok["iters_median"].fillna(math.inf)
        best = ok.sort_values(["recall", "_max", "_med", "fpr"], ascending=[False, True, True, True]).iloc[0]
        out[setting] = {"config": best["config"], "fpr_target": fpr_target,
                        **{k: (v.item() if hasattr(v, "item") else v) for k, v in best.drop(["_max", "_med"]).items()}}
    return out


# ----------------------------------------------------------------------------- tables

def _fmt_int(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{int(v)}"


def _fmt_pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _md(header: list, rows: list) -> str:
    from .report import markdown_table
    return markdown_table(pd.DataFrame(rows, columns=header))


def attack_label_table(trials: pd.DataFrame, setting: str, paper_setting: str, names: list) -> str:
    """Tables 2/3: per label, attack attempts, attacks never detected (the paper's
    "Successful") and the max iterations before detection per Table 1 config, ours
    beside the paper's (per label for MNIST; CelebA's labels differ from ours)."""
    a = trials[(trials["setting"] == setting) & (trials["kind"] == "attack")]
    ks = sorted(paper_k(c) for c in a["config"].unique() if paper_k(c))
    ref = paper_reference(paper_setting)
    per_label = paper_setting == "mnist"
    header = ["label", "attempts", "undetected (" + "/".join(f"cfg {k}" for k in ks) + ")"]
    for k in ks:
        header += [f"max iter. cfg {k}"] + ([f"paper cfg {k}"] if per_label else [])
    header += ["first query R_T conf ≥ success (median)"]
    rows = []
    for lab, g in a.groupby("label"):
        lab = int(lab)
        g1 = g[g["config"] == paper_name(ks[0])] if ks else g
        und = [int((~g[g["config"] == paper_name(k)]["detected"].astype(bool)).sum()) for k in ks]
        row = [names[lab] if lab < len(names) else str(lab), len(g1), "/".join(map(str, und))]
        for k in ks:
            gk = g[g["config"] == paper_name(k)]
            row.append(_fmt_int(gk["iters_before_detection"].max()) + ("" if gk["detected"].astype(bool).all() else "*"))
            if per_label:
                row.append(ref[k]["per_label_max"][lab] if lab < 10 else "–")
        row.append(_fmt_int(g1["first_success_query"].median()))
        rows.append(row)
    tot = ["total", sum(r[1] for r in rows),
           "/".join(str(int((~a[a["config"] == paper_name(k)]["detected"].astype(bool)).sum())) for k in ks)]
    for k in ks:
        gk = a[a["config"] == paper_name(k)]
        tot.append(_fmt_int(gk["iters_before_detection"].max()))
        if per_label:
            tot.append(ref[k]["iters_max"])
    tot.append(_fmt_int(a[a["config"] == paper_name(ks[0])]["first_success_query"].median()) if ks else "–")
    out = _md(header, rows + [tot])
    if not per_label:
        out += "\n\nPaper (CelebA, 4 attribute classes, 3 attempts each, 0 undetected), max iterations before " \
               "detection:\n\n" + _md(["config"] + PAPER_CELEBA_LABELS,
                                      [[f"cfg {k}"] + ref[k]["per_label_max"] for k in ks])
    return out


def user_label_table(trials: pd.DataFrame, setting: str, paper_setting: str, names: list) -> str:
    """Tables 4/5: regular-user attempts and false detections per label and config."""
    u = trials[(trials["setting"] == setting) & (trials["kind"] == "user")]
    ks = sorted(paper_k(c) for c in u["config"].unique() if paper_k(c))
    ref = paper_reference(paper_setting)
    per_label = paper_setting == "mnist"
    header = ["label", "user attempts", "queries each"]
    for k in ks:
        header += [f"false det. cfg {k}"] + ([f"paper cfg {k}"] if per_label else [])
    rows = []
    for lab, g in u.groupby("label"):
        lab = int(lab)
        g1 = g[g["config"] == paper_name(ks[0])] if ks else g
        row = [names[lab] if lab < len(names) else str(lab), len(g1), int(g1["n_queries"].median())]
        for k in ks:
            row.append(int(g[g["config"] == paper_name(k)]["flagged"].astype(bool).sum()))
            if per_label:
                row.append(ref[k]["per_label_fp"][lab] if lab < 10 else "–")
        rows.append(row)
    tot = ["total", sum(r[1] for r in rows), ""]
    for k in ks:
        tot.append(int(u[u["config"] == paper_name(k)]["flagged"].astype(bool).sum()))
        if per_label:
            tot.append(ref[k]["fp"])
    out = _md(header, rows + [tot])
    if not per_label:
        out += "\n\nPaper (CelebA), false detections per class:\n\n" + _md(
            ["config"] + PAPER_CELEBA_LABELS + ["total"],
            [[f"cfg {k}"] + ref[k]["per_label_fp"] + [ref[k]["fp"]] for k in ks])
    return out


def table6(summary: pd.DataFrame, setting: str, paper_setting: str, extra: tuple = ()) -> str:
    """Table 6 (ours | paper) for the Table 1 configs, plus FPR and iterations."""
    ref = paper_reference(paper_setting)
    g = summary[summary["setting"] == setting].set_index("config")
    header = ["config", "accuracy", "paper", "precision", "paper", "recall", "paper", "F1", "paper",
              "FPR", "paper", "max iter.", "paper", "median iter.", "TP/FN/FP/TN"]
    rows = []
    names = [paper_name(k) for k in (1, 2, 3) if paper_name(k) in g.index] + [n for n in extra if n in g.index]
    for n in dict.fromkeys(names):
        r = g.loc[n]
        k = paper_k(n)
        p = ref.get(k, {}) if k else {}
        pv = lambda key: _fmt_pct(p[key]) if p else "–"  # noqa: E731
        rows.append([n if k or is_ablation(n) else f"{n} (calibrated)", _fmt_pct(r["accuracy"]), pv("accuracy"),
                     _fmt_pct(r["precision"]), pv("precision"), _fmt_pct(r["recall"]), pv("recall"),
                     _fmt_pct(r["f1"]), pv("f1"), _fmt_pct(r["fpr"]), pv("fpr"), _fmt_int(r["iters_max"]),
                     p.get("iters_max", "–"), _fmt_int(r["iters_median"]),
                     f"{r['tp']}/{r['fn']}/{r['fp']}/{r['tn']}"])
    return _md(header, rows)


def grid_table(summary: pd.DataFrame, setting: str) -> str:
    g = summary[summary["setting"] == setting].copy()
    g = g.sort_values(["fpr", "recall", "iters_max"], ascending=[True, False, True])
    cols = ["config", "n_b", "t_ssim", "t_hash", "l_sp", "recall", "fpr", "f1", "iters_median", "iters_max",
            "reached_target_before_block"]
    rows = [[r.config, r.n_b, f"{r.t_ssim:g}", f"{r.t_hash:g}", r.l_sp, _fmt_pct(r.recall), _fmt_pct(r.fpr),
             _fmt_pct(r.f1), _fmt_int(r.iters_median), _fmt_int(r.iters_max), _fmt_pct(r.reached_target_before_block)]
            for r in g.itertuples()]
    return _md(cols, rows)


def noise_table(trials: pd.DataFrame, setting: str) -> str:
    """Adaptive attacker: detection and what the attack had achieved when stopped."""
    n = trials[(trials["setting"] == setting) & (trials["kind"] == "noise")]
    rows = []
    for (cfg_name, sigma), g in n.groupby(["config", "noise"], sort=True):
        rows.append([cfg_name, f"{sigma:g}", f"{int(g['detected'].astype(bool).sum())}/{len(g)}",
                     _fmt_int(g["iters_before_detection"].median()), _fmt_int(g["answered"].median()),
                     _fmt_pct(g["reached_target"].astype(float).mean()), _fmt_pct(g["x_conf_at_stop"].mean()),
                     _fmt_pct(g["re_top1_at_stop"].astype(float).mean())])
    return _md(["config", "noise σ", "detected", "median iter. before det.", "median answered",
                "reached R_T conf ≥ success", "R_T conf of x at stop (mean)", "R_E top-1 at stop"], rows)


def sybil_table(trials: pd.DataFrame, setting: str) -> str:
    s = trials[(trials["setting"] == setting) & (trials["kind"] == "sybil")]
    rows = []
    for (base, glob, k), g in s.groupby(["base_config", "global", "k"], sort=True):
        rows.append([base, "yes" if glob else "no", int(k), f"{int(g['detected'].astype(bool).sum())}/{len(g)}",
                     _fmt_int(g["first_id_blocked_at"].median()), _fmt_int(g["answered"].median()),
                     _fmt_pct(g["reached_target"].astype(float).mean()),
                     _fmt_pct(g["re_top1_at_stop"].astype(float).mean())])
    return _md(["config", "cross-client", "ids k", "attack stopped", "first id blocked at (median)",
                "queries answered (median)", "reached R_T conf ≥ success", "R_E top-1 at stop"], rows)


def population_table(trials: pd.DataFrame, setting: str) -> str:
    p = trials[(trials["setting"] == setting) & (trials["kind"] == "population")]
    rows = [[r.config, int(r.users), int(r.queries), int(r.blocked_client), int(r.blocked_global),
             _fmt_pct(r.fpr_with_global)] for r in p.itertuples()]
    return _md(["config", "users", "queries", "blocked by own filter", "blocked by cross-client check",
                "FPR with cross-client check"], rows)


# ----------------------------------------------------------------------------- figures

def detection_fpr_plot(summary: pd.DataFrame, calibration: dict, paper_settings: dict, titles: dict,
                       max_iters: dict, path) -> None:
    """Worst-case iterations before detection vs false-positive rate, every config of
    the grid; Table 1 configs labelled, the paper's own points as stars."""
    from . import report  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt
    settings = list(dict.fromkeys(summary["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(8.2 * len(settings), 4.6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, s in zip(axes[0], settings):
        g = summary[summary["setting"] == s]
        ts = sorted(g.loc[~g["config"].map(is_ablation), "t_ssim"].unique())
        markers = {nb: m for nb, m in zip(sorted(g["n_b"].unique()), "os^Dv<>")}
        cap = max_iters[s]
        for r in g.itertuples():
            full = r.recall >= 1.0
            y = r.iters_max if full else cap * 1.15
            if is_ablation(r.config):
                ax.scatter(r.fpr, y, marker="x", s=40, color="gray")
                ax.annotate(f"cfg {r.config.split('-')[1]}, L={r.data_range:g}", (r.fpr, y), textcoords="offset points",
                            xytext=(5, -9), fontsize=7, color="gray")
                continue
            c = cmap(ts.index(r.t_ssim) / max(1, len(ts) - 1))
            ax.scatter(r.fpr, y, marker=markers[r.n_b], s=26 + 60 * math.log10(r.t_hash / 1e-5 + 1) / 3,
                       facecolors=c if full else "none", edgecolors=c, alpha=0.8)
            if r.paper:
                ax.annotate(f"cfg {r.paper}", (r.fpr, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ref = paper_reference(paper_settings[s])
        for k, v in ref.items():
            ax.scatter(v["fpr"], v["iters_max"], marker="*", s=150, color="crimson", zorder=5)
            ax.annotate(f"paper cfg {k}", (v["fpr"], v["iters_max"]), textcoords="offset points", xytext=(6, -10),
                        fontsize=8, color="crimson")
        cal = calibration.get(s, {})
        if cal.get("config"):
            ax.scatter(cal["fpr"], cal["iters_max"], marker="o", s=260, facecolors="none", edgecolors="red", lw=1.5)
            ax.annotate("calibrated", (cal["fpr"], cal["iters_max"]), textcoords="offset points", xytext=(8, 8),
                        fontsize=8, color="red")
        ax.axhline(cap * 1.15, color="gray", lw=0.6, ls=":", label=f"hollow, on this line: an attack undetected "
                   f"after {cap} queries")
        ax.set_yscale("log")
        ax.set_xlabel("false-positive rate (regular users blocked)")
        ax.set_ylabel("max iterations before detection")
        ax.set_title(titles.get(s, s), fontsize=10)
        ax.grid(alpha=0.3)
        for i, t in enumerate(ts):
            ax.scatter([], [], color=cmap(i / max(1, len(ts) - 1)), label=f"T_ssim={t:g}")
        for nb, m in markers.items():
            ax.scatter([], [], marker=m, color="gray", label=f"N_B={nb}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def per_label_plot(trials: pd.DataFrame, setting: str, paper_setting: str, names: list, title: str, path) -> None:
    """Figs. 6/7: max iterations before detection per label for the Table 1 configs,
    ours (bars) beside the paper's."""
    from . import report  # noqa: F401
    import matplotlib.pyplot as plt
    a = trials[(trials["setting"] == setting) & (trials["kind"] == "attack")]
    ks = sorted(paper_k(c) for c in a["config"].unique() if paper_k(c))
    labels = sorted(int(v) for v in a["label"].unique())
    ref = paper_reference(paper_setting)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [max(4, len(labels)), 4]})
    w = 0.8 / max(1, len(ks))
    for i, k in enumerate(ks):
        g = a[a["config"] == paper_name(k)].groupby("label")["iters_before_detection"].max()
        axes[0].bar(np.arange(len(labels)) + i * w, [g.get(lab, np.nan) for lab in labels], w, label=f"cfg {k}")
    axes[0].set_xticks(np.arange(len(labels)) + w * (len(ks) - 1) / 2)
    axes[0].set_xticklabels([names[lab] if lab < len(names) else str(lab) for lab in labels], rotation=60, fontsize=7)
    axes[0].set_title(f"ours: {title}", fontsize=9)
    plabels = [str(i) for i in range(10)] if paper_setting == "mnist" else PAPER_CELEBA_LABELS
    for i, k in enumerate(ks):
        axes[1].bar(np.arange(len(plabels)) + i * w, ref[k]["per_label_max"], w, label=f"cfg {k}")
    axes[1].set_xticks(np.arange(len(plabels)) + w * (len(ks) - 1) / 2)
    axes[1].set_xticklabels(plabels, rotation=60, fontsize=7)
    axes[1].set_title(f"paper ({paper_setting})", fontsize=9)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("max iterations before detection")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def noise_plot(trials: pd.DataFrame, titles: dict, thresholds: dict, path) -> None:
    """Adaptive attacker: (top) SSIM between consecutive queries along the attack for
    each noise level, with the configs' T_ssim; (bottom) detection rate and the
    attack's progress at the stop, against the noise level."""
    from . import report  # noqa: F401
    import matplotlib.pyplot as plt
    n = trials[trials["kind"] == "noise"]
    settings = list(dict.fromkeys(n["setting"]))
    fig, axes = plt.subplots(2, len(settings), figsize=(6.2 * len(settings), 7.6), squeeze=False)
    cmap = plt.get_cmap("plasma")
    for j, s in enumerate(settings):
        g = n[n["setting"] == s]
        ref = g[g["config"] == NO_FILTER]
        sig = sorted(ref["noise"].unique())
        ax = axes[0, j]
        first = int(ref["label"].min())
        for i, sg in enumerate(sig):
            row = ref[(ref["noise"] == sg) & (ref["label"] == first)]
            if len(row) and row.iloc[0]["ssim_prev"] is not None:
                tr = 1.0 - np.asarray(row.iloc[0]["ssim_prev"], float)
                ax.plot(np.arange(2, len(tr) + 2), np.maximum(tr, 1e-9), color=cmap(i / max(1, len(sig) - 1)),
                        lw=0.8, label=f"σ={sg:g}")
        for name, t in thresholds[s].items():
            ax.axhline(1 - t, color="k", lw=0.6, ls="--")
            ax.text(1, (1 - t) * 1.1, f"{name}: 1−T_ssim", fontsize=7)
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_xlabel("attack iteration (query)")
        ax.set_ylabel("1 − SSIM(query, previous query)")
        ax.set_title(f"{titles.get(s, s)}: label {first}", fontsize=9)
        ax.legend(fontsize=6, ncol=3)
        ax = axes[1, j]
        xs = {sg: (sg if sg > 0 else min([v for v in sig if v > 0] or [1e-5]) / 3) for sg in sig}
        for name, gg in g[g["config"] != NO_FILTER].groupby("config"):
            r = gg["detected"].astype(float).groupby(gg["noise"]).mean()
            ax.plot([xs[v] for v in r.index], r.values, marker="o", ms=3, label=f"detected: {name}")
        r = ref.groupby("noise")
        ax.plot([xs[v] for v in r.groups], r["re_top1_at_stop"].apply(lambda v: v.astype(float).mean()).values, "k--",
                marker="s", ms=3,
                label=f"R_E top-1 of x, no filter (after {int(ref['answered'].max())} queries)")
        ax.plot([xs[v] for v in r.groups], r["x_conf_at_stop"].mean().values, "k:", marker="^", ms=3,
                label="R_T conf of x, no filter")
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("attacker noise σ (leftmost point: σ = 0)")
        ax.set_ylabel("rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
