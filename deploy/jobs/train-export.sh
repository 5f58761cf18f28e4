#!/bin/sh
# The compose `train` job: train the serving set and export it into the model volume.
# MovieLens is read from the read-only data mount when it is there; without it the job trains
# on the synthetic generator so that `docker compose up` works on any machine. Either way it trains
# on the first DEMO_MAX_USERS users (by user id), as `iat demo` does; the seed job replays the same.
set -eu
if ls "$IAT_MODEL_DIR"/*/*/manifest.json >/dev/null 2>&1; then
  echo "models already exported in $IAT_MODEL_DIR: nothing to do (remove the volume to retrain)"
  exit 0
fi
if [ -f "$IAT_DATA_DIR/movielens-100k/ml-100k.inter" ]; then
  iat train --dataset movielens-100k --data-dir "$IAT_DATA_DIR/movielens-100k" --out /runs/serving --quick --max-users "$DEMO_MAX_USERS" --no-progress
else
  echo "no MovieLens under $IAT_DATA_DIR: training on the synthetic generator"
  iat train --synthetic --out /runs/serving --quick --max-users "$DEMO_MAX_USERS" --no-progress
fi
# TorchScript is the runtime the services load by default (IAT_RUNTIME); the AOTInductor
# packages cost ~35 s of compile per model, so the demo skips them.
iat export --from /runs/serving --out "$IAT_MODEL_DIR" --no-aoti
