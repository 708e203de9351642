#!/usr/bin/env bash
# keyplane at scale (see BENCHMARKS.md, "Scale"): the same measurements with SMALL (1,000)
# and then LARGE (1,000,000) keys in one tenant of one fresh PostgreSQL database, each
# reported at LARGE as a ratio to SMALL; then the usage flush of FLUSH_KEYS keys. From
# anywhere:
#
#   bench/scale.sh
#
# Knobs (environment variables, defaults in brackets):
#   SMALL [1000] LARGE [1000000]  keys in the tenant for the two rounds
#   DURATION [10]     seconds of each h2load throughput run (after WARMUP [2])
#   CLIENTS [16] STREAMS [16]     h2load -c and -m of the throughput runs
#   LAT_REQUESTS [2000]  sequential VerifyApiKey calls timed on the cold server
#   LIST_REQUESTS [500]  sequential calls timed of each ListApiKeys page
#   PAGE_SIZE [50]    page size of the timed ListApiKeys calls
#   DEPTH_PCT [90]    the deep page starts after this % of the keys
#   FLUSH_KEYS [100000]  distinct keys per usage flush; FLUSH_INTERVAL_MS [2000] the bar
#   PORT_BASE [18600] two local ports (cached server, cold server)
#   PG [postgres://postgres:postgres@127.0.0.1:5432]  PostgreSQL server (no database)
#   PROFILE [release] SKIP_BUILD [0] KEEP_DB [0] WORK [mktemp -d]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

SMALL=${SMALL:-1000}
LARGE=${LARGE:-1000000}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CLIENTS=${CLIENTS:-16}
STREAMS=${STREAMS:-16}
LAT_REQUESTS=${LAT_REQUESTS:-2000}
LIST_REQUESTS=${LIST_REQUESTS:-500}
PAGE_SIZE=${PAGE_SIZE:-50}
DEPTH_PCT=${DEPTH_PCT:-90}
FLUSH_KEYS=${FLUSH_KEYS:-100000}
FLUSH_INTERVAL_MS=${FLUSH_INTERVAL_MS:-2000}
PORT_BASE=${PORT_BASE:-18600}
PG=${PG:-postgres://postgres:postgres@127.0.0.1:5432}
PROFILE=${PROFILE:-release}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_DB=${KEEP_DB:-0}
WORK=${WORK:-$(mktemp -d /tmp/keyplane-scale.XXXXXX)}
mkdir -p "$WORK"
DB_TAG=scale
SCOPE=crm:read
CACHED_PORT=$PORT_BASE
COLD_PORT=$((PORT_BASE + 1))

# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"

log "prerequisites"
prerequisites "$CACHED_PORT" "$COLD_PORT"
[ "$LARGE" -gt "$SMALL" ] || die "LARGE must be more than SMALL"
[ "$FLUSH_KEYS" -le "$LARGE" ] || die "FLUSH_KEYS must not be more than LARGE"
build setup payloads scale_probe
trap cleanup EXIT

log "PostgreSQL database $DB; keyplane on :$CACHED_PORT (cache) and :$COLD_PORT (--cache-capacity 0)"
pgq "CREATE DATABASE \"$DB\"" >/dev/null
TENANT=$(cat /proc/sys/kernel/random/uuid)
serve_keyplane cached "$CACHED_PORT"
TOKEN=$(tenant_token "$TENANT")
export BENCH_TOKEN=$TOKEN
SETUP_OUT=$("$BIN/setup" --addr "127.0.0.1:$CACHED_PORT" create --scope "$SCOPE") ||
  { cat "$WORK/cached.log" >&2; die "setup failed"; }
WORKSPACE_ID=$(sed -n 's/^WORKSPACE_ID=//p' <<<"$SETUP_OUT")
BENCH_KEY=$(sed -n 's/^KEY=//p' <<<"$SETUP_OUT")
export BENCH_KEY
"$BIN/payloads" --scope "$SCOPE" --out "$WORK" >/dev/null
serve_keyplane cold "$COLD_PORT" --cache-capacity 0
"$BIN/setup" --addr "127.0.0.1:$COLD_PORT" probe --kind verify --payload "$WORK/verify.bin" >&2 ||
  die "the cold server's VerifyApiKey probe failed"

# bulk_keys FROM TO: keys FROM..TO of the tenant's workspace, inserted by SQL. Their secrets
# are unknown (digests of "bulk-<db>-<n>"), they hold no scope and none is ever verified;
# they are there to be indexed, listed and flushed. Ids are random UUIDs (v4).
bulk_keys() {
  dbq "INSERT INTO api_keys (id, tenant_id, workspace_id, name, prefix, key_digest, last_four,
         owner_id, metadata, expire_time, disabled, revoke_time, last_used_time, replaced_by,
         revision, request_id, create_time, update_time)
       SELECT gen_random_uuid(), '$TENANT', '$WORKSPACE_ID', 'bulk-' || g, 'kp',
         sha256(convert_to('bulk-$DB-' || g, 'UTF8')), lpad((g % 10000)::text, 4, '0'),
         NULL, '{}', NULL, false, NULL, NULL, NULL, 1, NULL, now(), now()
       FROM generate_series($1, $2) AS g"
  dbq "VACUUM ANALYZE api_keys" 2>/dev/null
}

