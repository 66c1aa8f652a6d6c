"""A LLaVA folder's config.json as the harness's config classes.

The published configs say `model_type: "llava"`, which collides with transformers' own
(different) Llava config, so the file is read as JSON (through the contract, which holds every
field to its schema first) and handed to our classes directly; the architecture comes from
`model_type` / `architectures`.
"""

from __future__ import annotations

from pathlib import Path

from ..llava.config import CONFIG, architecture_of, constructor_fields, read_config
from ..llava.errors import ConfigError

__all__ = ["ConfigError", "architecture_of", "build_config", "llava_config", "read_config_json"]


def read_config_json(folder: Path) -> dict:
    """A model folder's config.json, read and checked by the contract."""
    return read_config(folder)


def llava_config(folder: Path, data: dict | None = None):
    """(arch, config) for the LLaVA model in `folder`."""
    from .llava import CONFIG_CLASSES  # heavy: torch, transformers

    data = read_config(folder) if data is None else data
    where = Path(folder) / CONFIG
    arch = architecture_of(data, where)
    return arch, build_config(CONFIG_CLASSES[arch], constructor_fields(data), where)


def build_config(cls, fields: dict, where: Path | str):
    """`cls(**fields)`, a refusal by transformers' own validation (a value the contract's
    schema lets through) turned into one ConfigError line naming the file."""
    # heavy: huggingface_hub: transformers 5's field checks
    from huggingface_hub.errors import StrictDataclassError

    try:
        return cls(**fields)
    except (TypeError, ValueError, KeyError, AttributeError, StrictDataclassError) as exc:
        raise ConfigError(f"{where}: transformers refuses it: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                          ) from None
