#!/usr/bin/env bash
# `gpu-governor restore` on a real NVIDIA GPU, in dry run: what the unit's ExecStopPost= does after a
# crash, minus the write. Read-only: the config says dry_run = true and the command gets --dry-run,
# so no power limit or fan is set; the recorded "original" is the limit in force now, so even a write
# would change nothing. It shows the command reads the state files, opens NVML, finds the GPU by
# UUID and names what it would put back; the second run (a file marked as corrupt input) shows a
# broken state file does not stop it.
# Usage (repo root, on the GPU machine): bash bench/gpu_restore_dry_run.sh OUTDIR
set -u
out=${1:-/tmp/gg-restore}
mkdir -p "$out"
work=$(mktemp -d)
chmod 755 "$work"
mkdir -m 700 "$work/state"
nvidia-smi --query-gpu=index,uuid,power.limit --format=csv,noheader,nounits | tee "$out/nvidia-smi-before.csv"
read -r uuid limit < <(nvidia-smi --query-gpu=uuid,power.limit --format=csv,noheader,nounits -i 0 | tr -d ' ' | tr ',' ' ')
lowered=$(python3 -c "print(round(float('$limit') * 0.9, 3))")
cat > "$work/state/original-limits.json" <<JSON
{"version": 2, "original_power_limits_w": {"$uuid": $limit}, "last_set_power_limits_w": {"$uuid": $lowered}}
JSON
chmod 600 "$work/state/original-limits.json"
cp "$work/state/original-limits.json" "$out/state-before.json"
printf 'dry_run = true\nstate_dir = "%s"\nruntime_dir = ""\n' "$work/state" > "$work/governor.toml"
chmod 644 "$work/governor.toml"
python3 -m governor restore --config "$work/governor.toml" --dry-run > "$out/restore.log" 2>&1
echo "restore rc=$?" | tee -a "$out/restore.log"
cmp -s "$work/state/original-limits.json" "$out/state-before.json" && echo "state file unchanged (dry run)" | tee -a "$out/restore.log"
echo '{"version": 2, "original_power_limits_w": {"'"$uuid"'": "garbage"' > "$work/state/original-limits.json"
python3 -m governor restore --config "$work/governor.toml" --dry-run > "$out/restore-corrupt.log" 2>&1
echo "restore (corrupt state file) rc=$?" | tee -a "$out/restore-corrupt.log"
ls "$work/state" | tee "$out/state-dir-after.txt"
nvidia-smi --query-gpu=index,uuid,power.limit --format=csv,noheader,nounits | tee "$out/nvidia-smi-after.csv"
rm -rf "$work"
