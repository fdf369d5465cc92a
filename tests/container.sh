#!/usr/bin/env bash
# The container image built and run as an operator would: hadolint finds nothing, `docker build`
# makes it (the base images are local stand-ins from ../shared/container/base-images.sh, as the
# registries cannot be reached), and the image, on its bundled config/container.toml:
#   - reports healthy through its HEALTHCHECK, as the numeric non-root user 65532;
#   - answers a proxied call with the inbound token with the proxy's own answer (httpbin.org is
#     pointed at 127.0.0.1 inside the container, so nothing leaves: 403 target_address_denied),
#     and one without it with 407;
#   - wants the admin token on /status, not on /healthz;
#   - reloads on SIGHUP (`docker kill -s HUP`), as its log says;
#   - stops on `docker stop` with exit code 0 within the grace.
# Where no Docker engine can be started it fails, loudly: it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=connector-proxy:test
NAME=connector-proxy-test-$$
INBOUND=container-inbound-t0ken
ADMIN=container-adm1n-t0ken
fail() { echo "container.sh: FAILED: $*" >&2; docker logs "$NAME" 2>&1 | tail -20 >&2 || true; exit 1; }
cleanup() { docker rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

BASE_IMAGES=../shared/container/base-images.sh
[ -f "$BASE_IMAGES" ] || fail "$BASE_IMAGES is missing: it makes the Docker engine and base images this machine cannot pull"

echo "-- hadolint"
out=$(target/venv/bin/hadolint --failure-threshold info Dockerfile) || fail "hadolint: $out"
[ -z "$out" ] || fail "hadolint: $out"
echo "hadolint: no warnings or infos"

echo "-- Docker engine and base images"
if ! docker info >/dev/null 2>&1 || ! docker image inspect rust:1.95-slim-bookworm gcr.io/distroless/cc-debian12:nonroot >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then bash "$BASE_IMAGES"; else sudo bash "$BASE_IMAGES"; fi \
        || fail "no Docker engine or base images could be had (see above)"
fi
docker info >/dev/null 2>&1 || fail "the Docker engine does not answer"

echo "-- docker build"
docker build -q -t "$IMAGE" . >/dev/null || fail "docker build"
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $((size / 1024 / 1024)) MiB ($size bytes)"

echo "-- docker run"
docker run -d --name "$NAME" \
    -p 127.0.0.1::8080 -p 127.0.0.1::9090 \
    --add-host httpbin.org:127.0.0.1 \
    -e CONNECTOR_PROXY_DEMO_TOKEN=$INBOUND -e CONNECTOR_PROXY_ADMIN_TOKEN=$ADMIN \
    "$IMAGE" >/dev/null
proxy=$(docker port "$NAME" 8080/tcp | head -1)
admin=$(docker port "$NAME" 9090/tcp | head -1)

health=starting
for _ in $(seq 1 60); do
    health=$(docker inspect --format '{{.State.Health.Status}}' "$NAME")
    [ "$health" = healthy ] && break
    [ "$(docker inspect --format '{{.State.Running}}' "$NAME")" = true ] || fail "the container exited"
    sleep 1
done
[ "$health" = healthy ] || fail "HEALTHCHECK says $health after 60 s"
echo "HEALTHCHECK: healthy"
uid=$(docker top "$NAME" -o pid,uid | awk 'NR == 2 { print $2 }')
[ "$uid" = 65532 ] || fail "runs as uid $uid, not 65532"
echo "runs as uid $uid"

# status code and X-Proxy-Error of a request: "CODE ERROR"
ask() { curl -s -o /dev/null -D - "$@" | awk 'NR == 1 { code = $2 } tolower($1) == "x-proxy-error:" { err = $2 } END { sub(/\r/, "", err); print code, err }'; }
got=$(ask -H "Proxy-Authorization: Bearer $INBOUND" -H 'X-Connector-Name: httpbin-demo' "http://$proxy/basic-auth/demo/demo")
[ "$got" = "403 target_address_denied" ] || fail "with the inbound token: $got"
echo "with the inbound token: $got (httpbin.org is 127.0.0.1 in here: nothing left the container)"
got=$(ask -H 'X-Connector-Name: httpbin-demo' "http://$proxy/basic-auth/demo/demo")
[ "$got" = "407 proxy_auth_required" ] || fail "without the inbound token: $got"
echo "without the inbound token: $got"
got=$(ask "http://$admin/status")
[ "${got%% *}" = 401 ] || fail "/status without the admin token: $got"
got=$(ask -H "Authorization: Bearer $ADMIN" "http://$admin/status")
[ "${got%% *}" = 200 ] || fail "/status with the admin token: $got"
got=$(ask "http://$admin/healthz")
[ "${got%% *}" = 200 ] || fail "/healthz: $got"
echo "admin: /status 401 without the token, 200 with it; /healthz 200"

echo "-- SIGHUP"
docker kill -s HUP "$NAME" >/dev/null
reloaded=
for _ in $(seq 1 20); do
    if docker logs "$NAME" 2>&1 | grep -q 'configuration reloaded'; then reloaded=yes; break; fi
    sleep 0.5
done
[ -n "$reloaded" ] || fail "no reload in the log after SIGHUP"
docker logs "$NAME" 2>&1 | grep 'configuration reloaded' | tail -1
if docker logs "$NAME" 2>&1 | grep -qE "$INBOUND|$ADMIN"; then fail "a token in the log"; fi

echo "-- docker stop"
start=$SECONDS
docker stop -t 40 "$NAME" >/dev/null
code=$(docker inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "exit code $code after docker stop"
echo "docker stop: exit code $code after $((SECONDS - start)) s"
echo "container.sh: ok"
