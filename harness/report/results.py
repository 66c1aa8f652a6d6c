"""One result record schema for every suite and benchmark, stored as JSON with a lossless round trip.

A results file is one run: schema name and version, run id, creation time, the environment
(see environment.py) and the records. A record is one case of one suite: its outcome (with the
reason when it did not pass), its metrics (value, unit, and which direction is better) and a
timestamp. Records made in the run's own environment do not repeat it in the file; a record
from elsewhere carries its own `environment` / `run_id`.

    rec = make_record("extraction", "bin-last", {"extract_wall_s": (0.12, "s"),
                                                  "peak_rss": (301.5, "MiB")})
    results = save_records([rec], "reports/x/results.json")
    load_results("reports/x/results.json") == results              # True

Round trip: `Results.from_json(r.to_json()) == r` and the JSON text it writes back is
identical. Integers stay integers (parameter counts print exactly); non-finite floats are
stored as the strings "NaN", "Infinity", "-Infinity", so the file is strict JSON.

A results file is untrusted input (they are gathered from a fleet and compared): it is read
only up to MAX_RESULTS_BYTES, as strict JSON (no bare NaN/Infinity, no number longer than
MAX_NUMBER_CHARS or beyond a float's range, no nesting past the parser's depth), and every
name in it is one line of at most MAX_NAME_CHARS. Anything else is a ResultsError: one line
naming the file and the fault, before a command writes anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from ..checkpoint.problems import brief, control_character
from ..console import write_text
from ..errors import HarnessError
from .environment import Environment, EnvironmentSchemaError, current
from .sample import MAX_VALUES, Sample, SampleError

SCHEMA = "llava-harness/results"
SCHEMA_VERSION = 1
OUTCOMES = ("passed", "failed", "skipped", "error")
DIRECTIONS = ("lower", "higher", "none")

# Units whose smaller values are better (time, memory, size) and the throughput suffix whose
# larger values are; anything else ("params", "ratio", "count") has no better direction unless
# the caller says so.
_LOWER_UNITS = {"s", "ms", "us", "ns", "min", "B", "bytes", "KB", "KiB", "MB", "MiB", "GB", "GiB"}
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

# The largest results file read. The default run writes 105 KB (327 cases, measured), so a run
# of every suite (1,571 cases) about 0.5 MB; one sample at its MAX_VALUES bound is 3.6 MB as
# written. 8 MiB holds all of that with room to spare, and bounds what parsing costs: ~6x the
# bytes for a real file, 25x (210 MB) at worst, a list of empty objects (measured, tracemalloc).
MAX_RESULTS_BYTES = 8 * 2**20
# A name (suite, case, metric, unit, run id...) is a table cell and part of one-line
# messages. The suites' longest case id is 189 characters.
MAX_NAME_CHARS = 1000
# A float's shortest repr has at most 24 characters and a 64-bit integer 20. Longer is no
# measurement (Python's int() raises on 4,301+ digits, int_max_str_digits).
MAX_NUMBER_CHARS = 40


class ResultsError(HarnessError):
    """A results file or record is malformed; one line naming the file and the field."""


_TIME_UNITS = {"s", "ms", "us", "ns", "min"}


def is_timing(unit: str) -> bool:
    """A duration or a rate per second: figures that move with the machine's load."""
    return unit in _TIME_UNITS or unit.endswith("/s")


def default_direction(unit: str) -> str:
    if unit in _LOWER_UNITS:
        return "lower"
    if unit.endswith("/s"):
        return "higher"
    return "none"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def check_name(value, what: str, allow_empty: bool = False) -> str:
    """A name is one line of text: no control or format character, at most MAX_NAME_CHARS."""
    if not isinstance(value, str) or not (value or allow_empty):
        raise ResultsError(f"{what} {brief(value)}: expected a{'' if allow_empty else ' non-empty'}"
                           " string")
    if len(value) > MAX_NAME_CHARS:
        raise ResultsError(f"{what} {brief(value)}: {len(value):,} characters, more than "
                           f"{MAX_NAME_CHARS:,}")
    bad = control_character(value)
    if bad is not None:
        raise ResultsError(f"{what} {brief(value)}: holds {ascii(bad)}; a name is one line of "
                           "printable text")
    return value


