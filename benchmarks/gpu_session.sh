#!/usr/bin/env bash
# One device-machine call: environment, GPU tests, kernel checks and benchmarks, each step
# time-limited, every log under $OUT (or ./gpu-logs). Usage: benchmarks/gpu_session.sh STEP...
# Steps: env tests gputests modeltests check_moe check_la quant bench_moe bench_la profile_moe profile_moe_tma bench_ep
# bench_la_a bench_la_b (bench_la's ops in two halves, e.g. one per GPU) train gen vla vlatrain check_gla_scalar profile_la1 profile_la2 profile_la profile_fla
# bench_la_nofla profile_fp8 fp8tests fp8_gemm train_profile ep_profile bench_ep16k bench_ep32k parity_bf16 parity_fp8 parity_mxfp8 cetest train_b8 train_b8_hybrid gen_sweep gen_profile bisect_launch sweep_state_delta profile_state_delta bench_fp8
# cmd (STEP_CMD, run under the name STEP_NAME with limit STEP_LIMIT);
# steps joined by '+' (e.g. gputests+check_moe) run at the same time (correctness, not timings);
# steps joined by ',' run one after another, e.g. modeltests,check_la@0+bench_la@1 on two GPUs.
set -u
OUT=${OUT:-gpu-logs}
LOGS=${LOGS:-/tmp/gpu-logs}  # tarred into $OUT after each group: the device tool returns at most 8 files
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  # Several sessions may start at once (one per working tree): the first one installs.
  flock /tmp/site.lock bash -c '[ -f /tmp/site/.done ] || { python3 -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.done; }' \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# Autotuning results persist between calls (fla's kernels take about 2 minutes per op to tune,
