#!/usr/bin/env bash
# L4 benchmark: requests/s and latency through weir (kube-default) against the same
# nginx backends reached directly and through HAProxy (mode tcp), side by side, in one
# run. Loopback only (127.41.0.0/16); every load run is bounded by wrk's -d.
#
#   bench/l4.sh                 # 10 s per run, 1 proxy thread, 50 connections
#   DURATION=20s THREADS=2 CONNECTIONS=100 bench/l4.sh
#
# Needs root for apt-get if wrk, haproxy or nginx are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
THREADS=${THREADS:-1}          # proxy threads: weir's workers and HAProxy's nbthread
CONNECTIONS=${CONNECTIONS:-50}
WRK_THREADS=${WRK_THREADS:-1}
MODES=${MODES:-keepalive close}
TARGETS=${TARGETS:-direct weir haproxy}

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release -q -p weir
WEIR=target/release/weir

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Two nginx backends answering a small body.
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server { listen 127.41.1.1:8080 reuseport; listen 127.41.1.2:8080 reuseport;
             location / { return 200 "hello from nginx\n"; } }
}
CONF
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)

# weir on the same backends: one Service, clusterIP 127.41.0.10:8000.
mkdir -p "$work/weir/objects"
cat > "$work/weir/objects/bench.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: default}
spec:
  clusterIP: 127.41.0.10
  ports: [{name: http, port: 8000, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels: {kubernetes.io/service-name: bench}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: ["127.41.1.1"]
- addresses: ["127.41.1.2"]
YAML
cat > "$work/weir/weir.toml" <<TOML
[node]
name = "bench"
addresses = ["127.41.0.1"]
[source]
kind = "files"
paths = ["objects"]
[admin]
address = "127.41.0.1:10256"
[proxy]
workers = $THREADS
TOML
WEIR_LOG=warn "$WEIR" run --config "$work/weir/weir.toml" &
pids+=($!)

# HAProxy in mode tcp on the same backends, random balancing like kube-proxy.
cat > "$work/haproxy.cfg" <<CFG
global
    nbthread $THREADS
    maxconn 8000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend bench
    bind 127.41.0.20:8000
    default_backend nginx
backend nginx
    balance random
    server a 127.41.1.1:8080
    server b 127.41.1.2:8080
CFG
haproxy -f "$work/haproxy.cfg" &
pids+=($!)

for _ in $(seq 1 100); do
    curl -sf http://127.41.0.1:10256/readyz >/dev/null 2>&1 \
        && curl -sf http://127.41.0.10:8000/ >/dev/null 2>&1 \
        && curl -sf http://127.41.0.20:8000/ >/dev/null 2>&1 \
        && curl -sf http://127.41.1.1:8080/ >/dev/null 2>&1 && break
    sleep 0.2
done

# Prints "rps p50_ms p99_ms" for one wrk run.
measure() {
    local url=$1; shift
    local out
    out=$(wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$url")
    local errors
    errors=$(echo "$out" | awk '/Socket errors|Non-2xx/ {print}')
    [ -n "$errors" ] && echo "  $url: $errors" >&2
    echo "$out" | awk '
        function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
        /^ +50%/ {p50=ms($2)} /^ +99%/ {p99=ms($2)} /^Requests\/sec/ {rps=$2}
        END {printf "%.0f %.3f %.3f\n", rps, p50, p99}'
}

declare -A result
for mode in $MODES; do
    args=()
    [ "$mode" = close ] && args=(-H "Connection: close")
    for target in $TARGETS; do
        case $target in
            direct) url=http://127.41.1.1:8080/ ;;
            weir) url=http://127.41.0.10:8000/ ;;
            haproxy) url=http://127.41.0.20:8000/ ;;
        esac
        DURATION=2s measure "$url" "${args[@]}" >/dev/null 2>&1 || true   # warm-up
        result[$mode.$target]=$(measure "$url" "${args[@]}")
    done
done

printf '\nwrk: %s threads, %s connections, %s per run; proxies with %s thread(s); %s cores\n\n' \
    "$WRK_THREADS" "$CONNECTIONS" "$DURATION" "$THREADS" "$(nproc)"
printf '%-10s %-8s %10s %9s %9s\n' mode target req/s p50_ms p99_ms
for mode in $MODES; do
    for target in $TARGETS; do
        read -r rps p50 p99 <<<"${result[$mode.$target]}"
        printf '%-10s %-8s %10s %9s %9s\n' "$mode" "$target" "$rps" "$p50" "$p99"
    done
done
[ "$TARGETS" = "direct weir haproxy" ] || exit 0
printf '\n%-10s %16s %16s %14s %14s\n' mode weir/direct_rps weir/haproxy_rps weir/haproxy_p50 weir/haproxy_p99
for mode in $MODES; do
    read -r drps _ _ <<<"${result[$mode.direct]}"
    read -r wrps wp50 wp99 <<<"${result[$mode.weir]}"
    read -r hrps hp50 hp99 <<<"${result[$mode.haproxy]}"
    awk -v m="$mode" -v d="$drps" -v w="$wrps" -v h="$hrps" -v w50="$wp50" -v h50="$hp50" -v w99="$wp99" -v h99="$hp99" \
        'BEGIN {printf "%-10s %16.2f %16.2f %14.2f %14.2f\n", m, w/d, w/h, w50/h50, w99/h99}'
done
