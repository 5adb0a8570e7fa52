"""What a query-based attacker can ask the released model: an *oracle*.

One interface, two backends, so that the black-box (score-based) and the label-only
attacks (:mod:`raymia.attacks.blackbox`, :mod:`raymia.attacks.label_only`) run unchanged
against a model in this process and against the live Serve app:

* :class:`InProcessOracle` wraps any released model (``model(x, alpha)`` returning
  probabilities: a :class:`~raymia.defenses.dummy.CombinedModel` with one α per row,
  R_T alone through :class:`~raymia.models.ProbModel`, any defense), answering all the
  rows' queries of one call with ONE forward pass;
* :class:`HTTPOracle` sends every query as one ``POST /predict`` of
  :class:`~raymia.serving.client.ServeClient` (one client, i.e. one client id or API
  key, per row; rows in a small thread pool, each row's queries in order).  A 403 ends
  the row: its later queries are not sent, and the number of the refused query is kept.

Both answer :meth:`Oracle.query` ``(images, rows)`` with an :class:`OracleReply`:
top-k probabilities (the classes not returned are NaN) or the top-1 label only, and a
mask of the queries that were answered.  Every oracle counts, per row, the images whose
answers the attacker received (``answered``) and the queries it sent (``sent``; the
two differ only by a refused query); :class:`CountingOracle` recounts independently.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class OracleReply:
    """Answers to N queries.  ``probs`` (N, n_classes) holds the returned confidences
    (NaN where a class was not among the returned top-k, and for unanswered queries);
    None in labels-only mode.  ``labels`` (N,) is the top-1 label (-1 when unanswered);
    ``answered`` (N,) says which queries got an answer."""
    labels: torch.Tensor
    answered: torch.Tensor
    probs: Optional[torch.Tensor] = None


class Oracle:
    """Base class: per-row counters and the blocked state.  Subclasses implement
    :meth:`_ask` for the queries of rows that are not blocked."""

    def __init__(self, n_rows: int, n_classes: int, labels_only: bool = False, top_k: Optional[int] = None):
        self.n_rows, self.n_classes = int(n_rows), int(n_classes)
        self.labels_only = bool(labels_only)
        self.top_k = None if top_k is None else max(1, min(int(top_k), self.n_classes))
        self.answered = np.zeros(self.n_rows, np.int64)      # images whose answers the attacker received
        self.sent = np.zeros(self.n_rows, np.int64)          # queries sent (answered + refused)
        self.blocked_at = np.zeros(self.n_rows, np.int64)    # 1-based number of the refused query; 0 = never
        self.calls = 0                                        # query() calls (batched forwards / HTTP rounds)

    @property
    def blocked(self) -> np.ndarray:
        return self.blocked_at > 0

    def query(self, images: torch.Tensor, rows) -> OracleReply:
        """Answer ``images`` (N, C, H, W) in [0, 1], query i on behalf of row ``rows[i]``.
        Queries of blocked rows are not sent (not answered, not counted)."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        n = rows.numel()
        if images.shape[0] != n:
            raise ValueError(f"{images.shape[0]} images for {n} row indices")
        if n and (int(rows.min()) < 0 or int(rows.max()) >= self.n_rows):
            raise ValueError(f"row index outside 0..{self.n_rows - 1}")
        self.calls += 1
        labels = torch.full((n,), -1, dtype=torch.long)
        answered = torch.zeros(n, dtype=torch.bool)
        probs = None if self.labels_only else torch.full((n, self.n_classes), float("nan"))
        live = torch.from_numpy(~self.blocked)[rows] if n else torch.zeros(0, dtype=torch.bool)
        idx = torch.nonzero(live).flatten()
        if idx.numel():
            p, lab, ok = self._ask(images[idx].detach(), rows[idx])
            answered[idx] = ok
            labels[idx] = torch.where(ok, lab, labels[idx])
            if probs is not None and p is not None:
                probs[idx[ok]] = p[ok].float()
        return OracleReply(labels, answered, probs)

    def _ask(self, images: torch.Tensor, rows: torch.Tensor):
        """-> (probs (n, C) with NaN for classes not returned, or None; labels (n,); answered (n,) bool);
        must update ``answered``, ``sent`` and ``blocked_at``."""
        raise NotImplementedError

    def _mask_top_k(self, p: torch.Tensor) -> torch.Tensor:
        """Keep the top-k confidences of every row, NaN elsewhere (what a top-k API returns)."""
        if self.top_k is None or self.top_k >= p.shape[1]:
            return p
        idx = p.topk(self.top_k, 1).indices
        out = torch.full_like(p, float("nan"))
        return out.scatter_(1, idx, p.gather(1, idx))

    def stats(self) -> dict:
        return {"answered": self.answered.copy(), "sent": self.sent.copy(), "blocked_at": self.blocked_at.copy()}


