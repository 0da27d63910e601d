#!/usr/bin/env bash
# The one prepared script a session runs when it is lent a GPU machine (one NVIDIA GPU, CUDA
# driver, cmake, ninja, Python with PyTorch, but none of the Debian -dev packages moesh builds
# with, no network, a few minutes of device time in all).
#
# Two phases:
#
#   scripts/device-check.sh --prepare
#       Here, on Debian 12 with scripts/setup's packages and the CUDA toolkit at /usr/local/cuda:
#       builds the device targets (Release, CUDA on) in build-device-cmake/, stages what the GPU
#       machine runs in build-device/, and packs that into build-device.tar.xz (what travels):
#         bin/       moesh, moesh_bench_gguf, moesh_bench_cuda, moesh_backend_conformance_tests,
#                    moesh_cuda_quant_math_tests (stripped)
#         lib/moesh/ the cpu and cuda plugins (stripped)
#         deps/      every shared library they need that is not glibc, libstdc++, libgcc or the
#                    CUDA driver (found with ldd): libhwy, libicu*, libpcre2-8, libtomlplusplus
#         src-deps.tar      headers, pkg-config and CMake files of those packages (and gtest,
#                    nlohmann-json, CLI11, pkgconf) from their .deb files (apt-get download,
#                    dpkg -x), for building from source there when the binaries do not run
#         MANIFEST   what was built, from which sources (a digest the run phase compares)
#       The device tool carries at most 64 MiB with the working tree (tracked and untracked files
#       git does not ignore): the shipped models alone are about 47 MiB, so the staging travels
#       xz-compressed (ICU's 30 MiB data library packs to about 7). Refuses, listing the biggest
#       files, when tree and pack together are over 62 MiB.
#       (--build-from-source does the build from src-deps.tar alone; the run phase calls it, and
#       MOESH_DEVICE_CHECK_FROM_SOURCE=1 makes the run phase use it even when the binaries start;
#       MOESH_DEVICE_CHECK_BUILD_S, default 300, bounds it.)
#
#   scripts/device-check.sh
#       On the GPU machine, from the repository root, with build-device.tar.xz carried (unpacked
#       into build-device/ first). The device tool: run with carry ["build-device.tar.xz"] and
#       command "scripts/device-check.sh" (timeout_s 540).
#       Prints nvidia-smi's card and driver, then runs, each step time-boxed (timeout) and
#       recorded as pass/fail/skip with its seconds, never stopping at a failure:
#         binaries     the staged binaries start with build-device/deps and their CUDA code sees
#                      the GPU (moesh_bench_cuda --info; a driver older than the CUDA 13 runtime
#                      they link would not). Else: a build from source with src-deps.tar and
#                      the machine's own toolkit into build-device-fallback/ (needs cmake, ninja,
#                      nvcc and a C++20 compiler there; a few minutes of the budget)
#         quant_math   moesh_cuda_quant_math_tests (host code; runs without a GPU too)
#         conformance  moesh_backend_conformance_tests --gtest_filter='*/cuda*': every cuda
#                      kernel against the CPU reference on fresh random data, all formats
#         golden, golden_tier
#                      scripts/check_golden.py --backend cuda [--gpu-budget 7MiB]: the shipped
#                      model's greedy tokens against transformers' references, all weights in VRAM,
#                      then with a gpu tier holding under half the experts (copy queue, prefetch)
#         cuda_bench   moesh_bench_cuda: device copy and read bandwidth, the plugin's GEMV
#                      (n_tokens 1), expert FFN and prefill GEMM per weight type, through the ABI
#         e2e_q4_0, e2e_q8_0
#                      moesh_bench_gguf --synthetic moe-mid --type T --backend cuda: decode and
#                      prefill tokens/s, and decode as a fraction of the measured copy bandwidth
#         tier_q4_0    moesh_bench_gguf ... --gpu-budgets 50,25 --costs auto,auto-sync,in-place: the
#                      gpu tier holding 50% / 25% of moe-mid's expert bytes, the rest promoted (on the
#                      copy queue, with the next layer prefetched; auto-sync: blocking, no prefetch) or
#                      computed on the cpu plugin by the cost model, beside the static rule (first
#                      layers pinned, the rest always on the cpu)
#         torch        PyTorch's bf16 matmul TFLOP/s and bf16 GEMV GB/s on the same GPU
#       and prints a table of the results LAST. Every JSON line (the benchmarks' and one per step)
#       goes to $OUT/device-check.jsonl, and the steps' logs to $OUT/device-check-logs/, when
#       $OUT is set. The steps share a budget of MOESH_DEVICE_CHECK_BUDGET_S seconds (default
#       420). Exit status: 0 when no step failed, 1 otherwise.
#       Without a GPU (no working nvidia-smi) it says so, runs the host-only steps, marks every
#       GPU step skipped, and exits 0 unless a host step failed.
#
# Numbers printed are only ever ones measured in this run; a step that did not run shows "-".
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
readonly SELF
cd "$(dirname "$0")/.."

