#!/usr/bin/env bash
# A two-node Ray cluster on this one machine (a head and a worker, 1 CPU each), token
# authentication on, and the demo's score_matrix submitted to it with `ray job submit`,
# exactly as it would be submitted to a real cluster.
#
#   cluster/local_multinode.sh [key=value ...]
#
# The key=value arguments are overrides for jobs/score_matrix.py, applied after the
# script's own (so they win). Paths must be absolute: the job runs in an uploaded copy of
# the working tree, not here. Defaults: checkpoint=runs/demo/train_decoder,
# audio=captions=runs/demo/extract_embeddings, output=<private temp dir>/out.
#
# Environment: AACRAY_PYTHON (interpreter with aacray installed; default .venv/bin/python),
# AACRAY_JOB_TIMEOUT (seconds to wait for the job; default 1800).
#
# Isolation, so that another Ray on the machine (a test's embedded ray.init(), a user's
# `ray start`) is never touched:
# - every port is picked free, nothing uses the defaults (6379, 8265, 10001, 52365);
# - each node gets its own --temp-dir below a private folder, so the "current cluster"
#   file that a bare ray.init() looks for in /tmp/ray is never written;
# - the token lives in a private file (RAY_AUTH_TOKEN_PATH), ~/.ray/auth_token is not
#   read or written;
# - `ray stop` is never called: it kills every Ray process of the machine. Every process
#   started here inherits AACRAY_LOCAL_CLUSTER=<unique tag>, and the exit trap ends
#   exactly the processes carrying that tag (SIGTERM, then SIGKILL after a grace period).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${AACRAY_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
# The job driver runs `python ...` with the PATH the raylet was started with.
export PATH="$(dirname "$PY"):$PATH"
RAY="$(dirname "$PY")/ray"
JOB_TIMEOUT=${AACRAY_JOB_TIMEOUT:-1800}

# A short private folder: Ray's unix sockets live below it (108-byte path limit).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/aacray-mn-XXXXXX")
TAG="$(basename "$WORK")-$$"
export AACRAY_LOCAL_CLUSTER="$TAG"
export RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_AUTH_TOKEN
STATUS=1

log() { printf '[local_multinode] %s\n' "$*" >&2; }

stop_nodes() {
    # End every process that carries our tag, and nothing else.
    "$PY" - "$TAG" "$$" <<'EOF'
import os, sys
import psutil

tag, script_pid = sys.argv[1], int(sys.argv[2])
skip = {os.getpid(), script_pid} | {p.pid for p in psutil.Process().parents()}
mine = []
for p in psutil.process_iter(["name"]):
    if p.pid in skip:
        continue
    try:
        if p.environ().get("AACRAY_LOCAL_CLUSTER") == tag:
            mine.append(p)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        pass
for p in mine:
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
gone, alive = psutil.wait_procs(mine, timeout=10)
names = sorted({p.info["name"] for p in alive})
for p in alive:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
psutil.wait_procs(alive, timeout=5)
print(f"[local_multinode] stopped {len(mine)} processes of this cluster "
      f"({len(alive)} needed SIGKILL{': ' + ', '.join(names) if names else ''})", file=sys.stderr)
EOF
}

cleanup() {
    set +e
    stop_nodes
    rm -f "$WORK/auth_token"
    if [ "$STATUS" = 0 ]; then
        rm -rf "$WORK/head" "$WORK/worker" "$WORK/head.log" "$WORK/worker.log"
        rmdir "$WORK" 2>/dev/null || true  # kept when the output is inside it
    else
        log "Ray logs kept for inspection: $WORK/head/session_latest/logs, $WORK/worker/session_latest/logs"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. A token for this cluster only. On a real cluster: `ray get-auth-token --generate`
#    writes ~/.ray/auth_token; every node and every submitter needs the same token.
"$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$WORK/auth_token"
chmod 600 "$WORK/auth_token"
# Nodes (and the job drivers they spawn) read RAY_AUTH_MODE and the token at start.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/auth_token"

# 2. Free ports, picked together so they differ.
read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_HEAD AGENT_WORKER < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
)

# 3. The head (1 CPU, dashboard = job server), then a worker node (1 CPU) joining it.
COMMON=(--num-cpus=1 --min-worker-port=0 --max-worker-port=0
        --object-store-memory=200000000 --disable-usage-stats)
log "starting the head (GCS :$GCS_PORT, dashboard :$DASH_PORT) in $WORK"
"$RAY" start --head --port="$GCS_PORT" --dashboard-port="$DASH_PORT" --include-dashboard=true \
    --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_HEAD" \
    --temp-dir="$WORK/head" "${COMMON[@]}" >"$WORK/head.log" 2>&1 \
    || { cat "$WORK/head.log" >&2; exit 1; }
GCS_ADDRESS=$(cat "$WORK/head/ray_current_cluster")
log "starting a worker node joining $GCS_ADDRESS"
"$RAY" start --address="$GCS_ADDRESS" --dashboard-agent-listen-port="$AGENT_WORKER" \
    --temp-dir="$WORK/worker" "${COMMON[@]}" >"$WORK/worker.log" 2>&1 \
    || { cat "$WORK/worker.log" >&2; exit 1; }
