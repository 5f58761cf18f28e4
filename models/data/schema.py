"""Dataset schema: which files, columns and labels make up the interaction log (DESIGN.md 7).

A schema is a TOML file; paths inside it are relative to the data directory given at load
time. ``load_schema("movielens-100k")`` returns a schema shipped in ``models/data/schemas/``.
"""
from __future__ import annotations

import bisect
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_DIR = Path(__file__).with_name("schemas")


class SchemaError(ValueError):
    """A schema file is malformed; the message names the offending key."""


def default_sep(path: str) -> str:
    return "," if path.lower().endswith(".csv") else "\t"


@dataclass(frozen=True)
class LabelSpec:
    """One task: the label is ``column >= min`` (or the 0/1 column itself when min is None)."""
    name: str
    column: str
    min: float | None = None


@dataclass(frozen=True)
class BucketSpec:
    """A categorical feature derived from a numeric column: the value is the index of the
    bucket ``column`` falls in (``edges`` ascending; ``x < edges[0]`` is bucket 0, missing is
    absent)."""
    column: str
    edges: tuple[float, ...]

    def bucket(self, value: float) -> str:
        if value != value:  # NaN: missing
            return ""
        return str(bisect.bisect_right(self.edges, value))


@dataclass(frozen=True)
class TableSpec:
    """A side table joined on ``key`` (a column of the log and of the table)."""
    path: str
    key: str
    sep: str
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    multi: dict[str, str] = field(default_factory=dict)  # column -> value separator
    group: str = ""  # "user" / "item" / "context"; inferred from key when empty
    buckets: dict[str, BucketSpec] = field(default_factory=dict)  # feature name -> bucketing


