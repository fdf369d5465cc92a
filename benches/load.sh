#!/usr/bin/env bash
# Load comparison: connector-proxy against nginx and HAProxy doing the same job, against a bare
# hyper-util forwarder (examples/bare_forwarder.rs: the stack's floor) and against a direct
# call, all on loopback, in one run. Prints req/s, p50, p99, RSS and CPU per request, with
# ratios; a second connector-proxy logs every request at info, for the access log's cost, and a
# third exports a trace of every request (OTLP/HTTP to a collector stand-in), for traces' cost.
#
#   bash benches/load.sh                 # 10 s per run, 32 connections
#   DURATION=5 CONNECTIONS=64 bash benches/load.sh
#   PROFILE=/tmp/cp.perf bash benches/load.sh   # also perf-record connector-proxy's Basic run
#   MODE=quick bash benches/load.sh      # only the 32-connection table (A/B with PROXY_BIN=...)
#   ROUNDS=5 DURATION=4 bash benches/load.sh   # the four servers compared in 5 rounds of 4 s
#                                        # (default 3 of DURATION), their order alternating
#   MODE=serve bash benches/load.sh      # start everything, print the ports and wait (profiling)
#   MODE=soak bash benches/load.sh       # 1,000 connections for 60 s (SOAK_SECONDS), Basic and
#                                        # OAuth with 2 s tokens; every answer checked, RSS sampled
#   CLUSTER=1 MODE=quick bash benches/load.sh   # the same rows with [cluster] on (a local
#                                        # redis-server), for A/B against CLUSTER=0
#   MODE=cluster-soak bash benches/load.sh      # three replicas sharing 2 s tokens through
#                                        # Redis, 1,000 connections over them, Redis stopped for
#                                        # 10 s in the middle; every answer checked
#
# The job (as in the performance issue): plain HTTP in, a static Basic Authorization added, HTTPS
# out with keepalive, upstream certificate verified. The HTTPS upstream is nginx answering a
# 2-byte body. The upstream and the proxy under test share core 0; wrk runs on core 1.
# Installs nginx and wrk from the distribution when missing. Every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}                   # rounds of nginx, HAProxy, bare and proxy at 32 connections
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a whole number from 1, not '$ROUNDS'" >&2; exit 1; }
CONNECTIONS=${CONNECTIONS:-32}
PROXY_CORE=${PROXY_CORE:-0}
UPSTREAM_HTTP2=${UPSTREAM_HTTP2:-1}   # 0: the upstream offers only HTTP/1.1 (as nginx proxies to it)
LOAD_CORE=${LOAD_CORE:-1}
# Requests per upstream connection before nginx closes it (for HTTP/2: a GOAWAY, after which the
# proxy opens a new connection and sends refused streams again).
UPSTREAM_KEEPALIVE_REQUESTS=${UPSTREAM_KEEPALIVE_REQUESTS:-1000000}
MODE=${MODE:-compare}                 # compare | quick | soak | cluster-soak | serve
CLUSTER=${CLUSTER:-0}                 # 1: [cluster] on, tokens shared through a local redis-server
SOAK_SECONDS=${SOAK_SECONDS:-60}
CONNECTIONS_SOAK=${CONNECTIONS_SOAK:-1000}
PROXY_ENV=${PROXY_ENV:-}              # e.g. PROXY_ENV=MALLOC_ARENA_MAX=2, for experiments
PROXY_WRAP=${PROXY_WRAP:-}            # e.g. PROXY_WRAP=heaptrack (RSS figures are then the wrapper's)

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk || ! need redis-server || ! need haproxy; then
    echo "installing nginx, wrk, redis-server and haproxy" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nginx-light wrk redis-server haproxy >/dev/null
fi
[ "$MODE" = cluster-soak ] && CLUSTER=1
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -z "${PROXY_BIN:-}" ]; then   # PROXY_BIN=path: measure another build (A/B experiments)
    cargo build --release --quiet --bin connector-proxy
    PROXY_BIN=target/release/connector-proxy
fi
cargo build --release --quiet --example bare_forwarder
BARE_BIN=target/release/examples/bare_forwarder

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$work/nginx-up.pid" ] && kill "$(cat "$work/nginx-up.pid")" 2>/dev/null || true
    [ -f "$work/nginx-px.pid" ] && kill "$(cat "$work/nginx-px.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

. benches/common.sh
UP=$(free_port); NGX=$(free_port); CP=$(free_port); CPA=$(free_port); REDIS=$(free_port)
HAP=$(free_port); BARE=$(free_port); CPL=$(free_port); CPLA=$(free_port)
CPT=$(free_port); CPTA=$(free_port); OTEL=$(free_port)

make_certs "$work"

