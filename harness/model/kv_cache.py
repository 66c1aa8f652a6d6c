"""The KV cache under the name the installed transformers gives it.

transformers 5.25 renamed the forward argument and output field `past_key_values` to `cache`;
the old name warns from then on and goes in 5.40. The harness supports releases on both sides
of the rename, so code that carries a cache from one step to the next asks here.
"""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=1)
def cache_name() -> str:
    from transformers import LlamaModel  # heavy: transformers

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters \
        else "past_key_values"


def carried(output) -> dict:
    """The keyword argument that hands `output`'s cache to the next forward step."""
    return {cache_name(): getattr(output, cache_name())}
