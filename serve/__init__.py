"""raymia's Ray Serve app: the dummy-model defense's combined model behind the per-client
similarity filter.

    serve run serve.app                       # orl preset, alpha from the alpha sweep
    serve run serve.app preset=smoke serve.alpha=0.5 serve.shards=4

See docs/serve.md for the HTTP API.  ``app`` is an application builder (``serve run``
passes it the ``key=value`` arguments); :func:`build_app` builds from a Config."""
from .builder import app, build_app
from .model import RaymiaModel
from .state import FilterShard, ShardRouter, shard_names

__all__ = ["app", "build_app", "RaymiaModel", "FilterShard", "ShardRouter", "shard_names"]