BASIC=$(printf 'svc-flow:bench-password' | base64)

# The HTTPS upstream: a 2-byte answer, and a token endpoint for the OAuth connector.
cat >"$work/upstream.conf" <<EOF
worker_processes 1;
pid $work/nginx-up.pid;
error_log $work/upstream-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests $UPSTREAM_KEEPALIVE_REQUESTS;
    server {
        listen 127.0.0.1:$UP ssl;
        http2 on;
        ssl_certificate $work/crm.pem;
        ssl_certificate_key $work/crm.key;
        location = /oauth2/token {
            default_type application/json;
            return 200 '{"access_token":"bench-token","token_type":"Bearer","expires_in":3600}';
        }
        # Two-second tokens for the rollover run; each request is logged to count refreshes.
        location = /oauth2/rolling {
            access_log $work/rolling.log;
            default_type application/json;
            return 200 '{"access_token":"rolling-\$msec","token_type":"Bearer","expires_in":2}';
        }
        # The soak's paths: each answers "ok" only to its connector's credentials.
        location = /soak/basic {
            if (\$http_authorization != "Basic $BASIC") { return 401; }
            default_type text/plain; return 200 "ok";
        }
        location = /soak/oauth {
            if (\$http_authorization !~ "^Bearer rolling-[0-9.]+\$") { return 401; }
            default_type text/plain; return 200 "ok";
        }
        location / { default_type text/plain; return 200 "ok"; }
    }
    # The OTLP/HTTP collector stand-in for the traced proxy: takes each export and discards it.
    server {
        listen 127.0.0.1:$OTEL;
        client_max_body_size 64m;
        location = /v1/traces { return 200; }
    }
}
EOF
# nginx 1.22 spells HTTP/2 on the listen line.
if [ "$UPSTREAM_HTTP2" = 1 ]; then
    sed -i "s|listen 127.0.0.1:$UP ssl;|listen 127.0.0.1:$UP ssl http2;|" "$work/upstream.conf"
fi
sed -i "/http2 on;/d" "$work/upstream.conf"

# nginx as the same authenticating proxy.
cat >"$work/proxy.conf" <<EOF
worker_processes 1;
pid $work/nginx-px.pid;
error_log $work/proxy-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream crm { server 127.0.0.1:$UP; keepalive 64; }
    server {
        listen 127.0.0.1:$NGX;
        location / {
            proxy_pass https://crm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host crm.example.com;
            proxy_set_header Authorization "Basic $BASIC";
            proxy_ssl_server_name on;
            proxy_ssl_name crm.example.com;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $work/ca.pem;
            proxy_ssl_session_reuse on;
        }
    }
}
EOF

# HAProxy 2.6 as the same authenticating proxy; HTTP/2 to the upstream where it offers it.
if [ "$UPSTREAM_HTTP2" = 1 ]; then HAP_ALPN="alpn h2"; else HAP_ALPN="alpn http/1.1"; fi
cat >"$work/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend proxy
    bind 127.0.0.1:$HAP
    default_backend crm
backend crm
    http-request set-header Host crm.example.com
    http-request set-header Authorization "Basic $BASIC"
    server crm 127.0.0.1:$UP ssl verify required ca-file $work/ca.pem sni str(crm.example.com) verifyhost crm.example.com $HAP_ALPN
EOF

basic_config "$work/connector-proxy.toml" "$CP" "$CPA" "$UP" svc-flow bench-password
oauth_connector "$work/connector-proxy.toml" oauth /oauth2/token
oauth_connector "$work/connector-proxy.toml" rolling /oauth2/rolling
if [ "$CLUSTER" = 1 ]; then
    start_redis() {
        taskset -c "$PROXY_CORE" redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no \
            --dir "$work" >"$work/redis.log" 2>&1 &
        REDIS_PID=$!
        for _ in $(seq 50); do redis-cli -p "$REDIS" ping >/dev/null 2>&1 && break; sleep 0.1; done
    }
    start_redis
    pids+=("$REDIS_PID")
    cat >>"$work/connector-proxy.toml" <<EOF

[cluster]
redis_url = "redis://127.0.0.1:$REDIS/0"
encryption_key = "$(openssl rand -base64 32)"
lock_ttl = "2s"
EOF
fi

taskset -c "$PROXY_CORE" "$NGINX" -c "$work/upstream.conf" -p "$work" 2>/dev/null
taskset -c "$PROXY_CORE" "$NGINX" -c "$work/proxy.conf" -p "$work" 2>/dev/null
taskset -c "$PROXY_CORE" env RUST_LOG=warn $PROXY_ENV $PROXY_WRAP "$PROXY_BIN" --config "$work/connector-proxy.toml" >"$work/cp.log" 2>&1 &
pids+=($!)
CP_PID=$!
# The same proxy logging its canonical line per request (RUST_LOG=info) to a file.
sed -e "s|127.0.0.1:$CP\"|127.0.0.1:$CPL\"|" -e "s|127.0.0.1:$CPA\"|127.0.0.1:$CPLA\"|" \
    "$work/connector-proxy.toml" >"$work/connector-proxy-logged.toml"
