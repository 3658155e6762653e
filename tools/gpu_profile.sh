#!/usr/bin/env bash
# Where the time of the text encoder and the VAE decode goes on the GPU (issue 15 item 2), for a
# session that has the device and time left after tools/gpu_check.sh. Here first:
# ../shared/gpu/prepare.sh, then the device tool's run with carry [".gpu"], timeout_s 570, command
# "bash tools/gpu_profile.sh". About 7 minutes on a fresh H200.
# Each stage runs twice in one kernel cache: cold (compiling and tuning) and warm (the kernels only),
# the warm one under CubeCL's profiler (CUBECL_DEBUG_OPTION=profile-medium: one line per kernel
# launch with its time). Output in $OUT: log.txt (timings, the bench tables), and per stage the
# profile's kernels summed by name, largest first (profile_<stage>.txt). Then the attention A/B:
# flash (`--attention auto`) against burn's head groups, under auto and f32.
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
source .gpu/env.sh
export COGVIEW_KERNEL_CACHE=/tmp/kc_profile
T0=$(date +%s); t() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi -L
for stage in text decode; do
  t "$stage, cold"
  timeout 200 $COGVIEW bench --preset full --width 1024 --height 1024 --steps 1 --stages $stage; echo "rc $?"
  t "$stage, warm, profiled"
  CUBECL_DEBUG_LOG=/tmp/profile_$stage.log CUBECL_DEBUG_OPTION=profile-medium \
    timeout 150 $COGVIEW bench --preset full --width 1024 --height 1024 --steps 1 --stages $stage; echo "rc $?"
  # Profile lines name a kernel and its duration; sum them by kernel name.
  python3 - /tmp/profile_$stage.log > "$OUT/profile_$stage.txt" <<'PY'
import re, sys, collections
total, count = collections.Counter(), collections.Counter()
unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"\| ([\d.]+)(ns|µs|us|ms|s) \|?", line) or re.search(r"([\d.]+)(ns|µs|us|ms|s)\s*$", line)
    if not m:
        continue
    name = re.sub(r"[\d.]+(ns|µs|us|ms|s)", "", line).strip()[:160]
    total[name] += float(m.group(1)) * unit[m.group(2)]
    count[name] += 1
print(f"{sum(total.values()):.3f} s in {sum(count.values())} profiled lines")
for name, s in total.most_common(40):
    print(f"{s:9.4f} s {count[name]:6d}x  {name}")
PY
  head -c 20000 /tmp/profile_$stage.log > "$OUT/profile_${stage}_head.log"
done
# Attention, flash against burn's head groups (the path before flash), on a 10-block DiT at 1024²
# with guidance, warm: under auto (f16 tiles against groups) and f32 (unit flash against groups).
for p in auto f32; do
  for a in auto grouped; do
    t "DiT 10 blocks, --precision $p --attention $a"
    timeout 120 $COGVIEW bench --preset full --width 1024 --height 1024 --steps 3 --layers 10 --stages denoise --precision $p --attention $a --json > /tmp/ab.json; echo "rc $?"
    python3 -c 'import json; d = json.load(open("/tmp/ab.json")); r = d["report"]; print(d["attention"], "first", round(r["first_step_seconds"], 3), "median", round(r["median_step_seconds"], 3), "peak", r["dit_peak"])' || true
  done
done
t done
