#!/usr/bin/env bash
# clang-format check of every C++/CUDA source (CI runs it; pass --fix to rewrite in place).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cf="${JAX_LL_EP_VENV:-$root/.venv}/bin/clang-format"  # the pinned clang-format (requirements-dev.txt)
mapfile -t files < <(cd "$root" && git ls-files 'xla_ffi/*.h' 'xla_ffi/*.cc' 'xla_ffi/*.cu' 'xla_ffi/*.cuh')
[ "${#files[@]}" -gt 0 ] || exit 0
cd "$root"
if [ "${1:-}" = "--fix" ]; then "$cf" -i "${files[@]}"; else "$cf" --dry-run --Werror "${files[@]}"; fi