taskset -c "$PROXY_CORE" env RUST_LOG=info $PROXY_ENV "$PROXY_BIN" --config "$work/connector-proxy-logged.toml" >"$work/cp-logged.log" 2>&1 &
pids+=($!)
CPL_PID=$!
# The same proxy recording a trace of every request (sampling_ratio 1.0), exported to $OTEL.
sed -e "s|127.0.0.1:$CP\"|127.0.0.1:$CPT\"|" -e "s|127.0.0.1:$CPA\"|127.0.0.1:$CPTA\"|" \
    "$work/connector-proxy.toml" >"$work/connector-proxy-traced.toml"
printf '\n[telemetry]\notlp_endpoint = "http://127.0.0.1:%s"\n' "$OTEL" >>"$work/connector-proxy-traced.toml"
taskset -c "$PROXY_CORE" env RUST_LOG=warn $PROXY_ENV "$PROXY_BIN" --config "$work/connector-proxy-traced.toml" >"$work/cp-traced.log" 2>&1 &
pids+=($!)
CPT_PID=$!
taskset -c "$PROXY_CORE" haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
pids+=($!)
HAP_PID=$!
taskset -c "$PROXY_CORE" "$BARE_BIN" "127.0.0.1:$BARE" "127.0.0.1:$UP" crm.example.com "$work/ca.pem" "Basic $BASIC" >"$work/bare.log" 2>&1 &
pids+=($!)
BARE_PID=$!
# Polls URL until it answers (10 s at the most).
wait_http() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; }
for url in "http://127.0.0.1:$CPA/readyz" "http://127.0.0.1:$CPLA/readyz" "http://127.0.0.1:$CPTA/readyz" "http://127.0.0.1:$HAP/" "http://127.0.0.1:$BARE/"; do
    wait_http "$url"
done

# The proxy's main process RSS in KiB.
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# nginx's proxy worker (the pid file names the master, which holds no connections).
nginx_pid() { pgrep -P "$(cat "$work/nginx-px.pid")" | head -1; }

# CPU time (user + system, all threads) of a process, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
upstream_pid() { pgrep -P "$(cat "$work/nginx-up.pid")" | head -1; }

# run NAME CONNECTIONS wrk-args... -> "req/s p50_ms p99_ms proxy_us upstream_us"
# The last two are CPU microseconds per request spent by the process named in $WATCH (the proxy
# under test; "-" when unset) and by the upstream's worker: far steadier on a noisy VM than req/s,
# because they do not depend on how the core is shared.
run() {
    local name=$1 conns=$2; shift 2
    local out up_pid w0=0 u0
    up_pid=$(upstream_pid)
    [ -n "${WATCH:-}" ] && w0=$(ticks "$WATCH")
    u0=$(ticks "$up_pid")
    out=$(timeout $((DURATION + 30)) taskset -c "$LOAD_CORE" wrk -t1 -c"$conns" -d"${DURATION}s" --latency "$@" 2>&1)
    local w1=0 u1 requests
    [ -n "${WATCH:-}" ] && w1=$(ticks "$WATCH")
    u1=$(ticks "$up_pid")
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    local errors
    errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}')
    [ -n "$errors" ] && echo "  $name: $errors" >&2
    local rps p50 p99
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    local per_request='BEGIN {if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-"}'
    local proxy_us=-
    [ -n "${WATCH:-}" ] && proxy_us=$(awk -v t=$((w1 - w0)) -v hz="$HZ" -v n="$requests" "$per_request")
    echo "$rps $(to_ms "$p50") $(to_ms "$p99") $proxy_us $(awk -v t=$((u1 - u0)) -v hz="$HZ" -v n="$requests" "$per_request")"
}
to_ms() {
    case "$1" in
        *us) awk -v v="${1%us}" 'BEGIN {printf "%.3f", v/1000}' ;;
        *ms) awk -v v="${1%ms}" 'BEGIN {printf "%.3f", v}' ;;
        *s) awk -v v="${1%s}" 'BEGIN {printf "%.3f", v*1000}' ;;
        *) echo "nan" ;;
    esac
}

