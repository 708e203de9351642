#!/usr/bin/env bash
# pgaf.sh: a throw-away local pg_auto_failover formation (PostgreSQL 15 HA) on loopback, for
# keyplane's failover integration test and benchmark: one monitor and two Postgres nodes with
# synchronous replication, all run as the `postgres` OS user (run this script as root).
#
#   install        apt-get install postgresql-15-auto-failover, unless pg_autoctl is there
#   up             wipe $PGAF_DIR, build monitor + primary + sync secondary, wait for
#                  primary/secondary, print the client URI (one line on stdout)
#   uri            print that URI again
#   primary        print the current primary's port
#   primary-uri    print a single-host URI of the current primary (for clients such as sqlx
#                  that cannot parse multi-host URIs)
#   failover       planned: `pg_autoctl perform failover`; prints switchover_ms=<ms>
#   kill-primary   unplanned: SIGKILL the primary's keeper and postgres; prints switchover_ms=<ms>
#   status         pg_autoctl show state
#   down           stop every process of this formation (keeps the files); idempotent
#
# Env: PGAF_DIR (default /tmp/keyplane-pgaf), PGAF_PORT_BASE (default 5490: monitor = base,
# node1 = base+1, node2 = base+2), PGAF_TIMEOUT (seconds to wait for a state, default 120),
# PGAF_FAST_FAILOVER (default 1: lower the failure-detection timeouts, see tune_monitor; 0 keeps
# pg_auto_failover's defaults, with which an unplanned failover takes ~50 s).
# Only results go to stdout; progress and pg_autoctl output go to stderr; daemons log to
# $PGAF_DIR/<name>.log.
set -euo pipefail

PGAF_DIR=${PGAF_DIR:-/tmp/keyplane-pgaf}
PORT_BASE=${PGAF_PORT_BASE:-5490}
TIMEOUT=${PGAF_TIMEOUT:-120}
FAST_FAILOVER=${PGAF_FAST_FAILOVER:-1}
PGBIN=/usr/lib/postgresql/15/bin
MON_PORT=$PORT_BASE
MON=$PGAF_DIR/monitor
HOST=127.0.0.1
MARKER=.keyplane-pgaf # in PGAF_DIR: proves the directory is ours before `up` wipes it

# The caller's libpq settings must not leak into our psql calls.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS PGSSLMODE \
  PGTARGETSESSIONATTRS PGCONNECT_TIMEOUT

