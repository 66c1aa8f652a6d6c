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


# Suite name -> file in suites/. `run --suites a,b` picks by these names, and records (the
# plugin's, any run's) name their suite the same way.
SUITES = {
    "specs": "test_specs_and_plan.py",
    "builder": "test_builder.py",
    "assets": "test_assets.py",
    "checks": "test_checkpoint_checks.py",
    "checkpoint": "test_checkpoint_folder.py",
    "rules": "test_folder_rules.py",
    "contract": "test_contract.py",
    "release": "test_verify_release.py",
    "relations": "test_release_relations.py",
    "extraction": "test_extraction.py",
    "counts": "test_projector_counts.py",
    "loader": "test_loader.py",
    "original": "test_original_llava.py",
    "oracle": "test_oracle.py",
    "packaging": "test_packaging.py",
    "splice": "test_splice.py",
    "stage1": "test_stage1_alignment.py",
    "strip": "test_backbone_strip.py",
    "convert": "test_convert.py",
    "lora": "test_lora_merge.py",
    "quant": "test_quant_load.py",
    "realsize": "test_realsize_build.py",
    "results": "test_results.py",
    "report": "test_report.py",
    "gate": "test_gate.py",
    "run": "test_run.py",
    "figures": "test_figures.py",
    "architecture": "test_architecture.py",
    "hostile": "test_hostile_inputs.py",
    "hostile_results": "test_hostile_results.py",
    "ab": "test_ab.py",
    "identity": "test_identity.py",
    "dependencies": "test_dependencies.py",
    "docs": "test_docs.py",
    "prequantized": "test_prequantized.py",
    "litgpt": "test_litgpt_export.py",
}
