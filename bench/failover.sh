#!/usr/bin/env bash
# PostgreSQL failover and outage figures for BENCHMARKS.md ("Database failover" and
# "Database outage"). Runs, in release mode, the two tests that measure them and keeps
# what they report:
#
#   tests/failover.rs  a pg_auto_failover formation (bench/pgaf.sh), 3 keyplane replicas on
#                      its multi-host URL under verification and write load, through a planned
#                      and an unplanned failover
#   tests/outage.rs    PostgreSQL gone for 60 s under verification load (stale answers),
#                      a 5 s stale bound, a partitioned replica
#
# Needs root (the formation runs as the postgres OS user), PostgreSQL on 127.0.0.1:5432
# (PG, as in run.sh) and installs pg_auto_failover when it is missing. Usage:
#
#   bench/failover.sh
#
# The report goes to stdout and to bench/results/failover-<time>.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PG=${PG:-postgres://postgres:postgres@127.0.0.1:5432}
export KEYPLANE_TEST_POSTGRES_URL=$PG/postgres KEYPLANE_TEST_PGAF=1
"$ROOT/bench/pgaf.sh" install >&2

run() {
  # The tests print their figures on stderr (with --nocapture), one line each; -q's
  # progress dots may lead a line.
  cargo test -q --release --test "$1" -- --nocapture --test-threads 1 "${@:2}" 2>&1 |
    tee /dev/stderr | sed 's/^\.*//' |
    grep -E '^(FAILOVER|outage of|normal answers|UNAVAILABLE|the .*replica|writes went)' || true
}

failover=$(run failover)
outage=$(run outage)
out="bench/results/failover-$(date -u +%Y-%m-%d-%H%M%S).md"
{
  echo "# Failover and outage, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "$(nproc) cores; \`bench/failover.sh\` (release build; tests/failover.rs, tests/outage.rs)."
  echo
  echo '## pg_auto_failover: planned and unplanned failover, 3 replicas'
  echo
  echo '```'
  echo "$failover"
  echo '```'
  echo
  echo '## PostgreSQL unreachable (behind a cut TCP proxy)'
  echo
  echo '```'
  echo "$outage"
  echo '```'
} | tee "$out"
echo "report: $out" >&2