@dataclass(frozen=True)
class LogSpec:
    path: str
    sep: str
    user: str
    item: str
    timestamp: str
    timestamp_unit: str = "s"
    request: str | None = None  # request-id column; absent: f"{user}:{timestamp}"
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    multi: dict[str, str] = field(default_factory=dict)
    buckets: dict[str, BucketSpec] = field(default_factory=dict)
    # Columns recorded after the exposure (clicks, watch time, ...): they may be labels, or
    # side info of PAST instances, never a feature of the instance being predicted. The schema
    # refuses any feature (or bucket source) among them.
    outcomes: tuple[str, ...] = ()
    # Keep one row per InsID (request, item, timestamp), the first in file order: a log that
    # repeats an exposure with a cosmetic difference (KuaiRand's hourmin) would otherwise give
    # two instances one InsID, which the instance store keeps as one.
    dedupe: bool = False


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    log: LogSpec
    labels: tuple[LabelSpec, ...]
    tables: tuple[TableSpec, ...] = ()
    context_features: tuple[str, ...] = ("hour", "weekday")  # derived from the timestamp (UTC)
    source: Path | None = None
    # A log has no label arrival times: its labels arrive this long after their instance (TOML
    # ``label_delay_s``, default 0: known from the instance's timestamp on). Offline histories
    # show a label only to instances after it arrived, as serving does (PreparedData.history_labels).
    label_delay_ms: int = 0

    @property
    def tasks(self) -> list[str]:
        return [label.name for label in self.labels]

    @classmethod
    def from_toml(cls, path: str | Path) -> "DatasetSchema":
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SchemaError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict, source: Path | None = None) -> "DatasetSchema":
        where = f"{source}: " if source else ""

        def need(table: dict, key: str, ctx: str):
            if key not in table:
                raise SchemaError(f"{where}missing required key '{ctx}{key}'")
            return table[key]

        def str_list(table: dict, key: str, ctx: str) -> tuple[str, ...]:
            value = table.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SchemaError(f"{where}'{ctx}{key}' must be a list of column names")
            return tuple(value)

        def multi_map(table: dict, ctx: str) -> dict[str, str]:
            value = table.get("multi", {})
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
            ):
                raise SchemaError(f"{where}'{ctx}multi' must map column -> non-empty separator")
            return dict(value)

        def bucket_map(table: dict, ctx: str) -> dict[str, BucketSpec]:
            value = table.get("buckets", {})
            if not isinstance(value, dict):
                raise SchemaError(f"{where}'{ctx}buckets' must map feature name -> {{column, edges}}")
            out = {}
            for name, spec in value.items():
                if not isinstance(spec, dict) or not isinstance(spec.get("column"), str):
                    raise SchemaError(f"{where}'{ctx}buckets.{name}.column' must be a column name")
                edges = spec.get("edges")
                if (not isinstance(edges, list) or not edges
                        or not all(isinstance(e, (int, float)) for e in edges)
                        or any(b <= a for a, b in zip(edges, edges[1:]))):
                    raise SchemaError(f"{where}'{ctx}buckets.{name}.edges' must be a non-empty "
                                      "list of strictly increasing numbers")
                out[name] = BucketSpec(spec["column"], tuple(float(e) for e in edges))
            return out

        log_raw = need(raw, "log", "")
        if not isinstance(log_raw, dict):
            raise SchemaError(f"{where}'log' must be a table")
        log_path = need(log_raw, "path", "log.")
        unit = log_raw.get("timestamp_unit", "s")
        if unit not in ("s", "ms"):
            raise SchemaError(f"{where}'log.timestamp_unit' must be \"s\" or \"ms\", got {unit!r}")
        log = LogSpec(
            path=log_path,
            sep=log_raw.get("sep", default_sep(log_path)),
            user=need(log_raw, "user", "log."),
            item=need(log_raw, "item", "log."),
            timestamp=need(log_raw, "timestamp", "log."),
            timestamp_unit=unit,
            request=log_raw.get("request"),
            categorical=str_list(log_raw, "categorical", "log."),
            numeric=str_list(log_raw, "numeric", "log."),
            multi=multi_map(log_raw, "log."),
            buckets=bucket_map(log_raw, "log."),
            outcomes=str_list(log_raw, "outcomes", "log."),
            dedupe=log_raw.get("dedupe", False),
        )
        if not isinstance(log.dedupe, bool):
            raise SchemaError(f"{where}'log.dedupe' must be true or false")
        labels_raw = raw.get("labels", [])
        if not isinstance(labels_raw, list) or not labels_raw:
            raise SchemaError(f"{where}'labels' must be a non-empty array of tables ([[labels]])")
        labels = []
        for i, lab in enumerate(labels_raw):
            ctx = f"labels[{i}]."
            minimum = lab.get("min")
            if minimum is not None and not isinstance(minimum, (int, float)):
                raise SchemaError(f"{where}'{ctx}min' must be a number")
            labels.append(LabelSpec(name=need(lab, "name", ctx), column=need(lab, "column", ctx),
                                    min=None if minimum is None else float(minimum)))
        if len({lab.name for lab in labels}) != len(labels):
            raise SchemaError(f"{where}'labels' has duplicate task names")
        tables = []
        for i, tab in enumerate(raw.get("tables", [])):
            ctx = f"tables[{i}]."
            tpath = need(tab, "path", ctx)
            key = need(tab, "key", ctx)
            group = tab.get("group") or ("user" if key == log.user else
                                         "item" if key == log.item else "context")
            if group not in ("user", "item", "context", "cross"):
                raise SchemaError(f"{where}'{ctx}group' must be user, item, context or cross")
            tables.append(TableSpec(path=tpath, key=key, sep=tab.get("sep", default_sep(tpath)),
                                    categorical=str_list(tab, "categorical", ctx),
                                    numeric=str_list(tab, "numeric", ctx),
                                    multi=multi_map(tab, ctx), group=group,
                                    buckets=bucket_map(tab, ctx)))
        context = raw.get("context_features", ["hour", "weekday"])
        bad = [c for c in context if c not in ("hour", "weekday")]
        if bad:
            raise SchemaError(f"{where}'context_features' supports hour and weekday, got {bad}")
        delay = raw.get("label_delay_s", 0)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < 2**31:
            raise SchemaError(f"{where}'label_delay_s' must be a number of seconds >= 0, got {delay!r}")
        schema = cls(name=raw.get("name", source.stem if source else "dataset"), log=log,
                     labels=tuple(labels), tables=tuple(tables),
                     context_features=tuple(context), source=source, label_delay_ms=round(delay * 1000))
        schema._check_unique_fields(where)
        schema._check_no_outcome_features(where)
        return schema

    def _check_unique_fields(self, where: str) -> None:
        seen: dict[str, str] = {}
        specs = [("log", self.log.categorical, self.log.numeric, self.log.multi, self.log.buckets)] + [
            (t.path, t.categorical, t.numeric, t.multi, t.buckets) for t in self.tables]
        for origin, cats, nums, multi, buckets in specs:
            for name in [*cats, *nums, *multi, *buckets]:
                if name in seen or name in (self.log.user, self.log.item, *self.context_features):
                    raise SchemaError(f"{where}feature column '{name}' ({origin}) is declared twice")
                seen[name] = origin

    def _check_no_outcome_features(self, where: str) -> None:
        log = self.log
        outcomes = set(log.outcomes)
        features = [("log.categorical", c) for c in log.categorical] + \
                   [("log.numeric", c) for c in log.numeric] + [("log.multi", c) for c in log.multi] + \
                   [(f"log.buckets.{n}.column", b.column) for n, b in log.buckets.items()] + \
                   [("log.user", log.user), ("log.item", log.item), ("log.timestamp", log.timestamp)]
        for where_key, column in features:
            if column in outcomes:
                raise SchemaError(f"{where}'{where_key}': column '{column}' is an outcome (log.outcomes): "
                                  "it may be a label, never a feature of the instance it describes")
        for i, table in enumerate(self.tables):
            if table.key in outcomes:
                raise SchemaError(f"{where}'tables[{i}].key': column '{table.key}' is an outcome (log.outcomes)")

    @property
    def feature_columns(self) -> set[str]:
        """Every raw column a feature is computed from (log and side tables)."""
        cols = {self.log.user, self.log.item, self.log.timestamp, *self.log.categorical,
                *self.log.numeric, *self.log.multi, *(b.column for b in self.log.buckets.values())}
        for t in self.tables:
            cols |= {t.key, *t.categorical, *t.numeric, *t.multi, *(b.column for b in t.buckets.values())}
        return cols


def load_schema(name_or_path: str | Path) -> DatasetSchema:
    """A shipped schema by name (``"movielens-100k"``) or any schema file by path."""
    candidate = SCHEMA_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return DatasetSchema.from_toml(candidate)
    path = Path(name_or_path)
    if path.is_file():
        return DatasetSchema.from_toml(path)
    shipped = sorted(p.stem for p in SCHEMA_DIR.glob("*.toml"))
    raise SchemaError(f"unknown schema {name_or_path!r}: not a file, and shipped ones are {shipped}")
