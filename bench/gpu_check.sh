#!/usr/bin/env bash
# Every GPU check of issue 12 in one go, on a machine with one CUDA GPU, torch, triton and
# transformers (docs/kernels.md, "To verify on a GPU"), in at most GPU_CHECK_BUDGET_S
# seconds (default 470: under 8 minutes), each step time-boxed:
#
#   1 env      nvidia-smi, versions, the wheels' imports, an 8 GiB device-to-device copy
#              (the bandwidth the later steps are set against), a bf16 matmul
#   2 kernels  pytest -m gpu tests/kernels: the Triton kernels compiled, bf16 and fp16,
#              Llama-3-8B shapes
#   3 kernels  bench.kernels: decode 1/8/64/256 x 512/4096/32768 (cold L2), prefill and
#              extend 8 x 4096 causal, torch SDPA beside each
#   4 greedy   the native runner's greedy tokens against transformers (default model, a
#              larger random Llama; fp32 exactly, bf16 teacher-forced)
#   5 graphs   CUDA graphs replay equal to eager; bench.model_step on Llama-3-8B shapes,
#              batch 1/8/64 x 2048, eager and graphs against the memory roofline
#   6 serve    python -m engine.launch on a random Llama-3-8B directory, bench.loadgen at
#              saturation (256 requests, 1,024 in / 128 out)
#
#   bash bench/gpu_check.sh [--dry-run] [--steps 1,3] [OUTDIR]
#
# --steps: run only these steps (a rerun within what is left of a lease; include 1, whose
# copy bandwidth steps 3 and 5 are set against, or they fall back to datasheet peaks).
#
# Results go to OUTDIR (default: $OUT, else ./gpu-results), at most 8 files (what the device
# tool brings back): stepN_NAME.json as each step ends (status ok / failed / timeout /
# skipped, and whatever its commands wrote, partial ones included), gpu_check.log (every
# command's output), summary.md (the targets, last; also printed).
#
# Wheels: where .whl/ holds wheels (`make gpu-wheels`), they are installed with pip
# --no-index into /tmp/site first (the GPU machine has no package index).
#
# --dry-run: the same steps on this CPU machine, tiny shapes, the Triton interpreter (fp16:
# it mishandles bf16), the gpu tests collected and skipped beside CPU ones; it proves the
# script, it measures nothing. The wheels are only checked (they are for Python 3.12).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dry=0 only=1,2,3,4,5,6
while [[ ${1:-} == --* ]]; do
    case $1 in
        --dry-run) dry=1; shift ;;
        --steps) only=$2; shift 2 ;;
        *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--steps 1,3] [OUTDIR]" >&2; exit 2 ;;
    esac
done
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/gpu_check.XXXXXX)
log=$out/gpu_check.log
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
budget=${GPU_CHECK_BUDGET_S:-$(( dry ? 300 : 470 ))}
start=$SECONDS
: > "$log"

say() { echo "$*" | tee -a "$log"; }

# Run a command within what is left of the current step (step_deadline); 124 on timeout.
# The output goes to the log; `timeout` signals the command's whole process group.
t() {
    local left=$(( step_deadline - SECONDS ))
    if (( left <= 0 )); then echo "no time left for: $*" >> "$log"; return 124; fi
    echo "+ [${left}s] $*" >> "$log"
    timeout -k 10 "$left" "$@" >> "$log" 2>&1
}

# step N NAME CAP_S FUNCTION: run FUNCTION within min(CAP_S, what is left of the budget),
# then write OUTDIR/stepN_NAME.json from the files FUNCTION named in $payloads.
step() {
    local n=$1 name=$2 cap=$3 fn=$4 rc t0=$SECONDS
    [[ ,$only, == *,$n,* ]] || return 0
    local left=$(( budget - (SECONDS - start) ))
    local limit=$(( cap < left ? cap : left ))
    payloads=()
    step_deadline=$(( SECONDS + limit ))
    say "=== step $n $name: at most ${limit}s ($(( SECONDS - start ))s into the run)"
    if (( limit < 5 )); then rc=-1 limit=0; else "$fn"; rc=$?; fi
    local args=()
    for p in "${payloads[@]}"; do args+=(--payload "$p"); done
    $py -m bench.gpu_check record --step "$n" --name "$name" --rc "$rc" \
        --seconds $(( SECONDS - t0 )) --limit "$limit" --out "$out/step${n}_$name.json" \
        $( (( dry )) && echo --dry-run ) "${args[@]}" 2>&1 | tee -a "$log"
}

# The worst exit code of several commands (0 if all passed).
worst() { local w=0 rc; for rc in "$@"; do (( rc != 0 && w == 0 )) && w=$rc; done; return $w; }

# The step-1 figures the later steps are set against (empty if step 1 did not get them).
measured() {
    $py -c "import json,sys; d=json.load(open(sys.argv[1])); print(round(d$1, 4))" \
        "$work/env.json" 2>/dev/null
}

# -v: each test's outcome is in the log as it ends, even if the step's time runs out.
pytest_args=(-v -p no:cacheprovider -o addopts="-ra --strict-markers")

step_env() {
    payloads=("env=$work/env.json")
    if (( dry )); then  # the wheels are for Python 3.12: checked here, not installed
        local w=0
        if [[ -d .whl ]]; then t $py -m bench.gpu_check wheels; w=$?
        else echo "no .whl/ here: run make gpu-wheels before the GPU run" >> "$log"; fi
        t $py -m bench.gpu_check env --payload "$work/env.json" --copy-gib 0.0625 \
            --matmul-n 256
        worst $w $?
    else
        t $py -m bench.gpu_check env --payload "$work/env.json" --copy-gib 8
    fi
}

