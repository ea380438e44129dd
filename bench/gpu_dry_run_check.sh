#!/usr/bin/env bash
# The governor on a real NVIDIA GPU with the built-in ladder, in dry run, under a real load:
# what a newcomer would see (issue 11's "Trying it safely"). Read-only: it never changes a GPU
# setting (dry_run = true and --dry-run); the only process it starts is its own PyTorch load.
# Usage (repo root, on the GPU machine): bash bench/gpu_dry_run_check.sh OUTDIR
set -u
out=${1:-/tmp/gg-check}
mkdir -p "$out"
work=$(mktemp -d)
chmod 755 "$work"
mkdir -m 755 "$work/state" "$work/run"
q="index,name,power.limit,power.default_limit,power.min_limit,power.max_limit,temperature.gpu"
nvidia-smi --query-gpu=$q --format=csv | tee "$out/nvidia-smi-before.csv"

echo "== check-config with no file: the built-in ladder on this GPU"
python3 -m governor check-config 2>&1 | grep -A3 "Effective power ladder" | tee "$out/check-config.txt"

cat > "$work/governor.toml" <<EOF
# Built-in ladder; step-down temperature lowered so the load's heat triggers a decision.
dry_run = true
state_dir = "$work/state"
runtime_dir = "$work/run"
[power]
step_down_at_c = 40.0
step_up_at_c = 32.0
debounce_samples = 2
[metrics]
port = 19847
[vram]
reserve = "1GiB"
EOF
chmod 644 "$work/governor.toml"

python3 tests/gpu/gpu_load.py 5 75 > "$work/load.log" 2>&1 &
load=$!
for _ in $(seq 60); do grep -q ready "$work/load.log" && break; sleep 1; done
python3 -m governor run --config "$work/governor.toml" --dry-run --log-format json > "$out/governor.log" 2>&1 &
gov=$!
sleep 25
python3 -m governor status --url 127.0.0.1:19847 > "$out/status.txt" 2>&1; echo "status rc=$?" >> "$out/status.txt"
python3 -m governor status --url 127.0.0.1:19847 --json > "$out/status.json" 2>&1
# The readings behind the MIG mode and the power-limit range (read again every 10 s), as Prometheus sees them.
python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:19847/metrics").read().decode())' \
    | grep -E '^gpu_governor_(gpu_mig_mode|gpu_power_limit_(min|max|default)_watts|mig_instance)' > "$out/metrics-mig-range.txt" 2>&1
kill -HUP $gov; sleep 3   # a reload must keep the dry run
kill -TERM $gov; wait $gov; echo "governor rc=$?" | tee -a "$out/status.txt"
kill $load 2>/dev/null; wait $load 2>/dev/null
nvidia-smi --query-gpu=$q --format=csv | tee "$out/nvidia-smi-after.csv"
cat "$out/status.txt"
grep -E '"power_limit_would_set"|"gpu_found"|config_reloaded|"governor_ready"' "$out/governor.log" | head -8
rm -rf "$work"
