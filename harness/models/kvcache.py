"""The name a model's forward takes and returns its key/value cache under, across transformers versions.

transformers 5.x renamed ``past_key_values`` (the forward argument and the output field) to ``cache``; the old name
still works with a FutureWarning and goes in 5.40. Versions before the rename know only ``past_key_values``. Every
caller that reuses keys and values (a shared prompt prefix, ROME's v* optimisation, sampling text) passes
``**cache_arg(model, cache)`` and reads ``returned_cache(out)``, so one file follows the library.
"""
from __future__ import annotations

import inspect


def cache_arg(model, cache) -> dict:
    """{"cache": cache} for a forward that takes ``cache`` (transformers >= 5.x), else {"past_key_values": cache}."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def returned_cache(out):
    """The key/value cache a forward returned (``use_cache=True``), under whichever field name the output has."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return out["cache"] if "cache" in fields else out.past_key_values
