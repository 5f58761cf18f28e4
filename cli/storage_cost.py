"""`iat storage-cost`: the InsEmb store's size by IAT Eq. 12, and the serving store's real size.

bytes = N_daily x T_days x d x bytes_per_value (fp32 4, fp16 2, int8 1); int8 adds its float32
per-vector scale (4 bytes per instance). The figure counts embedding values only, as Eq. 12 does;
``record_bytes`` adds this project's record header (storage.records: 48 bytes per record), still
without Redis' per-key overhead.

With ``--users U`` the serving store's size comes beside it, per codec: U x Lmax x bytes per
record, since Redis keeps each user's newest Lmax records only (a trimmed member's record is
deleted with it, storage/write_instances.lua); the full history lives outside Redis. Bytes per
record are measured (harness.store_memory) by writing whole sequences of such records into an
embedded redis-server and reading ``INFO memory``: key, value, TTL entry and sequence member,
allocator rounding included. ``--no-measure`` estimates them instead from overheads measured on
Redis 6.2 (loadtests/RESULTS.md, "Serving store memory"), within about 10%.
"""
from __future__ import annotations

import argparse
import json
import sys

from storage.codecs import CODECS, Codec
from storage.records import HEADER_BYTES

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
# Redis' bytes per servable record beyond the record's own (Redis 6.2, 64-bit, jemalloc, TTL set):
# a sequence of up to 128 members is a listpack, a longer one a skiplist, which costs more.
LISTPACK_MAX_ENTRIES = 128
OVERHEAD_LISTPACK, OVERHEAD_SKIPLIST = 235, 315
MEASURE_RECORDS = 8192  # records written per codec to measure (whole sequences of Lmax)


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances-per-day", required=True, type=_positive_int("--instances-per-day"), metavar="N",
                        help="training instances per day (N_daily)")
    parser.add_argument("--days", required=True, type=_positive_int("--days"), metavar="T", help="retention in days")
    parser.add_argument("--dim", required=True, type=_positive_int("--dim"), metavar="D", help="InsEmb dimension d")
    parser.add_argument("--dtype", choices=CODECS, default="fp32", help="stored codec (default fp32)")
    parser.add_argument("--users", type=_positive_int("--users"), metavar="U", default=None,
                        help="users served: also print the serving store's size, U x Lmax x bytes per record, per codec")
    parser.add_argument("--lmax", type=_positive_int("--lmax"), metavar="L", default=None,
                        help="records kept per user (default: IAT_MAX_SEQUENCE_LENGTH's default)")
    parser.add_argument("--no-measure", action="store_true",
                        help="estimate bytes per record instead of measuring them in an embedded redis-server")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in UNITS:
        if value < 1024 or unit == UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def estimate(instances_per_day: int, days: int, dim: int, dtype: str = "fp32") -> dict:
    codec = Codec(dtype)
    instances = instances_per_day * days
    eq12 = instances * codec.payload_bytes(dim)  # d x bytes per value (+ int8 scale)
    return {
        "instances_per_day": instances_per_day, "days": days, "dim": dim, "dtype": dtype,
        "instances": instances, "bytes_per_value": codec.bytes_per_value,
        "bytes_per_instance": codec.payload_bytes(dim),
        "bytes": eq12, "human": human_bytes(eq12),
        "record_bytes": instances * (codec.payload_bytes(dim) + HEADER_BYTES),
        "record_human": human_bytes(instances * (codec.payload_bytes(dim) + HEADER_BYTES)),
    }


def estimated_bytes_per_record(codec: str, lmax: int, dim: int) -> int:
    record = HEADER_BYTES + Codec(codec).payload_bytes(dim)
    return record + (OVERHEAD_LISTPACK if lmax <= LISTPACK_MAX_ENTRIES else OVERHEAD_SKIPLIST)


def measured_bytes_per_record(lmax: int, dim: int) -> tuple[dict[str, float], str]:
    """{codec: used_memory per servable record} from an embedded redis-server, and its version."""
    from harness.store_memory import bytes_per_record
    from storage.connection import EmbeddedRedis, connect

    server = EmbeddedRedis().start()
    try:
        client = connect(server.url, cluster=False)
        version = client.info("server")["redis_version"]
        users = max(1, -(-MEASURE_RECORDS // lmax))
        measured = {codec: bytes_per_record(client, codec, lmax, dim, sample_users=users) for codec in CODECS}
        client.close()
    finally:
        server.stop()
    return measured, version


def serving_size(users: int, lmax: int, dim: int, measure: bool = True) -> dict:
    """The serving store's size per codec: users x Lmax x bytes per record."""
    version = None
    if measure:
        per_record, version = measured_bytes_per_record(lmax, dim)
    else:
        per_record = {codec: estimated_bytes_per_record(codec, lmax, dim) for codec in CODECS}
    codecs = {}
    for codec, value in per_record.items():
        total = round(users * lmax * value)
        codecs[codec] = {"bytes_per_record": round(value, 1), "bytes": total, "human": human_bytes(total)}
    return {"users": users, "lmax": lmax, "records": users * lmax, "measured": measure,
            "redis_version": version, "codecs": codecs}


def _default_lmax() -> int:
    from services.config import Settings

    return Settings.model_fields["max_sequence_length"].default


def run(args: argparse.Namespace) -> int:
    result = estimate(args.instances_per_day, args.days, args.dim, args.dtype)
    if args.users is not None:
        try:
            result["serving"] = serving_size(args.users, args.lmax or _default_lmax(), args.dim, not args.no_measure)
        except (OSError, RuntimeError) as exc:  # no redis-server binary, or it would not start
            print(f"iat storage-cost: cannot measure in an embedded redis-server ({exc}); "
                  "--no-measure estimates instead", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result))
        return 0
    scale = " + 4-byte scale" if args.dtype == "int8" else ""
    print(
        f"{result['instances']:,} instances x {args.dim} x {result['bytes_per_value']} B ({args.dtype}{scale})"
        f" = {result['bytes']:,} bytes ({result['human']})"
    )
    print(f"with this store's {HEADER_BYTES}-byte record headers: {result['record_bytes']:,} bytes ({result['record_human']})")
    if "serving" in result:
        serving = result["serving"]
        how = (f"measured in redis {serving['redis_version']}" if serving["measured"]
               else "estimated (--no-measure)")
        print(f"serving store, at most (Redis holds each user's newest Lmax only): {serving['users']:,} users x Lmax "
              f"{serving['lmax']:,} = {serving['records']:,} records, bytes per record {how}, Redis overhead included:")
        for codec, row in serving["codecs"].items():
            print(f"  {codec:<5} {row['bytes_per_record']:>8.1f} B/record = {row['bytes']:,} bytes ({row['human']})")
    return 0
