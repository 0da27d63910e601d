#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan+UBSan) and runs each for N
# seconds over its seed corpus.
#
#   scripts/fuzz.sh            # every target, 60 s each
#   scripts/fuzz.sh 600        # every target, 10 minutes each
#   scripts/fuzz.sh 300 safetensors
#
# Targets are the tests/fuzz/<name>_fuzz.cpp files. New inputs go to
# $BUILD_DIR/fuzz-corpus/<name> (the seeds in tests/fuzz/corpus/<name> are
# only read); crashers to $BUILD_DIR/fuzz-artifacts/. To keep a finding as a
# regression test, fix it and copy the crasher into tests/fuzz/corpus/<name>/:
# moesh_fuzz_corpus_tests replays that folder in every normal build.
# Exits non-zero if any target found a crash.
set -euo pipefail

seconds=${1:-60}
shift || true
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-fuzz}
jobs=${JOBS:-$(nproc)}

if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  targets=()
  for f in "$root"/tests/fuzz/*_fuzz.cpp; do
    name=$(basename "$f" _fuzz.cpp)
    targets+=("$name")
  done
fi

CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DMOESH_FUZZ=ON -DMOESH_BUILD_TESTS=ON \
  -DMOESH_BUILD_BENCHMARKS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "$jobs" --target "${targets[@]/#/moesh_fuzz_}"

status=0
for name in "${targets[@]}"; do
  exe=$build/bin/moesh_fuzz_$name
  [[ -x $exe ]] || exe=$(find "$build" -type f -name "moesh_fuzz_$name" -perm -u+x | head -n 1)
  work=$build/fuzz-corpus/$name
  artifacts=$build/fuzz-artifacts
  mkdir -p "$work" "$artifacts"
  # -timeout: a unit slower than 10 s is a finding (libFuzzer's default, 1200 s, would never report one)
  args=(-max_total_time="$seconds" -max_len=65536 -timeout=10 -print_final_stats=1 -artifact_prefix="$artifacts/$name-")
  [[ -f $root/tests/fuzz/$name.dict ]] && args+=(-dict="$root/tests/fuzz/$name.dict")
  echo "== $name: ${seconds}s over tests/fuzz/corpus/$name"
  log=$build/fuzz-$name.log
  if "$exe" "${args[@]}" "$work" "$root/tests/fuzz/corpus/$name" >"$log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    grep -E '^#[0-9]+.*cov:' "$log" | tail -n 1 || true
  else
    status=1
    echo "!! $name found a problem; log: $log"
    grep -E 'ERROR|Test unit written|what\(\)|invariant' "$log" | head -n 5 || true
  fi
done
exit $status
