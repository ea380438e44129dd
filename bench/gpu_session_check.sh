#!/usr/bin/env bash
# One read-only validation pass on the GPU machine (repo root, wheels carried in .whl/):
# the GPU tests, the dry-run check with a /metrics scrape (MIG mode, power-limit range), and
# nvidia-smi's view of the power settings and MIG mode before and after (they must not move).
# Usage: bash bench/gpu_session_check.sh OUTDIR   (never changes a GPU setting)
set -u
out=${1:?OUTDIR}
mkdir -p "$out/d"
q="index,name,power.limit,power.default_limit,power.min_limit,power.max_limit,mig.mode.current,temperature.gpu"
nvidia-smi --query-gpu=$q --format=csv > "$out/d/smi-before.csv" 2>&1
python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/gpu > "$out/d/gpu-tests.txt" 2>&1
echo "pytest rc=$?" >> "$out/d/gpu-tests.txt"
bash bench/gpu_dry_run_check.sh "$out/d/dry" > "$out/d/dry-run.txt" 2>&1
nvidia-smi --query-gpu=$q --format=csv > "$out/d/smi-after.csv" 2>&1
tail -3 "$out/d/gpu-tests.txt"; cat "$out/d/dry/metrics-mig-range.txt"; cat "$out/d/smi-before.csv" "$out/d/smi-after.csv"
tar czf "$out/session-check.tgz" -C "$out" d && rm -rf "$out/d"