class InProcessOracle(Oracle):
    """The released model in this process.  ``model(x, alpha)`` returns probabilities;
    ``alphas`` gives each row its α (None: ``model(x)``, e.g. R_T through ProbModel).
    ``budgets`` (optional, per row) refuses -- like a block -- the queries beyond a
    row's budget, a guard on top of the attacks' own budgets."""

    def __init__(self, model, n_rows: int, n_classes: int, alphas: Optional[Sequence[float]] = None,
                 labels_only: bool = False, top_k: Optional[int] = None, device="cpu", batch: int = 4096):
        super().__init__(n_rows, n_classes, labels_only, top_k)
        self.model, self.device, self.batch = model, torch.device(device), int(batch)
        self.alphas = None if alphas is None else torch.as_tensor(list(alphas), dtype=torch.float32)
        if self.alphas is not None and self.alphas.numel() != self.n_rows:
            raise ValueError("alphas must have one entry per row")

    @torch.no_grad()
    def _ask(self, images, rows):
        out = []
        for i in range(0, images.shape[0], self.batch):     # one forward unless the batch is huge
            x = images[i:i + self.batch].to(self.device)
            if self.alphas is None:
                p = self.model(x)
            else:
                p = self.model(x, self.alphas[rows[i:i + self.batch]].to(self.device))
            out.append(p.float().cpu())
        p = torch.cat(out)
        np.add.at(self.answered, rows.numpy(), 1)
        np.add.at(self.sent, rows.numpy(), 1)
        labels = p.argmax(1)
        return (None if self.labels_only else self._mask_top_k(p)), labels, torch.ones(len(rows), dtype=torch.bool)


class HTTPOracle(Oracle):
    """The live Serve app (``POST /predict``) through :class:`~raymia.serving.client.ServeClient`.

    ``clients`` holds one ServeClient per row (its own client id or API key), or pass
    ``url`` with ``client_ids`` / ``api_keys``.  ``labels_only`` asks for labels only;
    ``top_k`` (None: the app's default) for that many confidences.  Rows are served by a
    pool of ``threads`` (each row's queries in order, so a 403 is seen before the row's
    next query is sent).  Any answer other than 200 or 403 raises
    :class:`~raymia.serving.client.ClientError`."""

    def __init__(self, n_classes: int, clients: Optional[Sequence] = None, url: Optional[str] = None,
                 client_ids: Optional[Sequence[str]] = None, api_keys: Optional[Sequence[Optional[str]]] = None,
                 labels_only: bool = False, top_k: Optional[int] = None, threads: int = 4):
        from ..serving.client import ServeClient
        if clients is None:
            if url is None or (client_ids is None and api_keys is None):
                raise ValueError("HTTPOracle needs clients, or url with client_ids and/or api_keys")
            n = len(client_ids if client_ids is not None else api_keys)
            ids = list(client_ids) if client_ids is not None else [None] * n
            keys = list(api_keys) if api_keys is not None else [None] * n
            clients = [ServeClient(url, i, k) for i, k in zip(ids, keys)]
        self.clients = list(clients)
        super().__init__(len(self.clients), n_classes, labels_only, top_k)
        self.threads = max(1, int(threads))
        self.replies_403: dict[int, dict] = {}       # row -> body of the 403
        self.seconds = np.zeros(self.n_rows)         # time spent waiting for answers, per row

    def _opts(self) -> dict:
        o = {}
        if self.labels_only:
            o["labels_only"] = True
        elif self.top_k is not None:
            o["top_k"] = self.top_k
        return o

    def _row(self, r: int, imgs: np.ndarray):
        from ..serving.client import ClientError
        c, opts = self.clients[r], self._opts()
        res = []
        for img in imgs:
            rep = c.predict(img, **opts)
            self.sent[r] += 1
            self.seconds[r] += rep.seconds
            if rep.status == 403:
                self.blocked_at[r] = self.sent[r]
                self.replies_403[r] = rep.body
                break
            if rep.status != 200:
                raise ClientError(f"row {r}, query {self.sent[r]}: HTTP {rep.status} {rep.body}")
            self.answered[r] += 1
            res.append(rep.body)
        return res

    def _ask(self, images, rows):
        x = images.float().clamp(0, 1).cpu().numpy()
        rr = rows.numpy()
        groups = {int(r): np.flatnonzero(rr == r) for r in np.unique(rr)}
        if self.threads > 1 and len(groups) > 1:
            with ThreadPoolExecutor(min(self.threads, len(groups))) as pool:
                bodies = dict(zip(groups, pool.map(lambda r: self._row(r, x[groups[r]]), groups)))
        else:
            bodies = {r: self._row(r, x[ix]) for r, ix in groups.items()}
        n = len(rr)
        labels = torch.full((n,), -1, dtype=torch.long)
        ok = torch.zeros(n, dtype=torch.bool)
        probs = None if self.labels_only else torch.full((n, self.n_classes), float("nan"))
        for r, ix in groups.items():
            for j, body in zip(ix, bodies[r]):
                ok[j] = True
                labels[j] = int(body["label"])
                if probs is not None:
                    for t in body.get("top_k", []):
                        probs[j, int(t["label"])] = float(t["confidence"])
        return probs, labels, ok


