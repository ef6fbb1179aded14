#!/usr/bin/env bash
# Smoke-runs every cargo-fuzz target in this folder for a few seconds each.
#
#   bash fuzz/smoke.sh                    # all targets, 10 s each
#   bash fuzz/smoke.sh params             # one target
#   FUZZ_SECONDS=60 bash fuzz/smoke.sh    # longer
#
# Exits non-zero if a target fails to build or finds a crash; libFuzzer
# prints the input and cargo-fuzz saves it under fuzz/artifacts/TARGET/.
# Replay one with: RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
#
# Runs on the stable toolchain: cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address), and RUSTC_BOOTSTRAP=1 lets stable rustc accept
# them. Needs a C++ compiler (libfuzzer-sys builds libFuzzer) and
# cargo-fuzz, which this script installs from crates.io if it is missing.
# Build output goes to fuzz/target, or $CARGO_TARGET_DIR/fuzz when that is set.
set -euo pipefail

cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-10}
target_dir=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
target_dir=${target_dir:-$PWD/target}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build --target-dir "$target_dir"
for target in "${targets[@]}"; do
    echo "== fuzz $target for ${seconds}s"
    cargo fuzz run --target-dir "$target_dir" "$target" -- \
        -max_total_time="$seconds" -print_final_stats=1
done
echo "fuzz smoke: ${#targets[@]} targets ran ${seconds}s each without a crash"
