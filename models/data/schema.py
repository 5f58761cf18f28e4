"""Dataset schema: which files, columns and labels make up the interaction log (DESIGN.md 7).

A schema is a TOML file; paths inside it are relative to the data directory given at load
time. ``load_schema("movielens-100k")`` returns a schema shipped in ``models/data/schemas/``.
"""
from __future__ import annotations

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
class TableSpec:
    """A side table joined on ``key`` (a column of the log and of the table)."""
    path: str
    key: str
    sep: str
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    multi: dict[str, str] = field(default_factory=dict)  # column -> value separator
    group: str = ""  # "user" / "item" / "context"; inferred from key when empty


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


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    log: LogSpec
    labels: tuple[LabelSpec, ...]
    tables: tuple[TableSpec, ...] = ()
    context_features: tuple[str, ...] = ("hour", "weekday")  # derived from the timestamp (UTC)
    source: Path | None = None

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
        )
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
                                    multi=multi_map(tab, ctx), group=group))
        context = raw.get("context_features", ["hour", "weekday"])
        bad = [c for c in context if c not in ("hour", "weekday")]
        if bad:
            raise SchemaError(f"{where}'context_features' supports hour and weekday, got {bad}")
        schema = cls(name=raw.get("name", source.stem if source else "dataset"), log=log,
                     labels=tuple(labels), tables=tuple(tables),
                     context_features=tuple(context), source=source)
        schema._check_unique_fields(where)
        return schema

    def _check_unique_fields(self, where: str) -> None:
        seen: dict[str, str] = {}
        specs = [("log", self.log.categorical, self.log.numeric, self.log.multi)] + [
            (t.path, t.categorical, t.numeric, t.multi) for t in self.tables]
        for origin, cats, nums, multi in specs:
            for name in [*cats, *nums, *multi]:
                if name in seen or name in (self.log.user, self.log.item, *self.context_features):
                    raise SchemaError(f"{where}feature column '{name}' ({origin}) is declared twice")
                seen[name] = origin


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