readonly DEV=build-device
readonly PACK=build-device.tar.xz
readonly DEV_CMAKE=build-device-cmake
readonly FALLBACK=build-device-fallback
readonly MAX_MIB=62
readonly BINS=(moesh moesh_bench_gguf moesh_bench_cuda moesh_backend_conformance_tests moesh_cuda_quant_math_tests)
readonly PLUGINS=(libmoesh_backend_cpu.so libmoesh_backend_cuda.so)
# -dev packages (and their runtime libraries) for a build from source on the GPU machine
readonly DEV_DEBS=(libhwy-dev libhwy1 libtomlplusplus-dev libtomlplusplus3 nlohmann-json3-dev libcli11-dev
                   libgtest-dev libpcre2-dev libpcre2-8-0 libicu-dev libicu72 pkgconf pkgconf-bin libpkgconf3)

usage() {
    sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'
}

# Digest of the sources the device binaries are built from: the same on both machines when the
# working tree is the same (the GPU machine's copy has no .git).
source_digest() {
    find CMakeLists.txt plugins runtime experts router transport scripts/CMakeLists.txt scripts/bench tests \
        -type f \( -name '*.c' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name 'CMakeLists.txt' \
        -o -name '*.map' \) -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 sha1sum | sha1sum | cut -c1-16
}

# ------------------------------------------------------------------------------------ prepare

# Shared libraries of the given ELF files that must travel with them: everything ldd resolves
# except the C runtime, the C++ runtime and the GPU driver, which the GPU machine has.
needed_libs() {
    ldd "$@" 2>/dev/null | awk '/=> \// { print $3 }' | sort -u |
        grep -Ev '/(ld-linux[^/]*|libc|libm|libdl|libpthread|librt|libutil|libresolv|libstdc\+\+|libgcc_s|libcuda|libnvidia[^/]*)\.so[^/]*$' || true
}

prepare_src_deps() {
    local work="$DEV_CMAKE/src-deps"
    rm -rf "$work"
    mkdir -p "$work/debs" "$work/prefix"
    echo "device-check: apt-get download ${DEV_DEBS[*]}"
    if ! (cd "$work/debs" && apt-get download "${DEV_DEBS[@]}") > "$work/download.log" 2>&1; then
        cat "$work/download.log" >&2
        echo "device-check: apt-get download failed" >&2
        exit 1
    fi
    local deb
    for deb in "$work"/debs/*.deb; do
        dpkg -x "$deb" "$work/prefix"
    done
    local p="$work/prefix" lib="$work/prefix/usr/lib/x86_64-linux-gnu"
    rm -rf "$p/usr/share/doc" "$p/usr/share/man" "$p/usr/share/lintian" "$p/usr/src"
    # static libraries: only gtest's (linked statically); the rest link the shared ones in deps/
    find "$lib" -name '*.a' ! -name 'libgtest*.a' -delete
    # libraries moesh does not link
    rm -f "$lib"/libicu{i18n,io,test,tu}.* "$lib"/libhwy_{contrib,test}.* "$lib"/libpcre2-{16,32,posix}.*
    # libraries deps/ already holds (by soname): drop the file, point the .so link at the soname,
    # which the fallback build copies in from deps/
    local f soname link
    for f in "$lib"/*.so.*; do
        [[ -f "$f" && ! -L "$f" ]] || continue
        soname=$(objdump -p "$f" 2>/dev/null | awk '$1 == "SONAME" { print $2 }')
        [[ -n "$soname" && -f "$DEV/deps/$soname" ]] || continue
        rm -f "$f"
        for link in "$lib"/*.so; do
            if [[ -L "$link" && ( "$(readlink "$link")" == "${f##*/}" || "$(readlink "$link")" == "$soname" ) ]]; then
                ln -sf "$soname" "$link"
            fi
        done
        rm -f "${lib:?}/$soname"
    done
    find "$p" -xtype l ! -name '*.so' -delete   # links to what was removed
    find "$work/debs" -name '*.deb' -printf '%f\n' | LC_ALL=C sort > "$p/DEBS"
    tar -C "$p" -cf "$DEV/src-deps.tar" .
}

