#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: repeatable on a VM where time is
# not (this one has no hardware counters for `perf stat -e instructions`). Each server runs
# under callgrind twice, serving 200 and then 1,200 sequential requests over one keep-alive
# connection; the difference over 1,000 is the per-request cost, start-up and shutdown cancel.
#
#   bash benches/instructions.sh                 # h2 upstream
#   UPSTREAM_HTTP2=0 bash benches/instructions.sh
#
# Rows: connector-proxy (Basic) at RUST_LOG=warn, at info (the access log's cost) and with traces
# on (every request sampled, exported to an nginx stand-in for an OTLP/HTTP collector); OAuth
# with a cached token, traces off and on; and the bare hyper-util forwarder
# (examples/bare_forwarder.rs); against an nginx HTTPS upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
UPSTREAM_HTTP2=${UPSTREAM_HTTP2:-1}
command -v valgrind >/dev/null && command -v nginx >/dev/null || {
    echo "needs valgrind and nginx: apt-get install -y valgrind nginx-light" >&2; exit 1; }
# PROXY_BIN=path counts another build (A/B); a build without [telemetry] skips the traced rows.
if [ -z "${PROXY_BIN:-}" ]; then
    cargo build --release --quiet --bin connector-proxy
    PROXY_BIN=target/release/connector-proxy
fi
cargo build --release --quiet --example bare_forwarder

work=$(mktemp -d)
trap '[ -f "$work/up.pid" ] && kill "$(cat "$work/up.pid")" 2>/dev/null; rm -rf "$work"' EXIT
. benches/common.sh
UP=$(free_port); PX=$(free_port); ADMIN=$(free_port); OTEL=$(free_port)
make_certs "$work"
h2=""; [ "$UPSTREAM_HTTP2" = 1 ] && h2=" http2"
cat >"$work/up.conf" <<EOF
worker_processes 1; pid $work/up.pid; error_log $work/up-error.log warn; events {}
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP ssl$h2; ssl_certificate $work/crm.pem; ssl_certificate_key $work/crm.key;
           location = /oauth2/token { default_type application/json;
               return 200 '{"access_token":"bench-token","token_type":"Bearer","expires_in":3600}'; }
           location / { default_type text/plain; return 200 "ok"; } }
  server { listen 127.0.0.1:$OTEL; client_max_body_size 64m; location = /v1/traces { return 200; } } }
EOF
nginx -c "$work/up.conf" -p "$work" 2>/dev/null
basic_config "$work/proxy.toml" "$PX" "$ADMIN" "$UP" svc p
oauth_connector "$work/proxy.toml" oauth /oauth2/token
cp "$work/proxy.toml" "$work/traced.toml"
printf '\n[telemetry]\notlp_endpoint = "http://127.0.0.1:%s"\n' "$OTEL" >>"$work/traced.toml"

# count N COMMAND... -> total instructions of COMMAND serving N requests on 127.0.0.1:$PX, through
# the connector $CONNECTOR (basic unless set)
count() {
    local n=$1; shift
    rm -f "$work"/cg.out.*
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.out.%p" "$@" >"$work/server.log" 2>"$work/valgrind.log" &
    local pid=$!
    local connector=${CONNECTOR:-basic}
    for _ in $(seq 300); do curl -s -o /dev/null -H "X-Connector-Name: $connector" "http://127.0.0.1:$PX/" && break; sleep 0.2; done
    python3 - "$n" "$PX" "$connector" <<'PY'
import socket, sys
n, port, connector = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", port))
request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Connector-Name: " + connector.encode() + b"\r\n\r\n"
for _ in range(n):
    s.sendall(request)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"ok"):
        answer += s.recv(65536)
PY
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    # One summary line a profile: its "totals:" line repeats it. Until the tenth session this
    # summed both, so BENCHMARKS' earlier counts are twice the true ones (ratios unchanged).
    grep -h '^summary:' "$work"/cg.out.* | awk '{s += $2} END {print s}'
}
per_request() { local a b; a=$(count 200 "$@"); b=$(count 1200 "$@"); echo $(( (b - a) / 1000 )); }

echo "instructions per request (callgrind), upstream offers h2: $UPSTREAM_HTTP2"
echo "connector-proxy: $PROXY_BIN"
warn=$(RUST_LOG=warn per_request "$PROXY_BIN" --config "$work/proxy.toml")
info=$(RUST_LOG=info per_request "$PROXY_BIN" --config "$work/proxy.toml")
oauth=$(CONNECTOR=oauth RUST_LOG=warn per_request "$PROXY_BIN" --config "$work/proxy.toml")
traced=0; oauth_traced=0
if "$PROXY_BIN" check --config "$work/traced.toml" >/dev/null 2>&1; then
    traced=$(RUST_LOG=warn per_request "$PROXY_BIN" --config "$work/traced.toml")
    oauth_traced=$(CONNECTOR=oauth RUST_LOG=warn per_request "$PROXY_BIN" --config "$work/traced.toml")
fi
bare=$(per_request target/release/examples/bare_forwarder "127.0.0.1:$PX" "127.0.0.1:$UP" crm.example.com "$work/ca.pem" "Basic c3ZjOnA=")
echo "| server | instructions/request | vs bare |"
echo "| --- | ---: | ---: |"
for row in "bare hyper-util forwarder:$bare" "connector-proxy, RUST_LOG=warn:$warn" "connector-proxy, access log at info:$info" "connector-proxy, traces on:$traced" \
    "connector-proxy, OAuth (cached token):$oauth" "connector-proxy, OAuth, traces on:$oauth_traced"; do
    awk -v name="${row%%:*}" -v n="${row##*:}" -v b="$bare" 'BEGIN {printf "| %s | %d | %.2fx |\n", name, n, n / b}'
done
