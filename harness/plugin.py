"""The pytest plugin (registered through the `pytest11` entry point): options, markers, fixtures.

Installed with the package, so `pip install llava-harness` makes these fixtures available in
any repository. All options live in one group, `llava`, each parsed by a `type=` function that
rejects a bad value at parse time, naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .presets import build_spec

MARKERS = {
    "gpu": "needs a CUDA GPU; skipped with a reason on CPU",
    "realsize": "builds or reads real-size (7B/13B) checkpoints; run with --realsize",
    "slow": "takes more than a few seconds on 2 CPU cores",
}

_NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False on this machine)"
_NO_REALSIZE = ("real-size: builds a 13.5 GB+ checkpoint into the cache; run with --realsize "
                "(cache folder: --llava-cache or LLAVA_HARNESS_CACHE)")


def _existing_or_creatable_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise pytest.UsageError(f"--llava-cache {text!r}: exists and is not a folder")
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llava", "llava-harness")
    group.addoption("--realsize", action="store_true", default=False,
                    help="run real-size tests (builds real-size checkpoints into the cache)")
    group.addoption("--llava-cache", type=_existing_or_creatable_dir, default=None,
                    metavar="DIR", help="cache folder for real-size builds "
                                        "(default: $LLAVA_HARNESS_CACHE or ~/.cache/llava-harness)")


def pytest_configure(config: pytest.Config) -> None:
    # Offline always: nothing may reach a hub at run time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    realsize = config.getoption("--realsize")
    need_cuda = any(item.get_closest_marker("gpu") for item in items)
    has_cuda = _cuda_available() if need_cuda else False
    for item in items:
        if item.get_closest_marker("realsize") and not realsize:
            item.add_marker(pytest.mark.skip(reason=_NO_REALSIZE))
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason=_NO_GPU))


class CheckpointFactory:
    """Builds synthetic checkpoints once per distinct spec and hands back their folders."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict = {}

    def __call__(self, preset: str = "tiny", *, model: dict | None = None,
                 checkpoint: dict | None = None) -> Path:
        from .synth import build

        spec = build_spec(preset, model=model, checkpoint=checkpoint)
        if spec not in self._built:
            folder = self.root / f"ckpt{len(self._built)}-{spec.model.name}"
            build(spec, folder)
            self._built[spec] = folder
        return self._built[spec]

    def spec_of(self, folder: Path):
        return next(spec for spec, path in self._built.items() if path == folder)


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """`factory(preset="tiny", model={...}, checkpoint={...})` -> folder, built once per spec."""
    return CheckpointFactory(tmp_path_factory.mktemp("llava-tiny"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_factory: CheckpointFactory) -> Path:
    """The default tiny LLaVA checkpoint: 2 `.bin` shards, tokenizer and CLIP tower."""
    return tiny_checkpoint_factory()


@pytest.fixture(scope="session")
def llava_cache(pytestconfig: pytest.Config) -> Path:
    from .cache import cache_root

    return pytestconfig.getoption("--llava-cache") or cache_root()


@pytest.fixture(scope="session")
def realsize_checkpoint_factory(llava_cache: Path):
    """`factory(preset, model={...}, checkpoint={...})` -> a cached real-size folder."""
    from .cache import cached_build

    def factory(preset: str = "llava-v1.5-7b", *, model: dict | None = None,
                checkpoint: dict | None = None) -> Path:
        return cached_build(build_spec(preset, model=model, checkpoint=checkpoint), llava_cache)

    return factory
