"""The simulated sessions of the similarity-filter paper (Raha et al., section 4.5), plain
torch/numpy (``raymia.distributed.filter_sweep`` spreads the units over Ray actors).

A *unit* is one simulated session, run live query by query through a *bank* of filter
configurations at once (each configuration has its own :class:`ClientFilterState`, so
the result for one configuration is exactly what a server running only that
configuration would have done: the attacker's queries do not depend on the filter's
answers until it is refused):

* ``attack``     Fredrikson's attack on R_T for one label, Gaussian noise added before
                 every query, until every configuration of the bank has blocked it or
                 ``filter_sim.max_iters`` queries were answered;
* ``user``       a regular user, no noise: protocol ``sequence`` -- one session of distinct
                 images of one label; protocol ``paper`` -- per trial one random held-out
                 test image of the label (the paper's section 4.5);
* ``noise``      the attack with another noise level (the adaptive attacker);
* ``sybil``      the attack spread round-robin over ``k`` client ids, with and without
                 the cross-client :class:`GlobalIndex`;
* ``population`` every regular user of a setting at once (interleaved), with the
                 cross-client check on: its false-positive cost.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd
import torch

from ..attacks.fredrikson import fredrikson_attack
from ..config import Config
from ..defenses.filter import ClientFilterState, FilterParams, MultiClientFilter, mean_hash, ssim_batch
from .units import NO_FILTER, Unit, derive_seed, resolve_labels, sequence_slice, setting_key


# ----------------------------------------------------------------------------- simulation context

class SimContext:
    """What one setting's simulations need: R_T (attacked, softmax outputs), R_E
    (judges reconstructions), the regular users' image pools, the ``filter`` section
    (``fc``) and the ``filter_sim`` section (``sim``)."""

    def __init__(self, cfg: Config, device="cpu", bundle=None, target=None, evaluator=None):
        """``target`` / ``evaluator``: logit classifiers; loaded from the config's
        artifacts when not given."""
        from ..data import load_bundle
        from ..kinds import artifact_dir
        from ..models import ProbModel
        from ..training import load_classifier
        self.cfg, self.fc, self.sim, self.device = cfg, cfg.filter, cfg.filter_sim, torch.device(device)
        b = bundle or load_bundle(cfg.data)
        rt = target if target is not None else load_classifier(artifact_dir(cfg, "target"), self.device)[0]
        self.target = ProbModel(rt.to(self.device)).eval()
        self.evaluator = (evaluator if evaluator is not None else
                          load_classifier(artifact_dir(cfg, "evaluator"), self.device)[0]).to(self.device).eval()
        self.private_to_eval = b.private_to_eval
        self.shape = tuple(b.private_train.x.shape[1:])
        self.n_classes = b.n_private
        self.class_names = list(b.class_names)
        if self.sim.user_pool == "all":
            xs, ys = torch.cat([b.private_train.x, b.private_test.x]), torch.cat([b.private_train.y, b.private_test.y])
        else:
            xs, ys = b.private_test.x, b.private_test.y
        self.pools = {int(c): xs[ys == c].numpy().astype(np.float32) for c in torch.unique(ys).tolist()}
        tx, ty = b.private_test.x, b.private_test.y      # the paper protocol's held-out test images
        self.test_pools = {int(c): tx[ty == c].numpy().astype(np.float32) for c in torch.unique(ty).tolist()}
        self.bundle = b
        self.key = setting_key(cfg)
        self._scorer = None

    def seed(self, *parts) -> int:
        return derive_seed(self.key, *parts)

    def user_session(self, label: int, rep: int) -> np.ndarray:
        """Distinct images of ``label`` for regular user ``rep``: the label's pool in a
        seeded order, users of a label taking disjoint slices when the pool allows it
        (else each user draws its own distinct images)."""
        pool = self.pools[label]
        n, own_slice = sequence_slice(len(pool), self.sim, rep)
        if own_slice:
            order = np.random.default_rng(self.seed("users", label)).permutation(len(pool))
            return pool[order[rep * n:(rep + 1) * n]]
        order = np.random.default_rng(self.seed("user", label, rep)).permutation(len(pool))
        return pool[order[:n]]

    def paper_trials(self, rep: int, per_label: int) -> list[tuple[int, int, np.ndarray]]:
        """The paper protocol's regular-user trials, (label, trial, image): per label
        ``per_label`` trials, each one random held-out test image of the label (drawn
        independently, with replacement, as "one random test image" per trial), labels
        in order.  Each label's test images are split by a seeded order into two halves:
        rep 0 (reported) draws from the first, rep 1 (calibration) from the second."""
        out = []
        for lab in resolve_labels(self.sim, self.n_classes):
            pool = self.test_pools[lab]
            order = np.random.default_rng(self.seed("paper-users", lab)).permutation(len(pool))
            half = len(pool) // 2
            idx = order if half < 1 else (order[:half] if rep % 2 == 0 else order[half:])
            rng = np.random.default_rng(self.seed("paper-user", lab, rep))
            for t, j in enumerate(rng.choice(idx, size=per_label, replace=True)):
                out.append((lab, t, pool[j]))
        return out

    def scorer(self):
        """R_E as a :class:`~raymia.evaluation.ReconstructionScorer` of the private set with
        the independent judges of the ``judge`` section (built on first use; a judge that
        cannot run here is left out with a message)."""
        if self._scorer is None:
            from ..evaluation import ReconstructionScorer
            from ..judges import JudgeError, build_judges
            try:
                judges = build_judges(self.cfg, self.bundle)
            except JudgeError as e:
                print(f"[filter_sim] judges left out: {e}", flush=True)
                judges = {}
            self._scorer = ReconstructionScorer(self.evaluator, self.bundle.private_train, self.bundle.private_to_eval,
                                                device=self.device, judges=judges)
        return self._scorer

    def judge_images(self, images: list, label: int) -> dict:
        """Top-5 and rank of ``label`` for attacker images by R_E (``re_*``), top-1/top-5
        and rank by each independent judge (``<judge>_*``)."""
        v = self.scorer().score(torch.stack(images).to(self.device), [label] * len(images))
        out = {"re_top5": v["success_top5"], "re_rank": v["eval_rank"]}     # R_E top-1: re_top1_at_stop
        for name in self.scorer().judges:
            for k in ("top1", "top5", "rank"):
                out[f"{name}_{k}"] = v[f"{name}_{k}"]
        return out

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
    return fredrikson_attack(ctx.target, label, ctx.shape, iters=ctx.sim.max_iters, lr=ctx.cfg.attack.fredrikson_lr,
                             noise_std=noise, x0=x0, seed=seed, gate=bank.gate, device=ctx.device,
                             observer=bank.observer)


def _attack_rows(ctx: SimContext, unit: Unit, bank: _Bank, res, extra: Optional[dict] = None) -> list[dict]:
    """One row per server: when it blocked the attack and how far the attack had got."""
    sim = ctx.sim
    conf = np.asarray(bank.conf)
    hit = np.flatnonzero(conf >= sim.success_conf)
    first_success = int(hit[0]) + 1 if hit.size else math.nan
    names = list(bank.servers)
    xs = [bank.x_at_stop.get(n, res.image.cpu()) for n in names]
    conf_x, top1_x = ctx.judge(xs, unit.label)
    judged: dict = {}
    if sim.judge_at_stop and unit.kind in JUDGED_KINDS and names:
        # one image per distinct stopping query (configs blocking at the same query share it)
        stop = [bank.blocked_at.get(n, -1) for n in names]
        first = {s_: i for i, s_ in reversed(list(enumerate(stop)))}
        order = sorted(first)
        v = ctx.judge_images([xs[first[s_]] for s_ in order], unit.label)
        pos = {s_: j for j, s_ in enumerate(order)}
        judged = {n: {f"{k}_at_stop": (vals[pos[stop[i]]].item() if hasattr(vals[pos[stop[i]]], "item")
                                       else vals[pos[stop[i]]]) for k, vals in v.items()}
                  for i, n in enumerate(names)}
    rows = []
    for i, n in enumerate(names):
        det = n in bank.blocked_at
        answered = bank.blocked_at[n] - 1 if det else res.queries
        rows.append({
            "setting": unit.setting, "kind": unit.kind, "config": n, "label": unit.label, "rep": unit.rep,
            "noise": unit.noise, "k": unit.k, "detected": det, "blocked_at": bank.blocked_at.get(n, math.nan),
            "iters_before_detection": answered if det else math.nan, "answered": answered,
            "max_iters": sim.max_iters, "first_success_query": first_success,
            "reached_target": bool(hit.size and first_success <= answered),
            "query_conf_at_stop": float(conf[answered - 1]) if answered >= 1 else math.nan,
            "x_conf_at_stop": float(conf_x[i]), "re_top1_at_stop": bool(top1_x[i]),
            **({"role": unit.session_role} if unit.kind == "attack" else {}), **judged.get(n, {}),
            **(extra or {}).get(n, {})})
    return rows


#: unit kinds whose image at the stop is judged by R_E and the judges (``filter_sim.judge_at_stop``)
JUDGED_KINDS = ("attack", "noise")


def stale(df: pd.DataFrame, unit: dict, sim) -> bool:
    """A cached unit computed before its images at the stop were judged (recomputed:
    the same session, seeded, plus the judges' columns)."""
    return bool(sim.judge_at_stop and unit["kind"] in JUDGED_KINDS and len(df) and "re_top5_at_stop" not in df)


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
    sim = ctx.sim
    bank = _Bank({}, keep_going=False)
    servers, info = bank.servers, {}
    for n in unit.bank:
        for glob in (False, True):
            srv = MultiClientFilter(configs[n], sim.global_size if glob else 0, sim.global_l_sp or None)
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
    """A regular user's session through every config of the bank (protocol ``sequence``),
    or the paper protocol's trials (:func:`paper_user_unit`)."""
    if unit.user_protocol == "paper":
        return paper_user_unit(ctx, unit, configs)
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
                     "n_queries": len(imgs), "max_matches": peak, "count": st.count,
                     "protocol": "sequence", "role": unit.session_role})
    return rows