prepare() {
    local nvcc=/usr/local/cuda/bin/nvcc
    if [[ ! -x "$nvcc" ]] && ! command -v nvcc >/dev/null; then
        echo "device-check: --prepare needs the CUDA toolkit (nvcc at /usr/local/cuda/bin or on PATH)" >&2
        exit 1
    fi
    local jobs="${MOESH_JOBS:-2}"
    cmake -S . -B "$DEV_CMAKE" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOESH_CUDA=ON -DMOESH_BUILD_TESTS=ON \
        -DMOESH_BUILD_BENCHMARKS=ON >/dev/null
    cmake --build "$DEV_CMAKE" -j "$jobs" --target "${BINS[@]}" moesh_backend_cpu moesh_backend_cuda

    rm -rf "$DEV"
    mkdir -p "$DEV/bin" "$DEV/lib/moesh" "$DEV/deps"
    local b
    for b in "${BINS[@]}"; do
        cp "$DEV_CMAKE/bin/$b" "$DEV/bin/"
        strip "$DEV/bin/$b"
    done
    for b in "${PLUGINS[@]}"; do
        cp "$DEV_CMAKE/lib/moesh/$b" "$DEV/lib/moesh/"
        strip --strip-unneeded "$DEV/lib/moesh/$b"
    done
    if ldd "$DEV"/bin/* "$DEV"/lib/moesh/*.so | grep 'not found'; then
        echo "device-check: the libraries above are missing here" >&2
        exit 1
    fi
    local lib
    while read -r lib; do
        cp -L "$lib" "$DEV/deps/"
    done < <(needed_libs "$DEV"/bin/* "$DEV"/lib/moesh/*.so)

    prepare_src_deps

    {
        echo "sources $(source_digest)"
        echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
        echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"'), $(ldd --version | head -1)"
        echo "cuda $("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), $(grep -o 'code=\[[a-z_0-9]*\]' "$DEV_CMAKE/build.ninja" | sort -u | tr '\n' ' ')"
    } > "$DEV/MANIFEST"

    echo "device-check: $DEV/ holds:"
    (cd "$DEV" && find . -type f -printf '%s %p\n' | sort -rn | awk '{ printf "  %7.2f MiB  %s\n", $1 / 1048576, $2 }')
    echo "device-check: packing $PACK (xz -9)"
    tar -cf - "$DEV" | xz -T"$jobs" -9 > "$PACK.tmp"
    mv "$PACK.tmp" "$PACK"
    # what the device tool sends: tracked files, untracked ones git does not ignore, and the pack
    local tree_b pack_b total_b
    tree_b=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null |
        awk '{ s += $1 } END { print s + 0 }')
    pack_b=$(stat -c %s "$PACK")
    total_b=$((tree_b + pack_b))
    local mib='BEGIN { printf "%.1f", b / 1048576 }'
    echo "device-check: $PACK is $(awk -v b="$pack_b" "$mib") MiB; with the working tree ($(awk -v b="$tree_b" "$mib") MiB) $(awk -v b="$total_b" "$mib") MiB travel (limit $MAX_MIB MiB)"
    if (( total_b > MAX_MIB * 1048576 )); then
        echo "device-check: over the $MAX_MIB MiB that may travel; the biggest files of the tree:" >&2
        git ls-files -z | xargs -0 -r stat -c '%s %n' | sort -rn | head -8 |
            awk '{ printf "  %7.2f MiB  %s\n", $1 / 1048576, $2 }' >&2
        exit 1
    fi
    echo "device-check: on the GPU machine: carry [\"$PACK\"], command scripts/device-check.sh"
}

# build-device.tar.xz unpacked into build-device/ (the GPU machine may lack xz: Python's lzma will do).
unpack() {
    [[ -f "$PACK" ]] || return 0
    if [[ -f "$DEV/MANIFEST" && "$DEV/MANIFEST" -nt "$PACK" ]]; then
        return 0
    fi
    rm -rf "$DEV"
    echo "device-check: unpacking $PACK"
    if command -v xz >/dev/null; then
        xz -dc "$PACK" | tar -xf -
    else
        python3 -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(".", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))' "$PACK"
    fi
    touch "$DEV/MANIFEST"
}

# ------------------------------------------------------------------------------------ run

# One JSON field of a flat JSON object line: string or number, "" when absent.
jfield() {
    sed -nE "s/.*\"$2\": ?(\"([^\"]*)\"|([-+0-9.eE]+)).*/\2\3/p" <<<"$1" | head -1
}

