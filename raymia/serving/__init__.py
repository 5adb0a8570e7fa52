"""Serving without Ray: what the Ray Serve app (``serve/``) and its clients need, in plain
Python/numpy/PIL so that it is unit-testable on its own.

* :mod:`.plan`: the artifacts and alpha an app serves (:func:`resolve_plan`, failing with
  one message naming the command that creates what is missing) and the released model
  (:func:`load_serving_model`).
* :mod:`.http`: request parsing and validation (:func:`identify`, :func:`parse_predict`,
  ...), every refusal a :class:`RequestError` with an HTTP status and a JSON body.
* :mod:`.store`: every client's similarity-filter state in one SQLite file
  (:class:`FilterStateStore`).
* :mod:`.client`: a stdlib HTTP client for the live endpoint (:class:`ServeClient`).

The attacker and regular-user simulations that use the client live in
:mod:`raymia.attacks.endpoint`; ``attack_endpoint`` and ``regular_user`` are still
importable from here."""
from .client import ClientError, Reply, ServeClient, add_client_args, app_errors, encode_png, write_samples
from .http import (CLIENT_ID_RE, JPEG_MAGIC, JSON_KEYS, PNG_MAGIC, InputSpec, RequestError, array_from_nested,
                   check_admin, check_array, check_client_id, check_content_length, decode_image_bytes,
                   hash_secret, identify, load_api_keys, parse_predict, prediction, secret_matches, too_large)
from .plan import (RECOMMENDATION, ServeSetupError, ServingPlan, config_from_serve_args, creation_command,
                   filter_params, load_serving_model, recommendation_path, resolve_plan, state_locator,
                   state_path)
from .store import FilterStateStore, StateConflict, shard_of

_ENDPOINT = ("attack_endpoint", "regular_user")


def __getattr__(name: str):
    # lazily: raymia.attacks.endpoint imports this package's client
    if name in _ENDPOINT:
        from ..attacks import endpoint
        return getattr(endpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ClientError", "Reply", "ServeClient", "add_client_args", "app_errors", "encode_png", "write_samples",
           "CLIENT_ID_RE", "JPEG_MAGIC", "JSON_KEYS", "PNG_MAGIC", "InputSpec", "RequestError", "array_from_nested",
           "check_admin", "check_array", "check_client_id", "check_content_length", "decode_image_bytes",
           "hash_secret", "identify", "load_api_keys", "parse_predict", "prediction", "secret_matches", "too_large",
           "RECOMMENDATION", "ServeSetupError", "ServingPlan", "config_from_serve_args", "creation_command",
           "filter_params", "load_serving_model", "recommendation_path", "resolve_plan", "state_locator", "state_path",
           "FilterStateStore", "StateConflict", "shard_of", *_ENDPOINT]