# The median of the numbers on standard input, one a line.
median() { sort -g | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
# medians RESULT... -> one result ("req/s p50 p99 proxy_us upstream_us") of each field's median
medians() {
    local k out=()
    for k in 1 2 3 4 5; do out+=("$(printf '%s\n' "$@" | awk -v k=$k '{print $k}' | median)"); done
    echo "${out[*]}"
}

row() {
    # Local: the callers' own rps and cpu variables keep their values.
    local name=$1 res=$2 rss=$3 rps p50 p99 pcpu ucpu nrps np99 hrps brps drps
    read -r rps p50 p99 pcpu ucpu <<<"$res"
    read -r nrps _ np99 _ <<<"$ngx"
    read -r hrps _ _ _ <<<"$hap"
    read -r brps _ _ _ <<<"$bare"
    read -r drps _ _ _ <<<"$direct"
    awk -v n="$name" -v r="$rps" -v a="$p50" -v b="$p99" -v m="$rss" -v nr="$nrps" -v hr="$hrps" -v br="$brps" -v dr="$drps" -v np="$np99" \
        -v pc="$pcpu" -v uc="$ucpu" \
        'BEGIN {printf "| %-40s | %9.0f | %7.3f | %7.3f | %8s | %6.2fx | %6.2fx | %6.2fx | %6.2fx | %6.2fx | %6s | %6s |\n", n, r, a, b, m, r/nr, r/hr, r/br, r/dr, b/np, pc, uc}'
}
# The 32-connection rows both modes print.
steady_rows() {
    row "direct HTTPS (baseline)" "$direct" "-"
    row "nginx (Basic)" "$ngx" "$ngx_rss"
    row "HAProxy (Basic)" "$hap" "$hap_rss"
    row "bare hyper-util forwarder (Basic)" "$bare" "$bare_rss"
    row "connector-proxy (Basic)" "$basic" "$cp_rss"
    row "connector-proxy (Basic, access log on)" "$logged" "$cpl_rss"
    row "connector-proxy (OAuth)" "$oauth" "$cp_rss"
    read -r lrps _ _ lcpu _ <<<"$logged"; read -r brps _ _ bcpu _ <<<"$basic_next"
    awk -v l="$lrps" -v b="$brps" -v lc="$lcpu" -v bc="$bcpu" -v d="$(wc -l <"$work/cp-logged.log")" -v x="$(curl -s "http://127.0.0.1:$CPLA/metrics" | awk '/^connector_proxy_log_lines_dropped_total/ {print $2}')" \
        'BEGIN {printf "access log at info: %.2fx the throughput of RUST_LOG=warn, %s against %s CPU us/req; %d lines written, %s dropped\n", l/b, lc, bc, d, x}'
    row "connector-proxy (Basic, traces on)" "$traced" "$cpt_rss"
    row "connector-proxy (OAuth, traces on)" "$traced_oauth" "$cpt_rss"
    read -r trps _ _ tcpu _ <<<"$traced"; read -r orps _ _ ocpu _ <<<"$oauth"; read -r torps _ _ tocpu _ <<<"$traced_oauth"
    local spans
    spans=$(curl -s "http://127.0.0.1:$CPTA/metrics" | awk '/^connector_proxy_spans_(exported|dropped)_total/ {printf "%s %s; ", $1, $2}')
    awk -v t="$trps" -v b="$brps" -v tc="$tcpu" -v bc="$bcpu" -v to="$torps" -v o="$orps" -v toc="$tocpu" -v oc="$ocpu" -v s="$spans" \
        'BEGIN {printf "traces on (every request sampled): Basic %.2fx the throughput of traces off, %s against %s CPU us/req; OAuth %.2fx, %s against %s; %s\n", t/b, tc, bc, to/o, toc, oc, s}'
    rounds_summary
}
# Per round, connector-proxy (Basic) against each peer run in the same round, and the median of
# those ratios: the figures to quote.
rounds_summary() {
    local i lines="" c n h b cc nc hc bc
    echo
    echo "connector-proxy (Basic) in each of $ROUNDS rounds (order alternating), throughput against the peer's in the same round; CPU us/req proxy / nginx / HAProxy / bare:"
    for ((i = 0; i < ROUNDS; i++)); do
        read -r c _ _ cc _ <<<"${r_cp[i]}"; read -r n _ _ nc _ <<<"${r_ngx[i]}"
        read -r h _ _ hc _ <<<"${r_hap[i]}"; read -r b _ _ bc _ <<<"${r_bare[i]}"
        lines+="$(awk -v c="$c" -v n="$n" -v h="$h" -v b="$b" 'BEGIN {printf "%.4f %.4f %.4f", c/n, c/h, c/b}') $cc $nc $hc $bc"$'\n'
        awk -v r=$((i + 1)) -v c="$c" -v n="$n" -v h="$h" -v b="$b" -v cc="$cc" -v nc="$nc" -v hc="$hc" -v bc="$bc" \
            'BEGIN {printf "  round %d: %.2fx nginx, %.2fx HAProxy, %.2fx bare; %s / %s / %s / %s\n", r, c/n, c/h, c/b, cc, nc, hc, bc}'
    done
    local cols=() k
    for k in 1 2 3 4 5 6 7; do cols+=("$(printf '%s' "$lines" | awk -v k=$k 'NF {print $k}' | median)"); done
    awk -v a="${cols[0]}" -v b="${cols[1]}" -v c="${cols[2]}" -v pc="${cols[3]}" -v nc="${cols[4]}" -v hc="${cols[5]}" -v bc="${cols[6]}" \
        'BEGIN {printf "  median of the rounds: %.2fx nginx, %.2fx HAProxy, %.2fx bare; %s / %s / %s / %s\n", a, b, c, pc, nc, hc, bc}'
}
table_head() {
    echo
    echo "Machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//'); kernel $(uname -r)"
    echo "$CONNECTIONS connections, ${DURATION}s per run, upstream and proxy on core $PROXY_CORE, wrk on core $LOAD_CORE, upstream offers h2: $UPSTREAM_HTTP2"
    echo "nginx, HAProxy, bare and connector-proxy (Basic): medians of $ROUNDS rounds, and ratios of those medians; the"
    echo "other rows, direct included (run before the rounds): one run each. The ratios to quote are the per-round ones below."
    echo
    echo "| path                                     |     req/s | p50 ms  | p99 ms  | RSS KiB  | vs nginx | vs HAProxy | vs bare | vs direct | p99 vs nginx | proxy CPU us/req | upstream CPU us/req |"
    echo "| ---------------------------------------- | --------: | ------: | ------: | -------: | -------: | ---------: | ------: | --------: | -----------: | -----: | -----: |"
}

# wrk checks every answer (status 200, body "ok") in Lua; the upstream answers "ok" only to the
# right credentials. Both soaks use it.
write_check_lua() {
    cat >"$work/check.lua" <<'EOF'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init() bad = 0 end
function response(status, headers, body)
    if status ~= 200 or body ~= "ok" then bad = bad + 1 end
end
function done(summary, latency, requests)
    local total = 0
    for _, t in ipairs(threads) do total = total + t:get("bad") end
    io.write(string.format("requests %d, wrong answers %d, socket errors %d\n", summary.requests,
        total, summary.errors.connect + summary.errors.read + summary.errors.write
        + summary.errors.timeout))
end
EOF
}

if [ "$MODE" = soak ]; then
    # Half the connections use Basic, half OAuth with 2 s tokens.
    write_check_lua
    half=$((CONNECTIONS_SOAK / 2))
    : >"$work/rss.txt"
    tokens_before=$(wc -l <"$work/rolling.log")
    soak_start=$(date +%s.%N)
    for connector in basic rolling; do
        path=basic; [ "$connector" = rolling ] && path=oauth
        timeout $((SOAK_SECONDS + 60)) taskset -c "$LOAD_CORE" wrk -t1 -c"$half" -d"${SOAK_SECONDS}s" --latency \
            -s "$work/check.lua" -H "X-Connector-Name: $connector" "http://127.0.0.1:$CP/soak/$path" \
            >"$work/soak-$connector.txt" 2>&1 &
        pids+=($!)
    done
    for i in $(seq 0 5 "$SOAK_SECONDS"); do
        echo "$i $(rss "$CP_PID")" >>"$work/rss.txt"
        sleep 5
    done
    wait "${pids[-1]}" "${pids[-2]}" || true
    tokens=$(($(wc -l <"$work/rolling.log") - tokens_before))
    soak_elapsed=$(awk -v a="$soak_start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
    echo
    echo "Machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//'); kernel $(uname -r)"
    echo "Soak: $CONNECTIONS_SOAK connections for ${SOAK_SECONDS}s, proxy on core $PROXY_CORE, wrk on core $LOAD_CORE"
    for connector in basic rolling; do
        f="$work/soak-$connector.txt"
        printf '%-8s %s; %s req/s, p50 %s, p99 %s\n' "$connector" "$(grep '^requests' "$f")" \
            "$(awk '/Requests\/sec/ {print $2}' "$f")" "$(awk '$1=="50%" {print $2}' "$f")" "$(awk '$1=="99%" {print $2}' "$f")"
        grep -E 'Non-2xx|Socket errors' "$f" || true
    done
    awk -v t="$tokens" -v e="$soak_elapsed" 'BEGIN {
        printf "token requests: %d in %.1f s (one per refresh; a 2 s token counts as 1 s, the second servers truncate taken off, refreshed at 80%%: every ~0.8 s, ~%.0f)\n", t, e, e / 0.8 }'
    echo "RSS KiB every 5 s: $(awk '{printf "%s ", $2}' "$work/rss.txt")"
    echo "answers other than 200, by the proxy's metrics:"
    curl -s "http://127.0.0.1:$CPA/metrics" | grep '^connector_proxy_requests_total' | grep -v 'code="200"' || echo "  none"
    # None is the good case: under pipefail grep's "no match" would end the script with 1.
    grep upstream_unreachable "$work/cp.log" | head -3 || true
    exit 0
fi

# Warm each path once (pools, TLS sessions, the OAuth token).
curl -s -o /dev/null -k --resolve "crm.example.com:$UP:127.0.0.1" "https://crm.example.com:$UP/"
curl -s -o /dev/null "http://127.0.0.1:$NGX/"
curl -s -o /dev/null -H 'X-Connector-Name: basic' "http://127.0.0.1:$CP/"
curl -s -o /dev/null -H 'X-Connector-Name: oauth' "http://127.0.0.1:$CP/"

if [ "$MODE" = cluster-soak ]; then
    # Two more replicas on the same file but their own ports; 1,000 connections spread over the
    # three, all on the 2 s-token connector; Redis killed for 10 s in the middle of the run.
    rep_pids=("$CP_PID"); rep_ports=("$CP")
    for n in 2 3; do
        port=$(free_port); admin=$(free_port)
        sed -e "s|^listen = .*|listen = \"127.0.0.1:$port\"|" -e "s|^admin_listen = .*|admin_listen = \"127.0.0.1:$admin\"|" \
            "$work/connector-proxy.toml" >"$work/replica-$n.toml"
        taskset -c "$PROXY_CORE" env RUST_LOG=warn "$PROXY_BIN" --config "$work/replica-$n.toml" >"$work/replica-$n.log" 2>&1 &
        pids+=($!); rep_pids+=($!); rep_ports+=("$port")
        for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$admin/readyz" && break; sleep 0.1; done
    done
    write_check_lua
    share=$((CONNECTIONS_SOAK / 3))
    tokens_before=$(wc -l <"$work/rolling.log")
    soak_start=$(date +%s.%N)
    wrk_pids=()
    for i in 0 1 2; do
        timeout $((SOAK_SECONDS + 60)) taskset -c "$LOAD_CORE" wrk -t1 -c"$share" -d"${SOAK_SECONDS}s" --latency \
            -s "$work/check.lua" -H "X-Connector-Name: rolling" "http://127.0.0.1:${rep_ports[$i]}/soak/oauth" \
            >"$work/cluster-soak-$i.txt" 2>&1 &
        wrk_pids+=($!)
    done
    half=$((SOAK_SECONDS / 2))
    sleep $((half - 5))
    tokens_mid=$(wc -l <"$work/rolling.log")
    kill -9 "$REDIS_PID"
    sleep 10
    tokens_down=$(($(wc -l <"$work/rolling.log") - tokens_mid))
    start_redis; pids+=("$REDIS_PID")
    wait "${wrk_pids[@]}" || true
    tokens=$(($(wc -l <"$work/rolling.log") - tokens_before))
    soak_elapsed=$(awk -v a="$soak_start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
    echo
    echo "Machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//'); kernel $(uname -r)"
    echo "Cluster soak: 3 replicas, $CONNECTIONS_SOAK connections for ${SOAK_SECONDS}s, 2 s tokens, Redis killed for 10 s from $((half - 5)) s"
    for i in 0 1 2; do
        f="$work/cluster-soak-$i.txt"
        printf 'replica %d: %s; %s req/s, p99 %s\n' $((i + 1)) "$(grep '^requests' "$f")" \
            "$(awk '/Requests\/sec/ {print $2}' "$f")" "$(awk '$1=="99%" {print $2}' "$f")"
        grep -E 'Non-2xx|Socket errors' "$f" || true
    done
    awk -v t="$tokens" -v d="$tokens_down" -v e="$soak_elapsed" 'BEGIN {
        printf "token requests: %d in %.1f s (shared: one per refresh, every ~0.8 s, ~%.0f; three alone: ~%.0f); %d in the 10 s without Redis (three alone: ~%.0f)\n", t, e, e / 0.8, 3 * e / 0.8, d, 3 * 10 / 0.8 }'
    for n in "${rep_pids[@]}"; do echo "replica pid $n: RSS $(rss "$n") KiB"; done
    exit 0
fi

if [ "$MODE" = serve ]; then   # leave everything running, for profiling by hand
    echo "connector-proxy pid $CP_PID on http://127.0.0.1:$CP (admin $CPA); nginx proxy on" \
        "http://127.0.0.1:$NGX; HAProxy pid $HAP_PID on http://127.0.0.1:$HAP; bare forwarder" \
        "pid $BARE_PID on http://127.0.0.1:$BARE; upstream https://127.0.0.1:$UP (worker" \
        "$(upstream_pid)). Ctrl-C stops."
    sleep "${SERVE_SECONDS:-3600}"
    exit 0
fi

# wrk cannot verify certificates or set SNI per host; the direct baseline is HTTPS to the upstream.
direct=$(run direct "$CONNECTIONS" -H 'Host: crm.example.com' "https://127.0.0.1:$UP/")
# The four servers compared, in ROUNDS rounds whose order alternates (nginx, HAProxy, bare,
# proxy; then the reverse), so that this VM's drift over minutes moves each alike. Their rows
# give the median of each column over the rounds; the ratios that matter are also given per
# round and as the median of the rounds' ratios, after the table.
r_ngx=(); r_hap=(); r_bare=(); r_cp=()
for ((round = 0; round < ROUNDS; round++)); do
    order="ngx hap bare cp"
    [ $((round % 2)) = 1 ] && order="cp bare hap ngx"
    for who in $order; do
        case $who in
            ngx) r_ngx+=("$(WATCH=$(nginx_pid) run nginx "$CONNECTIONS" "http://127.0.0.1:$NGX/")") ;;
            hap) r_hap+=("$(WATCH=$HAP_PID run haproxy "$CONNECTIONS" "http://127.0.0.1:$HAP/")") ;;
            bare) r_bare+=("$(WATCH=$BARE_PID run bare "$CONNECTIONS" "http://127.0.0.1:$BARE/")") ;;
            cp)
                if [ -n "${PROFILE:-}" ] && [ "$round" = 0 ]; then
                    perf record -F 999 -g -p "$CP_PID" -o "$PROFILE" -- sleep "$DURATION" >/dev/null 2>&1 &
                    perf_pid=$!
                fi
                r_cp+=("$(WATCH=$CP_PID run basic "$CONNECTIONS" -H 'X-Connector-Name: basic' "http://127.0.0.1:$CP/")")
                if [ -n "${PROFILE:-}" ] && [ "$round" = 0 ]; then
                    wait "$perf_pid" || true
                    echo "profile written to $PROFILE: perf report -i $PROFILE --no-children --sort symbol" >&2
                fi
                ;;
        esac
    done
done
ngx=$(medians "${r_ngx[@]}")
hap=$(medians "${r_hap[@]}")
bare=$(medians "${r_bare[@]}")
basic=$(medians "${r_cp[@]}")
ngx_rss=$(rss "$(nginx_pid)")
hap_rss=$(rss "$HAP_PID")
bare_rss=$(rss "$BARE_PID")
# Each variant right after the run it is compared with, so that drift over the run (this VM's
# neighbours) moves both alike.
basic_next=$(WATCH=$CP_PID run basic "$CONNECTIONS" -H 'X-Connector-Name: basic' "http://127.0.0.1:$CP/")
traced=$(WATCH=$CPT_PID run traced "$CONNECTIONS" -H 'X-Connector-Name: basic' "http://127.0.0.1:$CPT/")
logged=$(WATCH=$CPL_PID run logged "$CONNECTIONS" -H 'X-Connector-Name: basic' "http://127.0.0.1:$CPL/")
cpl_rss=$(rss "$CPL_PID")
oauth=$(WATCH=$CP_PID run oauth "$CONNECTIONS" -H 'X-Connector-Name: oauth' "http://127.0.0.1:$CP/")
cp_rss=$(rss "$CP_PID")
traced_oauth=$(WATCH=$CPT_PID run traced-oauth "$CONNECTIONS" -H 'X-Connector-Name: oauth' "http://127.0.0.1:$CPT/")
cpt_rss=$(rss "$CPT_PID")
if [ "$MODE" = quick ]; then   # the 32-connection rows only, for A/B runs of two builds
    table_head
    steady_rows
    exit 0
fi

# Token rollover: the same load on a connector whose tokens live 2 s, so the proxy refreshes
# ahead (at 20% of the lifetime left) every ~1.6 s while requests flow.
curl -s -o /dev/null -H 'X-Connector-Name: rolling' "http://127.0.0.1:$CP/"
rolling_before=$(wc -l <"$work/rolling.log")
rolling=$(WATCH=$CP_PID run rolling "$CONNECTIONS" -H 'X-Connector-Name: rolling' "http://127.0.0.1:$CP/")
rolling_tokens=$(($(wc -l <"$work/rolling.log") - rolling_before))

# Memory with 1,000 client connections: first 1,000 idle keepalive connections that have each
# made one request, then sampled halfway through a busy run (wrk holds them open).
idle() { # idle PORT HEADER -> RSS KiB of PID while 1,000 keepalive connections sit idle
    taskset -c "$LOAD_CORE" python3 benches/idle_connections.py "$1" "$2" 1000 3 &
    local client=$!
    sleep 2.5
    rss "$3"
    wait "$client"
}
cp_idle=$(idle "$CP" 'X-Connector-Name: basic' "$CP_PID")
ngx_idle=$(idle "$NGX" 'X-Unused: 1' "$(nginx_pid)")
# Halfway through a busy run: the RSS of $1 and the connections it has open to the upstream
# (its own only: the other servers keep their idle pooled connections from earlier rows).
upstream_conns() { ss -Htnp state established "( dport = :$UP )" | grep -c "pid=$1," || true; }
rss_midway() {
    sleep "$(awk -v d="$DURATION" 'BEGIN {print d/2}')"
    echo "$(rss "$1") $(upstream_conns "$1")" >"$2"
}
rss_midway "$CP_PID" "$work/cp-busy" &
many=$(WATCH=$CP_PID run basic1000 1000 -H 'X-Connector-Name: basic' "http://127.0.0.1:$CP/")
read -r cp_rss_1000 cp_up_1000 <"$work/cp-busy"
cp_hwm=$(awk '/VmHWM/ {print $2}' "/proc/$CP_PID/status")
rss_midway "$(nginx_pid)" "$work/ngx-busy" &
many_ngx=$(WATCH=$(nginx_pid) run nginx1000 1000 "http://127.0.0.1:$NGX/")
read -r ngx_rss_1000 ngx_up_1000 <"$work/ngx-busy"
rss_midway "$HAP_PID" "$work/hap-busy" &
many_hap=$(WATCH=$HAP_PID run haproxy1000 1000 "http://127.0.0.1:$HAP/")
read -r hap_rss_1000 hap_up_1000 <"$work/hap-busy"

# Light load: one connection, for added latency.
direct1=$(run direct1 1 -H 'Host: crm.example.com' "https://127.0.0.1:$UP/")
ngx1=$(run nginx1 1 "http://127.0.0.1:$NGX/")
basic1=$(run basic1 1 -H 'X-Connector-Name: basic' "http://127.0.0.1:$CP/")

table_head
steady_rows
row "connector-proxy (OAuth, 2 s tokens)" "$rolling" "-"
read -r _ _ o99 _ <<<"$oauth"; read -r _ _ r99 _ <<<"$rolling"
awk -v o="$o99" -v r="$r99" -v t="$rolling_tokens" -v d="$DURATION" 'BEGIN {
    printf "token rollover: p99 %.3f ms against %.3f ms steady (%.2fx); %d token requests in %d s (one per ~1.6 s refresh: ~%.0f)\n", r, o, r/o, t, d, d/1.6 }'
