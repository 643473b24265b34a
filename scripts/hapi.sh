#!/usr/bin/env bash
# Builds, starts, waits for, reports on and stops TrialTwin's HAPI FHIR R4 JPA test server (hapi/).
# CI has no Docker engine, so this runs the same HAPI JPA server as a plain Java process on loopback.
#
#   scripts/hapi.sh build    build hapi/target/trialtwin-hapi.jar (offline when ~/.m2 has everything)
#   scripts/hapi.sh start    build if needed, start in the background, wait until /fhir/metadata answers;
#                            a start that does not answer in time kills its JVM and fails
#   scripts/hapi.sh wait     wait until /fhir/metadata answers (HAPI_WAIT_S, default 600 s)
#   scripts/hapi.sh status   print "running <url> HAPI FHIR <version>" or "stopped" (exit 1)
#   scripts/hapi.sh stop     stop the server started by `start` (SIGTERM, then SIGKILL after 30 s)
#
# Environment: HAPI_PORT (8090), HAPI_DATA_DIR (data/hapi: pid file, log, H2 database),
# HAPI_DB (file | mem; default file), HAPI_JAVA_OPTS (default sized for a 2-core machine shared
# with the test run), HAPI_WAIT_S (600: a cold JVM on a busy 2-core machine has needed 170 s).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${HAPI_PORT:-8090}"
DATA_DIR="${HAPI_DATA_DIR:-$ROOT/data/hapi}"
JAR="$ROOT/hapi/target/trialtwin-hapi.jar"
PID_FILE="$DATA_DIR/hapi.pid"
LOG_FILE="$DATA_DIR/hapi.log"
BASE_URL="http://127.0.0.1:$PORT/fhir"
WAIT_S="${HAPI_WAIT_S:-600}"
# 2 GiB heap is plenty for a test store; SerialGC and one C1-only compiler thread leave the second
# core to the tests and shorten start-up (peak throughput matters little for a test store).
JAVA_OPTS="${HAPI_JAVA_OPTS:--Xms256m -Xmx2g -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:CICompilerCount=1 -Xss512k}"

log_tail() {
    if [[ -f "$LOG_FILE" ]]; then
        echo "---- last 40 lines of $LOG_FILE ----" >&2
        tail -n 40 "$LOG_FILE" >&2
    fi
}

running_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE")"
    # Only a java process we started counts; a stale pid file left by a crash does not.
    if kill -0 "$pid" 2>/dev/null && grep -q "trialtwin-hapi.jar" "/proc/$pid/cmdline" 2>/dev/null; then
        echo "$pid"
        return 0
    fi
    return 1
}

# True while the process in the pid file has not exited. Unlike running_pid this does not look at its
# command line: right after `start` forks, the child still shows this script's command line until it
# execs java, and a busy machine can hold it there long enough for the first check to see it.
started_pid_alive() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid state
    pid="$(cat "$PID_FILE")"
    kill -0 "$pid" 2>/dev/null || return 1
    state="$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
    [[ "$state" != "Z" ]]
}

# True when anything at all listens on the port (a JVM still starting answers no HTTP yet).
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

