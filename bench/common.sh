# Shared by bench/scale.sh and bench/soak.sh (sourced, not run). Expects ROOT, WORK, PG,
# SKIP_BUILD, KEEP_DB and PROFILE to be set; defines the helpers below and sets BIN, DB,
# DB_URL, JWT_SECRET and PIDS. (bench/run.sh predates it and keeps its own copy.)
# shellcheck shell=bash

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

case "$PROFILE" in
  release) BIN=$ROOT/target/release BUILD_FLAGS=(--release) ;;
  debug) BIN=$ROOT/target/debug BUILD_FLAGS=() ;;
  *) die "PROFILE must be release or debug" ;;
esac

# prerequisites PORT...: h2load, psql, a PostgreSQL that accepts $PG, free ports.
prerequisites() {
  if ! command -v h2load >/dev/null; then
    apt-get install -y nghttp2-client >/dev/null || { apt-get update >/dev/null && apt-get install -y nghttp2-client >/dev/null; }
  fi
  command -v psql >/dev/null || die "psql is needed (PostgreSQL 15 client)"
  if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    local version
    version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -n | tail -n 1)
    if [ -n "$version" ]; then pg_ctlcluster --skip-systemctl-redirect "$version" main start || true; fi
    for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
    pg_isready -h 127.0.0.1 -p 5432 -q || die "PostgreSQL is not answering on 127.0.0.1:5432"
  fi
  PGPASSWORD=$(sed -E 's#^postgres://[^:]+:([^@]*)@.*#\1#' <<<"$PG")
  export PGPASSWORD
  local pguser
  pguser=$(sed -E 's#^postgres://([^:]+):.*#\1#' <<<"$PG")
  if ! pgq "SELECT 1" >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ "$pguser" = postgres ]; then
    su postgres -c "psql -qc \"ALTER USER postgres PASSWORD '$PGPASSWORD'\"" >/dev/null
  fi
  pgq "SELECT 1" >/dev/null || die "cannot log in to $PG as $pguser"
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      die "port $port is taken; set PORT_BASE"
    fi
  done
}

pgq() { psql "$PG/postgres" -qAtX -v ON_ERROR_STOP=1 -c "$1"; }
dbq() { psql "$DB_URL" -qAtX -v ON_ERROR_STOP=1 -c "$1"; }

# build BIN...: cargo build (unless SKIP_BUILD=1), then checks the binaries are there.
build() {
  if [ "$SKIP_BUILD" != 1 ]; then
    log "cargo build ${BUILD_FLAGS[*]} -p keyplane -p bench"
    cargo build "${BUILD_FLAGS[@]}" -q -p keyplane -p bench
  fi
  local b
  for b in keyplane "$@"; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing (run without SKIP_BUILD=1)"
  done
}

PIDS=()
DB=kp_${DB_TAG:-bench}_$(date -u +%Y%m%d%H%M%S)_$$
DB_URL="$PG/$DB"
JWT_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n/+=' | head -c 48)
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$KEEP_DB" != 1 ]; then
    pgq "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" 2>/dev/null || true
  fi
}

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

# serve_keyplane NAME PORT [extra flags...]
serve_keyplane() {
  local name=$1 port=$2
  shift 2
  start "$name" "$BIN/keyplane" serve --listen "127.0.0.1:$port" --database-url "$DB_URL" \
    --jwt-secret "$JWT_SECRET" "$@"
}

# tenant_token TENANT: a token with every scope the benchmarks use.
tenant_token() {
  "$BIN/keyplane" token --jwt-secret "$JWT_SECRET" --tenant "$1" \
    --scope "keyplane.api_keys:verify keyplane.api_keys:read keyplane.api_keys:write keyplane.api_keys:delegate keyplane.workspaces:write keyplane.scopes:write keyplane.roles:write" --ttl 2h
}

# shellcheck disable=SC2034 # used by the scripts that source this file
H2_HEADERS=(-H 'content-type: application/grpc' -H 'te: trailers')

# h2load_counts FILE: "done failed errored timeouts non2xx" of an h2load output.
h2load_counts() {
  local line
  line=$(grep '^requests:' "$1") || { echo "0 1 0 0 0"; return; }
  # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
  # status codes: N 2xx, N 3xx, N 4xx, N 5xx
  printf '%s %s\n' "$(awk '{print $6, $10, $12, $14}' <<<"$line")" \
    "$(awk '/^status codes:/ {print $5 + $7 + $9}' "$1")"
}

# check_h2load NAME FILE: fails unless requests were done and none failed, errored, timed
# out or got a status other than 2xx.
check_h2load() {
  local ndone failed errored timeouts non2xx
  read -r ndone failed errored timeouts non2xx <<<"$(h2load_counts "$2")"
  if [ "$failed" != 0 ] || [ "$errored" != 0 ] || [ "$timeouts" != 0 ] || [ "$ndone" = 0 ] || [ "${non2xx:-1}" != 0 ]; then
    cat "$2" >&2
    die "$1: not every request succeeded at the HTTP level"
  fi
}

# h2load_rps FILE: the req/s of an h2load run.
h2load_rps() { awk '/^finished in/ { gsub(",", "", $4); print $4 }' "$1"; }
