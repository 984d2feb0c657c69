#!/usr/bin/env bash
# The one GPU run: with the GPU machine's own python3 and packages, offline, install this tree
# (no build isolation) with the CUDA extension built for the local GPU, benchmark the headline
# cases first, then run the GPU tests, writing the log and the JSON into OUTDIR as it goes, so that
# a run cut short still leaves them. Fails clearly without a GPU or without a package it needs.
#
#   bench/gpu_check.sh [OUTDIR]          (default bench/results; whole run within 8 minutes)
#   env: PYTHON (default python3); BUILD_BUDGET, BENCH_BUDGET, TEST_BUDGET and RELIABILITY_BUDGET
#        seconds (default 120, 100, 120, 60); FUSEDLORA_FUZZ_SCALE (default 0.1); FUSEDLORA_COMMIT;
#        WHEELS (default bench/wheels: wheels for packages the GPU image lacks, filled by
#        bench/fetch_wheels.sh and carried with the tree; bitsandbytes for the PEFT+bitsandbytes peer)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out" && out=$(cd "$out" && pwd)
log="$out/gpu_check.log"
: >"$log"
python=${PYTHON:-python3}
say() { echo "$*" | tee -a "$log"; }

wheels=${WHEELS:-bench/wheels}
if compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d)
    if "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl >>"$log" 2>&1; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        say "gpu_check: installed $(cd "$wheels" && echo *.whl) into $site"
    else
        say "gpu_check: installing $wheels/*.whl failed (see $log); going on without them"
    fi
fi

# Every import the run needs, checked before anything is built; one line says what is missing.
preflight=$("$python" - 2>>"$log" <<'EOF'
import importlib.util
required = ["torch", "triton", "numpy", "pytest", "hypothesis", "safetensors", "tqdm", "setuptools", "ninja"]
optional = ["bitsandbytes", "peft", "transformers", "matplotlib"]
missing = [name for name in required if importlib.util.find_spec(name) is None]
absent = [name for name in optional if importlib.util.find_spec(name) is None]
if missing:
    print("missing " + ", ".join(missing))
elif absent:
    print("without " + ", ".join(absent))
EOF
)
case "$preflight" in
    missing*) say "gpu_check: $python has no module: ${preflight#missing }; nothing was checked"; exit 2 ;;
    without*) say "gpu_check: going on without ${preflight#without } (the cases and tests that need them are skipped)" ;;
    "") ;;
    *) say "gpu_check: $python could not run the import check (see $log); nothing was checked"; exit 2 ;;
esac
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$log" 2>&1; then
    say "gpu_check: no CUDA GPU is visible to $python; nothing was checked"
    exit 2
fi
export FUSEDLORA_COMMIT=${FUSEDLORA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
say "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $FUSEDLORA_COMMIT"
"$python" -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$log"

say "== install, with the CUDA extension built for this GPU (budget ${BUILD_BUDGET:-120} s)"
arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! FUSEDLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} timeout "${BUILD_BUDGET:-120}" \
        "$python" -m pip install --no-deps --no-build-isolation --no-index -q -e . >>"$log" 2>&1; then
    say "gpu_check: building the CUDA extension failed or ran out of time (see $log); installing without it"
    "$python" -m pip install --no-deps --no-build-isolation --no-index -q -e . >>"$log" 2>&1 \
        || { say "gpu_check: install failed"; exit 3; }
fi
"$python" -m fusedlora info 2>&1 | tee -a "$log"

say "== benchmark, headline cases first (budget ${BENCH_BUDGET:-100} s)"
timeout $(( ${BENCH_BUDGET:-100} + 60 )) "$python" -m fusedlora bench --out "$out" --budget "${BENCH_BUDGET:-100}" 2>&1 \
    | grep -v -E '[0-9]+/[0-9]+ \[' | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

say "== pytest -m gpu"
# The backends' correctness first, then the reliability suites; the property tests at a tenth of
# their full budget (40 examples per backend) so that the run keeps its time.
export FUSEDLORA_FUZZ_SCALE=${FUSEDLORA_FUZZ_SCALE:-0.1}
timeout "${TEST_BUDGET:-120}" "$python" -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee -a "$log"
backends_rc=${PIPESTATUS[0]}
timeout "${RELIABILITY_BUDGET:-60}" "$python" -m pytest -m gpu -q -p no:cacheprovider --ignore=tests/test_gpu.py tests 2>&1 \
    | tee -a "$log"
reliability_rc=${PIPESTATUS[0]}
tests_rc=$(( backends_rc != 0 ? backends_rc : reliability_rc ))

latest=$(ls -t "$out"/bench-*-cuda.json 2>/dev/null | head -n 1)
say "== summary"
[ -n "$latest" ] && "$python" -m fusedlora bench --summarize "$latest" 2>&1 | tee -a "$log"
say "gpu tests: exit $tests_rc; benchmark: exit $bench_rc; results in $out"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
