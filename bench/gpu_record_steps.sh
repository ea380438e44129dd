#!/bin/sh
# Record a 1 Hz NVML trace of GPU 0 under a stepped PyTorch load (read-only: no GPU setting
# is changed; the load is our own process): idle 20 s, load 90 s, idle 60 s, load 45 s,
# idle 30 s, load 45 s, idle 45 s. Usage: bench/gpu_record_steps.sh OUTPUT.jsonl
# (on the GPU machine, with the wheels on PYTHONPATH: see the device README notes in BENCHMARKS.md).
set -eu
out=$1
python3 -m governor record --output "$out" --interval 1 --duration 360 &
rec=$!
sleep 20
for step in "90 60" "45 30" "45 45"; do
  set -- $step
  python3 tests/gpu/gpu_load.py 4 "$1" >/dev/null
  sleep "$2"
done
wait $rec
