#!/usr/bin/env bash
# Every quick GPU check in one device call, on one or two GPUs (two lanes run side by side).
# Usage (repository root, on the GPU machine):  bash benchmarks/gpu_checks.sh [PART ...]
# PARTs: dense nosa decode offload dims transforms multi context timing breakdown breakdown_docs1
# nosa_train compile offload_load offload_fused offload_fused_128k offload_fused_more offload_plan_device zero_copy kernel_fb suites fwd_dump persistent persistent_docs h2d (default:
# dense nosa decode offload dims transforms).
# `h2d`: host -> device transfer paths of the offload cache's block gather, 256/4096/41000 blocks
#   of 32 KiB (benchmarks/h2d_transfer.py -> $OUT/h2d.json), under T_H2D (150 s), first lane;
# `persistent_docs`: packed documents on the persistent forward (check_selected_mgpu_bwd.py
#   --persistent-docs; the public op keeps the per-tile forward with documents until this passes),
#   second lane;
# `persistent`: the persistent-grid forward (tests/gpu/check_selected_mgpu.py --persistent), then
#   its benchmark against the per-tile kernels at 8k and 64k, fwd and fwd+bwd ($PERSIST_VARIANTS),
#   first lane;
# `context`: decode tokens/s of every kind at 16k/32k/64k (B 1 and 16), and offloaded NOSA at
#   32k/64k (B 16 and 128);
# `timing`: the selected-attention benchmark for the new shapes (Dk192/Dv128, the GLA global
#   layer's 160/128 and block 128);
# `breakdown`: the time of each stage of one nsa_340m layer at 8k (benchmarks/nsa_breakdown.py),
#   4 packed documents per row (`breakdown_docs1`: one document per row, on the first lane);
# `nosa_train`: NOSA's biased selected attention on the kernels vs the reference
#   (tests/gpu/check_nosa_train.py);
# `offload_fused`: the whole offloaded decode step as one jitted call (--offload-plan fused):
#   greedy tokens vs resident (check_nosa_decode.py --stores pinned_array:device,pinned_array:fused),
#   the layer_step / device-plan / pinned_array CPU tests on the GPU backend, and decode at 32k,
#   B 16/128 with the fused step (first lane; FUSED_COPY, default kernel; with xla, chunks
#   FUSED_CHUNK, default 1024); part `offload_plan_device`: the device
#   plan (second lane, after persistent_docs);
# `offload_fused_128k`: the fused step at 128k, B 128 (a resident cache that does not fit; 134
#   GiB of pinned host memory, XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=HOST_LIMIT_GB, default 200),
#   second lane;
# `offload_fused_more`: copy="xla" with chunks of 256 and 4096 at 32k, B 128, and resident
#   infllm_v2 / nosa at 32k, B 16/128 (same call), second lane;
# `zero_copy`: can a Pallas kernel gather straight from a pinned_host array
#   (benchmarks/h2d_zero_copy.py -> $OUT/zero_copy.json), first lane;
# `offload_load`: one offloaded-cache update() at B 128, 131k (benchmarks/offload_update_cpu.py)
#   with load workers 1/2/4/8, fresh and staged transfers, and
#   and the one-pinned-array-per-layer store (pinned_array), and
#   offloaded NOSA at 32k, B 16/128, with 1 and 4 load workers, with 4 through staging
#   buffers (`offload_staged4`: --offload-transfer staged), and with the pinned_array store
#   (`offload_pinned_array`: --offload-store pinned_array), and that store with the slot plan
#   on the device (`offload_plan_device`: --offload-plan device) (second lane);
# `kernel_fb`: the issue-4 selected-attention benchmark at 8k and 64k, fwd and fwd+bwd, both selection
#   modes, with the block indices passed as arguments (re-measure of the figures taken while they
#   were compile-time constants), first lane;
# `compile`: compile and first/second-run time of the nsa_340m gradient at 8k, layers unrolled vs
#   model.scan_layers (benchmarks/compile_time.py --execute, one process per mode; COMPILE_MODES,
#   default "unrolled scan"; "scan4" = 4 layers per loop iteration, model.scan_unroll;
#   COMPILE_ARGS, e.g. "--remat dots", is appended), first lane;
# `suites`: the selected-attention backward correctness suite ($SUITE, default --all; e.g.
#   SUITE="--all --configs 11,12 --dispatch" reruns two of its configs and the dispatch checks) cut
#   into SUITE_SHARDS (default 4) processes side by side on the second lane (compilation
#   dominates), each under T_SUITES; logs suite_<i>.log. 8 processes on one H200 ran out of memory
#   in the T=1000/4096 configs (float32 references with [B, HQ, T, T] scores);
# `fwd_dump`: the optimized HLO of the forward's XLA preparation (tile lists) at 8k under
#   $OUT/hlo (XLA_FLAGS dump), first lane.
# With two GPUs the parts are split between the two lanes.
# Each part runs under `timeout`, logs to $OUT/logs/<part>.log, writes its JSON under $OUT, and
# the script prints one status line per part. Budget per part: the T_* variables below.
# `multi` (2 GPUs, needs grain + tqdm on PYTHONPATH: see benchmarks/multi_device_run.py) runs
# the 340M full-attention multi-GPU check after the other parts.
set -u
OUT=${OUT:-gpu_checks_out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT/logs"
parts=${*:-"dense nosa decode offload dims transforms"}
has() { [[ " $parts " == *" $1 "* ]]; }
ngpu=$(python3 -c "import jax; print(jax.device_count())" 2>/dev/null || echo 1)
lane1=$(( ngpu > 1 ? 1 : 0 ))
T_DENSE=${T_DENSE:-200} T_NOSA=${T_NOSA:-90} T_OFFLOAD=${T_OFFLOAD:-150} T_DIMS=${T_DIMS:-160}
T_TRANSFORMS=${T_TRANSFORMS:-70} T_MULTI=${T_MULTI:-170} T_DECODE=${T_DECODE:-40}
T_CONTEXT=${T_CONTEXT:-120} T_TIMING=${T_TIMING:-120} T_BREAKDOWN=${T_BREAKDOWN:-240}
T_NOSA_TRAIN=${T_NOSA_TRAIN:-180} T_COMPILE=${T_COMPILE:-300} T_KERNEL_FB=${T_KERNEL_FB:-240}
T_PERSIST=${T_PERSIST:-240} T_PERSIST_BENCH=${T_PERSIST_BENCH:-300}
PERSIST_VARIANTS=${PERSIST_VARIANTS:-128:direct,128:direct:persist,128:direct:persist:s3,128:direct:persist:nopp,64:tiles}
T_SUITES=${T_SUITES:-480} SUITE_SHARDS=${SUITE_SHARDS:-4} SUITE=${SUITE:---all}
COMPILE_MODES=${COMPILE_MODES:-"unrolled scan"}

run() {  # run NAME GPU SECONDS CMD...
  local name=$1 gpu=$2 secs=$3; shift 3
  local t0=$SECONDS
  CUDA_VISIBLE_DEVICES=$gpu timeout "$secs" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "[$(date +%T)] $name: rc=$rc in $((SECONDS - t0)) s (gpu $gpu, limit $secs s)" \
    | tee -a "$OUT/logs/status.txt"
}

context_kinds() {  # context_kinds GPU KIND...: decode vs context, one process per kind
  local gpu=$1; shift
  for k in "$@"; do
    has context && run "context_$k" "$gpu" "$T_CONTEXT" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      python3 benchmarks/decode.py --shape 1b --kinds "$k" --batch 1,16 \
      --context 16384,32768,65536 --steps 8 --warmup 2 --report-fit --out "$OUT/context_$k"
  done
}
timing_part() {  # timing_part NAME GPU ARGS...: a new kernel shape vs cuDNN at 8k and 32k
  local name=$1 gpu=$2; shift 2
  run "$name" "$gpu" "$T_TIMING" python3 benchmarks/selected_attention.py --bwd \
    --bwd-parts --seqs 8192,32768 --kinds exact-corr --variants 128:direct "$@" --out "$OUT/$name.json"
}
# Two GPUs: the context kinds and the timing parts are split between the lanes.
if (( ngpu > 1 )); then ctx_a="full nsa" ctx_b="infllm_v2 nosa"; else ctx_a="full nsa infllm_v2 nosa" ctx_b=""; fi

lane_a() {
  has persistent && run persistent_check 0 "$T_PERSIST" python3 tests/gpu/check_selected_mgpu.py \
    --persistent
  has persistent && run persistent_bench 0 "$T_PERSIST_BENCH" python3 \
    benchmarks/selected_attention.py --bwd --reps 10 --seqs 8192,65536 --kinds exact-corr,shared \
    --variants "$PERSIST_VARIANTS" --out "$OUT/persistent.json"
  has dense && run dense 0 "$T_DENSE" python3 -m pytest -q -m gpu tests/ops/test_semantics_causal.py
  has nosa && run nosa_decode 0 "$T_NOSA" env OUT="$OUT/nosa" python3 tests/gpu/check_nosa_decode.py
  has nosa_train && run nosa_train 0 "$T_NOSA_TRAIN" env OUT="$OUT/nosa_train" \
    python3 tests/gpu/check_nosa_train.py
  for k in infllm_v2 nosa; do      # the largest resident batch at 128k (1.06 GiB per sequence)
    has decode && run "decode_$k" 0 "$T_DECODE" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      python3 benchmarks/decode.py --shape 1b --kinds $k --batch 112 --context 131072 --steps 8 \
      --warmup 2 --report-fit --out "$OUT/decode_$k"
  done
  context_kinds 0 $ctx_a
  has timing && timing_part timing_dk192 0 --dk 192 --dv 128
  has breakdown_docs1 && run breakdown_docs1 0 "$T_BREAKDOWN" env OUT="$OUT/breakdown_docs1" \
    python3 benchmarks/nsa_breakdown.py --seq-len 8192 --docs 1
  has kernel_fb && run kernel_fb 0 "$T_KERNEL_FB" python3 benchmarks/selected_attention.py --bwd \
    --reps 5 --seqs 8192,65536 --kinds exact-corr,shared --variants 128:direct,64:tiles \
    --out "$OUT/kernel_fb.json"
  has fwd_dump && run fwd_dump 0 60 env XLA_FLAGS="--xla_dump_to=$OUT/hlo \
    --xla_dump_hlo_module_re=prepare" python3 benchmarks/selected_attention.py --seqs 8192 \
    --kinds exact-corr --variants 128:direct --reps 3
  for mode in $COMPILE_MODES; do  # one process per mode: Mosaic kernels compile once per process
    has compile && run "compile_$mode" 0 "$T_COMPILE" python3 benchmarks/compile_time.py \
      --config configs/nsa_340m.yaml --seq-len 8192 --execute --modes $mode ${COMPILE_ARGS:-} \
      --out "$OUT/compile"
  done
  has h2d && run h2d 0 "${T_H2D:-150}" python3 benchmarks/h2d_transfer.py --out "$OUT/h2d.json"
  has offload_fused && run nosa_fused 0 "$T_NOSA" env OUT="$OUT/nosa_fused" python3 \
    tests/gpu/check_nosa_decode.py --stores pinned_array:device,pinned_array:fused
  has offload_fused && run offload_fused_tests 0 "$T_NOSA" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    python3 -m pytest -q -p no:cacheprovider tests/test_nosa_offload.py -k \
    "layer_step or device_plan or pinned_array"
  has zero_copy && run zero_copy 0 "${T_H2D:-150}" python3 benchmarks/h2d_zero_copy.py \
    --out "$OUT/zero_copy.json"
  for c in ${FUSED_CHUNK:-1024}; do
    has offload_fused && run "offload_fused$c" 0 "$T_OFFLOAD" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      python3 benchmarks/decode.py --shape 1b --kinds nosa_offload --batch 16,128 --context 32768 \
      --steps 8 --warmup 2 --offload-store pinned_array --offload-plan fused \
      --offload-copy "${FUSED_COPY:-kernel}" --offload-chunk "$c" \
      --out "$OUT/offload_fused$c"
  done
}
lane_b() {
  if has suites; then  # shards side by side on one GPU: no preallocation, each grows as it needs
    for ((i = 0; i < SUITE_SHARDS; i++)); do
      run "suite_$i" "$lane1" "$T_SUITES" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 \
        tests/gpu/check_selected_mgpu_bwd.py $SUITE --shard "$i/$SUITE_SHARDS" &
    done
    wait
  fi
  has dims && run dims "$lane1" "$T_DIMS" python3 tests/gpu/check_selected_mgpu_bwd.py --smoke
  has persistent_docs && run persistent_docs "$lane1" "$T_SUITES" python3 \
    tests/gpu/check_selected_mgpu_bwd.py --persistent-docs
  has offload_plan_device && run offload_plan_device "$lane1" "$T_OFFLOAD" env \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/decode.py --shape 1b --kinds \
    nosa_offload --batch 16,128 --context 32768 --steps 8 --warmup 2 --offload-store pinned_array \
    --offload-plan device --out "$OUT/offload_plan_device"
  has offload_fused_128k && run offload_fused_128k "$lane1" "${T_FUSED_128K:-300}" env \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=${HOST_LIMIT_GB:-200} \
    python3 benchmarks/decode.py --shape 1b --kinds nosa_offload --batch 128 --context 131072 \
    --steps 8 --warmup 2 --report-fit --offload-store pinned_array --offload-plan fused \
    --out "$OUT/offload_fused_128k"
  for c in 256 4096; do
    has offload_fused_more && run "offload_fused_b128_$c" "$lane1" "$T_OFFLOAD" env \
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/decode.py --shape 1b --kinds \
      nosa_offload --batch 128 --context 32768 --steps 8 --warmup 2 --offload-store pinned_array \
      --offload-plan fused --offload-copy xla --offload-chunk $c --out "$OUT/offload_fused_b128_$c"
  done
  has offload_fused_more && run resident32k "$lane1" "$T_OFFLOAD" env \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/decode.py --shape 1b --kinds \
    infllm_v2,nosa --batch 16,128 --context 32768 --steps 8 --warmup 2 --report-fit \
    --out "$OUT/resident32k"
  has offload && run offload "$lane1" "$T_OFFLOAD" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
    python3 benchmarks/decode.py --shape 1b --kinds nosa_offload --batch 16,128 \
    --context 131072 --steps 8 --warmup 2 --report-fit --out "$OUT/offload"
  context_kinds "$lane1" $ctx_b
  has context && run context_nosa_offload "$lane1" "$T_OFFLOAD" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
    python3 benchmarks/decode.py --shape 1b --kinds nosa_offload --batch 16,128 \
    --context 32768,65536 --steps 8 --warmup 2 --report-fit --out "$OUT/context_nosa_offload"
  has timing && timing_part timing_gla "$lane1" --dk 160 --dv 128 --hq 32 --h 2
  has timing && timing_part timing_block128 "$lane1" --block 128 --n 8
  has breakdown && run breakdown_docs4 "$lane1" "$T_BREAKDOWN" env OUT="$OUT/breakdown_docs4" \
    python3 benchmarks/nsa_breakdown.py --seq-len 8192 --docs 4
  has offload_load && run offload_load "$lane1" "$T_OFFLOAD" python3 \
    benchmarks/offload_update_cpu.py --churn 10 --stores numpy,pinned_array --load-workers 1,2,4,8 \
    --transfers fresh,staged --out "$OUT/offload_load"
  for w in 1 4; do
    has offload_load && run "offload_workers$w" "$lane1" "$T_OFFLOAD" \
      env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/decode.py --shape 1b \
      --kinds nosa_offload --batch 16,128 --context 32768 --steps 8 --warmup 2 \
      --load-workers $w --out "$OUT/offload_workers$w"
  done
  has offload_load && run offload_staged4 "$lane1" "$T_OFFLOAD" \
    env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/decode.py --shape 1b \
    --kinds nosa_offload --batch 16,128 --context 32768 --steps 8 --warmup 2 \
    --load-workers 4 --offload-transfer staged --out "$OUT/offload_staged4"
  has offload_load && run offload_pinned_array "$lane1" "$T_OFFLOAD" \
    env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/decode.py --shape 1b \
    --kinds nosa_offload --batch 16,128 --context 32768 --steps 8 --warmup 2 \
    --offload-store pinned_array --out "$OUT/offload_pinned_array"
  has offload_load && run offload_plan_device "$lane1" "$T_OFFLOAD" \
    env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/decode.py --shape 1b \
    --kinds nosa_offload --batch 16,128 --context 32768 --steps 8 --warmup 2 \
    --offload-store pinned_array --offload-plan device --out "$OUT/offload_plan_device"
}
if (( ngpu > 1 )); then lane_a & lane_b & wait; else lane_a; lane_b; fi
all=$(seq -s, 0 $((ngpu - 1)))
has transforms && run transforms "$all" "$T_TRANSFORMS" env OUT="$OUT/transforms" \
  python3 tests/gpu/check_selected_transforms.py
has multi && run multi "$all" "$T_MULTI" python3 benchmarks/multi_device_run.py \
  --config configs/full_340m.yaml --steps 100 --seq-len 8192 --global-batch 2 \
  --meshes "data=2;fsdp=2" --checkpoint-every 40 --budget-s $((T_MULTI - 15)) --out "$OUT/multi"
rm -rf "$OUT/multi/jax_cache" "$OUT"/multi/*/checkpoints
cat "$OUT/logs/status.txt"
