#!/usr/bin/env bash
# Fuzzes every target for a bounded time (default 60 s each), growing fuzz/corpus/<target>
# and copying any crash into fuzz/regressions/<target>, which `cargo test` replays.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); runs on the stable toolchain through
# RUSTC_BOOTSTRAP=1. Not part of CI: CI replays the saved inputs instead.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
export RUSTC_BOOTSTRAP=1
status=0
for target in key_parser scope_parser page_token credentials request permission_query network http; do
  echo "==> $target for ${seconds}s"
  mkdir -p "corpus/$target" "regressions/$target"
  if ! cargo fuzz run -O "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=4096; then
    status=1
  fi
  for crash in artifacts/"$target"/crash-* artifacts/"$target"/oom-* artifacts/"$target"/timeout-*; do
    [ -e "$crash" ] && cp "$crash" "regressions/$target/" && echo "saved $crash"
  done
done
# Keep the committed corpus small: only inputs that add coverage.
for target in key_parser scope_parser page_token credentials request permission_query network http; do
  cargo fuzz cmin -O "$target" "corpus/$target" >/dev/null 2>&1 || true
done
exit $status