# `ray start` returns before the autoscaler's view lists the new node (seen under load:
# `ray status` showed one node). Wait until both are listed, at most 120 s, then show it.
nodes_listed() { grep -cE '^ *1 node_[0-9a-f]+ *$' <<<"$NODES" || true; }
DEADLINE=$((SECONDS + 120))
while :; do
    NODES=$("$RAY" status --address="$GCS_ADDRESS" 2>&1) || true
    if [ "$(nodes_listed)" -ge 2 ] || [ "$SECONDS" -ge "$DEADLINE" ]; then break; fi
    sleep 1
done
printf '%s\n' "$NODES" >&2
if [ "$(nodes_listed)" -lt 2 ]; then
    log "the worker node is not in \`ray status\` after 120 s; its log: $WORK/worker.log"
    exit 1
fi

# 4. Token auth is on: the job API answers a request without the token with HTTP 401, one
#    with a wrong token with 403, and the right one with 200. Status codes, not a CLI's
#    exit status (that fails for any reason: a head not up yet, a wrong port).
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASH_PORT"
"$PY" - "$RAY_API_SERVER_ADDRESS/api/jobs/" "$WORK/auth_token" <<'EOF' || exit 1
import sys, time, urllib.error, urllib.request

url, token = sys.argv[1], open(sys.argv[2]).read().strip()


def status(headers: dict) -> int:
    deadline = time.time() + 60  # the dashboard may still be starting: retry connecting only
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, ConnectionError):
            if time.time() > deadline:
                raise
            time.sleep(1)


got = {
    "no token": status({}),
    "a wrong token": status({"Authorization": "Bearer " + "0" * 64}),
    "the token": status({"Authorization": f"Bearer {token}"}),
}
print(f"[local_multinode] job API {url}: " + ", ".join(f"{k} -> HTTP {v}" for k, v in got.items()), file=sys.stderr)
if got != {"no token": 401, "a wrong token": 403, "the token": 200}:
    print("[local_multinode] ERROR: token authentication is not enforced as expected", file=sys.stderr)
    sys.exit(1)
EOF
log "a request without the token was refused (401), one with a wrong token too (403)"

# 5. Submit. The submitter needs RAY_AUTH_MODE=token plus the token, from RAY_AUTH_TOKEN,
#    from the file RAY_AUTH_TOKEN_PATH names, or from ~/.ray/auth_token (in that order);
#    the token alone, without RAY_AUTH_MODE=token, is not sent. Here: the env variable.
log "submitter: RAY_AUTH_MODE=token RAY_AUTH_TOKEN=\$(cat <token file>) ray job submit --address $RAY_API_SERVER_ADDRESS ..."
SUBMISSION_ID="aacray-score-matrix-$TAG"
OUT="$WORK/out"
OVERRIDES=(
    "checkpoint=$ROOT/runs/demo/train_decoder"
    "audio=$ROOT/runs/demo/extract_embeddings"
    "captions=$ROOT/runs/demo/extract_embeddings"
    "output=$OUT"
    "$@"
)
for ov in "${OVERRIDES[@]}"; do
    case "$ov" in output=*) OUT=${ov#output=} ;; esac
done
RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(cat "$WORK/auth_token")" \
    "$RAY" job submit --no-wait --submission-id "$SUBMISSION_ID" --working-dir . \
    --runtime-env-json '{"excludes": [".git", ".venv", "runs", "*.pth"]}' \
    -- python jobs/score_matrix.py configs/score_demo.yaml "${OVERRIDES[@]}"

# 6. Wait: the logs follow until the job ends; then its final status, from the SDK
#    (JobSubmissionClient sends the token the same way the CLI does).
timeout "$JOB_TIMEOUT" "$RAY" job logs --follow "$SUBMISSION_ID" || log "log stream ended (rc=$?)"
JOB_STATUS=$("$PY" - "$RAY_API_SERVER_ADDRESS" "$SUBMISSION_ID" <<'EOF' || true
import sys, time
from ray.job_submission import JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
deadline = time.time() + 120
status = client.get_job_status(sys.argv[2])
while not status.is_terminal() and time.time() < deadline:
    time.sleep(2)
    status = client.get_job_status(sys.argv[2])
print(status.value)
EOF
)
log "job $SUBMISSION_ID: ${JOB_STATUS:-UNKNOWN}; output: $OUT"

# 7. The job server refuses a second job with the same submission id: that is what makes
#    the reindex CronJob (cluster/kuberay/reindex-cronjob.yaml) idempotent.
if DUP=$(RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(cat "$WORK/auth_token")" \
    "$RAY" job submit --no-wait --submission-id "$SUBMISSION_ID" -- true 2>&1); then
    log "ERROR: a duplicate submission id was accepted"
    exit 1
fi
if grep -q "submission_id $SUBMISSION_ID already exists" <<<"$DUP"; then
    log "a second submission with the same id was refused: already exists"
else
    printf '%s\n' "$DUP" >&2
    log "ERROR: a duplicate submission failed for another reason"
    exit 1
fi
if [ "$JOB_STATUS" = SUCCEEDED ]; then
    STATUS=0
fi
exit "$STATUS"
