#!/usr/bin/env bash
# Model check of the synchronization protocol (verification/protocol.pml, read verification/README.md first).
#
#   scripts/model_check.sh            every check: the properties (must hold), the mutations (must be caught, each by
#                                     the property it breaks), the documented limitation (must still show)
#   scripts/model_check.sh --quick    only R = 2 (a few seconds)
#   scripts/model_check.sh --map      only the model-to-code map (file:line of every modelled step)
#
# Needs spin (Debian/Ubuntu: apt-get install spin) and a C compiler; installs nothing. Runs JOBS (default 2) checks
# at a time; work files and counterexample traces go to $MODEL_CHECK_OUT (default build/model_check). Exits non-zero
# if a property fails, a mutation is not caught (or is caught by another property), a search is incomplete, or an
# anchor of verification/code_map.tsv is gone from the code.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$root/verification/protocol.pml"
map="$root/verification/code_map.tsv"
out="${MODEL_CHECK_OUT:-$root/build/model_check}"
jobs="${JOBS:-2}"
cc="${CC:-cc}"
mode="${1:-all}"

# ---------------------------------------------------------------------------------------------------------------
# The model-to-code map: every row's anchors must still be in the code.
# ---------------------------------------------------------------------------------------------------------------
map_ok=1
print_map() {
  echo "== model step -> code (verification/code_map.tsv, lines as of now)"
  while IFS=$'\t' read -r step file func fanchor sanchor; do
    [[ -z "$step" || "$step" == \#* ]] && continue
    local path="$root/$file" fline sline
    fline="$(grep -nF -- "$fanchor" "$path" 2>/dev/null | head -1 | cut -d: -f1 || true)"
    sline=""
    if [ -n "$fline" ]; then
      sline="$(tail -n "+$fline" "$path" | grep -nF -- "$sanchor" | head -1 | cut -d: -f1 || true)"
      [ -n "$sline" ] && sline=$((fline + sline - 1))
    fi
    if [ -z "$sline" ]; then
      printf '  %-44s MISSING in %s: %s\n' "$func" "$file" "$sanchor"
      map_ok=0
    else
      printf '  %-44s %s:%s  %s\n' "$func" "${file#xla_ffi/}" "$sline" "$step"
    fi
  done <"$map"
  if [ "$map_ok" != 1 ]; then
    echo "model_check: the code no longer has some anchors of verification/code_map.tsv: the code changed under the"
    echo "  model. Re-read the steps above, update verification/protocol.pml if the protocol changed, then the map."
  fi
}

if [ "$mode" = "--map" ]; then
  print_map
  [ "$map_ok" = 1 ]
  exit
fi

if ! command -v spin >/dev/null 2>&1; then
  echo "model_check: 'spin' (the SPIN model checker) is not installed. Install it, e.g. 'sudo apt-get install spin'" >&2
  echo "  on Debian/Ubuntu, or build it from https://github.com/nimble-code/Spin; this script installs nothing." >&2
  exit 2
fi
if ! command -v "$cc" >/dev/null 2>&1; then
  echo "model_check: no C compiler '$cc' (set CC); spin's verifiers are C programs." >&2
  exit 2
fi

# ---------------------------------------------------------------------------------------------------------------
# The checks: name | expectation | spin -D flags | what it shows.
#   pass         the search completes with no error;
#   fail:PROP    the search stops at a violation of PROP (p1..p5: the assertion of that property; hang: an invalid
#                end state, i.e. some rank waits forever).
# ---------------------------------------------------------------------------------------------------------------
checks=(
  "same-R2-alternating|pass|-DR=2 -DROUTING=0|P1-P4, 2 ranks, every program of 4 calls (dispatch/combine, fused/split)"
  "same-R2-all-tokens|pass|-DR=2 -DROUTING=1|P1-P4, 2 ranks, one token on every pair"
  "same-R3-alternating|pass|-DR=3 -DROUTING=0|P1-P4, 3 ranks, every program of 4 calls"
  "same-R3-all-tokens|pass|-DR=3 -DROUTING=1|P1-P4, 3 ranks, one token on every pair"
  "any-R2-alternating|pass|-DR=2 -DSAME_PROGRAM=0 -DHALVES -DROUTING=0|P5 (+P1-P3 of successful calls), 2 ranks, any programs incl. split halves in any order, timeouts"
  "any-R2-all-tokens|pass|-DR=2 -DSAME_PROGRAM=0 -DHALVES -DROUTING=1|P5 (+P1-P3), 2 ranks, as above, one token on every pair"
  "any-R3-alternating|pass|-DR=3 -DSAME_PROGRAM=0 -DROUTING=0|P5 (+P1-P3), 3 ranks, any programs of fused calls, timeouts"
  "any-R3-all-tokens|pass|-DR=3 -DSAME_PROGRAM=0 -DROUTING=1|P5 (+P1-P3), 3 ranks, as above, one token on every pair"
  "retry-sticky-R2|pass|-DR=2 -DSAME_PROGRAM=0 -DHALVES -DCONTINUE_AFTER_ERROR -DSTICKY_ERRORS|the code: calls resumed after buf.check(); sends refused for good after a timeout/mismatch (RankState::unusable)"
  "mask-R2-alternating|pass|-DR=2 -DMASKING -DROUTING=0|on_timeout=mask: P1-P4 for what every rank reads, 2 ranks, any wait may time out and mask, late ranks keep writing"
  "mask-R2-all-tokens|pass|-DR=2 -DMASKING -DROUTING=1|the same, one token on every pair"
  "mask-death-R2|pass|-DR=2 -DMASKING -DDEATH -DROUTING=1|the same, and rank 1 may be killed at any step (mid-send included)"
  "mask-slow-R3|pass|-DR=3 -DMASKING -DONE_SLOW -DROUTING=1 -DNCALLS=3 -DSPLIT_OPS=0|on_timeout=mask, 3 ranks, rank 2 late beyond timeout_s (masked, then writing late), fused calls"
  "mut-no-zero-signal|fail:hang|-DR=2 -DMUT_NO_ZERO_SIGNAL|mutation: zero-token pairs get no signal"
  "mut-no-parity|fail:p3|-DR=2 -DMUT_NO_PARITY|mutation: single-buffered signals and regions"
  "mut-no-epoch|fail:p2|-DR=2 -DMUT_NO_EPOCH|mutation: classify_signal ignores the sequence number"
  "mut-signal-first|fail:p1|-DR=2 -DMUT_SIGNAL_FIRST|mutation: a signal may be seen before its data (no release/acquire)"
  "mut-no-timeout|fail:hang|-DR=2 -DSAME_PROGRAM=0 -DMUT_NO_TIMEOUT|mutation: the wait has no deadline"
  "mut-no-sticky|fail:p3|-DR=2 -DSAME_PROGRAM=0 -DCONTINUE_AFTER_ERROR|mutation: without RankState::unusable, calls resumed after a timeout overwrite a slow peer's region"
  "mut-no-sticky-silent|fail:p1|-DR=2 -DSAME_PROGRAM=0 -DCONTINUE_AFTER_ERROR -DIGNORE_P3 -DSILENT_ONLY|mutation: ... and a rank that saw no error returns wrong data"
  "mut-mask-still-sends|fail:p3|-DR=2 -DMASKING -DROUTING=1 -DMUT_MASK_STILL_SENDS|mutation: a rank goes on sending to a rank it masked: it runs ahead and overwrites what that slow rank still reads"
  "mut-rows-by-token|fail:p1|-DR=2 -DMASKING -DROUTING=1 -DMUT_ROWS_BY_TOKEN|mutation: combine slots not indexed by their writer (the old [token][k] rows): a masked rank's late row lands in a live call's slot"
)
if [ "$mode" = "--quick" ]; then
  quick=()
  for c in "${checks[@]}"; do [[ "$c" == *"-DR=3"* ]] || quick+=("$c"); done
  checks=("${quick[@]}")
elif [ "$mode" != "all" ]; then
  echo "model_check: unknown argument '$mode' (use --quick or --map)" >&2
  exit 2
fi

mkdir -p "$out"
cp "$model" "$out/protocol.pml"

# One check in its own directory: generate the verifier, compile, search, and on a violation replay the trail.
run_one() {
  local name="$1" flags="$2"
  [ -n "$name" ] || { echo "model_check: empty check name" >&2; return 1; }
  local dir="$out/$name"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  cp "$out/protocol.pml" protocol.pml
  local t0=$SECONDS
  # shellcheck disable=SC2086  # flags are separate words
  spin $flags -a protocol.pml >spin.log 2>&1 || { echo "spin -a failed" >result; cat spin.log >>result; return; }
  # SAFETY: safety properties and invalid end states only (every wait blocks, so a hang is an invalid end state).
  # COLLAPSE: lossless state compression (exhaustive search, less memory).
  "$cc" -O2 -w -DSAFETY -DCOLLAPSE -DMEMLIM="${MODEL_CHECK_MEMLIM:-6000}" -o pan pan.c >cc.log 2>&1 ||
    { echo "compile failed" >result; cat cc.log >>result; return; }
  ./pan -m200000 >pan.log 2>&1 || true
  echo $((SECONDS - t0)) >seconds
  if [ -f protocol.pml.trail ]; then
    # shellcheck disable=SC2086
    spin $flags -t protocol.pml >trace.txt 2>&1 || true
  fi
  echo done >result
}
export -f run_one
export out cc

for c in "${checks[@]}"; do
  IFS='|' read -r name _ flags _ <<<"$c"
  printf '%s\0%s\0' "$name" "$flags"
done | xargs -0 -n 2 -P "$jobs" bash -c 'run_one "$1" "$2"' _

# ---------------------------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------------------------
failures=0
printf '\n%-27s %-10s %-12s %12s %6s  %s\n' "check" "expected" "got" "states" "sec" "what it shows"
printf '%s\n' "$(printf '%.0s-' {1..120})"
for c in "${checks[@]}"; do
  IFS='|' read -r name expect flags what <<<"$c"
  dir="$out/$name"
  got="?" states="-" secs="-"
  if [ "$(cat "$dir/result" 2>/dev/null)" != "done" ]; then
    got="error"
  else
    log="$dir/pan.log"
    states="$(grep -Eo '^ *[0-9.e+]+ states, stored' "$log" | awk '{print $1}' || true)"
    secs="$(cat "$dir/seconds")"
    first="$(grep -E '^pan:[0-9]+: ' "$log" | head -1 || true)"  # pan's report of the first error found
    if [[ "$first" == *"assertion violated"* ]]; then
      got="$(grep -Eo 'p[1-5]_[a-z_]+' <<<"$first" | head -1 | cut -d_ -f1)"
    elif [[ "$first" == *"invalid end state"* ]]; then
      got="hang"
    elif grep -Eq 'Search not completed|max search depth too small|reached -DMEMLIM' "$log"; then
      got="incomplete"
    elif grep -Eq 'errors: 0$' "$log"; then
      got="pass"
    fi
  fi
  want="${expect#fail:}"
  verdict="ok"
  [ "$got" = "$want" ] || { verdict="FAIL"; failures=$((failures + 1)); }
  printf '%-27s %-10s %-12s %12s %6s  %s%s\n' "$name" "$want" "$got" "$states" "$secs" "$what" \
    "$([ "$verdict" = ok ] || echo "   <== FAIL")"
done

echo
for c in "${checks[@]}"; do
  IFS='|' read -r name expect _ _ <<<"$c"
  t="$out/$name/trace.txt"
  [ -f "$t" ] || continue
  echo "== counterexample of $name ($(grep -c 'rank [0-9]' "$t") steps; full trace: ${t#"$root"/})"
  grep -E '^ *rank [0-9]|assertion violated|text of failed' "$t" | sed 's/^ */    /' | tail -n 14
  # Where each rank that never ended stands (after a hang: the receive half's wait).
  grep -E '^ *[0-9]+:[[:space:]]+proc +[0-9]+ \(Rank' "$t" | sed -E 's/^ *[0-9]+:[[:space:]]+/    stuck at the end: /' || true
done

echo
print_map
[ "$map_ok" = 1 ] || failures=$((failures + 1))

echo
if [ "$failures" -ne 0 ]; then
  echo "model_check: $failures check(s) FAILED (see the table; logs in ${out#"$root"/})"
  exit 1
fi
echo "model_check: all ${#checks[@]} checks as expected"
