"""A dataset's log rows as raw instances, the JSON of POST /v1/instances (DESIGN.md section 7).

What a live system would send the source service: ids, the event time, the schema's own
column names as features (side tables joined, multi-valued values joined with ``|``), labels.
Request ids are the loader's (``models.data.prepared``), so the InsIDs the service computes equal the
offline ones. Used to seed a service (deploy/seed.py, the demo), by load tests and by the
end-to-end tests that compare served scores with offline predictions.
"""
from __future__ import annotations

from pathlib import Path

from models.data.prepared import read_table
from models.data.schema import DatasetSchema
from models.runtime.hashing import ins_id


def raw_instances(schema: DatasetSchema, data_dir: Path) -> list[dict]:
    """Every log row as a POST /v1/instances instance, in the loader's order (time, then InsID)."""
    log = schema.log
    header, rows = read_table(data_dir / log.path, log.sep, "log")
    col = {name: i for i, name in enumerate(header)}
    joins = []  # (table spec, {key: row dict})
    for table in schema.tables:
        t_header, t_rows = read_table(data_dir / table.path, table.sep, table.path)
        joins.append((table, {r[t_header.index(table.key)]: dict(zip(t_header, r)) for r in t_rows}))
    ms = 1000 if log.timestamp_unit == "s" else 1
    out = []
    for row in rows:
        get = lambda name: row[col[name]].strip() if col[name] < len(row) else ""  # noqa: E731
        categorical = {n: get(n) for n in log.categorical}
        categorical |= {n: "|".join(get(n).split(sep)) for n, sep in log.multi.items()}
        numeric = {n: float(get(n)) for n in log.numeric if get(n)}
        for table, by_key in joins:
            side = by_key.get(get(table.key))
            if side is None:
                continue  # a failed join: the service encodes missing values as the loader does
            categorical |= {n: side[n].strip() for n in table.categorical}
            categorical |= {n: "|".join(side[n].split(sep)) for n, sep in table.multi.items()}
            numeric |= {n: float(side[n]) for n in table.numeric if side[n].strip()}
        ts_raw = get(log.timestamp)
        labels = {lab.name: int(float(get(lab.column)) >= lab.min) if lab.min is not None
                  else int(float(get(lab.column))) for lab in schema.labels}
        out.append({
            # The loader's request id (models/data.py): the InsID hashes it, so it must match.
            "request_id": get(log.request) if log.request else f"{get(log.user)}:{ts_raw}",
            "user_id": get(log.user), "item_id": get(log.item),
            "timestamp_ms": int(float(ts_raw) * ms),
            "features": {"categorical": categorical, "numeric": numeric}, "labels": labels,
        })
    # The loader's canonical order: time, ties by InsID.
    out.sort(key=lambda inst: (inst["timestamp_ms"], ins_id(inst["request_id"], inst["item_id"], inst["timestamp_ms"])))
    return out
