#!/bin/bash
# Before/after of the history fetch as the Feast comparison times it (loadtests/report.py:our_fetch:
# sync InstanceStore.read_history of users bench-h64 and bench-h256, loopback TCP redis-server),
# this checkout against another (BASE, e.g. `git archive <commit> | tar -x -C /tmp/base`) on ONE
# redis-server seeded once, a fresh process per side and round, sides alternating. Prints one JSON
# line per side and round: {"side", "L", "p50_ms"}. Run from this checkout's root:
#   BASE=/tmp/base QUICK=<a quick export> WORK=/tmp/fetch-ab ROUNDS=6 ITERATIONS=1500 harness/fetch_before_after.sh
set -e
BASE=${BASE:?a checkout of the base commit}; QUICK=${QUICK:?a quick export (iat train --quick + iat export)}
WORK=${WORK:-/tmp/iat-fetch-ab}; PY=${PYTHON:-python}; HERE=$PWD
ROUNDS=${ROUNDS:-6}; ITERATIONS=${ITERATIONS:-1500}
mkdir -p "$WORK"; rm -f "$WORK/redis.url"
PYTHONPATH="$HERE" $PY -c "
import signal, sys, time; from pathlib import Path
from harness.processes import free_port; from storage.connection import EmbeddedRedis
r = EmbeddedRedis(directory=Path('$WORK/redis'), port=free_port()).start(); Path('$WORK/redis.url').write_text(r.url)
signal.signal(signal.SIGTERM, lambda *_: (r.stop(), sys.exit(0)))  # the redis-server goes with it
time.sleep(86400)" & REDIS_PID=$!
trap 'kill $REDIS_PID' EXIT
for _ in $(seq 60); do [ -s "$WORK/redis.url" ] && break; sleep 1; done
URL=$(cat "$WORK/redis.url")
# this checkout's bench model and records (the source lineage they carry) serve both sides
PYTHONPATH="$HERE" $PY -c "
from pathlib import Path; from harness.bench_ranking import build_bench_models, seed_histories
from services.config import Settings
d = build_bench_models(Path('$QUICK'), Path('$WORK/models'))
seed_histories(d, '$URL', [64, 256], Settings(redis_url='$URL'))"
for round in $(seq "$ROUNDS"); do
  for side in before after; do
    DIR=$([ $side = before ] && echo "$BASE" || echo "$HERE")
    (cd "$DIR" && PYTHONPATH="$DIR" $PY -c "
import json; from pathlib import Path; from loadtests.report import our_fetch
for r in our_fetch('$URL', Path('$WORK/models'), ['bench-h64', 'bench-h256'], $ITERATIONS):
    print(json.dumps({'side': '$side', 'round': $round, 'L': r['length'], 'p50_ms': r['p50_ms']}))")
  done
done