# moekit's MoE GEMMs tune too): Triton keeps them on disk, the *.autotune.json files come back in
# $OUT/autotune.tgz, and a copy at .triton-autotune/autotune.tgz (a carried, ignored path) is
# restored first. A source or Triton change gives a new key, so a stale entry is never used.
export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .triton-autotune/autotune.tgz ]; then tar xzf .triton-autotune/autotune.tgz -C "$TRITON_CACHE_DIR"; fi
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log"
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
}
run_step() {  # NAME[,NAME...][@GPU] (that GPU alone, e.g. two checks side by side on a 2-GPU machine)
  if [[ $1 == *@* ]]; then CUDA_VISIBLE_DEVICES=${1#*@} run_step "${1%@*}"; return; fi
  if [[ $1 == *,* ]]; then local s; for s in ${1//,/ }; do run_step "$s"; done; return; fi
  case $1 in
    env) step env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"' ;;
    gputests) step gputests 300 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
      --tb=short -rfE --durations=10 tests ;;
    modeltests) step modeltests 110 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE \
      tests/models tests/vla tests/train ;;
    gputests_rest) step gputests_rest 300 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE --durations=5 \
      tests/train tests/vla tests/parallel tests/hf ;;
    profile_delta) step profile_delta 150 python3 benchmarks/profile_linear_attention.py --ops delta_rule,gated_delta_rule \
      --settings default,w8s1,w4s1 ;;
    vlatrain) step vlatrain 90 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE --durations=5 \
      tests/vla tests/train ;;
    tests) step tests 130 python3 -m pytest -q -x -p no:cacheprovider tests/moe tests/ops tests/quant tests/models ;;
    check_moe) step check_moe 290 python3 benchmarks/gpu_check_moe.py ;;
    check_la) step check_la 180 python3 benchmarks/gpu_check_linear_attention.py ;;
    check_gla_scalar) step check_gla_scalar 90 env MOEKIT_GLA_TC=0 python3 benchmarks/gpu_check_linear_attention.py --ops gla ;;
    profile_la1) step profile_la1 300 python3 benchmarks/profile_linear_attention.py --ops linear_attn,simple_gla,mamba2_ssd ;;
    profile_la2) step profile_la2 300 python3 benchmarks/profile_linear_attention.py --ops delta_rule,gated_delta_rule,gla \
      --settings default,w4s1,w4s2,w4s3,w8s1,w8s2,w8s3 ;;
    profile_la) step profile_la 120 python3 benchmarks/profile_linear_attention.py --settings default ;;
    profile_fla) step profile_fla 300 python3 benchmarks/profile_linear_attention.py --fla --ops linear_attn,delta_rule ;;
    quant) step quant 120 python3 benchmarks/quant.py ;;
    bench_moe) step bench_moe 360 python3 benchmarks/moe_layer.py ;;
    bench_moe_noloop) step bench_moe_noloop 240 python3 benchmarks/moe_layer.py --no-loop ;;
    moe_tests) step moe_tests 240 python3 -m pytest -q -p no:cacheprovider --tb=short -rfE --durations=5 \
      -o faulthandler_timeout=100 tests/ops/test_moe_triton.py tests/moe ;;
    bench_la) step bench_la 520 python3 benchmarks/linear_attention.py ;;
    bench_la_a) step bench_la_a 400 python3 benchmarks/linear_attention.py --ops linear_attn,delta_rule,simple_gla ;;
    bench_la_b) step bench_la_b 300 python3 benchmarks/linear_attention.py --ops gla,gated_delta_rule,mamba2_ssd ;;
    bench_la_nofla) step bench_la_nofla 300 python3 benchmarks/linear_attention.py --no-fla ;;
    profile_fp8) step profile_fp8 200 python3 benchmarks/moe_fp8.py --shapes mixtral-8x7b --profile ;;
    bench_fp8) step bench_fp8 240 python3 benchmarks/moe_fp8.py ;;
    bench_fp8_ds) step bench_fp8_ds 140 python3 benchmarks/moe_fp8.py --shapes deepseek-v3 ;;
    fp8tests) step fp8tests 180 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE tests/ops/test_moe_fp8.py tests/quant ;;
    fp8_gemm) step fp8_gemm 90 python3 benchmarks/fp8_gemm.py ;;
    profile_mixtral) step profile_mixtral 200 python3 benchmarks/moe_layer.py --profile --shapes mixtral-8x7b ;;
    bench_mixtral) step bench_mixtral 150 python3 benchmarks/moe_layer.py --no-loop --shapes mixtral-8x7b ;;
    profile_moe) step profile_moe 200 python3 benchmarks/moe_layer.py --profile --shapes deepseek-v3 ;;
    profile_moe_tma) step profile_moe_tma 200 env MOEKIT_TRITON_TMA=1 python3 benchmarks/moe_layer.py --profile \
      --shapes deepseek-v3 ;;
    train_profile) step train_profile 200 python3 benchmarks/train_throughput.py --paths bf16 --models hybrid --profile ;;
    ep_profile) step ep_profile 200 torchrun --standalone --nproc-per-node 2 benchmarks/expert_parallel.py --expert-mem 0.3 --steps 3 --warmup 1 --profile ;;
    ep_profile32k) step ep_profile32k 200 torchrun --standalone --nproc-per-node 2 benchmarks/expert_parallel.py --expert-mem 0.3 \
      --steps 3 --warmup 1 --tokens 32768 --profile ;;
    bench_ep32k_vendor|bench_ep32k_triton) step "$1" 200 env MOEKIT_MOE_IMPL="${1#bench_ep32k_}" torchrun --standalone \
      --nproc-per-node 2 benchmarks/expert_parallel.py --expert-mem 0.3 --steps 3 --warmup 1 --tokens 32768 ;;
    ep_env_sweep) step ep_env_sweep 290 bash -c 'for env in NCCL_MIN_NCHANNELS=32 NCCL_PROTO=Simple \
      "NCCL_MIN_NCHANNELS=32 NCCL_PROTO=Simple" "NCCL_MIN_CTAS=32 NCCL_MAX_CTAS=32"; do echo "## $env"; \
      env $env torchrun --standalone --nproc-per-node 2 benchmarks/expert_parallel.py --expert-mem 0.3 --steps 3 \
      --warmup 1 --tokens 32768 2>&1 | grep "^small\|^model"; done' ;;
    profile_delta1) step profile_delta1 120 python3 benchmarks/profile_linear_attention.py --settings default \
      --ops delta_rule,gated_delta_rule --lengths 2048 ;;
    bisect_launch) step bisect_launch 500 python3 benchmarks/bisect_launch.py ;;
    profile_state_delta) step profile_state_delta 200 python3 benchmarks/profile_linear_attention.py --lengths 2048 \
      --settings default,sb_w4v64,sb_w8v64,sb_w8v128,sf_w4v16,sf_w8v64 --ops delta_rule,gated_delta_rule ;;
    sweep_state_delta) step sweep_state_delta 400 bash -c 'for s in num_warps=8,num_stages=2,BV=128 \
      num_warps=4,num_stages=2,BV=64 num_warps=8,num_stages=2,BV=64 num_warps=4,num_stages=2,BV=16; do echo "## $s"; \
      python3 benchmarks/bisect_launch.py --setting $s --kernels state_fwd_delta,state_bwd_delta; done' ;;
    bench_delta) step bench_delta 150 python3 benchmarks/linear_attention.py --ops delta_rule --lengths 2048,32768 ;;
    check_delta) step check_delta 120 python3 benchmarks/gpu_check_linear_attention.py --ops delta_rule,gated_delta_rule ;;
    ep_gputest) step ep_gputest 150 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE \
      tests/parallel/test_expert_parallel_layer.py ;;
    bench_ep32k_s6) step "$1" 150 torchrun --standalone --nproc-per-node 2 benchmarks/expert_parallel.py --expert-mem 0.3 \
      --steps 6 --warmup 1 --tokens 32768 ;;
    bench_ep_fill) step "$1" 300 torchrun --standalone --nproc-per-node 2 benchmarks/expert_parallel.py --expert-mem 0.65 \
      --small-layers 60 --stacks small --steps 4 --warmup 1 --tokens 32768 ;;
    bench_ep16k) step "$1" 200 torchrun --standalone --nproc-per-node 2 benchmarks/expert_parallel.py --expert-mem 0.3 --steps 3 --warmup 1 --tokens 16384 ;;
    bench_ep32k) step "$1" 200 torchrun --standalone --nproc-per-node 2 benchmarks/expert_parallel.py --expert-mem 0.3 --steps 3 --warmup 1 --tokens 32768 ;;
    parity_bf16|parity_fp8|parity_mxfp8) step "$1" 380 python3 benchmarks/parity.py --precisions "${1#parity_}" --out "$LOGS/parity" ;;
    cetest) step cetest 90 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE tests/ops/test_cross_entropy.py ;;
    train_b8) step train_b8 330 python3 benchmarks/train_throughput.py --batch 8 --paths bf16 fp8 reference ;;
    gen_sweep) step gen_sweep 420 python3 benchmarks/generation.py --contexts 4096 16384 65536 --batches 1 16 \
      --plot "$LOGS/generation_sweep.png" ;;
    train_b8_hybrid) step train_b8_hybrid 200 python3 benchmarks/train_throughput.py --batch 8 --models hybrid \
      --paths bf16 fp8 ;;
    train) step train 150 python3 benchmarks/train_throughput.py --paths bf16 fp8 ;;
    gen) step gen 240 python3 benchmarks/generation.py --plot "$LOGS/generation.png" ;;
    gen_profile) step gen_profile 200 python3 benchmarks/generation.py --contexts 4096 65536 --batches 16 --new 8 \
      --profile --plot "$LOGS/generation_profile.png" ;;
    vla) step vla 90 python3 benchmarks/vla.py ;;
    a2a_sweep) step a2a_sweep 150 bash -c 'for env in "" NCCL_MIN_P2P_NCHANNELS=16 NCCL_MIN_P2P_NCHANNELS=32 \
      "NCCL_MIN_P2P_NCHANNELS=32 NCCL_NCHANNELS_PER_PEER=16" "NCCL_MIN_P2P_NCHANNELS=32 NCCL_P2P_NVL_CHUNKSIZE=2097152" \
      NCCL_P2P_USE_CUDA_MEMCPY=1; do env $env torchrun --standalone --nproc-per-node 2 benchmarks/all_to_all.py \
      2>&1 | grep -v "^W1\|^\[W"; done' ;;
    bench_la_nocheck) step bench_la_nocheck 200 python3 benchmarks/linear_attention.py --ops linear_attn,delta_rule \
      --skip-finite-checks ;;
    train_ref1) step train_ref1 200 python3 benchmarks/train_throughput.py --batch 1 --models hybrid --paths bf16 reference ;;
    bench_ep) step bench_ep 160 torchrun --standalone --nproc-per-node "${EP_GPUS:-2}" benchmarks/expert_parallel.py --expert-mem 0.3 --steps 3 --warmup 1 ;;
    cmd) step "${STEP_NAME:-cmd}" "${STEP_LIMIT:-300}" bash -c "$STEP_CMD" ;;  # any command, given by env
    *) echo "unknown step $1" ;;
  esac
}
for group in "$@"; do
  for s in ${group//+/ }; do run_step "$s" > "$LOGS/${s//[@,]/_}.summary" & done
  wait
  for s in ${group//+/ }; do cat "$LOGS/${s//[@,]/_}.summary"; done
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/autotune.tgz" -T -)
done
