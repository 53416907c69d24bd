#!/usr/bin/env bash
# L7 benchmark: HTTP requests/s and latency through weir's HTTP ports (a Wasm policy,
# round-robin.wasm, deciding every request) against the same nginx backends reached
# directly and through HAProxy in mode http, side by side, in one run:
#   h2c   h2load, many streams on few connections (h2c in front and behind)
#   http1 wrk, HTTP/1.1 keep-alive
# Loopback only (127.42.0.0/16); every load run is bounded by its duration.
#
# The machine is shared and noisy: each target is run ROUNDS times, the targets taking
# turns, and the tables give each one's median run, and the ratios of every round.
#
#   bench/l7.sh                      # 3 rounds of 10 s per run, 1 proxy thread
#   DURATION=20 THREADS=2 ROUNDS=5 bench/l7.sh
#   MODES=http1 TARGETS="weir haproxy" bench/l7.sh   # a part of it
#   PROFILE=quick-release bench/l7.sh                  # weir built faster, for A/B runs
#
# Needs root for apt-get if h2load, wrk, haproxy or nginx are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}       # seconds per run
ROUNDS=${ROUNDS:-3}            # runs of each target, taking turns
THREADS=${THREADS:-1}          # proxy threads: weir's workers and HAProxy's nbthread
H2_CONNECTIONS=${H2_CONNECTIONS:-4}
H2_STREAMS=${H2_STREAMS:-32}
H1_CONNECTIONS=${H1_CONNECTIONS:-50}
TARGETS=${TARGETS:-direct weir haproxy}
MODES=${MODES:-h2c http1}

missing=()
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v wrk >/dev/null || missing+=(wrk)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --profile ${PROFILE:-release} -q -p weir
WEIR=target/${PROFILE:-release}/weir
POLICY=target/policies/round-robin.wasm

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Two nginx backends: HTTP/1.1 on 8080, h2c (prior knowledge) on 8081.
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
    http2_max_concurrent_streams 1024;
    server { listen 127.42.1.1:8080 reuseport; listen 127.42.1.2:8080 reuseport;
             location / { return 200 "hello from nginx\n"; } }
    server { listen 127.42.1.1:8081 http2 reuseport; listen 127.42.1.2:8081 http2 reuseport;
             location / { return 200 "hello from nginx\n"; } }
}
CONF
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)

# weir: one Service, an HTTP/1.1 port 8000 and an h2c port 8001, round-robin.wasm.
mkdir -p "$work/weir/objects" "$work/weir/policies"
cp "$POLICY" "$work/weir/policies/round-robin.wasm"
cat > "$work/weir/objects/bench.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: default, annotations: {weir.dev/policy: round-robin}}
spec:
  clusterIP: 127.42.0.10
  ports:
  - {name: http, port: 8000, targetPort: 8080, protocol: TCP, appProtocol: http}
  - {name: h2c, port: 8001, targetPort: 8081, protocol: TCP, appProtocol: kubernetes.io/h2c}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels: {kubernetes.io/service-name: bench}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: h2c, port: 8081, protocol: TCP}]
endpoints:
- addresses: ["127.42.1.1"]
- addresses: ["127.42.1.2"]
YAML
cat > "$work/weir/weir.toml" <<TOML
[node]
name = "bench"
addresses = ["127.42.0.1"]
[source]
kind = "files"
paths = ["objects"]
[policies]
dir = "policies"
cache_dir = ""
[admin]
address = "127.42.0.1:10256"
[proxy]
workers = $THREADS
TOML
WEIR_LOG=warn ${WEIR_ENV:-} "$WEIR" run --config "$work/weir/weir.toml" &
pids+=($!)
declare -A pid_of=([weir]=$!)

# HAProxy in mode http on the same backends: h2c in front and behind for 8001,
# HTTP/1.1 keep-alive for 8000, round-robin.
cat > "$work/haproxy.cfg" <<CFG
global
    nbthread $THREADS
    maxconn 8000
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend http1
    bind 127.42.0.20:8000
    default_backend nginx_http1
frontend h2c
    bind 127.42.0.20:8001 proto h2
    default_backend nginx_h2c
backend nginx_http1
    balance roundrobin
    server a 127.42.1.1:8080
    server b 127.42.1.2:8080
backend nginx_h2c
    balance roundrobin
    server a 127.42.1.1:8081 proto h2
    server b 127.42.1.2:8081 proto h2
CFG
haproxy -f "$work/haproxy.cfg" &
pids+=($!)
pid_of[haproxy]=$!

for _ in $(seq 1 150); do
    curl -sf http://127.42.0.1:10256/readyz >/dev/null 2>&1 \
        && curl -sf http://127.42.0.10:8000/ >/dev/null 2>&1 \
        && curl -sf --http2-prior-knowledge http://127.42.0.10:8001/ >/dev/null 2>&1 \
        && curl -sf --http2-prior-knowledge http://127.42.0.20:8001/ >/dev/null 2>&1 \
        && curl -sf --http2-prior-knowledge http://127.42.1.1:8081/ >/dev/null 2>&1 && break
    sleep 0.2
done

