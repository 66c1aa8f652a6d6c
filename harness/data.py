"""Where the data and suites that ship with the package are, in a checkout or an install.

In the repository they are the top-level `fixtures/` and `suites/`; the wheel carries them as
`harness.fixtures` and `harness.suites` (pyproject's package-dir), and an editable install maps
the same names onto the repository's folders. Everything reads them through here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _folder(package: str) -> Path:
    # Both are plain folders on disk (never zipped), so the traversable is a real path.
    return Path(str(resources.files(package)))


def fixtures_dir() -> Path:
    return _folder("harness.fixtures")


def suites_dir() -> Path:
    return _folder("harness.suites")
