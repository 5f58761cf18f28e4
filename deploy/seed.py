"""Seed a running source service with a dataset's instances (the compose `seed` job).

Reads the log and side tables the way the trainer does (same schema, same request ids, so the
stored InsIDs equal the offline ones) and POSTs them in time order to /v1/instances as raw
requests (DESIGN.md section 7); the sequencer then builds every user's sequence from the stream.

    python deploy/seed.py --source-url http://source:8001 --dataset movielens-100k --data-dir /data
    python deploy/seed.py --source-url http://source:8001 --schema runs/serving/synthetic-data/schema.toml
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

from models.data.raw import raw_instances
from models.data.schema import DatasetSchema, load_schema


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--schema", type=Path, help="dataset schema TOML (paths relative to --data-dir)")
    src.add_argument("--dataset", help="a schema shipped with the project (movielens-100k)")
    parser.add_argument("--data-dir", type=Path, help="data directory (default: the schema file's folder)")
    parser.add_argument("--source-url", required=True, help="base URL of the source service")
    parser.add_argument("--batch", type=int, default=512, help="instances per POST (<= IAT_INGEST_MAX_REQUEST)")
    parser.add_argument("--limit", type=int, default=0, help="seed only the newest N instances (0: all)")
    parser.add_argument("--max-users", type=int, default=0,
                        help="seed only the first N users by user id, those `iat train --max-users N` trains on (0: all)")


def post(url: str, instances: list[dict]) -> int:
    body = json.dumps({"instances": instances}).encode()
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("IAT_API_TOKEN")  # the source service requires it when it has one
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, body, headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return int(json.load(response)["accepted"])


def run(args: argparse.Namespace) -> int:
    schema = DatasetSchema.from_toml(args.schema) if args.schema else load_schema(args.dataset)
    data_dir = args.data_dir or (args.schema.parent if args.schema else Path("."))
    instances = raw_instances(schema, data_dir)
    if args.max_users:
        # The loader numbers users in sorted order of their ids (np.unique); train keeps the first N.
        kept = set(sorted({inst["user_id"] for inst in instances})[:args.max_users])
        instances = [inst for inst in instances if inst["user_id"] in kept]
    if args.limit:
        instances = instances[-args.limit:]
    url = args.source_url.rstrip("/") + "/v1/instances"
    accepted = 0
    for start in range(0, len(instances), args.batch):
        accepted += post(url, instances[start:start + args.batch])
        print(f"seeded {accepted}/{len(instances)}", flush=True)
    return 0 if accepted == len(instances) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="seed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