# First line of the JSONL whose fields match all key=value pairs given.
jline() {
    local line kv ok
    while read -r line; do
        ok=1
        for kv in "$@"; do
            [[ "$(jfield "$line" "${kv%%=*}")" == "${kv#*=}" ]] || { ok=0; break; }
        done
        if (( ok )); then echo "$line"; return; fi
    done < "$JSONL"
}

fmt() {   # fmt PRINTF_FORMAT VALUE: "-" when the value is empty
    if [[ -z "$2" ]]; then echo "-"; else awk -v v="$2" -v f="$1" 'BEGIN { printf f, v }'; fi
}

STEP_NAMES=() STEP_RESULTS=() STEP_SECONDS=() STEP_NOTES=()
record() {   # record NAME RESULT SECONDS NOTE
    STEP_NAMES+=("$1") STEP_RESULTS+=("$2") STEP_SECONDS+=("$3") STEP_NOTES+=("$4")
    local note=${4//\\/\\\\}
    note=${note//\"/\\\"}
    note=${note//[[:cntrl:]]/ }
    echo "{\"bench\": \"device_check_step\", \"step\": \"$1\", \"result\": \"$2\", \"seconds\": $3, \"note\": \"$note\"}" >> "$JSONL"
    printf 'device-check: %-12s %-4s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

# Seconds a step may take: its own limit, within what is left of the budget (0: nothing left).
step_limit() {
    local left=$((BUDGET_END - SECONDS - 5))
    if (( left < 10 )); then echo 0; elif (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

# run_step NAME LIMIT CMD...: runs CMD under timeout, its output in $LOGDIR/NAME.log, its JSON lines
# appended to $JSONL. Sets STEP_RC (124: timed out, -1: no time left) and STEP_T (seconds).
run_step() {
    local name=$1 limit
    limit=$(step_limit "$2")
    shift 2
    STEP_T=0
    if (( limit == 0 )); then STEP_RC=-1; return; fi
    local t0=$SECONDS
    echo "device-check: $name: $* (limit ${limit}s)"
    set +e
    timeout --kill-after=5 "$limit" "$@" > "$LOGDIR/$name.log" 2>&1
    STEP_RC=$?
    set -e
    STEP_T=$((SECONDS - t0))
    grep '^{' "$LOGDIR/$name.log" >> "$JSONL" || true
}

# Why a step failed, in one line: a timeout, or the last line of its log that says what went
# wrong (else its last line that is not JSON).
failure_note() {
    if (( STEP_RC == 124 || STEP_RC == 137 )); then
        echo "timed out"
        return
    fi
    local line
    line=$(grep -v '^{' "$LOGDIR/$1.log" | grep -iE 'error|fail|rejected|refuse|cannot|no cuda|skipped' | tail -1 || true)
    [[ -n "$line" ]] || line=$(grep -v '^{' "$LOGDIR/$1.log" | grep -v '^\s*$' | tail -1 || true)
    echo "exit $STEP_RC: ${line:0:200}"
}

# Builds the device targets from source into $FALLBACK/build with the headers of src-deps.tar
# (prepared binaries missing or not starting, e.g. another C library), for their libraries
# in $FALLBACK/prefix/usr/lib/x86_64-linux-gnu.
build_from_source() {
    local prefix="$FALLBACK/prefix" lib
    unpack
    [[ -f "$DEV/src-deps.tar" ]] || { echo "no $DEV/src-deps.tar"; return 1; }
    command -v cmake >/dev/null || { echo "no cmake"; return 1; }
    command -v ninja >/dev/null || { echo "no ninja"; return 1; }
    rm -rf "$prefix"
    mkdir -p "$prefix"
    tar -C "$prefix" -xf "$DEV/src-deps.tar"
    lib="$PWD/$prefix/usr/lib/x86_64-linux-gnu"
    cp "$DEV"/deps/* "$lib/"
    local pc="$lib/pkgconfig:$PWD/$prefix/usr/share/pkgconfig"
    local pkgconf=()
    if ! command -v pkg-config >/dev/null; then
        pkgconf=(-DPKG_CONFIG_EXECUTABLE="$PWD/$prefix/usr/bin/pkgconf")
    fi
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"   # pkgconf's, and the binaries'
    (
        export PKG_CONFIG_LIBDIR="$pc" PKG_CONFIG_PATH="$pc" PKG_CONFIG_SYSROOT_DIR="$PWD/$prefix"
        export PKG_CONFIG_ALLOW_SYSTEM_CFLAGS=1 PKG_CONFIG_ALLOW_SYSTEM_LIBS=1
        export CPATH="$PWD/$prefix/usr/include${CPATH:+:$CPATH}"
        export LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
        cmake -S . -B "$FALLBACK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOESH_CUDA=ON -DMOESH_BUILD_TESTS=ON \
            -DMOESH_BUILD_BENCHMARKS=ON -DCMAKE_PREFIX_PATH="$PWD/$prefix/usr;$lib/cmake;$PWD/$prefix/usr/share/cmake" \
            -DCMAKE_LIBRARY_ARCHITECTURE=x86_64-linux-gnu "${pkgconf[@]}" &&
            cmake --build "$FALLBACK/build" -j "$(nproc)" --target "${BINS[@]}" moesh_backend_cpu moesh_backend_cuda
    )
}

# Whether every binary starts (dynamic libraries found), in $BIN with $PLUG.
binaries_start() {
    local b
    for b in "${BINS[@]}"; do
        [[ -x "$BIN/$b" ]] || { echo "$BIN/$b is missing"; return 1; }
    done
    "$BIN/moesh" --help >/dev/null &&
        "$BIN/moesh_bench_gguf" --help >/dev/null &&
        "$BIN/moesh_bench_cuda" --help >/dev/null &&
        "$BIN/moesh_backend_conformance_tests" --gtest_list_tests >/dev/null &&
        "$BIN/moesh_cuda_quant_math_tests" --gtest_list_tests >/dev/null
}

gtest_count() {   # gtest_count LOG PASSED|FAILED|SKIPPED
    sed -nE "s/^\[  $2 *\] ([0-9]+) tests?.*/\1/p" "$1" | head -1
}

run() {
    local t_start=$SECONDS
    unpack
    BUDGET_END=$((SECONDS + ${MOESH_DEVICE_CHECK_BUDGET_S:-420}))
    LOGDIR=$(mktemp -d)
    JSONL="$LOGDIR/device-check.jsonl"
    : > "$JSONL"

    # ---- the GPU
    local gpu="" have_gpu=0
    if ! command -v nvidia-smi >/dev/null; then
        gpu="none (nvidia-smi not found)"
        echo "device-check: NO GPU HERE: nvidia-smi not found. Every GPU step is skipped."
    elif ! gpu=$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1) ||
        [[ -z "$gpu" ]]; then
        echo "device-check: NO GPU HERE: nvidia-smi failed: ${gpu:-no output}. Every GPU step is skipped."
        gpu="none (nvidia-smi failed: $(head -1 <<<"${gpu:-no output}"))"
    else
        have_gpu=1
        gpu=$(head -1 <<<"$gpu")
        echo "device-check: GPU: $gpu (name, driver, memory)"
        echo "{\"bench\": \"device_check_gpu\", \"nvidia_smi\": \"${gpu//\"/}\"}" >> "$JSONL"
    fi
    local no_gpu_note="no GPU here"

    # ---- the binaries
    BIN="$DEV/bin"
    PLUG="$DEV/lib/moesh"
    export LD_LIBRARY_PATH="$PWD/$DEV/deps${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    local have_bins=0 t0=$SECONDS why
    local from_source=0
    [[ "${MOESH_DEVICE_CHECK_FROM_SOURCE:-0}" == 1 ]] && from_source=1
    if [[ ! -f "$DEV/MANIFEST" ]]; then
        why="no $DEV/MANIFEST: run scripts/device-check.sh --prepare on the build machine and carry $DEV"
    elif (( from_source )); then
        why="MOESH_DEVICE_CHECK_FROM_SOURCE=1"
    elif why=$(binaries_start 2>&1 | tail -3 | tr '\n' ' '); then
        have_bins=1
        local built digest
        built=$(sed -n 's/^sources //p' "$DEV/MANIFEST")
        digest=$(source_digest)
        why="prepared: $(sed -n 's/^commit //p' "$DEV/MANIFEST")"
        if [[ "$built" != "$digest" ]]; then
            echo "device-check: WARNING: $DEV was built from other sources than this tree ($built, here $digest): re-run --prepare"
            why="STALE: built from other sources ($built, tree $digest); $why"
        fi
        # e.g. a driver older than the CUDA runtime they were built with: the machine's own toolkit may do
        if (( have_gpu )) && ! "$BIN/moesh_bench_cuda" --info > "$LOGDIR/cuda_info.log" 2>&1; then
            have_bins=0
            why="the prepared CUDA code cannot use this GPU: $(grep -v '^{' "$LOGDIR/cuda_info.log" | tail -1)"
        fi
        grep '^{' "$LOGDIR/cuda_info.log" >> "$JSONL" 2>/dev/null || true
    fi
    if (( have_bins )); then
        record binaries pass $((SECONDS - t0)) "$why"
    elif (( have_gpu || from_source )) && [[ -f "$DEV/src-deps.tar" ]]; then
        echo "device-check: not using the prepared binaries ($why); building from source"
        run_step fallback_build "${MOESH_DEVICE_CHECK_BUILD_S:-300}" "$SELF" --build-from-source
        BIN="$FALLBACK/build/bin"
        PLUG="$FALLBACK/build/lib/moesh"
        export LD_LIBRARY_PATH="$PWD/$FALLBACK/prefix/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH"
        if (( STEP_RC == 0 )) && binaries_start > /dev/null 2>&1; then
            have_bins=1
            record binaries pass $((SECONDS - t0)) "built from source here (not prepared ones: $why)"
        else
            record binaries fail $((SECONDS - t0)) "not prepared ones ($why), and the build from source failed: $(failure_note fallback_build)"
        fi
    elif (( !have_gpu )) && [[ ! -f "$DEV/MANIFEST" ]]; then
        record binaries skip $((SECONDS - t0)) "$why"
    else
        record binaries fail $((SECONDS - t0)) "$why"
    fi
    local conf_env=(env "MOESH_CONFORMANCE_PLUGIN_DIR=$PWD/$PLUG")

    # ---- a. the cuda plugin's block math on the host, then its kernels against the reference
    if (( have_bins )); then
        run_step quant_math 60 "$BIN/moesh_cuda_quant_math_tests"
        if (( STEP_RC == -1 )); then record quant_math skip 0 "out of time"
        elif (( STEP_RC == 0 )); then
            record quant_math pass "$STEP_T" "$(gtest_count "$LOGDIR/quant_math.log" PASSED) passed"
        else
            record quant_math fail "$STEP_T" "$(gtest_count "$LOGDIR/quant_math.log" FAILED) failed; $(failure_note quant_math)"
        fi
    else
        record quant_math skip 0 "no binaries"
    fi

    if (( !have_gpu )); then
        record conformance skip 0 "$no_gpu_note"
    elif (( !have_bins )); then
        record conformance skip 0 "no binaries"
    else
        run_step conformance 150 "${conf_env[@]}" "$BIN/moesh_backend_conformance_tests" --gtest_filter='*/cuda*'
        local log="$LOGDIR/conformance.log" np nf ns
        np=$(gtest_count "$log" PASSED) nf=$(gtest_count "$log" FAILED) ns=$(gtest_count "$log" SKIPPED)
        local counts="${np:-0} passed, ${nf:-0} failed, ${ns:-0} skipped"
        echo "{\"bench\": \"device_check_conformance\", \"passed\": ${np:-0}, \"failed\": ${nf:-0}, \"skipped\": ${ns:-0}}" >> "$JSONL"
        if (( STEP_RC == -1 )); then record conformance skip 0 "out of time"
        elif (( STEP_RC == 0 && ${np:-0} > 0 )); then record conformance pass "$STEP_T" "$counts"
        elif (( STEP_RC == 0 )); then record conformance fail "$STEP_T" "$counts: the plugin did not run on this GPU"
        else record conformance fail "$STEP_T" "$counts; $(failure_note conformance)"
        fi
    fi

    # ---- a2. whole-model greedy tokens on the GPU against transformers' references (the shipped
    #          model), with every weight in VRAM and with a gpu tier holding under half the experts
    #          (uploads on the copy queue, next layer prefetched, the rest on the cpu plugin)
    local g
    for g in golden golden_tier; do
        if (( !have_gpu )); then record "$g" skip 0 "$no_gpu_note"; continue
        elif (( !have_bins )); then record "$g" skip 0 "no binaries"; continue
        fi
        local budget=()
        [[ "$g" == golden_tier ]] && budget=(--gpu-budget 7MiB)
        run_step "$g" 90 python3 scripts/check_golden.py --moesh "$BIN/moesh" --backend cuda --plugin-dir "$PLUG" "${budget[@]}"
        local nf
        nf=$(grep '"golden_summary"' "$LOGDIR/$g.log" | sed -nE 's/.*"failed": ([0-9]+).*/\1/p' | tail -1)
        if (( STEP_RC == -1 )); then record "$g" skip 0 "out of time"
        elif (( STEP_RC == 0 )); then record "$g" pass "$STEP_T" "3 prompts x 24 tokens equal transformers'"
        else record "$g" fail "$STEP_T" "${nf:-?} of 3 prompts differ (first_diff in the log); $(failure_note "$g")"
        fi
    done

    # ---- b. bandwidth, and the plugin's kernels as a fraction of it
    local copy_gbps=""
    if (( !have_gpu )); then
        record cuda_bench skip 0 "$no_gpu_note"
    elif (( !have_bins )); then
        record cuda_bench skip 0 "no binaries"
    else
        run_step cuda_bench 120 "$BIN/moesh_bench_cuda" --plugin-dir "$PLUG"
        copy_gbps=$(jfield "$(jline bench=cuda_copy)" gbps)
        if (( STEP_RC == -1 )); then record cuda_bench skip 0 "out of time"
        elif (( STEP_RC == 0 )); then record cuda_bench pass "$STEP_T" "copy $(fmt %.0f "$copy_gbps") GB/s"
        elif (( STEP_RC == 77 )); then record cuda_bench skip "$STEP_T" "$(failure_note cuda_bench)"
        else record cuda_bench fail "$STEP_T" "$(failure_note cuda_bench)"
        fi
    fi

    # ---- c. whole-model decode and prefill on the GPU (moe-mid, built in memory)
    local t
    for t in q4_0 q8_0; do
        if (( !have_gpu )); then
            record "e2e_$t" skip 0 "$no_gpu_note"
            continue
        elif (( !have_bins )); then
            record "e2e_$t" skip 0 "no binaries"
            continue
        fi
        local roofline=()
        if [[ -n "$copy_gbps" ]]; then roofline=(--roofline-gbps "$copy_gbps"); fi
        # leave a minute of the budget to the torch step after this one
        local limit=$((BUDGET_END - SECONDS - 60))
        (( limit > 150 )) && limit=150
        (( limit < 0 )) && limit=0
        run_step "e2e_$t" "$limit" "$BIN/moesh_bench_gguf" --synthetic moe-mid --type "$t" --backend cuda \
            --plugin-dir "$PLUG" --threads "$(nproc)" --prompt 128 --gen 64 --batch 128 --reps 2 "${roofline[@]}"
        local j
        j=$(jline bench=moesh "model=synthetic moe-mid $t")
        if (( STEP_RC == -1 )); then record "e2e_$t" skip 0 "out of time"
        elif (( STEP_RC == 0 )); then
            record "e2e_$t" pass "$STEP_T" "decode $(fmt %.1f "$(jfield "$j" decode_tps)") tok/s"
        else
            record "e2e_$t" fail "$STEP_T" "$(failure_note "e2e_$t")"
        fi
    done

    # ---- c2. the gpu tier (issue 6, measure c): half and a quarter of the experts' bytes in VRAM,
    #         the rest promoted or computed on the cpu plugin (cost model), beside the static rule
    #         (first layers pinned, the rest always on the cpu)
    if (( !have_gpu )); then
        record tier_q4_0 skip 0 "$no_gpu_note"
    elif (( !have_bins )); then
        record tier_q4_0 skip 0 "no binaries"
    else
        local limit=$((BUDGET_END - SECONDS - 60))
        (( limit > 180 )) && limit=180
        (( limit < 0 )) && limit=0
        run_step tier_q4_0 "$limit" "$BIN/moesh_bench_gguf" --synthetic moe-mid --type q4_0 --backend cuda \
            --plugin-dir "$PLUG" --threads "$(nproc)" --prompt 128 --gen 64 --batch 128 --reps 2 \
            --gpu-budgets 50,25 --costs auto,auto-sync,in-place
        local full half sync stat qrate
        full=$(jfield "$(jline bench=moesh "model=synthetic moe-mid q4_0")" decode_tps)
        half=$(jfield "$(jline bench=moesh_gpu_tier gpu_budget_percent=50.0 cost=auto)" decode_tps)
        qrate=$(jfield "$(jline bench=moesh_gpu_tier gpu_budget_percent=50.0 cost=auto)" tier_async_upload_gbps)
        sync=$(jfield "$(jline bench=moesh_gpu_tier gpu_budget_percent=50.0 cost=auto-sync)" decode_tps)
        stat=$(jfield "$(jline bench=moesh_gpu_tier gpu_budget_percent=50.0 cost=in-place)" decode_tps)
        if (( STEP_RC == -1 )); then record tier_q4_0 skip 0 "out of time"
        elif (( STEP_RC == 0 )); then
            record tier_q4_0 pass "$STEP_T" "50% of experts in VRAM: $(fmt %.1f "$half") tok/s (blocking uploads $(fmt %.1f "$sync"), all in VRAM $(fmt %.1f "$full"), static rule $(fmt %.1f "$stat")); copy queue $(fmt %.1f "$qrate") GB/s as the GPU timed it"
        else
            record tier_q4_0 fail "$STEP_T" "$(failure_note tier_q4_0)"
        fi
    fi

    # ---- d. PyTorch's own rates on the same GPU (without our libraries on the path)
    if (( !have_gpu )); then
        record torch skip 0 "$no_gpu_note"
    elif ! command -v python3 >/dev/null; then
        record torch skip 0 "no python3"
    else
        run_step torch 90 env LD_LIBRARY_PATH="$ORIG_LD_LIBRARY_PATH" python3 scripts/bench/torch_bench.py
        if (( STEP_RC == -1 )); then record torch skip 0 "out of time"
        elif (( STEP_RC == 0 )); then record torch pass "$STEP_T" ""
        elif (( STEP_RC == 77 )); then record torch skip "$STEP_T" "$(failure_note torch)"
        else record torch fail "$STEP_T" "$(failure_note torch)"
        fi
    fi

    # ---- e. results
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT/device-check-logs"
        cp "$JSONL" "$OUT/device-check.jsonl"
        cp "$LOGDIR"/*.log "$OUT/device-check-logs/" 2>/dev/null || true
    fi
    local failed=0 i
    echo
    echo "==================== device-check results ===================="
    echo "GPU: $gpu"
    printf '%-12s %-5s %6s  %s\n' step result secs note
    for i in "${!STEP_NAMES[@]}"; do
        printf '%-12s %-5s %6s  %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_SECONDS[$i]}" "${STEP_NOTES[$i]}"
        [[ "${STEP_RESULTS[$i]}" == fail ]] && failed=1
    done
    if (( have_gpu )); then
        local read_gbps
        read_gbps=$(jfield "$(jline bench=cuda_read)" gbps)
        echo
        echo "bandwidth: copy $(fmt %.0f "$copy_gbps") GB/s (read + write), read kernel $(fmt %.0f "$read_gbps") GB/s"
        printf '%-6s %22s %22s %22s %14s\n' type "gemv 14336x4096" "gemv 4096x14336" "expert_ffn 1 token" "prefill 128"
        local d g1 g2 f p
        for d in f16 bf16 q8_0 q4_0 q4_K; do
            g1=$(jline bench=cuda_gemv dtype=$d n_out=14336) g2=$(jline bench=cuda_gemv dtype=$d n_out=4096)
            f=$(jline bench=cuda_expert_ffn dtype=$d) p=$(jline bench=cuda_prefill dtype=$d)
            printf '%-6s %22s %22s %22s %14s\n' "$d" \
                "$(fmt '%.0f GB/s' "$(jfield "$g1" weight_gbps)") $(fmt '(%.2f)' "$(jfield "$g1" fraction_of_copy)")" \
                "$(fmt '%.0f GB/s' "$(jfield "$g2" weight_gbps)") $(fmt '(%.2f)' "$(jfield "$g2" fraction_of_copy)")" \
                "$(fmt '%.0f GB/s' "$(jfield "$f" weight_gbps)") $(fmt '(%.2f)' "$(jfield "$f" fraction_of_copy)")" \
                "$(fmt '%.1f TFLOP/s' "$(jfield "$p" tflops)")"
        done
        echo "(fractions: of the copy bandwidth; goal >= 0.70)"
        for t in q4_0 q8_0; do
            local j
            j=$(jline bench=moesh "model=synthetic moe-mid $t")
            echo "moe-mid $t on cuda: decode $(fmt %.1f "$(jfield "$j" decode_tps)") tok/s," \
                "prefill $(fmt %.0f "$(jfield "$j" prefill_tps)") tok/s," \
                "roofline fraction $(fmt %.2f "$(jfield "$j" decode_roofline_fraction)")"
        done
        local tm tg
        tm=$(jline bench=torch_matmul) tg=$(jline bench=torch_gemv)
        echo "torch bf16: matmul 8192^3 $(fmt %.0f "$(jfield "$tm" tflops)") TFLOP/s," \
            "gemv 14336x4096 $(fmt %.0f "$(jfield "$tg" weight_gbps)") GB/s"
    fi
    echo "total wall time: $((SECONDS - t_start)) s; JSON lines: ${OUT:+$OUT/device-check.jsonl (and }$JSONL${OUT:+)}"
    return "$failed"
}

ORIG_LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
case "${1:-}" in
    --prepare) prepare ;;
    --build-from-source) build_from_source ;;
    "") run ;;
    -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
esac
