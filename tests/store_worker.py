"""One holder of a filter-state store in its own process, for the concurrency and kill tests
(``python tests/store_worker.py LOCATOR NAME BATCHES ORDER [SEED]``): each batch checks one
random 8-bit image for each of the clients ``shared-0..4`` (in ``asc`` or ``desc`` order, so
two workers take their locks in opposite orders) plus one fixed face for ``attacker``, in one
``check_many``; after each batch it prints one JSON line per verdict, flushed, so what it
printed is exactly what it was told.  BATCHES 0 = until killed."""
import itertools
import json
import sys

import numpy as np

from raymia.defenses.filter import FilterParams
from raymia.serving.store import FilterStateStore

SHARED = [f"shared-{k}" for k in range(5)]


def main(locator: str, name: str, batches: int, order: str, seed: int = 0) -> None:
    store = FilterStateStore(locator, FilterParams())
    rng = np.random.default_rng(seed)
    face = np.full((1, 32, 32), 0.5, np.float32)
    clients = SHARED if order == "asc" else SHARED[::-1]
    for b in itertools.count() if batches == 0 else range(batches):
        items = [(c, (rng.integers(0, 256, (1, 32, 32)) / 255.0).astype(np.float32), f"{name}-{b}-{c}")
                 for c in clients] + [("attacker", face, f"{name}-{b}-attacker")]
        out = store.check_many(items)
        sys.stdout.write("".join(json.dumps({"client": c, "n": v["n_queries"], "safe": v["safe"],
                                             "blocked": v["blocked"]}) + "\n"
                                 for (c, _, _), v in zip(items, out)))
        sys.stdout.flush()
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 0)
