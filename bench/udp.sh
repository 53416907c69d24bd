#!/usr/bin/env bash
# UDP benchmark, DNS-shaped: queries/s and latency (p50, p99) with dnsperf against two
# dnsmasq servers reached directly, through weir (kube-default), and through nginx's
# `stream` UDP proxy (random balancing), side by side, in one run. Loopback only
# (127.42.0.0/16); every load run is bounded by dnsperf's -l.
#
#   bench/udp.sh                          # 10 s per run, 1 proxy thread, 20 client sockets
#   DURATION=20 THREADS=2 CLIENTS=50 bench/udp.sh
#
# Needs root (port 53, and apt-get if dnsperf, dnsmasq or nginx's stream module are
# missing).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}       # seconds per run
THREADS=${THREADS:-1}          # proxy threads: weir's workers and nginx's worker_processes
CLIENTS=${CLIENTS:-20}         # dnsperf's client sockets (each is one flow)
FLOWS=${FLOWS:-5000}           # flows opened at once to measure weir's memory per flow
OUTSTANDING=${OUTSTANDING:-100}
TARGETS=${TARGETS:-direct weir nginx}

missing=()
command -v dnsperf >/dev/null || missing+=(dnsperf)
command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
{ command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || missing+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
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

# Two DNS servers answering every A query from memory.
for n in 1 2; do
    dnsmasq --keep-in-foreground --no-resolv --no-hosts --conf-file=/dev/null \
        --listen-address=127.42.1.$n --bind-interfaces --port=53 \
        --address=/#/198.18.0.1 --user=root --pid-file="$work/dnsmasq$n.pid" \
        --log-facility=/dev/null --dns-forward-max=10000 &
    pids+=($!)
done

# weir on the same servers: Service dns, 53/UDP and 53/TCP on clusterIP 127.42.0.10.
mkdir -p "$work/weir/objects"
cat > "$work/weir/objects/dns.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 127.42.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-1
  namespace: default
  labels: {kubernetes.io/service-name: dns}
addressType: IPv4
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
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
[admin]
address = "127.42.0.1:10256"
[proxy]
workers = $THREADS
TOML
WEIR_LOG=warn "$WEIR" run --config "$work/weir/weir.toml" &
WEIR_PID=$!
pids+=($WEIR_PID)

# nginx's stream module on the same servers.
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $THREADS;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 16384; }
stream {
    upstream dns { random; server 127.42.1.1:53; server 127.42.1.2:53; }
    server { listen 127.42.0.20:53 udp reuseport; proxy_pass dns; proxy_timeout 30s; }
}
CONF
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)

printf 'example.com A\nweir.example A\nkubernetes.default.svc.cluster.local A\n' > "$work/queries"
ready=false
for _ in $(seq 1 100); do
    if curl -sf http://127.42.0.1:10256/readyz >/dev/null 2>&1 \
        && dnsperf -s 127.42.0.10 -d "$work/queries" -n 1 -t 1 2>/dev/null | grep -q 'Queries completed: *3 ' \
        && dnsperf -s 127.42.0.20 -d "$work/queries" -n 1 -t 1 2>/dev/null | grep -q 'Queries completed: *3 ' \
        && dnsperf -s 127.42.1.1 -d "$work/queries" -n 1 -t 1 2>/dev/null | grep -q 'Queries completed: *3 '; then
        ready=true
        break
    fi
    sleep 0.2
done
$ready || { echo "the servers and proxies did not come up" >&2; exit 1; }

