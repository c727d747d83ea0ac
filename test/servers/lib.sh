# Shared helpers for test/servers/*.server.sh. Source it; SERVERS_DIR must be set.
: "${SERVERS_DIR:?}"
# Logs of the daemons this script started, shown when waiting for one of them times out.
STARTED_LOGS=()

# wait_for DESCRIPTION SECONDS COMMAND...: retry COMMAND until it succeeds or time runs out.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "timed out after ${seconds}s waiting for $what" >&2
      # The reason is usually in the server's own output: show its end.
      local log
      for log in "${STARTED_LOGS[@]}"; do
        [ -f "$log" ] || continue
        echo "--- last lines of $log:" >&2
        tail -n 20 "$log" >&2
      done
      return 1
    fi
    sleep 0.5
  done
}

# start_daemon NAME COMMAND...: run COMMAND in the background, logging to .servers/logs/NAME.log.
start_daemon() {
  local name=$1
  shift
  nohup "$@" >"$SERVERS_DIR/logs/$name.log" 2>&1 &
  echo $! >"$SERVERS_DIR/$name.pid"
  STARTED_LOGS+=("$SERVERS_DIR/logs/$name.log")
}

# stop_daemon NAME: stop what start_daemon started.
stop_daemon() {
  local pidfile="$SERVERS_DIR/$1.pid"
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
  rm -f "$SERVERS_DIR/env/$1.env"
}

# write_env NAME KEY=VALUE...: record the variables tests need to reach NAME.
write_env() {
  local name=$1
  shift
  printf '%s\n' "$@" >"$SERVERS_DIR/env/$name.env"
}
