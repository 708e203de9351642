#!/usr/bin/env bash
# keyplane soak (see BENCHMARKS.md, "Soak"): 3 replicas on one PostgreSQL database. First
# the maximum VerifyApiKey rate of the three together (one h2load per replica, MAX_SECONDS),
# then SOAK_SECONDS at LOAD_PCT% of it spread evenly over the replicas, while
# `soak_driver` creates, rotates and revokes keys (DRIVER_RATE cycles a second) and checks
# every replica refuses each revoked key within 1 s, and every replica's VmRSS is sampled
# every RSS_INTERVAL seconds. Exits 1 if any h2load request or driver step failed, any
# revocation was honoured late, or any replica's RSS grew by 10% or more after warm-up.
#
#   bench/soak.sh                    # 10 minutes
#   SOAK_SECONDS=30 bench/soak.sh    # the CI variant
#
# Knobs (environment variables, defaults in brackets):
#   SOAK_SECONDS [600]  LOAD_PCT [80]  MAX_SECONDS [5]
#   CLIENTS [4] STREAMS [8]  h2load -c and -m per replica (max-rate and soak runs)
#   DRIVER_RATE [2]      create/rotate/revoke cycles a second
#   RSS_INTERVAL [5]     seconds between RSS samples (2 when SOAK_SECONDS < 120)
#   WARMUP_SECONDS [60, or SOAK_SECONDS/4 when SOAK_SECONDS < 240]  RSS baseline after this
#   PORT_BASE [18700]    three local ports
#   PG [postgres://postgres:postgres@127.0.0.1:5432]  PROFILE [release] SKIP_BUILD [0]
#   KEEP_DB [0] WORK [mktemp -d]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

SOAK_SECONDS=${SOAK_SECONDS:-600}
LOAD_PCT=${LOAD_PCT:-80}
MAX_SECONDS=${MAX_SECONDS:-5}
CLIENTS=${CLIENTS:-4}
STREAMS=${STREAMS:-8}
DRIVER_RATE=${DRIVER_RATE:-2}
if [ "$SOAK_SECONDS" -lt 120 ]; then RSS_INTERVAL=${RSS_INTERVAL:-2}; else RSS_INTERVAL=${RSS_INTERVAL:-5}; fi
if [ "$SOAK_SECONDS" -lt 240 ]; then
  WARMUP_SECONDS=${WARMUP_SECONDS:-$((SOAK_SECONDS / 4))}
else
  WARMUP_SECONDS=${WARMUP_SECONDS:-60}