class CountingOracle(Oracle):
    """Wraps another oracle and recounts, independently of it and of the attack, how many
    queries each row sent and how many answers it received (for tests)."""

    def __init__(self, inner: Oracle):
        super().__init__(inner.n_rows, inner.n_classes, inner.labels_only, inner.top_k)
        self.inner = inner
        self.images_seen = 0

    def query(self, images, rows) -> OracleReply:
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        before = self.inner.blocked.copy()
        rep = self.inner.query(images, rows)
        self.calls += 1
        self.images_seen += int(images.shape[0])
        ok = rep.answered.numpy()
        np.add.at(self.answered, rows.numpy()[ok], 1)
        # a query is sent when its row was not blocked before it; the refused one is the first unanswered
        for r in np.unique(rows.numpy()):
            mine = np.flatnonzero(rows.numpy() == r)
            if before[r]:
                continue
            n_ok = int(ok[mine].sum())
            refused = int(self.inner.blocked[r] and not before[r])
            self.sent[r] += n_ok + refused
            if refused:
                self.blocked_at[r] = self.sent[r]
        return rep

    @property
    def blocked(self) -> np.ndarray:
        return self.inner.blocked


def check_rows(generator, oracle: Oracle, targets: Sequence[int], seeds: Sequence[int]) -> int:
    """The checks every query attack makes before its first query; returns the row count."""
    if generator.training:
        raise ValueError("the attacker's generator must be in eval mode")
    n = len(targets)
    if n != oracle.n_rows or len(seeds) != n:
        raise ValueError(f"targets and seeds need one entry per oracle row ({oracle.n_rows})")
    return n


def target_scores(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The attacker's reading of its target's confidence from a (possibly top-k) answer:
    the returned confidence, or -- when the target was not among the returned classes --
    the mass the answer left unassigned spread evenly over the classes not returned
    (capped at the smallest returned confidence)."""
    p = probs.gather(1, targets[:, None])[:, 0]
    missing = torch.isnan(p)
    if bool(missing.any()):
        q = probs[missing]
        known = ~torch.isnan(q)
        rest = (1.0 - torch.nan_to_num(q, nan=0.0).sum(1)).clamp_min(0.0)
        n_unknown = (~known).sum(1).clamp_min(1)
        low = torch.where(known, q, torch.full_like(q, float("inf"))).min(1).values
        p = p.clone()
        p[missing] = torch.minimum(rest / n_unknown, low)
    return p