def check_text(value, what: str) -> str:
    """Free text (a reason, a setting) may span lines, but UTF-8 must hold it: a lone surrogate
    (a JSON "\\ud800" escape) would fail every report written from it."""
    if not isinstance(value, str):
        raise ResultsError(f"{what} {brief(value)}: expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ResultsError(f"{what}: holds {ascii(value[exc.start])}, a lone surrogate, which "
                           "is not text") from None
    return value


def check_run_id(text: str) -> str:
    """A run id names a folder: letters, digits, '.', '_' and '-', at most 100."""
    if not isinstance(text, str) or not _RUN_ID.fullmatch(text):
        raise ResultsError(f"run id {brief(text)}: use letters, digits, '.', '_' and '-' (it names "
                           "a folder)")
    return text


def new_run_id() -> str:
    """Sortable by time and unique enough for a folder name: 20250101-120000-3fa2c1."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Metric:
    """One figure. A repeated measurement carries its `sample` (every value as measured) and
    its value is the sample's median."""

    value: int | float
    unit: str
    direction: str = "none"
    sample: Sample | None = None

    @classmethod
    def of(cls, values, unit: str, direction: str | None = None) -> Metric:
        """A metric from repeated measurements: the median, with the sample kept."""
        try:
            sample = Sample(tuple(values))
        except SampleError as exc:
            raise ResultsError(str(exc)) from None
        return cls(sample.median, unit, direction or default_direction(unit), sample)

    @property
    def spread(self) -> float | None:
        """The measured noise (Sample.spread: the IQR, half the range below 4 values), or None
        for a figure measured once."""
        return self.sample.spread if self.sample is not None else None

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise ResultsError(f"metric value {brief(self.value)}: expected a number")
        if self.sample is not None and (not isinstance(self.sample, Sample)
                                        or self.value != self.sample.median):
            raise ResultsError(f"metric value {self.value!r}: with a sample, the value is its "
                               "median")
        check_name(self.unit, "metric unit", allow_empty=True)
        if self.direction not in DIRECTIONS:
            raise ResultsError(f"metric direction {brief(self.direction)}: expected one of "
                               f"{', '.join(DIRECTIONS)}")

    def __eq__(self, other) -> bool:
        # NaN equals NaN here: a stored NaN must survive the round trip as "the same metric".
        if not isinstance(other, Metric):
            return NotImplemented
        same = self.value == other.value or (_is_nan(self.value) and _is_nan(other.value))
        return (same and type(self.value) is type(other.value) and self.unit == other.unit
                and self.direction == other.direction and self.sample == other.sample)

    def __hash__(self) -> int:
        return hash((repr(self.value), self.unit, self.direction))


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def as_metric(name: str, spec) -> Metric:
    """(value, unit), (value, unit, direction) or a Metric -> Metric; a list or tuple of
    numbers as the value is a repeated measurement (its median, with the sample)."""
    check_name(name, "metric name")
    if isinstance(spec, Metric):
        return spec
    if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
        raise ResultsError(f"metric {name!r}: expected (value, unit) or (value, unit, "
                           f"direction), got {spec!r}")
    value, unit = spec[0], spec[1]
    direction = spec[2] if len(spec) == 3 else default_direction(str(unit))
    try:
        if isinstance(value, (list, tuple)):
            return Metric.of(value, unit, direction)
        return Metric(value, unit, direction)
    except ResultsError as exc:
        raise ResultsError(f"metric {name!r}: {exc}") from None


@dataclass(frozen=True)
class Record:
    suite: str
    case: str
    outcome: str = "passed"
    reason: str | None = None
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    timestamp: str = ""
    environment: Environment | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("suite", "case"):
            check_name(getattr(self, name), f"record {name}")
        if self.run_id is not None:
            check_name(self.run_id, f"record {self.id}: run id")
        check_name(self.timestamp, f"record {self.id}: timestamp", allow_empty=True)
        if self.outcome not in OUTCOMES:
            raise ResultsError(f"record {self.id}: outcome {brief(self.outcome)} is not one of "
                               f"{', '.join(OUTCOMES)}")
        if self.reason is not None:
            check_text(self.reason, f"record {self.id}: reason")
        for name, metric in self.metrics.items():
            check_name(name, f"record {self.id}: metric name")
            if not isinstance(metric, Metric):
                raise ResultsError(f"record {self.id}: metric {name!r} must be a Metric")
        object.__setattr__(self, "metrics", dict(self.metrics))

    def __hash__(self) -> int:
        return hash((self.suite, self.case, self.outcome, self.timestamp))

    @property
    def key(self) -> tuple[str, str]:
        return self.suite, self.case

    @property
    def id(self) -> str:
        return f"{self.suite}::{self.case}"

    def with_metrics(self, metrics: Mapping[str, Metric]) -> Record:
        return dataclasses.replace(self, metrics={**self.metrics, **metrics})


