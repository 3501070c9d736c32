#!/usr/bin/env bash
# Every GPU check in one command, for a machine with a CUDA GPU and JAX already installed
# (no network needed):
#
#   bash benchmarks/gpu_check.sh
#
# 1. installs this project without dependencies (or, failing that, puts it on PYTHONPATH);
# 2. runs the GPU tests of both kernels, Pallas's and the @triton.jit one through jax-triton
#    (implementation="triton"; its tests skip without the gpu extra): compiled against the
#    Pallas kernel in interpret mode and the jnp path (aligned and ragged leaves, fp32/bf16,
#    stochastic, fused), per shard under shard_map, sentinels past every output
#    (tests/test_pallas_gpu.py), and the kernel-vs-XLA optimizer tests (tests/test_pallas_update.py);
# 3. runs both ragged kernels under compute-sanitizer memcheck, where it is installed;
# 4. times the optimizer step at 130M, 1B and 7B (benchmarks/step_time.py: XLA, pallas and
#    triton rows against optax.adamw), which writes benchmarks/results/step_time_gpu.md and
#    step_time_gpu.json: implementation="auto" may take a kernel only where these rows show it
#    faster than the XLA path (qadam_mini_jax.transform.AUTO_KERNELS_ON_GPU);
# 5. times MicroAdam's parts at 1B for two top-k block sizes (benchmarks/micro_adam_profile.py
#    -> micro_adam_profile_gpu.md): whether one part would pay for a kernel of its own.
# The test log goes to benchmarks/results/gpu_check.md. Exits non-zero if any stage failed,
# and with 2, saying so, where no GPU is found.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

device=$("$PY" -c 'import jax; d = jax.devices()[0]; print(d.device_kind if d.platform == "gpu" else "")' 2>/dev/null)
if [ -z "$device" ]; then
  echo "gpu_check: no CUDA GPU found (jax.devices() has none); nothing was run." >&2
  exit 2
fi
echo "gpu_check: $device"

if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1; then
  echo "gpu_check: pip could not install the project without dependencies; using PYTHONPATH=$PWD"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

failed=()
log=$(mktemp)
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_pallas_gpu.py tests/test_pallas_update.py \
  2>&1 | tee "$log" || failed+=("tests")
{
  echo "GPU tests on $device, from \`bash benchmarks/gpu_check.sh\` ($(date -u +%F))."
  echo
  echo '```'
  grep -E "passed|failed|error|FAILED|ERROR" "$log" | tail -40
  echo '```'
} > "$RESULTS/gpu_check.md"

if command -v compute-sanitizer >/dev/null; then
  # The platform allocator gives every buffer its own cudaMalloc, so memcheck sees an access
  # one byte past any of them.
  if XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout 120 compute-sanitizer --tool memcheck \
      --error-exitcode 7 "$PY" -m pytest -q -p no:cacheprovider tests/test_pallas_gpu.py \
      -k "nothing_is_written_past" 2>&1 | tee -a "$log" | tail -15; then
    echo "compute-sanitizer memcheck: no error" | tee -a "$RESULTS/gpu_check.md"
  else
    failed+=("memcheck")
    echo "compute-sanitizer memcheck: FAILED or timed out (log above)" | tee -a "$RESULTS/gpu_check.md"
  fi
else
  echo "compute-sanitizer not found: memcheck skipped" | tee -a "$RESULTS/gpu_check.md"
fi

timeout 300 "$PY" benchmarks/step_time.py || failed+=("step_time")
timeout 120 "$PY" benchmarks/micro_adam_profile.py --model 1B --blocks 1024 4096 --iters 5 \
  || failed+=("micro_adam_profile")

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}" | tee -a "$RESULTS/gpu_check.md"
  exit 1
fi
echo "gpu_check: all passed" | tee -a "$RESULTS/gpu_check.md"
