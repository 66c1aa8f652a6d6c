"""`llava-harness check`: a folder of any kind held to the contract, rule by rule.

Every rule (`RULES`, registered by the rules_* modules) looks at the folder kinds it knows and
yields findings; `check()` runs them all and says what it found, what it could not look at and
why. The same rules run as pytest cases (harness/suites/test_folder_rules.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ...checkpoint.problems import CheckpointError
from ..errors import ContractError
# Registered in this order, which is the order of docs/checks.md: the folder as a whole, its
# values, the vision side, the tokenizer, adapters and stage-1 folders.
from . import rules_folder, rules_values, rules_tower, rules_tokenizer  # noqa: F401, I001
from . import rules_adapter  # noqa: F401
from .context import Context
from .model import RULES, SEVERITIES, Finding, NotApplicable, Rule

__all__ = ["RULES", "Finding", "Report", "Rule", "RuleResult", "catalog", "check", "run_rule"]


@dataclass
class RuleResult:
    rule: Rule
    findings: list[Finding] = field(default_factory=list)
    skipped: str | None = None  # why the rule could not look (None: it looked)
    ignored: bool = False


@dataclass
class Report:
    folder: Path
    kind: str
    reason: str
    base: Path | None
    results: dict[str, RuleResult]

    @property
    def findings(self) -> list[Finding]:
        out = [f for r in self.results.values() if not r.ignored for f in r.findings]
        return sorted(out, key=lambda f: (SEVERITIES.index(f.severity), f.code, f.file,
                                          f.where))

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def exit_code(self) -> int:
        """0 clean or only warnings, 1 on errors (2, unreadable input, never gets a report)."""
        return 1 if self.count("error") else 0

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "kind": self.kind, "kind_reason": self.reason,
                "base": str(self.base) if self.base else None,
                "counts": {s: self.count(s) for s in SEVERITIES},
                "findings": [f.to_dict() for f in self.findings],
                "skipped": {code: r.skipped for code, r in self.results.items() if r.skipped},
                "ignored": sorted(c for c, r in self.results.items() if r.ignored),
                "exit": self.exit_code}


@contextlib.contextmanager
def offline():
    """Nothing a rule does may reach a hub (transformers' tokenizer and config loaders)."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def run_rule(rule: Rule, ctx: Context) -> RuleResult:
    """One rule on one folder: its findings, or why it could not look."""
    if ctx.kind not in rule.kinds:
        return RuleResult(rule, skipped=f"looks at {', '.join(rule.kinds)} folders; this is a "
                                        f"{ctx.kind} folder")
    try:
        with offline():
            found = [Finding(rule, file, where, message) for file, where, message in
                     rule.run(ctx)]
    except NotApplicable as exc:
        return RuleResult(rule, skipped=str(exc))
    except (CheckpointError, ContractError) as exc:
        # Bad bytes met while looking: the rule cannot judge the folder, which is its finding.
        found = [Finding(rule, str(ctx.path), "", f"could not be read: {exc}")]
    return RuleResult(rule, found)


def check(path: Path, base: Path | None = None, ignore: tuple[str, ...] = ()) -> Report:
    """Every rule on the folder at `path` (and its `base`, for an adapter). A folder that is no
    model folder at all, or an unknown code in `ignore`, raises (bad input: exit 2)."""
    unknown = sorted(set(ignore) - set(RULES))
    if unknown:
        raise ContractError(f"--ignore {unknown[0]}: no such check (see docs/checks.md)")
    ctx = Context(Path(path), Context(Path(base)) if base is not None else None)
    detected = ctx.detected
    if ctx.base is not None and ctx.base.kind not in ("llava", "language_model"):
        raise ContractError(f"{base}: --base must be a full LLaVA or language model folder, "
                            f"this is a {ctx.base.kind} folder")
    if ctx.kind in ("llava", "llava-hf", "language_model"):
        ctx.prefetch_values()
    results = {code: run_rule(rule, ctx) for code, rule in RULES.items()}
    for code in ignore:
        results[code].ignored = True
    return Report(Path(path), detected.kind, detected.reason, Path(base) if base else None,
                  results)


def catalog() -> str:
    """Every rule as a markdown table: code, severity, kinds, what it finds, what loaders do,
    the fix, and the public report (docs/checks.md holds this table; a test keeps them equal).
    """
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| code | severity | folder kinds | what it finds | what LLaVA's loader / transformers "
            "do | fix | reported in |", "|---|---|---|---|---|---|---|"]
    for code, r in RULES.items():
        rows.append(f"| `{code}` | {r.severity} | {', '.join(r.kinds)} | {cell(r.title)} | "
                    f"{cell(r.loader)} | {cell(r.fix)} | {cell(r.report)} |")
    return "\n".join(rows) + "\n"
