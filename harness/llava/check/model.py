"""What a check finds: rules with stable codes, and the findings they report.

A rule is one defect class users actually ship. It has a stable code (what `--ignore` and the
docs name), a severity, the folder kinds it looks at, what LLaVA's loader and transformers do
with the defect, the fix, and the public report it comes from. A finding is one occurrence:
the rule, the file, the field or key, and what exactly is wrong there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ...checkpoint.problems import shown

SEVERITIES = ("error", "warning", "info")
ALL_KINDS = ("llava", "llava-hf", "lora", "projector", "language_model", "language_model_lora")
FULL = ("llava", "llava-hf")


class NotApplicable(Exception):
    """The rule cannot look at this folder (what it needs is absent): the reason, for pytest's
    skip and the report."""


@dataclass(frozen=True)
class Rule:
    code: str
    severity: str
    kinds: tuple[str, ...]
    title: str
    loader: str   # what LLaVA's loader / transformers do with the defect
    fix: str
    report: str   # the public report the rule comes from
    run: Callable = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"rule {self.code}: severity {self.severity!r}")
        if not set(self.kinds) <= set(ALL_KINDS):
            raise ValueError(f"rule {self.code}: kinds {self.kinds}")


@dataclass(frozen=True)
class Finding:
    rule: Rule
    file: str
    where: str
    message: str

    @property
    def code(self) -> str:
        return self.rule.code

    @property
    def severity(self) -> str:
        return self.rule.severity

    def line(self) -> str:
        """One line: severity, code, place, what is wrong, what loaders do, the fix."""
        place = f"{self.file}: {shown(self.where)}: " if self.where else f"{self.file}: "
        return (f"{self.severity} {self.code} {place}{self.message} -> {self.rule.loader}; "
                f"fix: {self.rule.fix}")

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "file": self.file,
                "where": self.where, "message": self.message, "loader": self.rule.loader,
                "fix": self.rule.fix, "report": self.rule.report}


RULES: dict[str, Rule] = {}


def rule(code: str, severity: str, kinds: tuple[str, ...], title: str, loader: str, fix: str,
         report: str):
    """Register a rule: the decorated function takes the folder's Context and yields
    (file, where, message) for each occurrence, or raises NotApplicable."""
    def register(run: Callable[..., Iterator[tuple[str, str, str]]]):
        if code in RULES:
            raise ValueError(f"rule code {code} registered twice")
        RULES[code] = Rule(code, severity, kinds, title, loader, fix, report, run)
        return run
    return register
