#!/bin/sh
# The compose `seed` job: replay the training data through the running source service so that
# the store holds InsEmbs and the sequencer builds user sequences (what ranking then reads).
# Same data choice as train-export.sh: MovieLens when mounted, else the job's synthetic data, and
# the same users (the first DEMO_MAX_USERS by user id).
set -eu
if [ -f "$IAT_DATA_DIR/movielens-100k/ml-100k.inter" ]; then
  python deploy/seed.py --source-url "$SOURCE_URL" --dataset movielens-100k --data-dir "$IAT_DATA_DIR/movielens-100k" --max-users "$DEMO_MAX_USERS"
else
  python deploy/seed.py --source-url "$SOURCE_URL" --schema /runs/serving/synthetic-data/schema.toml --max-users "$DEMO_MAX_USERS"
fi
