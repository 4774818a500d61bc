#!/usr/bin/env bash
# One entry point for a fresh clone:
#   scripts/dev.sh demo    build, then run the MoE layer example on 8 simulated CPU devices
#   scripts/dev.sh test    build, then run every test this machine can run (the README's test command; CI runs it)
#   scripts/dev.sh build   create/refresh .venv (Python >= 3.12) and build the native modules in place
#   scripts/dev.sh python ARGS...   run the project's Python with ARGS
#
# It finds a Python >= 3.12 by itself (PATH, then pyenv), creates .venv beside this repository's sources with the
# pinned toolchain (requirements-dev.txt), and builds the native modules into jax_ll_ep/ with CMake.
# JAX_LL_EP_CUDA=ON|OFF|AUTO chooses whether the CUDA module is built (AUTO: when nvcc and NVSHMEM are found).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${JAX_LL_EP_VENV:-$root/.venv}"

find_python() {
  local candidates=()
  for v in 3.12 3.13 3.14; do
    command -v "python$v" >/dev/null 2>&1 && candidates+=("$(command -v "python$v")")
  done
  local pyroot="${PYENV_ROOT:-$HOME/.pyenv}"
  if command -v pyenv >/dev/null 2>&1; then pyroot="$(pyenv root)"; fi
  for p in "$pyroot"/versions/3.12*/bin/python3 "$pyroot"/versions/3.13*/bin/python3; do
    [ -x "$p" ] && candidates+=("$p")
  done
  candidates+=("$(command -v python3 || true)")
  for p in "${candidates[@]}"; do
    [ -n "$p" ] || continue
    if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  return 1
}

ensure_venv() {
  local stamp="$venv/.requirements-dev.stamp"
  if [ ! -x "$venv/bin/python" ]; then
    local py
    if ! py="$(find_python)"; then
      echo "jax_ll_ep: no Python >= 3.12 found (jax 0.11+ needs it). Looked on PATH (python3.12, python3.13) and" \
           "in pyenv (${PYENV_ROOT:-$HOME/.pyenv}/versions). Install one, e.g. 'pyenv install 3.12'." >&2
      exit 2
    fi
    echo "jax_ll_ep: creating $venv with $py ($("$py" --version))"
    "$py" -m venv "$venv"
  fi
  if [ ! -f "$stamp" ] || ! cmp -s "$root/requirements-dev.txt" "$stamp"; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/requirements-dev.txt"
    cp "$root/requirements-dev.txt" "$stamp"
  fi
}

build() {
  ensure_venv
  local build_dir="$root/build/dev"
  local nvshmem_dir
  nvshmem_dir="$("$venv/bin/python" -c 'import nvidia.nvshmem as m; print(m.__path__[0])' 2>/dev/null || true)"
  # The pinned CMake and Ninja of the venv (requirements-dev.txt), never whatever is first on PATH: the project needs
  # CMake >= 3.26, and Debian's is 3.25.
  local cmake="$venv/bin/cmake"
  "$cmake" -S "$root" -B "$build_dir" -G Ninja -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$venv/bin/python" -DJAX_LL_EP_CUDA="${JAX_LL_EP_CUDA:-AUTO}" \
    -DNVSHMEM_DIR="$nvshmem_dir" -DCMAKE_INSTALL_PREFIX="$root" >"$root/build/cmake-configure.log" 2>&1 \
    || { cat "$root/build/cmake-configure.log"; exit 1; }
  grep -E "jax_ll_ep:" "$root/build/cmake-configure.log" || true
  "$cmake" --build "$build_dir" -j "$(nproc)"
  "$cmake" --install "$build_dir" >/dev/null
}

cmd="${1:-test}"
shift || true
mkdir -p "$root/build"
case "$cmd" in
  build) build ;;
  demo) build; cd "$root"; exec env PYTHONPATH="$root" "$venv/bin/python" examples/moe_layer.py "$@" ;;
  test) build; cd "$root"; exec env PYTHONPATH="$root" "$venv/bin/python" -m pytest "$@" ;;
  python) ensure_venv; cd "$root"; exec env PYTHONPATH="$root" "$venv/bin/python" "$@" ;;
  *) echo "usage: scripts/dev.sh demo|test|build|python [args...]" >&2; exit 2 ;;
esac
