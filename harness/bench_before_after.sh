#!/bin/bash
# Before/after in ONE `iat bench score` run: another checkout's `iat serve ranking` (BASE, e.g.
# `git worktree add /tmp/base d8687e5`) serves its own TorchScript trace of the same bench model
# (built with seed 0: same weights) on the same embedded Redis, timed call by call as grpc:base
# beside this checkout's grpc (scores checked equal within 1e-5). Extra arguments go to
# `iat bench score`. Run from this checkout's root:
#   BASE=/tmp/base QUICK=<a quick export> WORK=/tmp/before-after harness/bench_before_after.sh \
#     --methods fetch,assemble,assemble:previous,model,model:previous,inproc,inproc:miss,grpc \
#     --candidates 100,500 --history 256 --saturation-s 0 --budget 15 --json after.json
set -e
BASE=${BASE:?a checkout of the base commit}; QUICK=${QUICK:?a quick export (iat train --quick + iat export)}
WORK=${WORK:-/tmp/iat-before-after}; PY=${PYTHON:-python}; HERE=$PWD
mkdir -p "$WORK"
(cd "$BASE" && PYTHONPATH="$BASE" $PY -c "
from pathlib import Path; from harness.bench_ranking import build_bench_models
build_bench_models(Path('$QUICK'), Path('$WORK/base-models'))")
rm -f "$WORK/redis.url"
PYTHONPATH="$HERE" $PY -c "
import signal, sys, time; from pathlib import Path; from storage.connection import EmbeddedRedis
r = EmbeddedRedis(directory=Path('$WORK/redis')).start(); Path('$WORK/redis.url').write_text(r.url)
signal.signal(signal.SIGTERM, lambda *_: (r.stop(), sys.exit(0)))  # the redis-server goes with it
time.sleep(86400)" & REDIS_PID=$!
port() { $PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
GRPC_PORT=$(port); HTTP_PORT=$(port)
for _ in $(seq 60); do [ -s "$WORK/redis.url" ] && break; sleep 1; done
URL=$(cat "$WORK/redis.url")
(cd "$BASE" && exec env PYTHONPATH="$BASE" REDIS_URL="$URL" IAT_MODEL_DIR="$WORK/base-models" IAT_RELOAD_INTERVAL_S=0 \
  IAT_RUNTIME="${RUNTIME:-torchscript}" OMP_NUM_THREADS=1 IAT_API_TOKEN= \
  $PY -m cli serve ranking --host 127.0.0.1 --grpc-port "$GRPC_PORT" --port "$HTTP_PORT" > "$WORK/base-ranking.log" 2>&1) &
BASE_PID=$!
trap 'kill $BASE_PID $REDIS_PID 2>/dev/null' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" > /dev/null && break; sleep 1; done
PYTHONPATH="$HERE" $PY -m cli bench score --quick-models "$QUICK" --redis-url "$URL" --work-dir "$WORK/new" \
  --runtime "${RUNTIME:-torchscript}" --grpc-peer "base=127.0.0.1:$GRPC_PORT" "$@"