# Prints "qps p50_ms p99_ms lost%" for one dnsperf run against $1 for $2 seconds, from
# its per-query latencies (-v).
measure() {
    local out="$work/dnsperf.out"
    dnsperf -s "$1" -d "$work/queries" -l "$2" -c "$CLIENTS" -q "$OUTSTANDING" -t 2 -v >"$out" 2>/dev/null
    awk '/^> / { print $NF * 1000 }' "$out" | sort -n >"$work/latencies"
    local n p50 p99
    n=$(wc -l <"$work/latencies")
    if [ "$n" -eq 0 ]; then echo "0 0 0 100"; return; fi
    p50=$(sed -n "$((n * 50 / 100 + 1))p" "$work/latencies")
    p99=$(sed -n "$((n * 99 / 100 + 1))p" "$work/latencies")
    awk -v p50="$p50" -v p99="$p99" '
        /Queries per second:/ { qps = $4 }
        /Queries sent:/ { sent = $3 }
        /Queries lost:/ { lost = $3 }
        END { printf "%.0f %.3f %.3f %.2f\n", qps, p50, p99, (sent ? 100 * lost / sent : 0) }' "$out"
}

declare -A result
for target in $TARGETS; do
    case $target in
        direct) server=127.42.1.1 ;;
        weir) server=127.42.0.10 ;;
        nginx) server=127.42.0.20 ;;
    esac
    measure "$server" 2 >/dev/null || true   # warm-up
    result[$target]=$(measure "$server" "$DURATION")
done

printf '\ndnsperf: %s client sockets, %s outstanding, %ss per run; proxies with %s thread(s); %s cores\n\n' \
    "$CLIENTS" "$OUTSTANDING" "$DURATION" "$THREADS" "$(nproc)"
printf '%-8s %10s %9s %9s %7s\n' target queries/s p50_ms p99_ms lost%
for target in $TARGETS; do
    read -r qps p50 p99 lost <<<"${result[$target]}"
    printf '%-8s %10s %9s %9s %7s\n' "$target" "$qps" "$p50" "$p99" "$lost"
done
[ "$TARGETS" = "direct weir nginx" ] || exit 0
read -r dq _ _ _ <<<"${result[direct]}"
read -r wq w50 w99 _ <<<"${result[weir]}"
read -r nq n50 n99 _ <<<"${result[nginx]}"
printf '\n%16s %15s %13s %13s\n' weir/direct_qps weir/nginx_qps weir/nginx_p50 weir/nginx_p99
awk -v d="$dq" -v w="$wq" -v n="$nq" -v w50="$w50" -v n50="$n50" -v w99="$w99" -v n99="$n99" \
    'BEGIN {printf "%16.2f %15.2f %13.2f %13.2f\n", w/d, w/n, w50/n50, w99/n99}'

# Memory per flow: FLOWS client sockets each open one flow (a query and its answer) and
# keep it; weir's resident memory before and after. Each flow also holds a kernel socket
# (one file descriptor, its buffers charged to the kernel, not to weir's RSS).
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$WEIR_PID/status"; }
active_flows() {
    curl -sf http://127.42.0.1:10256/metrics |
        awk '/^weir_udp_flows_active\{service="default\/dns:dns"/ {n += $NF} END {print n + 0}'
}
sleep 31   # the flows of the runs above end (proxy.udp_timeout)
before=$(rss_kib)
before_flows=$(active_flows)
python3 - "$FLOWS" <<'PY' &
import socket, sys, time
flows, sockets = int(sys.argv[1]), []
query = bytes.fromhex("123401000001000000000000076578616d706c6503636f6d0000010001")
for n in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect(("127.42.0.10", 53))
    s.send(query)
    try:
        s.recv(512)
    except OSError:
        pass
    sockets.append(s)
time.sleep(20)
PY
holder=$!
for _ in $(seq 1 600); do
    [ "$(active_flows)" -ge $((before_flows + FLOWS * 95 / 100)) ] && break
    sleep 0.1
done
after=$(rss_kib)
after_flows=$(active_flows)
kill $holder 2>/dev/null || true
awk -v f=$((after_flows - before_flows)) -v b="$before" -v a="$after" \
    'BEGIN {printf "\nflows: %d open; weir RSS %d -> %d KiB: %.2f KiB per flow (plus one socket each in the kernel)\n", f, b, a, f ? (a - b) / f : 0}'
