# Sourced by the scripts that run on a GPU machine (scripts/gpu_suite.sh, benchmarks/gpu_round.sh): the environment
# every GPU process of this project runs under, and nvshmem4py made importable from the wheel(s) in .whl/ when the
# image lacks it. Expects $py (the Python to use); returns 1 if nvshmem4py cannot be made importable.
export XLA_PYTHON_CLIENT_PREALLOCATE=false NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_DISABLE_NVLS=1 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONUNBUFFERED=1
if ! "$py" -c "import nvshmem.core" 2>/dev/null; then
  _jax_ll_ep_site="$(mktemp -d)/site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$_jax_ll_ep_site" .whl/*.whl \
    || return 1
  export PYTHONPATH="$_jax_ll_ep_site${PYTHONPATH:+:$PYTHONPATH}"
fi