def make_record(suite: str, case: str, metrics: Mapping | None = None, outcome: str = "passed",
                reason: str | None = None, *, environment: Environment | None = None) -> Record:
    """A record stamped with the time and this process's environment."""
    built = {name: as_metric(name, spec) for name, spec in (metrics or {}).items()}
    return Record(suite=suite, case=case, outcome=outcome, reason=reason, metrics=built,
                  timestamp=now(), environment=environment or current())


@dataclass(frozen=True)
class Results:
    """One run: what `results.json` holds."""

    run_id: str
    environment: Environment
    records: tuple[Record, ...] = ()
    created: str = ""
    # What each suite checks, one line each (the test module's docstring), for the report.
    suite_descriptions: Mapping[str, str] = field(default_factory=dict)
    # How the run was made, for a reader: {"checkpoint": "/data/7b", "preset": "tiny", ...}.
    settings: Mapping[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_name(self.run_id, "run id")
        check_name(self.created, f"run {self.run_id}: created", allow_empty=True)
        # A record without its own run id / environment belongs to this run.
        records = tuple(dataclasses.replace(r, run_id=r.run_id or self.run_id,
                                            environment=r.environment or self.environment)
                        for r in self.records)
        seen: set = set()
        for record in records:
            if record.key in seen:
                raise ResultsError(f"run {self.run_id}: two records for {record.id}")
            seen.add(record.key)
        object.__setattr__(self, "records", records)
        for name in ("suite_descriptions", "settings"):
            mapping = dict(getattr(self, name))
            for key, value in mapping.items():
                check_name(key, f"run {self.run_id}: {name} key")
                check_text(value, f"run {self.run_id}: {name}[{key}]")
            object.__setattr__(self, name, mapping)

    def __hash__(self) -> int:
        return hash((self.run_id, self.created, len(self.records)))

    def record(self, suite: str, case: str) -> Record | None:
        return self._by_key.get((suite, case))

    @cached_property
    def _by_key(self) -> dict[tuple[str, str], Record]:
        # An index, so that comparing or gating two runs is linear in their records.
        out: dict[tuple[str, str], Record] = {}
        for record in self.records:
            out.setdefault(record.key, record)
        return out

    @property
    def suites(self) -> list[str]:
        return list(dict.fromkeys(r.suite for r in self.records))

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "schema_version": self.schema_version, "run_id": self.run_id,
                "created": self.created, "environment": self.environment.to_dict(),
                "settings": dict(self.settings), "suites": dict(self.suite_descriptions),
                "records": [self._record_dict(r) for r in self.records]}

    def _record_dict(self, record: Record) -> dict:
        out = {"suite": record.suite, "case": record.case, "outcome": record.outcome,
               "reason": record.reason, "timestamp": record.timestamp,
               "metrics": {name: metric_to_dict(m) for name, m in record.metrics.items()}}
        if record.run_id != self.run_id:
            out["run_id"] = record.run_id
        if record.environment != self.environment:
            out["environment"] = record.environment.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "results") -> Results:
        return cls.from_dict(parse_json(text, source), source)

    @classmethod
    def from_dict(cls, data, source: str = "results") -> Results:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ResultsError(f"{source}: not a llava-harness results file (no \"schema\": "
                               f"\"{SCHEMA}\")")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ResultsError(f"{source}: results schema version {brief(version)}; this harness "
                               f"reads version {SCHEMA_VERSION}")
        unknown = sorted(set(data) - {"schema", "schema_version", "run_id", "created",
                                      "environment", "settings", "suites", "records"})
        if unknown:
            raise ResultsError(f"{source}: unknown top-level field {brief(unknown[0])}")
        run_id = _string(data, "run_id", source)
        created = _string(data, "created", source, allow_empty=True)
        environment = _environment(data.get("environment"), source)
        raw = data.get("records")
        if not isinstance(raw, list):
            raise ResultsError(f"{source}: records must be a list")
        records = tuple(_record(item, f"{source}: records[{i}]") for i, item in enumerate(raw))
        suites, settings = data.get("suites", {}), data.get("settings", {})
        for name, value in (("suites", suites), ("settings", settings)):
            if not isinstance(value, dict):
                raise ResultsError(f"{source}: {name} must be an object of strings")
        try:
            return cls(run_id=run_id, environment=environment, records=records, created=created,
                       suite_descriptions=suites, settings=settings)
        except ResultsError as exc:
            raise ResultsError(f"{source}: {exc}") from None


