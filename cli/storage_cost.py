"""`iat storage-cost`: the InsEmb store's size by IAT Eq. 12.

bytes = N_daily x T_days x d x bytes_per_value (fp32 4, fp16 2, int8 1); int8 adds its float32
per-vector scale (4 bytes per instance). The figure counts embedding values only, as Eq. 12 does;
``record_bytes`` adds this project's record header (storage.records: 48 bytes per record), still
without Redis' per-key overhead.
"""
from __future__ import annotations

import argparse
import json

from storage.codecs import CODECS, Codec
from storage.records import HEADER_BYTES

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


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


def run(args: argparse.Namespace) -> int:
    result = estimate(args.instances_per_day, args.days, args.dim, args.dtype)
    if args.json:
        print(json.dumps(result))
        return 0
    scale = " + 4-byte scale" if args.dtype == "int8" else ""
    print(
        f"{result['instances']:,} instances x {args.dim} x {result['bytes_per_value']} B ({args.dtype}{scale})"
        f" = {result['bytes']:,} bytes ({result['human']})"
    )
    print(f"with this store's {HEADER_BYTES}-byte record headers: {result['record_bytes']:,} bytes ({result['record_human']})")
    return 0
