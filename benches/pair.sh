#!/usr/bin/env bash
# A/B two connector-proxy builds against one nginx upstream, for changes too small for
# load.sh's rounds to show: both proxies run at once, and wrk drives them in turn, ROUNDS
# times (A first in odd rounds, B first in even ones), so that the VM's drift falls on both.
#
#   bash benches/pair.sh BIN_A BIN_B [ROUNDS=8] [SECONDS=4] [CONNECTIONS=32]
#
# UPSTREAM_HTTP2=1 gives the upstream h2 (default: HTTP/1.1 only). The proxies run on
# PROXY_CORES (default 0, with nginx, as in load.sh), wrk on core 1. Prints, per run, req/s and
# the CPU a request (user + system over the run, divided by the requests) of the proxy and of
# nginx; then the medians of B's ratio to A (req/s) and of B's difference (CPU µs a request).
# One build against a copy of itself gave 0.99x to 1.08x in four runs of 6 rounds (BENCHMARKS
# finding 52): run it both ways round, and more than once, before reading a few percent.
# Last, the median of B's CPU a request divided by nginx's in the same run, against A's: nginx
# does the same work for every request, so its CPU a request follows the VM's speed of the
# moment: within one run of 8 rounds a build's quotient spread 5 to 13%, its CPU 28 to 61%
# (BENCHMARKS, eighteenth session). Changing how the proxy batches its upstream writes moves
# nginx's share too.
# Needs nginx, wrk, openssl and curl (`benches/load.sh` installs nginx and wrk when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
A=$1 B=$2 ROUNDS=${3:-8} SECS=${4:-4} CONNS=${5:-32}
for n in "$ROUNDS" "$SECS" "$CONNS"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "pair.sh: rounds, seconds and connections are positive integers, got '$n'" >&2; exit 2; }
done
for bin in "$A" "$B"; do
    [ -x "$bin" ] || { echo "pair.sh: $bin is not an executable" >&2; exit 2; }
done
. benches/common.sh
work=$(mktemp -d)
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    [ -f "$work/up.pid" ] && kill "$(cat "$work/up.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
UP=$(free_port)
make_certs "$work"
h2=""
[ "${UPSTREAM_HTTP2:-0}" = 1 ] && h2=" http2"
cat >"$work/up.conf" <<EOF
worker_processes 1; pid $work/up.pid; error_log $work/up-error.log warn; events {}
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP ssl$h2; ssl_certificate $work/crm.pem; ssl_certificate_key $work/crm.key;
           location / { default_type text/plain; return 200 "ok"; } } }
EOF
taskset -c 0 nginx -c "$work/up.conf" -p "$work" 2>/dev/null
declare -A pid port
for side in A B; do
    port[$side]=$(free_port)
    basic_config "$work/$side.toml" "${port[$side]}" "$(free_port)" "$UP" svc pair-password
    bin=$A
    [ "$side" = B ] && bin=$B
    RUST_LOG=warn taskset -c "${PROXY_CORES:-0}" "$bin" --config "$work/$side.toml" >"$work/$side.log" 2>&1 &
    pid[$side]=$!
    pids+=("$!")
done
for side in A B; do
    for _ in $(seq 100); do
        curl -fs -o /dev/null -H "X-Connector-Name: basic" "http://127.0.0.1:${port[$side]}/" && continue 2
        sleep 0.1
    done
    echo "pair.sh: proxy $side did not answer; its log:" >&2
    cat "$work/$side.log" >&2
    exit 1
done
upstream_worker=$(pgrep -P "$(cat "$work/up.pid")" | head -1 || true)
[ -n "$upstream_worker" ] || { echo "pair.sh: nginx has no worker process" >&2; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# run SIDE: one wrk run against SIDE's proxy; prints SIDE req/s proxy_us nginx_us.
run() {
    local p0 u0 p1 u1 out n
    p0=$(cpu_ticks "${pid[$1]}")
    u0=$(cpu_ticks "$upstream_worker")
    out=$(timeout $((SECS + 30)) taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" -H 'X-Connector-Name: basic' \
        "http://127.0.0.1:${port[$1]}/" 2>&1) || { echo "pair.sh: wrk against $1 failed: $out" >&2; exit 1; }
    p1=$(cpu_ticks "${pid[$1]}")
    u1=$(cpu_ticks "$upstream_worker")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    # Answers other than 2xx would count as throughput: a run with any is no measurement.
    if ! [[ $n =~ ^[1-9][0-9]*$ ]] || grep -q 'Non-2xx' <<<"$out"; then
        echo "pair.sh: wrk against $1 gave no clean count: $out" >&2
        exit 1
    fi
    awk -v s="$1" -v n="$n" -v d="$SECS" -v p=$((p1 - p0)) -v u=$((u1 - u0)) -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "%s %.0f %.1f %.1f\n", s, n / d, p / hz * 1e6 / n, u / hz * 1e6 / n }'
}
run A >/dev/null
run B >/dev/null
echo "upstream $([ -n "$h2" ] && echo h2 || echo HTTP/1.1), $CONNS connections, $ROUNDS rounds of $SECS s"
echo "side req/s proxy_cpu_us/req nginx_cpu_us/req"
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then run A; run B; else run B; run A; fi
done | tee "$work/runs"
awk '
    { rps[$1] = $2; cpu[$1] = $3; up[$1] = $4 }
    NR % 2 == 0 {
        ratio[++k] = rps["B"] / rps["A"]; diff[k] = cpu["B"] - cpu["A"]
        norm[k] = (cpu["B"] / up["B"]) / (cpu["A"] / up["A"])
    }
    function median(v, n,   i, j, t) {
        for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
        return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    END {
        printf "B against A, medians of %d rounds: %.2fx req/s, %+.1f proxy CPU us a request\n", k, median(ratio, k), median(diff, k)
        printf "B against A, proxy CPU over nginx CPU a request in the same run: %.3fx\n", median(norm, k)
    }
' "$work/runs"