fi
PORT_BASE=${PORT_BASE:-18700}
PG=${PG:-postgres://postgres:postgres@127.0.0.1:5432}
PROFILE=${PROFILE:-release}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_DB=${KEEP_DB:-0}
WORK=${WORK:-$(mktemp -d /tmp/keyplane-soak.XXXXXX)}
mkdir -p "$WORK"
DB_TAG=soak
SCOPE=crm:read
PORTS=("$PORT_BASE" $((PORT_BASE + 1)) $((PORT_BASE + 2)))
VERIFY_PATH=/keyplane.v1.ApiKeyService/VerifyApiKey

# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

log "prerequisites"
prerequisites "${PORTS[@]}"
build setup payloads soak_driver
trap cleanup EXIT

log "PostgreSQL database $DB; 3 replicas on ports ${PORTS[*]}"
pgq "CREATE DATABASE \"$DB\"" >/dev/null
TENANT=$(cat /proc/sys/kernel/random/uuid)
# The first replica migrates the database alone; the others start once it answers.
serve_keyplane replica0 "${PORTS[0]}"
REPLICA_PIDS=("$LAST_PID")
TOKEN=$(tenant_token "$TENANT")
export BENCH_TOKEN=$TOKEN
SETUP_OUT=$("$BIN/setup" --addr "127.0.0.1:${PORTS[0]}" create --scope "$SCOPE") ||
  { cat "$WORK/replica0.log" >&2; die "setup failed"; }
WORKSPACE_ID=$(sed -n 's/^WORKSPACE_ID=//p' <<<"$SETUP_OUT")
BENCH_KEY=$(sed -n 's/^KEY=//p' <<<"$SETUP_OUT")
export BENCH_KEY
for i in 1 2; do
  serve_keyplane "replica$i" "${PORTS[$i]}"
  REPLICA_PIDS+=("$LAST_PID")
done
"$BIN/payloads" --scope "$SCOPE" --out "$WORK" >/dev/null
for port in "${PORTS[@]}"; do
  "$BIN/setup" --addr "127.0.0.1:$port" probe --kind verify --payload "$WORK/verify.bin" >&2 ||
    die "the VerifyApiKey probe failed on :$port"
done

# load NAME SECONDS [--rps N]: one h2load per replica at once, outputs $WORK/NAME-<i>.txt.
load() {
  local name=$1 secs=$2 i
  shift 2
  local pids=()
  for i in 0 1 2; do
    h2load -D "$secs" -c "$CLIENTS" -m "$STREAMS" "$@" "${H2_HEADERS[@]}" \
      -H "authorization: Bearer $TOKEN" -d "$WORK/verify.bin" \
      "http://127.0.0.1:${PORTS[$i]}$VERIFY_PATH" >"$WORK/$name-$i.txt" 2>&1 &
    pids+=($!)
  done
  for i in 0 1 2; do wait "${pids[$i]}" || true; done
}

log "maximum rate: ${MAX_SECONDS}s, h2load -c $CLIENTS -m $STREAMS on each replica at once"
load max "$MAX_SECONDS"
MAX_RPS=0
for i in 0 1 2; do
  check_h2load "max rate on replica $i" "$WORK/max-$i.txt"
  MAX_RPS=$(awk -v a="$MAX_RPS" -v b="$(h2load_rps "$WORK/max-$i.txt")" 'BEGIN { printf "%.0f", a + b }')
done
TARGET_RPS=$((MAX_RPS * LOAD_PCT / 100))
PER_CLIENT=$((TARGET_RPS / 3 / CLIENTS))
[ "$PER_CLIENT" -ge 1 ] || PER_CLIENT=1
echo "maximum $MAX_RPS req/s; soak at $TARGET_RPS req/s ($PER_CLIENT per client, $CLIENTS clients per replica)" >&2

log "soak: ${SOAK_SECONDS}s; driver at $DRIVER_RATE cycles/s; VmRSS every ${RSS_INTERVAL}s"
echo "seconds,replica,vmrss_kb" >"$WORK/rss.csv"
rss_sampler() {
  local t0 now i kb
  t0=$(date +%s)
  while :; do
    now=$(($(date +%s) - t0))
    for i in 0 1 2; do
      kb=$(awk '/^VmRSS:/ {print $2}' "/proc/${REPLICA_PIDS[$i]}/status" 2>/dev/null || echo "")
      echo "$now,$i,${kb:-gone}" >>"$WORK/rss.csv"
    done
    sleep "$RSS_INTERVAL"
  done
}
rss_sampler &
SAMPLER_PID=$!
PIDS+=("$SAMPLER_PID")
"$BIN/soak_driver" "${PORTS[@]/#/--replica=127.0.0.1:}" --workspace "$WORKSPACE_ID" \
  --scope "$SCOPE" --seconds "$SOAK_SECONDS" --rate "$DRIVER_RATE" \
  --errors "$WORK/driver-errors.txt" >"$WORK/driver.txt" 2>"$WORK/driver.log" &
DRIVER_PID=$!
load soak "$SOAK_SECONDS" --rps "$PER_CLIENT"
DRIVER_STATUS=0
wait "$DRIVER_PID" || DRIVER_STATUS=$?
sleep "$RSS_INTERVAL" # one more sample after the load
stop "$SAMPLER_PID"
for i in 0 1 2; do
  kill -0 "${REPLICA_PIDS[$i]}" 2>/dev/null || die "replica $i exited during the soak (see $WORK/replica$i.log)"
done

# ---------------------------------------------------------------- verdicts
H2_ERRORS=0 H2_DONE=0 CARRIED=0
for i in 0 1 2; do
  read -r ndone failed errored timeouts non2xx <<<"$(h2load_counts "$WORK/soak-$i.txt")"
  H2_DONE=$((H2_DONE + ndone))
  H2_ERRORS=$((H2_ERRORS + failed + errored + timeouts + ${non2xx:-0}))
  CARRIED=$(awk -v a="$CARRIED" -v b="$(h2load_rps "$WORK/soak-$i.txt")" 'BEGIN { printf "%.0f", a + b }')
done
DRIVER_LINE=$(grep '^SOAK_DRIVER' "$WORK/driver.txt" || true)
field() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p" <<<" $2"; }
if [ -z "$DRIVER_LINE" ] || [ "$DRIVER_STATUS" != 0 ]; then
  cat "$WORK/driver.log" >&2
  DRIVER_ERRORS="driver failed (exit $DRIVER_STATUS)"
  LATE=unknown
else
  DRIVER_ERRORS=$(field errors "$DRIVER_LINE")
  LATE=$(field late "$DRIVER_LINE")
fi

# Per replica: RSS at the first sample at or after the warm-up, at the end, and the peak
# after warm-up; growth = end / baseline - 1.
RSS_TABLE=$(awk -F, -v warm="$WARMUP_SECONDS" '
  NR > 1 && $3 != "gone" {
    r = $2
    if (!(r in first)) first[r] = $3
    if ($1 >= warm && !(r in base)) base[r] = $3
    if ($1 >= warm && $3 > peak[r]) peak[r] = $3
    last[r] = $3
  }
  END {
    for (r = 0; r < 3; r++) {
      g = (base[r] > 0) ? 100 * (last[r] / base[r] - 1) : 999
      printf "%d %.1f %.1f %.1f %.1f %.1f %s\n", r, first[r] / 1024, base[r] / 1024, peak[r] / 1024, last[r] / 1024, g, (g < 10) ? "flat" : "GREW"
    }
  }' "$WORK/rss.csv")
RSS_OK=1
grep -q GREW <<<"$RSS_TABLE" && RSS_OK=0

FAIL=()
[ "$H2_ERRORS" = 0 ] || FAIL+=("$H2_ERRORS h2load requests failed, errored, timed out or were not 2xx")
[ "$DRIVER_ERRORS" = 0 ] || FAIL+=("driver errors: $DRIVER_ERRORS (see $WORK/driver-errors.txt)")
[ "$LATE" = 0 ] || FAIL+=("revocations not honoured within 1 s: $LATE")
[ "$RSS_OK" = 1 ] || FAIL+=("a replica's RSS grew by 10% or more after warm-up")

STAMP=$(date -u +%Y-%m-%d-%H%M%S)
mkdir -p "$ROOT/bench/results"
REPORT=$ROOT/bench/results/soak-$STAMP.md
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (with uncommitted changes)"
ok() { if [ "$1" = 0 ]; then echo "0 (met)"; else echo "**$1 (not met)**"; fi; }
{
  echo "# keyplane soak, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Commit $COMMIT ($PROFILE build); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'));"
  echo "PostgreSQL $(pgq 'SHOW server_version'); 3 replicas, h2load, the driver and the database on the same machine."
  echo "Knobs: SOAK_SECONDS=$SOAK_SECONDS LOAD_PCT=$LOAD_PCT MAX_SECONDS=$MAX_SECONDS CLIENTS=$CLIENTS STREAMS=$STREAMS DRIVER_RATE=$DRIVER_RATE RSS_INTERVAL=$RSS_INTERVAL WARMUP_SECONDS=$WARMUP_SECONDS."
  echo
  echo "| figure | value |"
  echo "|---|---|"
  echo "| maximum VerifyApiKey rate, 3 replicas (${MAX_SECONDS}s) | $MAX_RPS req/s |"
  echo "| soak rate offered ($LOAD_PCT%) / carried | $TARGET_RPS / $CARRIED req/s |"
  echo "| VerifyApiKey requests done during the soak | $H2_DONE |"
  echo "| h2load failed + errored + timed out + non-2xx | $(ok "$H2_ERRORS") |"
  echo "| driver | ${DRIVER_LINE#SOAK_DRIVER } |"
  echo "| driver errors | $(ok "$DRIVER_ERRORS") |"
  echo "| revocations not refused by every replica within 1 s | $(ok "$LATE") |"
  echo
  echo "VmRSS (MiB) per replica: at the first sample, at warm-up (${WARMUP_SECONDS}s), the peak after it, at the end; growth = end / warm-up − 1 (bar < 10%)."
  echo
  echo "| replica | first | warm-up | peak | end | growth | |"
  echo "|---|---:|---:|---:|---:|---:|---|"
  while read -r r first base peak last growth verdict; do
    echo "| $r | $first | $base | $peak | $last | $growth% | $verdict |"
  done <<<"$RSS_TABLE"
  echo
  echo "RSS over time (MiB, replicas 0 / 1 / 2; at most 30 rows, every sample is in $WORK/rss.csv):"
  echo
  echo '```'
  awk -F, 'NR > 1 { v[$1] = v[$1] sprintf(" %7.1f", $3 / 1024); if (!($1 in seen)) { seen[$1] = 1; order[++n] = $1 } }
    END { step = int((n + 29) / 30); for (i = 1; i <= n; i++) if ((i - 1) % step == 0 || i == n) printf "%5ss%s\n", order[i], v[order[i]] }' "$WORK/rss.csv"
  echo '```'
  echo
  if [ "${#FAIL[@]}" = 0 ]; then echo "Verdict: **pass**."; else printf 'Verdict: **fail**: %s.\n' "$(IFS=';'; echo "${FAIL[*]}")"; fi
} >"$REPORT"
log "results ($REPORT; raw outputs in $WORK)"
cat "$REPORT"
[ "${#FAIL[@]}" = 0 ] || exit 1
