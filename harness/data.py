"""Where the data and suites that ship with the package are, in a checkout or an install, and
where the harness keeps what it makes (the cache folder).

In the repository they are the top-level `fixtures/` and `suites/`; the wheel carries them as
`harness.fixtures` and `harness.suites` (pyproject's package-dir), and an editable install maps
the same names onto the repository's folders. A source tree used straight from `PYTHONPATH`
(as on a bare GPU machine) has neither mapping: there the folders beside the package are used.
Everything reads them through here.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

# Real-size builds, the oracle and litgpt environments, cached expectations: one folder the
# user sets (a roomy disk), by default in the home folder.
CACHE_ENV_VAR = "LLAVA_HARNESS_CACHE"

_CHECKOUT = Path(__file__).resolve().parent.parent


def _folder(package: str, beside: str) -> Path:
    try:
        # Plain folders on disk in every install (never zipped): the traversable is a path.
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:
        return _CHECKOUT / beside


def fixtures_dir() -> Path:
    return _folder("harness.fixtures", "fixtures")


def suites_dir() -> Path:
    return _folder("harness.suites", "suites")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "llava-harness")