# Prints "rps p50_ms p99_ms" for one h2load run (percentiles from its per-request log).
h2() {
    local url=$1 seconds=$2 log="$work/h2load.log"
    rm -f "$log"
    local out
    out=$(h2load -D "$seconds" -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -t 1 --log-file="$log" "$url" 2>&1)
    echo "$out" | grep -E "^requests:" | grep -v " 0 failed" | sed "s|^|  $url: |" >&2 || true
    python3 - "$log" "$(echo "$out" | awk '/^finished in/ {print $4}')" <<'PY'
import sys
durations = sorted(int(line.split()[2]) for line in open(sys.argv[1]) if line.strip())
rps = float(sys.argv[2] or 0)
def pct(p):
    return durations[min(len(durations) - 1, int(len(durations) * p))] / 1000.0 if durations else 0
print(f"{rps:.0f} {pct(0.50):.3f} {pct(0.99):.3f}")
PY
}

# Prints "rps p50_ms p99_ms" for one wrk run.
h1() {
    local url=$1 seconds=$2 out
    out=$(wrk -t1 -c"$H1_CONNECTIONS" -d"${seconds}s" --latency "$url")
    echo "$out" | awk '/Socket errors|Non-2xx/ {print}' | sed "s|^|  $url: |" >&2
    echo "$out" | awk '
        function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
        /^ +50%/ {p50=ms($2)} /^ +99%/ {p99=ms($2)} /^Requests\/sec/ {rps=$2}
        END {printf "%.0f %.3f %.3f\n", rps, p50, p99}'
}

# CPU time a process has used, user and system, in microseconds.
cpu_us() {
    awk -v tck="$(getconf CLK_TCK)" '{printf "%d %d\n", $14 * 1e6 / tck, $15 * 1e6 / tck}' "/proc/$1/stat"
}

declare -A result cpu
for round in $(seq 1 "$ROUNDS"); do
for mode in $MODES; do
    for target in $TARGETS; do
        case $mode.$target in
            h2c.direct) url=http://127.42.1.1:8081/ ;;
            h2c.weir) url=http://127.42.0.10:8001/ ;;
            h2c.haproxy) url=http://127.42.0.20:8001/ ;;
            http1.direct) url=http://127.42.1.1:8080/ ;;
            http1.weir) url=http://127.42.0.10:8000/ ;;
            http1.haproxy) url=http://127.42.0.20:8000/ ;;
        esac
        load=h1
        [ "$mode" = h2c ] && load=h2
        $load "$url" 2 >/dev/null 2>&1 || true   # warm-up
        pid=${pid_of[$target]:-}
        [ -n "$pid" ] && read -r user0 sys0 < <(cpu_us "$pid")
        run=$($load "$url" "$DURATION")
        # The proxy's CPU per request, user and kernel, over the measured run.
        usage="- -"
        if [ -n "$pid" ]; then
            read -r user1 sys1 < <(cpu_us "$pid")
            read -r rps _ <<<"$run"
            usage=$(awk -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v n="$rps" -v d="$DURATION" \
                'BEGIN {printf "%.2f %.2f\n", u / (n * d), s / (n * d)}')
        fi
        result[$mode.$target]+="$run $usage"$'\n'
    done
done
done

printf '\nh2c: h2load, %s connections x %s streams; http1: wrk, %s keep-alive connections;\n' \
    "$H2_CONNECTIONS" "$H2_STREAMS" "$H1_CONNECTIONS"
printf '%s rounds of %s s per run; proxies with %s thread(s); %s cores; weir decides each request with round-robin.wasm\n' \
    "$ROUNDS" "$DURATION" "$THREADS" "$(nproc)"
printf 'Each row: the target'"'"'s median run by req/s.\n\n'
printf '%-6s %-8s %10s %9s %9s %12s %12s\n' mode target req/s p50_ms p99_ms user_us/req sys_us/req
# A target's median run (by req/s; the lower middle of an even count).
median() {
    printf '%s' "${result[$1]}" | sort -n -k1,1 | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2)'
}
for mode in $MODES; do
    for target in $TARGETS; do
        read -r rps p50 p99 user sys <<<"$(median "$mode.$target")"
        printf '%-6s %-8s %10s %9s %9s %12s %12s\n' "$mode" "$target" "$rps" "$p50" "$p99" "$user" "$sys"
    done
done
[[ " $TARGETS " == *" weir "* && " $TARGETS " == *" haproxy "* ]] || exit 0
# weir against HAProxy in each round (the runs of a round are minutes apart at most),
# and between the medians.
printf '\n%-6s %-8s %16s %16s %16s\n' mode round weir/haproxy_rps weir/haproxy_p50 weir/haproxy_p99
for mode in $MODES; do
    paste <(printf '%s' "${result[$mode.weir]}") <(printf '%s' "${result[$mode.haproxy]}") |
        awk -v m="$mode" '{printf "%-6s %-8s %16.2f %16.2f %16.2f\n", m, NR, $1/$6, $2/$7, $3/$8}'
    read -r wrps wp50 wp99 _ <<<"$(median "$mode.weir")"
    read -r hrps hp50 hp99 _ <<<"$(median "$mode.haproxy")"
    awk -v m="$mode" -v w="$wrps" -v h="$hrps" -v w50="$wp50" -v h50="$hp50" -v w99="$wp99" -v h99="$hp99" \
        'BEGIN {printf "%-6s %-8s %16.2f %16.2f %16.2f\n", m, "median", w/h, w50/h50, w99/h99}'
    case " $TARGETS " in *" direct "*)
        read -r drps _ <<<"$(median "$mode.direct")"
        awk -v m="$mode" -v w="$wrps" -v d="$drps" 'BEGIN {printf "%-6s weir/direct req/s (medians): %.2f\n", m, w/d}' ;;
    esac
done