# measure LABEL: fills the ROUND_<LABEL>_* variables.
measure() {
  local label=$1 count out line
  count=$(dbq "SELECT count(*) FROM api_keys WHERE tenant_id = '$TENANT'")
  log "$label: $count keys; cached VerifyApiKey throughput (${DURATION}s)"
  out="$WORK/$label-cached.h2load.txt"
  h2load -D "$DURATION" --warm-up-time "$WARMUP" -c "$CLIENTS" -m "$STREAMS" "${H2_HEADERS[@]}" \
    -H "authorization: Bearer $TOKEN" -d "$WORK/verify.bin" \
    "http://127.0.0.1:$CACHED_PORT/keyplane.v1.ApiKeyService/VerifyApiKey" >"$out" 2>&1 || true
  check_h2load "$label cached" "$out"
  printf -v "R_${label}_cached_rps" '%s' "$(h2load_rps "$out")"
  log "$label: cold VerifyApiKey throughput (${DURATION}s) and latency ($LAT_REQUESTS sequential calls)"
  out="$WORK/$label-cold.h2load.txt"
  h2load -D "$DURATION" --warm-up-time "$WARMUP" -c "$CLIENTS" -m "$STREAMS" "${H2_HEADERS[@]}" \
    -H "authorization: Bearer $TOKEN" -d "$WORK/verify.bin" \
    "http://127.0.0.1:$COLD_PORT/keyplane.v1.ApiKeyService/VerifyApiKey" >"$out" 2>&1 || true
  check_h2load "$label cold" "$out"
  printf -v "R_${label}_cold_rps" '%s' "$(h2load_rps "$out")"
  line=$("$BIN/scale_probe" verify --addr "127.0.0.1:$COLD_PORT" --scope "$SCOPE" \
    --requests "$LAT_REQUESTS") || die "scale_probe verify failed"
  echo "$line" >&2
  printf -v "R_${label}_cold_p50" '%s' "$(field verify_p50_ms "$line")"
  printf -v "R_${label}_cold_p99" '%s' "$(field verify_p99_ms "$line")"
  log "$label: ListApiKeys first page and a page after $DEPTH_PCT% of the keys ($LIST_REQUESTS calls each)"
  line=$("$BIN/scale_probe" list --addr "127.0.0.1:$CACHED_PORT" --depth $((count * DEPTH_PCT / 100)) \
    --page-size "$PAGE_SIZE" --requests "$LIST_REQUESTS") || die "scale_probe list failed"
  echo "$line" >&2
  local f
  for f in first_p50_ms first_p99_ms deep_p50_ms deep_p99_ms depth walk_s; do
    printf -v "R_${label}_$f" '%s' "$(field "$f" "$line")"
  done
  printf -v "R_${label}_count" '%s' "$count"
}
field() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p" <<<" $2"; }

log "small: $SMALL keys"
bulk_keys 2 "$SMALL"
measure small

