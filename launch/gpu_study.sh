#!/usr/bin/env bash
# The `gpu` variant of the comparison study (configs/study_fashion.py:gpu) on the GPU
# machine, resumable across device calls of under 8 minutes each:
#   bash benchmarks/fetch_gpu_wheels.sh      # once, here: wheels + Fashion-MNIST in .whl/
#   run(command="bash launch/gpu_study.sh", carry=[".whl", ".study"], timeout_s=540)
#   mkdir -p .study && tar -xzf FILES_AT/study_records.tgz -C .study   # here, after each call
# Each call trains the next runs for STUDY_SECONDS (default 450), keeps every finished run's
# record (run.json: results and costs) and returns all of them in study_records.tgz, plus
# study.log and, once the last run is done, study.json, study.md and the two figures.
# A run cut off by the time limit starts again from scratch in the next call.
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
