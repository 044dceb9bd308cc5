#!/usr/bin/env bash
# The GPU proof of the vLLM integration, one part per call of at most ~9 minutes (CONTRIBUTING.md).
#
#   B=.vllm-bundle-moe scripts/gpu_proof.sh suites     # either GPU machine; two GPUs run two pytest processes
#   B=.vllm-bundle     scripts/gpu_proof.sh bench      # one GPU: fence vs KV size, attach, AsyncLLM fence
#   B=.vllm-bundle-moe scripts/gpu_proof.sh derive     # one GPU: derived plans == tables, table-less attach, gemma3
#   B=.vllm-bundle     scripts/gpu_proof.sh stream     # two GPUs: stream into vLLM, both receivers, the ceiling
#   B=.vllm-bundle     scripts/gpu_proof.sh same-gpu   # one GPU: a sleep-mode engine fed through the IPC buffer
#   B=.vllm-bundle     scripts/gpu_proof.sh trl        # one GPU: TRL's colocate vs TRL on ipcbridge (.trl-wheels)
#   B=.vllm-bundle     scripts/gpu_proof.sh tp2        # four GPUs: stream into a TP=2 engine on GPUs 1 and 2
#
# Run from the repository root on the GPU machine. $B is a vLLM bundle folder (CONTRIBUTING.md); with vLLM
# installed by pip, set B= (empty). Results go to $OUT. Every step has its own deadline, so one that hangs
# leaves the others' results; the exit status is the number of failed steps.
set -uo pipefail
part=${1:?"usage: scripts/gpu_proof.sh suites|bench|derive|stream|same-gpu|trl|tp2"}
OUT=${OUT:-/tmp/ipcbridge-gpu-proof}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if [ -n "${B:-}" ]; then
    export VLLM_BUNDLE=$PWD/$B
    # shellcheck disable=SC1090
    source "$B/install.sh"
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__,
'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a deadline, log to $OUT/NAME.log, report one line
    local name=$1 seconds=$2
    shift 2
    # ONLY="a b" runs just those steps, so a part that would pass the 10-minute call limit splits in two.
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    local t0=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "step $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
    grep -E "^(FAILED|ERROR)|passed|failed|^\|" "$OUT/$name.log" | tail -25
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

pytest_on() {  # pytest_on GPU NAME ARGS...: one pytest process on one GPU
    local gpu=$1 name=$2
    shift 2
    CUDA_VISIBLE_DEVICES=$gpu IPCBRIDGE_RESULTS=$OUT/$name.jsonl step "$name" 540 \
        python3 -m pytest -m "gpu or vllm" -v -s -p no:cacheprovider "$@"
}

case $part in
suites)
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
        pytest_on 0 suite-default tests/vllm/test_vllm_offline.py tests/vllm/test_vllm_moe.py \
            tests/vllm/test_vllm_async.py &
        VLLM_USE_V2_MODEL_RUNNER=0 pytest_on 1 suite-v1 tests/gpu tests/vllm/test_vllm_offline.py \
            tests/vllm/test_vllm_serve.py &
        wait
    else
        pytest_on 0 suite-default tests/gpu tests/vllm/test_vllm_offline.py tests/vllm/test_vllm_moe.py
    fi
    ;;
bench)
    step attach-cuda 120 python3 benchmarks/bench_attach.py --device cuda --repeats 7 --profile 30 \
        --json "$OUT/attach_cuda.json"
    step bench-8b 200 python3 benchmarks/bench_vllm.py --json "$OUT/bench_vllm.json"
    step kv-table 300 python3 benchmarks/bench_vllm.py --kv-table --json "$OUT/kv_table.json"
    step async-fence 120 python3 benchmarks/bench_vllm.py --async-fence --tiny --json "$OUT/async_fence.json"
    ;;
derive)
    step derive 240 python3 benchmarks/derive_check.py --json "$OUT/derive.json" --jobs 12 --timeout 200 \
        --logs "$OUT/derive-logs"
    pytest_on 0 table-less tests/vllm/test_vllm_derived.py -k table_less
    step gemma3 200 python3 benchmarks/bench_parity.py --json "$OUT/parity.json" --jobs 3 \
        --archs gemma3_text,gemma3_text:window=4,gemma3_text:window=16,gemma2
    ;;
stream)
    # ipcbridge's receiver first: the goal figure. vLLM's own receiver is ~10x slower to load (1B measured
    # 2026-11-30), so its 8B row comes last; ONLY= splits the part across calls.
    step stream-bench 400 python3 benchmarks/bench_stream_vllm.py --receivers ipcbridge --check \
        --json "$OUT/stream.json"
    IPCBRIDGE_RESULTS=$OUT/stream.jsonl step stream-tests 400 python3 -m pytest -m vllm -v -s \
        tests/vllm/test_vllm_stream.py -k "not sleep"
    step stream-stock 400 python3 benchmarks/bench_stream_vllm.py --receivers vllm --check \
        --json "$OUT/stream_stock.json"
    step nccl-localengine 180 python3 -m pytest -m gpu -q -s tests/stream
    ;;
same-gpu)
    IPCBRIDGE_RESULTS=$OUT/sleep.jsonl step sleep-test 300 python3 -m pytest -m vllm -v -s \
        tests/vllm/test_vllm_stream.py -k sleep
    step same-gpu-bench 280 python3 benchmarks/bench_stream_vllm.py --same-gpu --check \
        --json "$OUT/stream_same_gpu.json"
    ;;
trl)
    pip install --no-index --no-deps --quiet .trl-wheels/*.whl --target /tmp/trl-site
    export PYTHONPATH=/tmp/trl-site:$PYTHONPATH
    step trl-bench 420 python3 benchmarks/bench_trl.py --json "$OUT/bench_trl.json"
    # One pytest process each: the in-process LLM lives in the pytest process.
    step trl-colocate 150 python3 -m pytest -m vllm -v -s \
        tests/integrations/test_trl_vllm.py::test_grpo_trains_the_in_process_llm
    step trl-serve 200 python3 -m pytest -m vllm -v -s \
        tests/integrations/test_trl_vllm.py::test_grpo_trains_vllm_serve_by_url
    step trl-llm 150 python3 -m pytest -m vllm -v -s tests/integrations/test_trl_vllm_llm.py
    ;;
tp2)
    step tp2 560 python3 benchmarks/bench_stream_vllm.py --tp 2 --gpus 1,2 --receivers vllm --check \
        --json "$OUT/stream_tp2.json"
    ;;
*)
    echo "unknown part $part" >&2
    exit 2
    ;;
esac
echo "failed steps: $failed"
exit "$failed"
