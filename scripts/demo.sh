#!/usr/bin/env bash
# The main job on the embedded default: a local Redis (started if none answers), SQLite and local
# storage under ./.segq, one local worker, a small generated dataset, `segq submit --wait`, then
# Dice against the ground truth and the results table.
#   scripts/demo.sh [WORKDIR] [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-demo}
count=${2:-4}
scripts/setup.sh
scripts/services.sh
export SEGQ_DATA_DIR=${SEGQ_DATA_DIR:-$PWD/.segq}
mkdir -p "$SEGQ_DATA_DIR"
# The demo's database lives here, not in segq's default data directory: say so, first and last.
see_again="export SEGQ_DATA_DIR=$SEGQ_DATA_DIR   # then: segq status, segq results, segq report"
echo "the demo keeps its database in $SEGQ_DATA_DIR; to look at it afterwards: $see_again"
name="demo-$(date +%Y%m%d-%H%M%S)"

segq demo-data -o "$work" --count "$count"
segq db upgrade
segq worker -n "demo@%h" -l WARNING >"$SEGQ_DATA_DIR/demo-worker.log" 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT

segq submit "$work/images" --out "$work/masks" --model models/demo/model.toml --name "$name" --wait --timeout 1800
segq evaluate "$name" --truth "$work/truth"
segq results "$name"
echo "masks in $work/masks; the worker's log is $SEGQ_DATA_DIR/demo-worker.log"
echo "to see this dataset again from another shell: $see_again"