log "large: inserting $((LARGE - SMALL)) more keys"
INSERT_START=$(date +%s.%N)
bulk_keys $((SMALL + 1)) "$LARGE"
INSERT_SECS=$(awk -v a="$INSERT_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
echo "inserted and analysed in ${INSERT_SECS}s" >&2
measure large

log "usage flush: Store::record_key_usage of $FLUSH_KEYS distinct keys (3 runs)"
dbq "SELECT id FROM api_keys WHERE tenant_id = '$TENANT' ORDER BY random() LIMIT $FLUSH_KEYS" >"$WORK/flush-ids.txt"
FLUSH_LINE=$("$BIN/scale_probe" flush --database-url "$DB_URL" --tenant "$TENANT" \
  --ids "$WORK/flush-ids.txt" --repeat 3) || die "scale_probe flush failed"
echo "$FLUSH_LINE" >&2
FLUSH_RUNS=$(field runs_ms "$FLUSH_LINE")
FLUSH_MEDIAN=$(field median_ms "$FLUSH_LINE")
DB_SIZE=$(dbq "SELECT pg_size_pretty(pg_database_size(current_database()))")

# ---------------------------------------------------------------- report
# row NAME SMALL LARGE KIND: KIND "higher" (throughput: large/small ≥ 0.8) or "lower"
# (latency: large/small ≤ 1.2).
row() {
  awk -v name="$1" -v s="$2" -v l="$3" -v kind="$4" 'BEGIN {
    if (s == "" || l == "" || s + 0 == 0) { printf "| %s | %s | %s | n/a | **not measured** |\n", name, s, l; exit }
    r = l / s
    ok = (kind == "higher") ? (r >= 0.8) : (r <= 1.2)
    printf "| %s | %s | %s | %.2f | %s |\n", name, s, l, r, ok ? "met" : "**not met**"
  }'
}
get() { local v="R_$1_$2"; printf '%s' "${!v:-}"; }
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
mkdir -p "$ROOT/bench/results"
REPORT=$ROOT/bench/results/scale-$STAMP.md
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (with uncommitted changes)"
{
  echo "# keyplane at scale, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Commit $COMMIT ($PROFILE build); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'));"
  echo "PostgreSQL $(pgq 'SHOW server_version'); server, load generator and database on the same machine."
  echo "Knobs: DURATION=$DURATION WARMUP=$WARMUP CLIENTS=$CLIENTS STREAMS=$STREAMS LAT_REQUESTS=$LAT_REQUESTS LIST_REQUESTS=$LIST_REQUESTS PAGE_SIZE=$PAGE_SIZE DEPTH_PCT=$DEPTH_PCT."
  echo "$((LARGE - SMALL)) keys inserted and analysed in ${INSERT_SECS}s; database size at the end $DB_SIZE."
  echo
  echo "| measurement | $(get small count) keys | $(get large count) keys | ratio | within 20% |"
  echo "|---|---:|---:|---:|---|"
  row "cached VerifyApiKey, req/s" "$(get small cached_rps)" "$(get large cached_rps)" higher
  row "cold VerifyApiKey (--cache-capacity 0), req/s" "$(get small cold_rps)" "$(get large cold_rps)" higher
  row "cold VerifyApiKey p50, ms" "$(get small cold_p50)" "$(get large cold_p50)" lower
  row "cold VerifyApiKey p99, ms" "$(get small cold_p99)" "$(get large cold_p99)" lower
  row "ListApiKeys first page ($PAGE_SIZE) p50, ms" "$(get small first_p50_ms)" "$(get large first_p50_ms)" lower
  row "ListApiKeys first page ($PAGE_SIZE) p99, ms" "$(get small first_p99_ms)" "$(get large first_p99_ms)" lower
  row "ListApiKeys deep page ($PAGE_SIZE) p50, ms" "$(get small deep_p50_ms)" "$(get large deep_p50_ms)" lower
  row "ListApiKeys deep page ($PAGE_SIZE) p99, ms" "$(get small deep_p99_ms)" "$(get large deep_p99_ms)" lower
  echo
  echo "Deep page: after $(get small depth) and $(get large depth) keys (walked in pages of 1000 in $(get small walk_s)s and $(get large walk_s)s)."
  echo
  echo "## Usage flush at $(get large count) keys"
  echo
  echo "\`Store::record_key_usage\` of $FLUSH_KEYS distinct keys: runs ${FLUSH_RUNS} ms, median $FLUSH_MEDIAN ms;"
  awk -v m="$FLUSH_MEDIAN" -v i="$FLUSH_INTERVAL_MS" 'BEGIN { printf "%.0f%% of one %d ms flush interval (%s).\n", 100 * m / i, i, (m < i) ? "fits" : "**does not fit**" }'
} >"$REPORT"
log "results ($REPORT; raw outputs in $WORK)"
cat "$REPORT"
