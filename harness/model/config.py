"""Reading a LLaVA folder's config.json into the harness's config classes.

The published configs say `model_type: "llava"`, which collides with transformers' own
(different) Llava config, so the file is read as JSON and handed to our classes directly; the
architecture comes from `model_type` / `architectures`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import HarnessError

# Saved by transformers into every config; not constructor arguments.
_NOT_FIELDS = {"model_type", "architectures", "transformers_version"}


class ConfigError(HarnessError):
    pass


def read_config_json(folder: Path) -> dict:
    """A model folder's config.json, resolved inside the folder (a link out is refused) and
    size-capped, as every file of an untrusted checkpoint is read."""
    from ..checkpoint.paths import inside
    from ..checkpoint.reader import read_json

    path = Path(folder) / "config.json"
    found = inside(Path(folder), "config.json", must_exist=False)
    if found is None:
        raise ConfigError(f"{path}: missing (every model folder needs a config.json)")
    return read_json(found, path)


def architecture_of(data: dict, where: Path | str = "config.json") -> str:
    """'llama' or 'mistral'; MPT and anything else are a clear error."""
    names = " ".join([str(data.get("model_type", ""))] + list(data.get("architectures") or []))
    names = names.lower()
    if "mpt" in names:
        raise ConfigError(f"{where}: MPT-based LLaVA is not supported (its modelling code is "
                          "remote code that cannot be fetched offline)")
    if "mistral" in names:
        return "mistral"
    if "llama" in names or "llava" in names:
        return "llama"
    raise ConfigError(f"{where}: model_type {data.get('model_type')!r} is not a Llama or "
                      "Mistral (LLaVA) model")


def llava_config(folder: Path, data: dict | None = None):
    """(arch, config) for the LLaVA model in `folder`."""
    from .llava import CONFIG_CLASSES

    data = read_config_json(folder) if data is None else data
    arch = architecture_of(data, Path(folder) / "config.json")
    fields = {k: v for k, v in data.items() if k not in _NOT_FIELDS}
    if fields.get("rope_scaling", 0) is None:
        # The published configs say `rope_scaling: null`; transformers 5 warns about the key
        # itself. Leaving it out means the same (no scaling).
        del fields["rope_scaling"]
    return arch, CONFIG_CLASSES[arch](**fields)