echo
read -r m_rps _ m_p99 m_us _ <<<"$many"; read -r mn_rps _ mn_p99 mn_us _ <<<"$many_ngx"
read -r mh_rps _ mh_p99 mh_us _ <<<"$many_hap"
echo "1000 busy connections: connector-proxy $m_rps req/s (p99 $m_p99 ms, $m_us CPU us/req), RSS $cp_rss_1000 KiB (peak $cp_hwm KiB), $cp_up_1000 upstream connections; nginx $mn_rps req/s (p99 $mn_p99 ms, $mn_us us/req), worker RSS $ngx_rss_1000 KiB, $ngx_up_1000 upstream connections; HAProxy $mh_rps req/s (p99 $mh_p99 ms, $mh_us us/req), RSS $hap_rss_1000 KiB, $hap_up_1000 upstream connections"
awk -v c="$m_rps" -v n="$mn_rps" -v h="$mh_rps" 'BEGIN { printf "1000 busy connections: connector-proxy %.2fx nginx, %.2fx HAProxy\n", c/n, c/h }'
curl -s "http://127.0.0.1:$CPA/metrics" | grep '^connector_proxy_upstream_tls_handshakes_total' || true
echo "1000 idle keepalive connections: connector-proxy RSS $cp_idle KiB; nginx worker RSS $ngx_idle KiB"
read -r _ d50 _ <<<"$direct1"; read -r _ n50 _ <<<"$ngx1"; read -r _ b50 _ <<<"$basic1"
awk -v d="$d50" -v n="$n50" -v b="$b50" 'BEGIN {
    printf "1 connection, p50: direct %.3f ms, nginx %.3f ms (+%.0f us), connector-proxy %.3f ms (+%.0f us)\n", d, n, (n-d)*1000, b, (b-d)*1000 }'