# Python's json takes bare NaN/Infinity and numbers of any length; a results file is strict
# JSON (the harness writes a non-finite value as a string, see _encode), so these hooks refuse
# what strict JSON has no place for, before Python spends time or memory on it.
def _bare_constant(name: str):
    raise ResultsError(f"bare {name} is not JSON (a non-finite value is written as the string "
                       f"\"{name}\")")


def _number_text(text: str) -> str:
    if len(text) > MAX_NUMBER_CHARS:
        raise ResultsError(f"number {text[:20]}... is {len(text):,} characters long; a results "
                           f"file's numbers have at most {MAX_NUMBER_CHARS}")
    return text


def _int(text: str) -> int:
    return int(_number_text(text))


def _float(text: str) -> float:
    value = float(_number_text(text))
    if not math.isfinite(value):
        raise ResultsError(f"number {text} is beyond a float's range")
    return value


_RECORD_FIELDS = {"suite", "case", "outcome", "reason", "timestamp", "metrics", "run_id",
                  "environment"}


def _string(data: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = data.get(key)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ResultsError(f"{where}: {key} must be a{'' if allow_empty else ' non-empty'} "
                           f"string, got {brief(value)}")
    return value


_ENV_TYPES = {"str": str, "int": int, "bool": bool}


def _environment(data, where: str) -> Environment:
    try:
        env = Environment.from_dict(data, where)
    except (EnvironmentSchemaError, TypeError) as exc:
        raise ResultsError(str(exc).splitlines()[0]) from None
    # from_dict takes any JSON value; reports print these fields as numbers or one line each.
    for f in dataclasses.fields(env):
        value, kind = getattr(env, f.name), f.type.split(" ")[0]  # "int | None" -> "int"
        here = f"{where}: environment.{f.name}"
        if f.name == "libraries":
            for name, version in value.items():
                check_name(name, f"{here} name")
                check_name(version or "", f"{here}[{name}]", allow_empty=True)
        elif value is not None or "None" not in f.type:
            if type(value) is not _ENV_TYPES[kind]:  # not isinstance: a bool is no count
                raise ResultsError(f"{here}: expected {kind}, got {brief(value)}")
            if kind == "str":
                check_name(value, here, allow_empty=True)
    return env


def metric_to_dict(metric: Metric) -> dict:
    """A metric as results.json holds it: plain JSON, so it also travels on a pytest report
    from an xdist worker to the controller (the plugin), read back by metric_from_dict."""
    out = {"value": _encode(metric.value), "unit": metric.unit, "direction": metric.direction}
    if metric.sample is not None:
        out["sample"] = list(metric.sample.values)
    return out


def metric_from_dict(entry, here: str) -> Metric:
    """metric_to_dict's output back to a Metric, every field checked; `here` names it in an
    error."""
    if not isinstance(entry, dict) or not {"value", "unit", "direction"} <= set(entry) \
            or not set(entry) <= {"value", "unit", "direction", "sample"}:
        raise ResultsError(f"{here}: expected an object with value, unit, direction and "
                           "optionally sample")
    sample = None
    if "sample" in entry:
        raw = entry["sample"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_VALUES:
            raise ResultsError(f"{here}.sample: expected a list of 1 to {MAX_VALUES:,} numbers")
        # Named here, briefly: Sample's own message would repr a value of any size or depth.
        wrong = next((i for i, v in enumerate(raw)
                      if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if wrong is not None:
            raise ResultsError(f"{here}.sample[{wrong}]: {brief(raw[wrong])} is not a finite "
                               "number")
        try:
            sample = Sample(tuple(raw))
        except SampleError as exc:
            raise ResultsError(f"{here}.sample: {exc}") from None
    try:
        return Metric(_decode(entry["value"], here), entry["unit"], entry["direction"], sample)
    except ResultsError as exc:
        raise ResultsError(f"{here}: {exc}") from None


def _encode(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode(value, where: str):
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResultsError(f"{where}.value: expected a number, got {brief(value)}")
    return value


def _record(item, where: str) -> Record:
    if not isinstance(item, dict):
        raise ResultsError(f"{where}: expected an object")
    unknown = sorted(set(item) - _RECORD_FIELDS)
    if unknown:
        raise ResultsError(f"{where}: unknown field {brief(unknown[0])}")
    metrics_raw = item.get("metrics")
    if not isinstance(metrics_raw, dict):
        raise ResultsError(f"{where}: metrics must be an object")
    metrics = {}
    for name, entry in metrics_raw.items():
        metrics[name] = metric_from_dict(entry, f"{where}.metrics[{brief(name)}]")
    env = item.get("environment")
    try:
        return Record(suite=item.get("suite"), case=item.get("case"),
                      outcome=item.get("outcome"), reason=item.get("reason"), metrics=metrics,
                      timestamp=_string(item, "timestamp", where, allow_empty=True),
                      environment=None if env is None else _environment(env, where),
                      run_id=item.get("run_id"))
    except ResultsError as exc:
        raise ResultsError(f"{where}: {exc}") from None


def make_results(records: Iterable[Record], run_id: str | None = None,
                 environment: Environment | None = None) -> Results:
    """A run from records; its environment is the first record's, else this process's."""
    records = tuple(records)
    env = environment or next((r.environment for r in records if r.environment), None) \
        or current()
    return Results(run_id=run_id or new_run_id(), environment=env, records=records,
                   created=now())


def write_results(results: Results, path: Path | str) -> Path:
    """Write atomically, replacing an existing file (a reader never sees half a file); `-` is
    the command's machine output (stdout)."""
    write_text(path, results.to_json())
    return Path(path)


def save_records(records: Iterable[Record], path: Path | str, run_id: str | None = None,
                 environment: Environment | None = None) -> Results:
    """Write a complete results file (schema version, run id, environment, records)."""
    results = make_results(records, run_id=run_id, environment=environment)
    write_results(results, path)
    return results


def parse_json(text: str, source: str):
    """Strict JSON from an untrusted file: no bare NaN/Infinity, no number past
    MAX_NUMBER_CHARS or a float's range, no nesting past the parser's depth."""
    try:
        return json.loads(text, parse_constant=_bare_constant, parse_int=_int,
                          parse_float=_float)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{source}: not valid JSON ({exc})") from None
    except ResultsError as exc:  # a number or a constant the hooks refuse
        raise ResultsError(f"{source}: {exc}") from None
    except RecursionError:  # the schema nests 6 deep; Python's parser stops near 1,000
        raise ResultsError(f"{source}: JSON nested too deeply to read") from None


def read_capped(path: Path | str) -> str:
    """The text of a file from elsewhere: at most MAX_RESULTS_BYTES are ever read."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            # The size first, so a huge file is refused unread; then one byte past the cap at
            # most, since a pipe or a device has no size and a file may grow meanwhile.
            size = os.fstat(f.fileno()).st_size
            data = f.read(MAX_RESULTS_BYTES + 1) if size <= MAX_RESULTS_BYTES else b""
        if size > MAX_RESULTS_BYTES or len(data) > MAX_RESULTS_BYTES:
            raise ResultsError(f"{path}: larger than {MAX_RESULTS_BYTES:,} bytes, the most a "
                               "results file may have")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") \
            from None


def load_json(path: Path | str):
    """A JSON file from elsewhere, capped and strict (read_capped, parse_json)."""
    return parse_json(read_capped(path), str(path))


def load_results(path: Path | str) -> Results:
    """Read and check a results file: at most MAX_RESULTS_BYTES are ever read."""
    return Results.from_json(read_capped(path), str(path))
