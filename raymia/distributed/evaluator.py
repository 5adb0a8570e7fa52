"""The evaluator actor: holds R_E and the private/anchor features it compares against,
scores reconstructions as attack workers send them, and keeps the tally behind the
progress line.  The attackers never see it."""
from __future__ import annotations

import time

import ray

from ..config import Config, config_from_dict
from ..progress import line


@ray.remote(num_cpus=0)
class Evaluator:
    def __init__(self, cfg_dict: dict, total: int, done: int, with_sweep_anchors: bool):
        from ..data import load_bundle
        from ..evaluation import make_scorer
        from ..runtime import set_threads
        from ..sweep import load_sweep_models
        c = config_from_dict(cfg_dict)
        set_threads(1)
        bundle = load_bundle(c.data)
        self.scorer = make_scorer(c, bundle, "cpu")
        if with_sweep_anchors:
            models = load_sweep_models(c, "cpu")
            for v, x in models.anchors.items():
                self.scorer.add_anchors(v, x, models.anchor_labels[v])
        self.total, self.done, self.start_done = total, done, done
        self.t0 = time.time()
        self.hits: dict = {}

    def score(self, images, targets, variant, alphas):
        out = self.scorer.score(images, targets, variant)
        self.done += len(targets)
        for a, h in zip(alphas, out["success_top5"]):
            k = (variant, float(a))
            n, s = self.hits.get(k, (0, 0))
            self.hits[k] = (n + 1, s + int(h))
        return out

    def progress(self, label: str = "rows") -> str:
        """The progress line of the rows scored so far."""
        return line(label, self.done, self.total, time.time() - self.t0, self.done - self.start_done)

    def anchor_floor(self, variant):
        return self.scorer.anchor_floor(variant)

    def add_anchors(self, key, images, labels):
        self.scorer.add_anchors(key, images, labels)


def start_evaluator(cfg: Config, total_rows: int, done_rows: int, name: str, namespace: str,
                    sweep_anchors: bool = True):
    """Start the named evaluator actor.  ``sweep_anchors`` loads the anchors of the α
    sweep's R_dmy variants; the defense search registers each trial's with ``add_anchors``."""
    return Evaluator.options(name=name, namespace=namespace).remote(cfg.to_dict(), total_rows, done_rows,
                                                                    sweep_anchors)