log() { printf '[pgaf %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

node_port() { echo $((PORT_BASE + ${1#node})); } # node1 -> base+1
port_node() { echo "node$(($1 - PORT_BASE))"; }  # base+2 -> node2

[ "$(id -u)" = 0 ] || die "run as root (the formation runs as the postgres OS user)"
case "$PGAF_DIR" in
  /?*) ;;
  *) die "PGAF_DIR must be an absolute path other than / (got '$PGAF_DIR')" ;;
esac
PGAF_DIR=${PGAF_DIR%/}

find_pg_autoctl() {
  command -v pg_autoctl 2>/dev/null || { [ -x "$PGBIN/pg_autoctl" ] && echo "$PGBIN/pg_autoctl"; }
}

# as_pg NODE CMD...: run CMD as postgres with this formation's environment.
# - cd /tmp: postgres may not be allowed into the caller's working directory.
# - XDG_*: pg_autoctl keeps its config, state and pid files under these (by default in
#   ~postgres/.config, .local/share and /tmp/pg_autoctl, keyed by pgdata path); keeping them
#   inside PGAF_DIR means wiping PGAF_DIR really starts from scratch.
# - KEYPLANE_PGAF_DIR / KEYPLANE_PGAF_NODE: markers in the environment of every pg_autoctl
#   and postmaster process we start, so `down` and `kill-primary` find exactly our processes
#   (pg_autoctl's children rename themselves, e.g. "pg_autoctl: node active", so their
#   command line does not say which pgdata they serve).
# - setpriv, not runuser/su: those stay around as the parent and stop themselves whenever
#   their child is stopped, which kill-primary's SIGSTOP would leave behind (stopped, as root).
AS_POSTGRES=(setpriv --reuid=postgres --regid=postgres --init-groups)
PG_ENV=(env -i HOME=/var/lib/postgresql PATH="$PGBIN:/usr/bin:/bin" LANG=C.UTF-8 LC_ALL=C.UTF-8
  XDG_CONFIG_HOME="$PGAF_DIR/xdg/config" XDG_DATA_HOME="$PGAF_DIR/xdg/data"
  XDG_RUNTIME_DIR="$PGAF_DIR/xdg/run" KEYPLANE_PGAF_DIR="$PGAF_DIR")
as_pg() {
  local node=$1
  shift
  (cd /tmp && exec "${AS_POSTGRES[@]}" "${PG_ENV[@]}" KEYPLANE_PGAF_NODE="$node" "$@")
}

# SQL as the postgres superuser over TCP (initdb ran with --auth=trust: no password).
sql_at() { psql "host=$HOST port=$1 user=postgres dbname=${3:-postgres} connect_timeout=2" -qAtX -v ON_ERROR_STOP=1 -c "$2"; }
mon_sql() { sql_at "$MON_PORT" "$1" pg_auto_failover; }

# probe_write PORT: succeeds once PORT's postgres accepts (and, if synchronous, replicates) a write.
# No short timeout on purpose: a commit waiting for the synchronous standby is not "accepted" yet.
probe_write() {
  timeout 30 psql "host=$HOST port=$1 user=postgres dbname=postgres connect_timeout=2 application_name=pgaf_probe" \
    -qAtX -v ON_ERROR_STOP=1 \
    -c 'create table if not exists pgaf_probe(x int); insert into pgaf_probe values (1)' >/dev/null 2>&1
}

# wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s until it succeeds.
wait_for() {
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "timed out after ${secs}s waiting for: $what"; return 1; }
    sleep 0.2
  done
}

# roles: "<primary port> <secondary port>" when the monitor sees exactly one node that is and
# should be primary and one that is and should be secondary; fails otherwise.
roles() {
  local out
  out=$(mon_sql "select coalesce(max(nodeport) filter (where reportedstate = 'primary' and goalstate = 'primary'), 0)
                    || ' ' || coalesce(max(nodeport) filter (where reportedstate = 'secondary' and goalstate = 'secondary'), 0)
                  from pgautofailover.node where formationid = 'default'
                  having count(*) filter (where reportedstate = 'primary' and goalstate = 'primary') = 1
                     and count(*) filter (where reportedstate = 'secondary' and goalstate = 'secondary') = 1") || return 1
  [ -n "$out" ] && echo "$out"
}

# writable_node: port of the one node that is and should be a writable primary (primary,
# wait_primary when its standby is gone, single when alone); fails if there is not exactly one.
writable_node() {
  local out
  out=$(mon_sql "select nodeport from pgautofailover.node
                  where formationid = 'default' and reportedstate = goalstate
                    and goalstate in ('primary', 'wait_primary', 'single')") || return 1
  [ -n "$out" ] && [ "$(wc -l <<<"$out")" -eq 1 ] && echo "$out"
}

node_is() { # node_is PORT STATE...: the monitor reports PORT in one of STATEs, as assigned
  local states
  states=$(printf "'%s'," "${@:2}")
  [ "$(mon_sql "select count(*) from pgautofailover.node where nodeport = $1
                  and reportedstate = goalstate and goalstate in (${states%,})")" = 1 ]
}

# our_pids [NODE]: pids of this formation's processes (of one node if NODE is given).
# pg_autoctl processes and postmasters carry our env markers; postgres' own children overwrite
# their environment with the process title, so they are added as children of the postmaster.
our_pids() {
  local pid
  for pid in $(pgrep -u postgres || true); do
    # grep -z: the environment is NUL-separated; 2>/dev/null: the process may be gone already.
    grep -qzxF "KEYPLANE_PGAF_DIR=$PGAF_DIR" "/proc/$pid/environ" 2>/dev/null || continue
    [ -z "${1:-}" ] || grep -qzxF "KEYPLANE_PGAF_NODE=$1" "/proc/$pid/environ" 2>/dev/null || continue
    echo "$pid"
    pgrep -P "$pid" || true
  done | sort -un
}

# require_formation: fail at once (rather than wait for states) when there is no formation; and
# never run pg_autoctl against a PGAF_DIR that `up` did not make (it would create xdg/ there).
require_formation() {
  [ -f "$PGAF_DIR/$MARKER" ] || die "no formation in $PGAF_DIR (run: $0 up)"
  mon_sql "select 1" >/dev/null 2>&1 || die "the monitor on $HOST:$MON_PORT does not answer (run: $0 up)"
}

ports_free() {
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null; then return 1; fi
  done
}

# A SIGKILLed postmaster leaves its socket and lock file in /var/run/postgresql; when nothing
# listens on the port they are stale (and a recycled pid in the lock file would stop the next
# postmaster on that port from starting).
clear_stale_sockets() {
  local port
  for port in "$MON_PORT" $((PORT_BASE + 1)) $((PORT_BASE + 2)); do
    if ports_free "$port"; then
      rm -f "/var/run/postgresql/.s.PGSQL.$port" "/var/run/postgresql/.s.PGSQL.$port.lock"
    fi
  done
}

cmd_install() {
  if [ -n "$(find_pg_autoctl)" ] && [ -f /usr/share/postgresql/15/extension/pgautofailover.control ]; then
    log "pg_autoctl already installed: $(find_pg_autoctl)"
    return 0
  fi
  log "installing postgresql-15-auto-failover"
  apt-get update >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-15-auto-failover >&2 ||
    die "apt-get install postgresql-15-auto-failover failed"
  [ -n "$(find_pg_autoctl)" ] || die "pg_autoctl not found after installing postgresql-15-auto-failover"
}

# start_daemon NAME ARGS...: `pg_autoctl ARGS...` in the background, logging to NAME.log, in
# its own session: a Ctrl-C or process-group kill aimed at the caller must not reach it.
start_daemon() {
  local name=$1
  shift
  (cd /tmp && exec setsid "${AS_POSTGRES[@]}" "${PG_ENV[@]}" KEYPLANE_PGAF_NODE="$name" \
    pg_autoctl "$@") </dev/null >>"$PGAF_DIR/$name.log" 2>&1 &
}

# Lower the failure-detection timeouts so that an unplanned failover takes ~9 s instead of
# ~50 s. With the defaults, on a killed primary the monitor waits for
#   the health check to fail (period 5 s, 2 retries 2 s apart),
#   node_considered_unhealthy_timeout (20 s without a keeper report; the node must also fail
#     its health checks, so a keeper that is merely slow under load does not trigger it),
#   primary_demote_timeout (30 s, for the old primary to report it has demoted itself; a
#     planned failover waits for it too when the old primary is slow to stop).
# primary_demote_timeout has to stay above the keepers' network_partition_timeout (20 s by
# default; a primary cut off from the monitor and its standby demotes itself after it), or a
# real partition could give two primaries; so that one is lowered on each node too.
tune_monitor() {
  [ "$FAST_FAILOVER" = 1 ] || return 0
  mon_sql "alter system set pgautofailover.health_check_period = 1000" # ms, default 5000
  mon_sql "alter system set pgautofailover.health_check_timeout = 1000" # ms, default 5000
  mon_sql "alter system set pgautofailover.health_check_max_retries = 1" # default 2
  mon_sql "alter system set pgautofailover.health_check_retry_delay = 500" # ms, default 2000
  mon_sql "alter system set pgautofailover.node_considered_unhealthy_timeout = 3000" # ms, default 20000
  mon_sql "alter system set pgautofailover.primary_demote_timeout = 4000" # ms, default 30000
  mon_sql "select pg_reload_conf()" >/dev/null
}
tune_node() {
  [ "$FAST_FAILOVER" = 1 ] || return 0
  # seconds, default 20; must stay below primary_demote_timeout. `config set` signals the
  # running keeper to reload its configuration.
  as_pg "$1" pg_autoctl config set --pgdata "$PGAF_DIR/$1" timeout.network_partition_timeout 2 >&2
}

# fail_with_logs WHAT: show the tail of every log, then die.
fail_with_logs() {
  local f
  for f in "$PGAF_DIR"/*.log; do
    [ -f "$f" ] || continue
    log "---- tail of $f"
    tail -n 25 "$f" >&2
  done
  die "$1"
}

formation_uri() {
  local uri
  uri=$(as_pg cli pg_autoctl show uri --formation default --pgdata "$MON" 2>/dev/null) ||
    die "cannot get the formation URI from the monitor (is the formation up?)"
  # pg_autoctl leaves the user out, so libpq would log in as the calling OS user (root);
  # name the user that the nodes trust.
  echo "${uri/#postgres:\/\//postgres://postgres@}"
}

cmd_up() {
  local t0 n1 n2 sync uri
  t0=$(now_ms)
  cmd_install
  cmd_down
  if [ -e "$PGAF_DIR" ]; then
    [ -f "$PGAF_DIR/$MARKER" ] || [ -z "$(ls -A "$PGAF_DIR")" ] ||
      die "$PGAF_DIR exists and was not made by this script; refusing to wipe it"
    rm -rf "$PGAF_DIR"
  fi
  n1=$(node_port node1)
  n2=$(node_port node2)
  ports_free "$MON_PORT" "$n1" "$n2" ||
    die "one of ports $MON_PORT, $n1, $n2 is taken; set PGAF_PORT_BASE"
  clear_stale_sockets
  mkdir -p "$PGAF_DIR/xdg/run"
  touch "$PGAF_DIR/$MARKER"
  chmod 700 "$PGAF_DIR/xdg/run"
  chown -R postgres:postgres "$PGAF_DIR"

  log "creating monitor on $HOST:$MON_PORT"
  # --listen is accepted though `create monitor --help` does not list it (default: '*').
  start_daemon monitor create monitor --pgdata "$MON" --pgport "$MON_PORT" --pgctl "$PGBIN/pg_ctl" \
    --hostname "$HOST" --listen "$HOST" --auth trust --no-ssl --run
  wait_for 60 "monitor ready" mon_sql "select 1 from pgautofailover.formation where formationid = 'default'" ||
    fail_with_logs "the monitor did not come up"
  tune_monitor

  local monitor_uri="postgres://autoctl_node@$HOST:$MON_PORT/pg_auto_failover?sslmode=prefer"
  create_node() {
    start_daemon "$1" create postgres --pgdata "$PGAF_DIR/$1" --pgport "$(node_port "$1")" \
      --pgctl "$PGBIN/pg_ctl" --hostname "$HOST" --listen "$HOST" --name "$1" \
      --username postgres --dbname postgres --monitor "$monitor_uri" --auth trust --no-ssl --run
  }
  # One node at a time, so that node1 deterministically becomes the first primary.
  log "creating node1 on $HOST:$n1"
  create_node node1
  wait_for "$TIMEOUT" "node1 single" node_is "$n1" single || fail_with_logs "node1 did not become single"
  tune_node node1
  log "creating node2 on $HOST:$n2 (pg_basebackup from node1)"
  create_node node2
  wait_for "$TIMEOUT" "node1 primary, node2 secondary" roles ||
    fail_with_logs "the formation did not reach primary + secondary"
  tune_node node2

  # With two nodes, replication-quorum true and number_sync_standbys 0 (the defaults), the
  # primary state means synchronous_standby_names = 'ANY 1 (pgautofailover_standby_2)'.
  sync_set() { [ -n "$(sql_at "$n1" 'show synchronous_standby_names')" ]; }
  wait_for 30 "synchronous_standby_names on the primary" sync_set ||
    fail_with_logs "synchronous replication is not enabled on the primary"
  sync=$(sql_at "$n1" 'show synchronous_standby_names')
  uri=$(formation_uri)
  [ "$(psql "$uri" -qAtX -c 'select pg_is_in_recovery()')" = f ] ||
    fail_with_logs "cannot write through $uri"
  log "formation ready in $(($(now_ms) - t0)) ms: primary $HOST:$n1, secondary $HOST:$n2, synchronous_standby_names = $sync"
  echo "$uri"
}

cmd_uri() { formation_uri; }

cmd_primary() {
  wait_for 60 "a primary" writable_node || die "no primary in the formation"
  writable_node
}

cmd_primary_uri() {
  local port
  port=$(cmd_primary)
  echo "postgres://postgres@$HOST:$port/postgres?sslmode=disable"
}

stable_roles() {
  wait_for 60 "a primary and a secondary" roles ||
    die "the formation is not primary + secondary (after kill-primary, run up again)"
  roles
}

cmd_failover() {
  local r old new t0 t1 pid rc=0
  r=$(stable_roles)
  read -r old new <<<"$r"
  log "planned failover: primary $old -> $new"
  t0=$(now_ms)
  # In the background, so the new primary can be probed while the command runs: it only returns
  # once the old primary is a secondary again, well after the new one accepts writes. Its
  # "Monitor ERROR: invalid input syntax for type integer" about get_nodes is a known, cosmetic
  # bug of pg_autoctl 2.0's progress table (hapostgres/pg_auto_failover#1033).
  as_pg cli pg_autoctl perform failover --pgdata "$MON" --formation default --group 0 --wait "$TIMEOUT" >&2 &
  pid=$!
  local deadline=$((t0 + TIMEOUT * 1000))
  until probe_write "$new"; do
    [ "$(now_ms)" -lt "$deadline" ] || { kill "$pid" 2>/dev/null; die "$new never accepted a write"; }
    sleep 0.05
  done
  t1=$(now_ms)
  wait "$pid" || rc=$?
  [ "$rc" = 0 ] || die "pg_autoctl perform failover failed (exit $rc)"
  until [ "$(roles 2>/dev/null || true)" = "$new $old" ]; do
    [ "$(now_ms)" -lt "$deadline" ] || die "the formation did not settle as primary $new, secondary $old"
    sleep 0.2
  done
  log "failover done: primary $new, secondary $old; write accepted $((t1 - t0)) ms after the command started"
  echo "switchover_ms=$((t1 - t0))"
}

# kill_node NODE: SIGKILL the node's pg_autoctl processes (so nothing restarts postgres) and its
# postgres processes, and nothing else. Fails if it has none.
kill_node() {
  local -a pids more
  mapfile -t pids < <(our_pids "$1")
  [ "${#pids[@]}" -gt 0 ] || return 1
  # Freeze first, so that no process reacts to the death of another (a supervisor restarting
  # a child, the postmaster forking a new backend) before all are killed.
  KILLED_AT_MS=$(now_ms) # for kill-primary: from here on the node is as good as dead
  kill -STOP "${pids[@]}" 2>/dev/null || true
  mapfile -t more < <(our_pids "$1")
  kill -KILL "${pids[@]}" "${more[@]}" 2>/dev/null || true
}

cmd_kill_primary() {
  local r old new node t0 t1 deadline
  r=$(stable_roles)
  read -r old new <<<"$r"
  node=$(port_node "$old")
  log "unplanned failover: SIGKILL $node (primary $old); $new should take over"
  kill_node "$node" || die "no process found for $node"
  t0=$KILLED_AT_MS
  deadline=$((t0 + TIMEOUT * 1000))
  until probe_write "$new"; do
    [ "$(now_ms)" -lt "$deadline" ] || die "$new never accepted a write"
    sleep 0.05
  done
  t1=$(now_ms)
  # Its standby is gone, so the new primary settles in wait_primary (synchronous replication off).
  wait_for "$TIMEOUT" "$new primary" node_is "$new" primary wait_primary ||
    die "the monitor does not show $new as primary"
  [ -z "$(our_pids "$node")" ] || die "processes of $node survived: $(our_pids "$node" | xargs)"
  log "unplanned failover done: primary $new ($node stays down); write accepted $((t1 - t0)) ms after the kill"
  echo "switchover_ms=$((t1 - t0))"
}

cmd_status() {
  as_pg cli pg_autoctl show state --pgdata "$MON"
}

cmd_down() {
  local name pids deadline
  local -a rest
  if [ -z "$(our_pids)" ]; then
    clear_stale_sockets
    log "down: nothing running for $PGAF_DIR"
    return 0
  fi
  # Nodes first: a monitor stopped first would leave the keepers complaining meanwhile.
  for name in node1 node2 monitor; do
    if [ -n "$(our_pids "$name")" ]; then
      log "stopping $name"
      as_pg cli pg_autoctl stop --fast --pgdata "$PGAF_DIR/$name" >&2 || true
    fi
  done
  deadline=$(($(date +%s) + 30))
  while pids=$(our_pids) && [ -n "$pids" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
  if [ -n "$pids" ]; then
    log "still running after 30 s, SIGKILL: $(xargs <<<"$pids")"
    for name in node1 node2 monitor; do kill_node "$name" || true; done
    mapfile -t rest < <(our_pids)
    [ "${#rest[@]}" = 0 ] || kill -KILL "${rest[@]}" 2>/dev/null || true
    sleep 0.5
    [ -z "$(our_pids)" ] || die "could not stop: $(our_pids | xargs)"
  fi
  clear_stale_sockets
  log "down: stopped"
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  uri) require_formation && cmd_uri ;;
  primary) require_formation && cmd_primary ;;
  primary-uri) require_formation && cmd_primary_uri ;;
  failover) require_formation && cmd_failover ;;
  kill-primary) require_formation && cmd_kill_primary ;;
  status) require_formation && cmd_status ;;
  down) cmd_down ;;
  *)
    echo "usage: $0 install|up|uri|primary|primary-uri|failover|kill-primary|status|down" >&2
    exit 2
    ;;
esac