# Stop one JVM we started: SIGTERM, then SIGKILL after 30 s.
kill_jvm() {
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 1
    done
    echo "HAPI (pid $pid) ignored SIGTERM for 30 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

hapi_version() {
    curl -sf --max-time 10 -H 'Accept: application/fhir+json' "$BASE_URL/metadata" |
        python3 -c 'import json,sys; s=json.load(sys.stdin).get("software",{}); print(s.get("name","?"), s.get("version","?"))'
}

cmd_build() {
    local mvn=(mvn -B -q -Dstyle.color=never -f "$ROOT/hapi/pom.xml" -DskipTests package)
    local t0=$SECONDS
    # Offline first: a warm ~/.m2 needs no network; fall back to Maven Central when something is missing
    # (the offline attempt's errors about artifacts not yet downloaded are kept in a log, not shown).
    local offline_log
    offline_log="$(mktemp)"
    if [[ -d "${HOME}/.m2/repository/ca/uhn/hapi/fhir/hapi-fhir-jpaserver-base" ]] && "${mvn[@]}" -o >"$offline_log" 2>&1; then
        rm -f "$offline_log"
        echo "built $JAR offline in $((SECONDS - t0)) s"
        return 0
    fi
    if [[ -s "$offline_log" ]]; then
        echo "offline build incomplete (some artifacts not downloaded yet); building with Maven Central"
    fi
    rm -f "$offline_log"
    "${mvn[@]}"
    echo "built $JAR in $((SECONDS - t0)) s"
}

cmd_wait() {
    local t0=$SECONDS
    while (( SECONDS - t0 < WAIT_S )); do
        if curl -sf --max-time 5 -o /dev/null "$BASE_URL/metadata"; then
            echo "HAPI answered at $BASE_URL after $((SECONDS - t0)) s: $(hapi_version)"
            return 0
        fi
        if [[ -f "$PID_FILE" ]] && ! started_pid_alive; then
            echo "error: HAPI process $(cat "$PID_FILE") exited before answering $BASE_URL/metadata" >&2
            log_tail
            return 1
        fi
        sleep 1
    done
    echo "error: HAPI did not answer $BASE_URL/metadata within ${WAIT_S} s" >&2
    log_tail
    return 1
}

cmd_start() {
    if pid="$(running_pid)"; then
        echo "HAPI already running (pid $pid) at $BASE_URL"
        cmd_wait
        return
    fi
    # Never test against a stranger: whatever holds the port (another HAPI, a JVM left by an
    # interrupted run whose pid file is gone, any other program) is refused, not reused.
    if port_in_use; then
        echo "error: port $PORT is already in use by a process this script did not start" \
             "(stop it, or choose another port with HAPI_PORT)" >&2
        return 1
    fi
    # Rebuild when the jar is missing or older than the sources (a stale jar would test old code).
    if [[ ! -f "$JAR" ]] || [[ -n "$(find "$ROOT/hapi/src" "$ROOT/hapi/pom.xml" -newer "$JAR" -print -quit)" ]]; then
        cmd_build
    fi
    mkdir -p "$DATA_DIR"
    local jdbc
    case "${HAPI_DB:-file}" in
        mem) jdbc="jdbc:h2:mem:hapi" ;;
        file) jdbc="jdbc:h2:file:$DATA_DIR/h2/hapi" ;;
        *) echo "error: HAPI_DB must be 'file' or 'mem'" >&2; return 2 ;;
    esac
    local t0=$SECONDS
    # shellcheck disable=SC2086  # JAVA_OPTS is a list of flags
    nohup java $JAVA_OPTS -jar "$JAR" \
        --server.port="$PORT" --trialtwin.hapi.jdbc-url="$jdbc" >"$LOG_FILE" 2>&1 &
    local pid=$!
    echo "$pid" >"$PID_FILE"
    echo "started HAPI (pid $pid), log $LOG_FILE"
    # From here on a failed or interrupted start must not leave its JVM holding the port.
    trap 'kill_jvm '"$pid"'; rm -f "$PID_FILE"; exit 130' INT TERM
    if ! cmd_wait; then
        echo "error: stopping the HAPI that failed to start (pid $pid)" >&2
        kill_jvm "$pid"
        rm -f "$PID_FILE"
        return 1
    fi
    trap - INT TERM
    echo "start-up took $((SECONDS - t0)) s"
}

cmd_status() {
    if pid="$(running_pid)" && curl -sf --max-time 5 -o /dev/null "$BASE_URL/metadata"; then
        echo "running pid $pid $BASE_URL $(hapi_version)"
        return 0
    fi
    echo "stopped"
    return 1
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PID_FILE"
        echo "HAPI not running"
        return 0
    fi
    kill_jvm "$pid"
    rm -f "$PID_FILE"
    echo "stopped HAPI (pid $pid)"
}

case "${1:-}" in
    build) cmd_build ;;
    start) cmd_start ;;
    wait) cmd_wait ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    url) echo "$BASE_URL" ;;
    *) echo "usage: $0 build|start|stop|wait|status|url" >&2; exit 2 ;;
esac
