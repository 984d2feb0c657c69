#!/usr/bin/env bash
# The one GPU run: with the GPU machine's own python3 and packages, offline, install this tree
# (no build isolation) with the CUDA extension built for the local GPU, benchmark the headline
# cases first, run the GPU tests, then record the cost model's estimate beside each measured
# headline figure (so the model's error is known), then run the FSDP2 example on the one GPU
# (NCCL) and time whole-model training steps (bench-model) while time is left, writing the log
# and the JSON into OUTDIR as it
# goes, so that a run cut short still leaves them. Fails clearly without a GPU or without a
# package it needs.
#
#   bench/gpu_check.sh [OUTDIR]          (default bench/results; whole run within TOTAL_BUDGET)
#   env: PYTHON (default python3); TOTAL_BUDGET seconds (default 470: every step is cut to what is
#        left of it); BUILD_BUDGET, BENCH_BUDGET, MODEL_BUDGET, TEST_BUDGET, RELIABILITY_BUDGET,
#        FSDP_BUDGET, MODEL_BENCH_BUDGET seconds (default 120, 100, 90, 120, 60, 60, 90); FUSEDLORA_FUZZ_SCALE (default 0.1); FUSEDLORA_COMMIT (the commit to
#        record where the tree has no .git); WHEELS (default bench/wheels: wheels for packages the
#        GPU image lacks, filled by bench/fetch_wheels.sh and carried with the tree)
set -uo pipefail
deadline=$((SECONDS + ${TOTAL_BUDGET:-470}))
out=${1:-bench/results}
case "$out" in /*) ;; *) [ $# -ge 1 ] && out="$PWD/$out" ;; esac  # an OUTDIR given is relative to the caller
cd "$(dirname "$0")/.."
mkdir -p "$out" && out=$(cd "$out" && pwd)
log="$out/gpu_check.log"
: >"$log"
python=${PYTHON:-python3}
say() { echo "$*" | tee -a "$log"; }
# Seconds a step may take: its own budget, or what is left before the deadline if that is less.
budget() { local left=$((deadline - SECONDS)); [ "$left" -lt 1 ] && left=1; echo $(( $1 < left ? $1 : left )); }
step() { local seconds=$1; shift; timeout -k 5 "$(budget "$seconds")" "$@"; }

wheels=${WHEELS:-bench/wheels}
site=
if compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    if step 60 "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl >>"$log" 2>&1; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        say "gpu_check: installed $(cd "$wheels" && echo *.whl) into $site"
    else
        say "gpu_check: installing $wheels/*.whl failed (see $log); going on without them"
    fi
fi

# Every import the run needs, tried before anything is built; one line says what is missing.
preflight=$(step 120 "$python" - 2>>"$log" <<'EOF'
import importlib, importlib.metadata, importlib.util
required = ["torch", "triton", "numpy", "safetensors", "tqdm"]
optional = {"pytest": "the GPU tests", "hypothesis": "the GPU tests", "ninja": "a fast CUDA build",
            "bitsandbytes": "the peft-bnb peer", "peft": "the PEFT peers", "transformers": "the model tests",
            "matplotlib": "the plot"}
def importable(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False
missing = [name for name in required if not importable(name)]
# The installers are looked up, not imported (setuptools refuses to import after distutils).
missing += [name for name in ("pip", "setuptools") if importlib.util.find_spec(name) is None]
if "setuptools" not in missing:
    version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        missing.append("setuptools>=70.1 or wheel")
absent = [f"{name} ({use})" for name, use in optional.items() if not importable(name)]
print("missing " + ", ".join(missing) if missing else "ok" + ("; without " + ", ".join(absent) if absent else ""))
EOF
)
case "$preflight" in
    missing*) say "gpu_check: $python has no module: ${preflight#missing }; nothing was checked"; exit 2 ;;
    "ok; without "*) say "gpu_check: going on without ${preflight#ok; without }" ;;
    ok) ;;
    *) say "gpu_check: $python could not run the import check (see $log); nothing was checked"; exit 2 ;;
esac
if ! step 120 "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$log" 2>&1; then
    say "gpu_check: no CUDA GPU is visible to $python; nothing was checked"
    exit 2
fi
export FUSEDLORA_COMMIT=${FUSEDLORA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
say "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $FUSEDLORA_COMMIT"
step 60 "$python" -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$log"

say "== install, with the CUDA extension built for this GPU (budget ${BUILD_BUDGET:-120} s)"
arch=$(step 60 "$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! FUSEDLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} \
        step "${BUILD_BUDGET:-120}" "$python" -m pip install --no-deps --no-build-isolation --no-index -q -e . >>"$log" 2>&1; then
    say "gpu_check: building the CUDA extension failed or ran out of time (see $log); installing without it"
    step 60 "$python" -m pip install --no-deps --no-build-isolation --no-index -q -e . >>"$log" 2>&1 \
        || { say "gpu_check: install failed"; exit 3; }
fi
step 60 "$python" -m fusedlora info 2>&1 | tee -a "$log"

say "== benchmark, headline cases first (budget ${BENCH_BUDGET:-100} s)"
step $(( ${BENCH_BUDGET:-100} + 60 )) "$python" -m fusedlora bench --out "$out" --budget "$(budget "${BENCH_BUDGET:-100}")" 2>&1 \
    | grep -v -E '[0-9]+/[0-9]+ \[' | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

say "== pytest -m gpu"
if "$python" -c "import pytest, hypothesis" >/dev/null 2>&1; then
    # The backends' correctness first, then the reliability suites; the property tests at a tenth of
    # their full budget (40 examples per backend) so that the run keeps its time.
    export FUSEDLORA_FUZZ_SCALE=${FUSEDLORA_FUZZ_SCALE:-0.1}
    step "${TEST_BUDGET:-120}" "$python" -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee -a "$log"
    backends_rc=${PIPESTATUS[0]}
    step "${RELIABILITY_BUDGET:-60}" "$python" -m pytest -m gpu -q -p no:cacheprovider --ignore=tests/test_gpu.py tests 2>&1 \
        | tee -a "$log"
    reliability_rc=${PIPESTATUS[0]}
    tests_rc=$(( backends_rc != 0 ? backends_rc : reliability_rc ))
else
    say "gpu_check: pytest or hypothesis is missing: the GPU tests were not run"
    tests_rc=4
fi

latest=$(ls -t "$out"/bench-2*-cuda.json 2>/dev/null | head -n 1)  # the layer benchmark's, not bench-model's
# After the tests (they come first): compiling every headline kernel for the model takes a minute.
say "== the cost model's estimates beside the measured headline figures (budget ${MODEL_BUDGET:-90} s)"
[ -n "$latest" ] && step "${MODEL_BUDGET:-90}" "$python" -m fusedlora bench --summarize "$latest" --model 2>&1 \
    | tee -a "$log"
say "== summary"
[ -n "$latest" ] && step 30 "$python" -m fusedlora bench --summarize "$latest" 2>&1 | tee -a "$log"

say "== examples/train_fsdp2.py under torchrun, world size 1, NCCL (budget ${FSDP_BUDGET:-60} s)"
if "$python" -c "import transformers" >/dev/null 2>&1; then
    step "${FSDP_BUDGET:-60}" "$python" -m torch.distributed.run --standalone --nproc-per-node=1 examples/train_fsdp2.py \
        --tiny --steps 4 --save-every 2 --seq-len 256 --checkpoints "$(mktemp -d)" 2>&1 | tee -a "$log"
    fsdp_rc=${PIPESTATUS[0]}
else
    say "gpu_check: transformers is missing: the FSDP2 example was not run"
    fsdp_rc=5
fi

say "== whole-model training steps, the Llama-3-8B block, then the 1B model while time is left (budget ${MODEL_BENCH_BUDGET:-90} s each)"
model_bench_rc=0
for preset in llama-3-8b-block llama-1b; do
    step "${MODEL_BENCH_BUDGET:-90}" "$python" -m fusedlora bench-model --preset "$preset" --steps 8 --out "$out" 2>&1 \
        | grep -v -E '[0-9]+/[0-9]+ \[' | tee -a "$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && model_bench_rc=$rc
done

say "gpu tests: exit $tests_rc; benchmark: exit $bench_rc; FSDP2 example: exit $fsdp_rc; bench-model: exit $model_bench_rc; results in $out"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$fsdp_rc" -eq 0 ] && [ "$model_bench_rc" -eq 0 ]
