#!/usr/bin/env bash
# Measures `dmp import` of a gzip JSONL partner file into a running `dmp run` (embedded bus, the
# storage writer working alongside, as in production; DMP_BENCH_ROLE=api for ingest alone).
# Usage: scripts/bench-import.sh [LINES]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dmp-target}"
LINES="${1:-1000000}"
cargo build --release -q -p dmp
BIN="$CARGO_TARGET_DIR/release/dmp"
WORK="$(mktemp -d -t dmp-bench-import.XXXXXX)"
trap 'kill $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
python3 - "$WORK/partner.jsonl.gz" "$LINES" <<'PY'
import gzip, json, sys, time
path, n = sys.argv[1], int(sys.argv[2])
ts = int(time.time() * 1000) - 86_400_000
with gzip.open(path, "wt", compresslevel=6) as f:
    for i in range(n):
        f.write(json.dumps({"uid": f"p{i % 300000}", "ts": ts + i, "type": "purchase",
                            "url": f"https://shop.example/item/{i % 20000}", "ip": f"178.49.{(i >> 8) & 255}.{i & 255}",
                            "attrs": {"category": ["cars", "cats", "mortgage"][i % 3]}}, separators=(",", ":")) + "\n")
PY
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$BIN" "${DMP_BENCH_ROLE:-run}" --data-dir "$WORK/data" --listen "127.0.0.1:$PORT" >/dev/null 2>&1 &
PID=$!
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
ls -l "$WORK/partner.jsonl.gz" | awk '{printf "file: %.1f MiB gzip, %s lines\n", $5/1048576, "'"$LINES"'"}'
"$BIN" import --source bench --batch 5000 --api "http://127.0.0.1:$PORT" "$WORK/partner.jsonl.gz"
