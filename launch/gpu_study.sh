#!/usr/bin/env bash
# The `gpu` variant of the comparison study (configs/study_fashion.py:gpu) on a GPU host,
# in pieces of STUDY_SECONDS (default 450) each:
#   bash benchmarks/fetch_gpu_wheels.sh      # once, where pip reaches PyPI; copy .whl/ over
#   bash launch/gpu_study.sh                 # on the GPU host; repeat until study.json appears
# Each piece trains the next runs, keeps every finished run's record (run.json: results and
# costs) under runs/study_fashion_gpu/study, and writes all of them to $OUT (default
# /tmp/gpu_study) as study_records.tgz, plus study.log and, once the last run is done,
# study.json, study.md and the two figures. On a fresh host, first unpack the last pieces'
# records into the checkout:  mkdir -p .study && tar -xzf study_records.tgz -C .study
# A run cut off by the time limit starts again from scratch in the next piece.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_study}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source benchmarks/gpu_env.sh
W=runs/study_fashion_gpu
mkdir -p "$W/study"
if [ -d .study/study ]; then cp -r .study/study/. "$W/study/"; fi
timeout --signal=KILL "${STUDY_SECONDS:-450}" python3 -m launch.main \
  --config=configs/study_fashion.py:gpu --mode=study --workdir="$W" 2>&1 \
  | grep --line-buffered -v "it/s]" | tee "$OUT/study.log"
(cd "$W" && find study -name run.json -print0 | tar -czf "$OUT/study_records.tgz" --null -T -)
for f in study.json study.md study_label_fraction.png study_bytes.png; do
  if [ -f "$W/results/$f" ]; then cp "$W/results/$f" "$OUT/"; fi
done
echo "finished runs: $(tar -tzf "$OUT/study_records.tgz" | wc -l)"
