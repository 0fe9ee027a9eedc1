#!/usr/bin/env bash
# GPU checks and benchmarks in one run (repository root, on a machine with a Hopper GPU).
# Usage:  bash benchmarks/gpu_checks.sh [PART ...]      (default: tests)
# PARTs:
#   tests      every kernel numerics check: `pytest -m gpu tests` (kernels, ops, nn, offload)
#   selected   benchmarks/selected_attention.py: selected kernels vs cuDNN dense, 8k and 64k,
#              fwd and fwd+bwd, correlated and independent picks
#   packed     benchmarks/packed_selected.py: selected kernels on packed rows (4 and 16 documents,
#              document-relative ids) vs unpacked rows and cuDNN dense, 8k, fwd and fwd+bwd
#   op         benchmarks/nsa_op.py: the whole NSA op (fla, paper) and its compressed stage vs cuDNN
#              dense at 8k, 64k and 128k
#   breakdown  benchmarks/nsa_breakdown.py: each stage of one nsa_340m layer at 8k, 4 documents
#   decode     benchmarks/decode.py: decode tokens/s of every kind at 32k, B 1 and 16, and the
#              offloaded NOSA decoder at 32k, B 16 and 128
#   compile    benchmarks/compile_time.py: first-step compile of the nsa_340m gradient at 8k
#   multi      benchmarks/multi_device_run.py on every visible GPU (needs grain and tqdm)
# Each part runs under `timeout` (T_<PART> seconds), logs to $OUT/logs/<part>.log and writes its
# JSON under $OUT (default runs/gpu_checks); one status line per part goes to $OUT/logs/status.txt.
set -u
OUT=${OUT:-runs/gpu_checks}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT/logs"
parts=${*:-tests}

run() {  # run NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s (limit $secs s)" | tee -a "$OUT/logs/status.txt"
}

for part in $parts; do
  case $part in
    tests) run tests "${T_TESTS:-540}" python3 -m pytest -q -p no:cacheprovider -m gpu \
      --durations=30 --junitxml="$OUT/gpu_tests.xml" tests ;;
    selected) run selected "${T_SELECTED:-300}" python3 benchmarks/selected_attention.py --bwd \
      --reps 10 --seqs 8192,65536 --kinds exact-corr,exact-random --out "$OUT/selected.json" ;;
    packed) run packed "${T_PACKED:-540}" python3 benchmarks/packed_selected.py --reps 20 \
      --out "$OUT/packed.json" ;;
    op) run op "${T_OP:-540}" python3 benchmarks/nsa_op.py --seqs 8192,65536,131072 --scores \
      --out "$OUT/op.json" --plot "$OUT/op.png" ;;
    breakdown) run breakdown "${T_BREAKDOWN:-240}" env OUT="$OUT/breakdown" \
      python3 benchmarks/nsa_breakdown.py --seq-len 8192 --docs 4 ;;
    decode) run decode "${T_DECODE:-300}" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      python3 benchmarks/decode.py --shape 1b --kinds full,nsa,infllm_v2,nosa --batch 1,16 \
      --context 32768 --steps 8 --warmup 2 --report-fit --out "$OUT/decode"
      run decode_offload "${T_DECODE:-300}" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      python3 benchmarks/decode.py --shape 1b --kinds nosa_offload --batch 16,128 \
      --context 32768 --steps 8 --warmup 2 --out "$OUT/decode_offload" ;;
    compile) run compile "${T_COMPILE:-300}" python3 benchmarks/compile_time.py \
      --config configs/nsa_340m.yaml --seq-len 8192 --execute --modes scan --out "$OUT/compile" ;;
    multi) run multi "${T_MULTI:-300}" python3 benchmarks/multi_device_run.py \
      --config configs/full_340m.yaml --steps 100 --seq-len 8192 --global-batch 2 \
      --meshes "data=2;fsdp=2" --checkpoint-every 40 --budget-s 280 --out "$OUT/multi"
      rm -rf "$OUT/multi/jax_cache" "$OUT"/multi/*/checkpoints ;;
    *) echo "unknown part: $part (see the header of $0)" >&2; exit 2 ;;
  esac
done
cat "$OUT/logs/status.txt"
