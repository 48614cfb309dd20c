#!/usr/bin/env bash
# 1,000-edit CounterFact streams (docs/results.md, "1,000 sequential edits"), one editor after another on one
# core. Each spec is EDITOR:BATCH. --resume continues a stream that was killed (its journal and checkpoint are in
# $REPORTS/stream1000-EDITOR/sequential), so rerunning the same command picks up where it stopped.
#
#   benchmarks/streams.sh encore:100 grace:1 memit:100 alphaedit:100
#   python benchmarks/streams.py reports/stream1000-*/latest.json --plot docs/streams-1000.png
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
DATA="${HARNESS_DATA_DIR:-../shared/data}"
REPORTS="${REPORTS:-reports}"
mkdir -p "$REPORTS/logs"
for spec in "$@"; do
  editor=${spec%%:*}; batch=${spec##*:}
  python -m pytest suites/test_sequential.py --editor "$editor" --data-dir "$DATA" --dataset counterfact-easyedit \
    --seq-edits 1000 --batch-size "$batch" --ppl-schedule geometric --probe-every 100 --probe-size 50 \
    --report-dir "$REPORTS/stream1000-$editor" --resume -p no:cacheprovider >> "$REPORTS/logs/$editor.log" 2>&1
  echo "$editor: exit $? $(date -u +%FT%TZ)" | tee -a "$REPORTS/logs/done.txt"
done