step_kernel_tests() {
    payloads=("tests=$work/kernel_tests.xml")
    if (( dry )); then  # the gpu tests collected (and skipped) beside two interpreted ones
        t $py -m pytest "${pytest_args[@]}" tests/kernels/test_triton_kernels.py \
            -k "gpu or head_dim_128" --junitxml="$work/kernel_tests.xml"
    else
        t $py -m pytest "${pytest_args[@]}" -m gpu tests/kernels \
            --junitxml="$work/kernel_tests.xml"
    fi
}

step_kernels() {
    payloads=("decode=$work/decode.json" "prefill=$work/prefill.json"
              "extend=$work/extend.json")
    local peak=() bw flops
    bw=$(measured "['copy']['tbps']") && peak+=(--peak-tbps "$bw")
    flops=$(measured "['matmul']['tflops']") && peak+=(--peak-tflops "$flops")
    local dec=(--batch 1 8 64 256 --context 512 4096 32768) pre=(--batch 8 --context 4096)
    local ext=(--prefix-len 2048) run=(t $py -m bench.kernels --dtype bf16)
    if (( dry )); then
        dec=(--batch 1 2 --context 32 64) pre=(--batch 2 --context 48) ext=(--prefix-len 24)
        run=(t env TRITON_INTERPRET=1 $py -m bench.kernels --device cpu --dtype fp16)
    fi
    "${run[@]}" "${peak[@]}" --only decode "${dec[@]}" --partial "$work/decode.json"
    local a=$?
    "${run[@]}" "${peak[@]}" --only prefill "${pre[@]}" --partial "$work/prefill.json"
    local b=$?
    "${run[@]}" "${peak[@]}" --only prefill "${pre[@]}" "${ext[@]}" \
        --partial "$work/extend.json"
    worst $a $b $?
}

step_greedy() {
    payloads=("tests=$work/greedy.xml")
    if (( dry )); then  # the gpu test collected and skipped; the CPU batch against transformers
        t $py -m pytest "${pytest_args[@]}" tests/worker/test_native_runner.py \
            -k "greedy_batch_matches_hf or gpu_greedy" --junitxml="$work/greedy.xml"
    else
        t $py -m pytest "${pytest_args[@]}" -m gpu tests/worker/test_native_runner.py \
            -k gpu_greedy_matches_transformers --junitxml="$work/greedy.xml"
    fi
}

step_graphs() {
    payloads=("tests=$work/graphs.xml" "model_step=$work/model_step.json")
    local peak=() bw
    bw=$(measured "['copy']['tbps']") && peak+=(--peak-tbps "$bw")
    if (( dry )); then  # the padded graph path without capture, on CPU
        t $py -m pytest "${pytest_args[@]}" tests/worker/test_native_runner.py \
            -k "padded_decode_path or cuda_graphs_equal_eager" --junitxml="$work/graphs.xml"
        local a=$?
        t $py -m bench.model_step --model tiny --device cpu --batch 1 2 --context 32 \
            --iters 3 "${peak[@]}" --partial "$work/model_step.json"
    else
        t $py -m pytest "${pytest_args[@]}" -m gpu tests/worker/test_native_runner.py \
            -k cuda_graphs_equal_eager --junitxml="$work/graphs.xml"
        local a=$?
        t $py -m bench.model_step --model llama3-8b --batch 1 8 64 --context 2048 \
            "${peak[@]}" --partial "$work/model_step.json"
    fi
    worst $a $?
}

step_serve() {
    payloads=("serve=$work/serve.json")
    if (( dry )); then
        t $py -m bench.gpu_check serve --payload "$work/serve.json" --preset tiny \
            --model-dir "$work/model" --device cpu --num-requests 8 --input-len 64 \
            --output-len 16 -- --device cpu --num-threads 1 --max-num-seqs 8 \
            --max-model-len 256
    else
        t $py -m bench.gpu_check serve --payload "$work/serve.json" --preset llama3-8b \
            --model-dir "$work/model" --num-requests 256 --input-len 1024 --output-len 128 \
            -- --device cuda --max-model-len 2048 --max-num-seqs 256 \
            --max-num-batched-tokens 8192 --kv-cache-memory 40 --ready-timeout 300
    fi
}

say "gpu_check: $( (( dry )) && echo "DRY RUN (CPU, tiny shapes)" || echo "GPU" ) into $out," \
    "budget ${budget}s, scratch $work"
if (( ! dry )) && compgen -G ".whl/*.whl" > /dev/null; then
    timeout 120 $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl >> "$log" 2>&1 \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site \
        || say "wheels: pip install failed (see the log)"
fi
step 1 env 60 step_env
step 2 kernel_tests 90 step_kernel_tests
step 3 kernels 100 step_kernels
step 4 greedy 100 step_greedy
step 5 graphs 100 step_graphs
step 6 serve 170 step_serve
summary=()
(( dry )) && summary=(--decode 2x64 --prefill 2x48 --small 1 --large 2)
$py -m bench.gpu_check summary "$out" "${summary[@]}" 2>&1 | tee -a "$log"
say "gpu_check: done in $(( SECONDS - start ))s"
rm -rf "$work"
bad=$(grep -l '"status": "\(failed\|timeout\)"' "$out"/step*_*.json 2>/dev/null | wc -l)
exit $(( bad > 0 ))
