#!/usr/bin/env bash
# Start `edge-llm serve` on the port a platform requires (PORT, default 8501), load the models
# first, and exit non-zero unless /health answers within START_TIMEOUT seconds. Inference is
# POST: /inference ({"prompt"} -> {"generated"}), /generate, / and the OpenAI routes /v1/*.
#   PORT=8501 deploy/start.sh qwen2-0.5b -np 4
# Arguments go to `edge-llm serve`. SIGTERM is passed on (the server drains, then exits).
set -euo pipefail

PORT="${PORT:-8501}"
HOST="${HOST:-0.0.0.0}"
START_TIMEOUT="${START_TIMEOUT:-300}"
PYTHON="${PYTHON:-python3}"
read -ra EDGE_LLM <<< "${EDGE_LLM:-edge-llm}"

"${EDGE_LLM[@]}" serve --host "$HOST" --port "$PORT" --preload "$@" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' TERM INT

# With --preload the server accepts connections only once every model is loaded.
deadline=$((SECONDS + START_TIMEOUT))
until "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:${PORT}/health" 2>/dev/null; do
    if ! kill -0 "$server" 2>/dev/null; then
        wait "$server" || status=$?
        echo "start.sh: edge-llm serve exited (status ${status:-0}) before it was healthy" >&2
        exit "${status:-1}"
    fi
    if ((SECONDS >= deadline)); then
        echo "start.sh: edge-llm serve not healthy after ${START_TIMEOUT}s; stopping it" >&2
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" || true
        exit 1
    fi
    sleep 1
done
echo "start.sh: edge-llm serve is healthy on port ${PORT}" >&2

# `wait` returns early when a trapped signal arrives: wait again for the drain to finish.
status=0
wait "$server" || status=$?
while kill -0 "$server" 2>/dev/null; do
    wait "$server" || status=$?
done
exit "$status"
