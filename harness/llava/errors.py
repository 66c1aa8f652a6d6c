"""The contract's errors: one line naming the file, the field or key, and what was expected."""

from __future__ import annotations

from ..errors import HarnessError


class ContractError(HarnessError, ValueError):
    """A value that breaks what a LLaVA checkpoint is (bad input: exit 2)."""


class ConfigError(ContractError):
    """A config.json field that is missing, of the wrong type or out of range."""
