#!/usr/bin/env bash
# The one GPU run (DESIGN §6): install this tree (offline, no build isolation) with the CUDA
# extension built for the local GPU, run the GPU tests,
# benchmark a budgeted subset with the headline cases first, and leave the log, the JSON and the
# PNG in OUTDIR, printing a short summary last. Needs no network; fails clearly without a GPU.
#
#   bench/gpu_check.sh [OUTDIR]          (default bench/results)
#   env: PYTHON (default python3), TEST_BUDGET, RELIABILITY_BUDGET and BENCH_BUDGET seconds
#        (default 240, 180, 200),
#        FUSEDLORA_FUZZ_SCALE (default 0.1), FUSEDLORA_COMMIT
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
python=${PYTHON:-python3}
say() { echo "$*" | tee -a "$log"; }

if ! "$python" -c "import torch" >>"$log" 2>&1; then
    say "gpu_check: $python cannot import torch; nothing was checked"
    exit 2
fi
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$log" 2>&1; then
    say "gpu_check: no CUDA GPU is visible to $python; nothing was checked"
    exit 2
fi
export FUSEDLORA_COMMIT=${FUSEDLORA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
say "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $FUSEDLORA_COMMIT"
"$python" -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$log"

say "== install, with the CUDA extension built for this GPU"
arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! FUSEDLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} \
        "$python" -m pip install --no-deps --no-build-isolation -q -e . >>"$log" 2>&1; then
    say "gpu_check: building the CUDA extension failed (see $log); installing without it"
    "$python" -m pip install --no-deps --no-build-isolation -q -e . >>"$log" 2>&1 || { say "gpu_check: install failed"; exit 3; }
fi
"$python" -m fusedlora info 2>&1 | tee -a "$log"

say "== pytest -m gpu"
# The backends' correctness first, then the reliability suites; the property tests at a tenth of
# their full budget (40 examples per backend) so that the benchmark keeps its time.
export FUSEDLORA_FUZZ_SCALE=${FUSEDLORA_FUZZ_SCALE:-0.1}
timeout "${TEST_BUDGET:-240}" "$python" -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee -a "$log"
backends_rc=${PIPESTATUS[0]}
timeout "${RELIABILITY_BUDGET:-180}" "$python" -m pytest -m gpu -q -p no:cacheprovider --ignore=tests/test_gpu.py tests 2>&1 \
    | tee -a "$log"
reliability_rc=${PIPESTATUS[0]}
tests_rc=$(( backends_rc != 0 ? backends_rc : reliability_rc ))

say "== benchmark (budget ${BENCH_BUDGET:-200} s)"
timeout $(( ${BENCH_BUDGET:-200} + 150 )) "$python" -m fusedlora bench --out "$out" --budget "${BENCH_BUDGET:-200}" 2>&1 \
    | grep -v -E '[0-9]+/[0-9]+ \[' | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

latest=$(ls -t "$out"/bench-*-cuda.json 2>/dev/null | head -n 1)
say "== summary"
[ -n "$latest" ] && "$python" -m fusedlora bench --summarize "$latest" 2>&1 | tee -a "$log"
say "gpu tests: exit $tests_rc; benchmark: exit $bench_rc; results in $out"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
