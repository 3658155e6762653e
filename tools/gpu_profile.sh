#!/usr/bin/env bash
# Where the GPU time goes (issue 15 items 2 and 3), for a session that has the device and time left
# after tools/gpu_check.sh. Here first: ../shared/gpu/prepare.sh, then the device tool's run with
# carry [".gpu"], timeout_s 570, command "bash tools/gpu_profile.sh [PART ...]". PARTs, in the order
# given (default: text decode f16 attention; about 9 minutes in all on a fresh H200; samples and kernels
# on request):
#   text, decode  T5 (24 layers) or the VAE decode at 1024², each twice in one kernel cache: cold
#                 (compiling and tuning) and warm, both under CubeCL's debug log (CUBECL_DEBUG_LOG:
#                 compilations, every autotune candidate with its compile-and-bench time, and the
#                 profiler's time of every kernel launch). About 2 minutes each.
#   f16           --precision f16, cold, under the debug log: the tiny overflow fixture, then 6 DiT
#                 blocks at 1024² (both stalled on the H200 before). On a timeout the summary's last
#                 lines say what the run was doing (F16_DIT_LIMIT: the DiT's limit, 150 s); with
#                 COGVIEW_MATMUL_KERNEL=matmul_simple_cyclic_cmma (for instance) it tunes no
#                 matrix product, to tell a stalling candidate from slow compiling. About 3.5 minutes.
#   attention     flash against burn's head groups on a 10-block DiT at 1024², warm, under auto
#                 (f16 tiles against groups) and f32 (the exact kernel autotune chose, unit flash
#                 or head groups, against burn's attention in groups). About 2 minutes.
#   samples       the same 10-block DiT under auto, with bench's memory samples (a device wait at
#                 every module output, which also ends fused kernels there) and without
#                 (--no-memory-samples: the steps as a generate runs them). About 2 minutes.
#   kernels       the same 10-block DiT under auto with each cooperative-matrix kernel named
#                 (COGVIEW_MATMUL_KERNEL) against autotune: first step (its compile) and median.
#                 About 3 minutes.
# Output in $OUT: log.txt (timings, bench tables) and per run <run>.txt, tools/cubecl_log.py's
# summary of its debug log: kernel time by kernel and family, autotune time by candidate and
# winner, kernels compiled, and the log's last lines.
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
source .gpu/env.sh
export COGVIEW_KERNEL_CACHE=/tmp/kc_profile
T0=$(date +%s); t() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
exec > >(tee "$OUT/log.txt") 2>&1
# `logged NAME TIMEOUT COMMAND...`: COMMAND under CubeCL's debug log, then its summary.
logged() {
  local name=$1 limit=$2; shift 2
  t "$name"
  CUBECL_DEBUG_LOG=/tmp/$name.log CUBECL_DEBUG_OPTION=profile-medium timeout "$limit" "$@"; echo "rc $? ($name)"
  python3 tools/cubecl_log.py /tmp/$name.log > "$OUT/$name.txt" 2>&1
  head -4 "$OUT/$name.txt"; sed -n '/^== autotune/,+3p' "$OUT/$name.txt"
}
nvidia-smi -L
for part in ${@:-text decode f16 attention}; do
  case $part in
    text|decode)
      for run in cold warm; do
        logged "${part}_$run" 200 $COGVIEW bench --preset full --width 1024 --height 1024 --steps 1 --stages $part
      done ;;
    f16)
      rm -rf /tmp/kc_f16
      COGVIEW_KERNEL_CACHE=/tmp/kc_f16 logged f16_tiny 120 $COGVIEW generate --model tests/fixtures/overflow/pipeline \
        --prompt "A photo of a red fox sitting in the snow at sunrise, highly detailed, 4k." --steps 4 --guidance 7 \
        -W 64 -H 64 --seed 0 --precision f16 -o /tmp/f16.png --overwrite
      COGVIEW_KERNEL_CACHE=/tmp/kc_f16 logged f16_dit ${F16_DIT_LIMIT:-150} $COGVIEW bench --preset full --layers 6 --width 1024 --height 1024 \
        --steps 2 --stages denoise --precision f16 ;;
    attention)
      for p in auto f32; do
        for a in auto grouped; do
          t "DiT 10 blocks, --precision $p --attention $a"
          timeout 120 $COGVIEW bench --preset full --width 1024 --height 1024 --steps 3 --layers 10 --stages denoise --precision $p --attention $a --json > /tmp/ab.json; echo "rc $?"
          python3 -c 'import json; d = json.load(open("/tmp/ab.json")); r = d["report"]; print(d["attention"], r.get("dit_exact_attention"), "first", round(r["first_step_seconds"], 3), "median", round(r["median_step_seconds"], 3), "peak", r["dit_peak"])' || true
        done
      done ;;
    samples)
      for flag in "" --no-memory-samples; do
        t "DiT 10 blocks, auto ${flag:-with memory samples}"
        timeout 120 $COGVIEW bench --preset full --width 1024 --height 1024 --steps 4 --layers 10 --stages denoise $flag --json > /tmp/s.json; echo "rc $?"
        python3 -c 'import json; d = json.load(open("/tmp/s.json")); r = d["report"]; print("first", round(r["first_step_seconds"], 3), "median", round(r["median_step_seconds"], 3), "peak", r["dit_peak"], "compiled/tuned", r["dit_kernels"])' || true
      done ;;
    kernels)
      for k in autotune matmul_auto matmul_simple_cyclic_cmma matmul_simple_cyclic_cmma_multi_rows matmul_double_cyclic_cmma \
               matmul_ordered_double_cmma_partition_k2_row_count8_rows_per_plane2 matmul_specialized_cyclic_cmma; do
        t "DiT 10 blocks, auto, COGVIEW_MATMUL_KERNEL=$k"
        COGVIEW_MATMUL_KERNEL=$k timeout 90 $COGVIEW bench --preset full --width 1024 --height 1024 --steps 3 --layers 10 --stages denoise --json > /tmp/k.json; echo "rc $?"
        python3 -c 'import json; d = json.load(open("/tmp/k.json")); r = d["report"]; print(d["matmul_kernel"], d["matmul"], d["attention"], "first", round(r["first_step_seconds"], 3), "median", round(r["median_step_seconds"], 3), "compiled/tuned", r["dit_kernels"])' || true
      done ;;
    *) echo "unknown part $part (text, decode, f16, attention, samples, kernels)" ;;
  esac
done
t done
