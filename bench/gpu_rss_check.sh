#!/usr/bin/env bash
# Where the daemon's resident memory goes on a real GPU, against a Python that only initialises
# NVML (the baseline of bench/gpu_overhead.py), mapping by mapping (bench/rss_breakdown.py).
# Read-only: the governor runs with dry_run = true and --dry-run.
# Usage (repo root, on the GPU machine): bash bench/gpu_rss_check.sh OUTDIR
set -u
out=${1:-/tmp/gg-rss}
mkdir -p "$out"
work=$(mktemp -d)
mkdir -m 755 "$work/state"
printf 'dry_run = true\nstate_dir = "%s"\nruntime_dir = ""\n[metrics]\nport = 19848\n' "$work/state" > "$work/governor.toml"
python3 -m governor run --config "$work/governor.toml" --dry-run --log-format json > "$out/governor.log" 2>&1 &
gov=$!
python3 -c "
import time, pynvml
pynvml.nvmlInit()
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    pynvml.nvmlDeviceGetTemperature(h, 0); pynvml.nvmlDeviceGetComputeRunningProcesses(h)
time.sleep(60)" &
base=$!
sleep 15
for _ in $(seq 50); do curl -s -o /dev/null 127.0.0.1:19848/metrics; done
sleep 5
python3 bench/rss_breakdown.py "$gov" "$base" > "$out/rss-breakdown.json"
python3 - "$out/rss-breakdown.json" "$gov" "$base" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
gov, base = data[sys.argv[2]], data[sys.argv[3]]
print(f"daemon {gov['vmrss_kib'] / 1024:.1f} MiB, baseline {base['vmrss_kib'] / 1024:.1f} MiB")
names = set(gov["by_mapping_kib"]) | set(base["by_mapping_kib"])
diff = {n: gov["by_mapping_kib"].get(n, 0) - base["by_mapping_kib"].get(n, 0) for n in names}
for name, kib in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:15]:
    print(f"  {name:40s} {kib / 1024:+7.2f} MiB  (daemon {gov['by_mapping_kib'].get(name, 0) / 1024:.2f})")
PY
kill "$gov" "$base"
wait "$gov" 2>/dev/null
rm -rf "$work"