def paper_user_unit(ctx: SimContext, unit: Unit, configs: dict[str, FilterParams]) -> list[dict]:
    """The paper's regular users (section 4.5): each trial is one random held-out test
    image of its label (:meth:`SimContext.paper_trials`, ``unit.k`` per label).  Alone in
    a fresh session a single image can never be refused (Algorithm 2 needs a buffered
    image to match), so the trials of the setting go to one client session in turn, as a
    simulator that never opens a new session would send them; a trial is a false positive
    when its image is refused.  One row per (config, trial)."""
    trials = ctx.paper_trials(unit.rep, unit.k)
    rows = []
    for n in unit.bank:
        st = ClientFilterState(configs[n])
        for pos, (lab, t, im) in enumerate(trials):
            r = st.check(im)
            rows.append({"setting": unit.setting, "kind": "user", "config": n, "label": lab, "rep": t,
                         "noise": 0.0, "k": 1, "flagged": not r.safe, "flagged_at": pos + 1 if not r.safe else math.nan,
                         "n_queries": 1, "max_matches": r.matches, "count": r.count,
                         "protocol": "paper", "role": unit.session_role, "session_pos": pos + 1})
    return rows


def normalise_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of units computed before the user protocols and the calibration sessions
    existed (cached under OUT/units/) with their ``protocol`` / ``role`` filled in."""
    if df.empty:
        return df
    df = df.copy()
    users = df["kind"] == "user"
    if "protocol" not in df:
        df["protocol"] = None
    df.loc[users & df["protocol"].isna(), "protocol"] = "sequence"
    if "role" not in df:
        df["role"] = None
    df.loc[df["kind"].isin(["attack", "user"]) & df["role"].isna(), "role"] = "report"
    return df


def population_unit(ctx: SimContext, unit: Unit, configs: dict[str, FilterParams]) -> list[dict]:
    """Every regular user of the setting at once, interleaved round-robin, through one
    server per config with the cross-client index on: who gets blocked, and by what."""
    sim = ctx.sim
    labels = resolve_labels(sim, ctx.n_classes)
    sessions = {(lab, r): ctx.user_session(lab, r) for lab in labels for r in range(sim.user_trials_per_label)}
    rows = []
    for n in unit.bank:
        srv = MultiClientFilter(configs[n], sim.global_size, sim.global_l_sp or None)
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
    return normalise_rows(pd.DataFrame(RUNNERS[unit.kind](ctx, unit, configs)))
