#!/usr/bin/env bash
# Bounded loopback load test of `upstream serve`.
#
# Starts a server on 127.0.0.1 (a free port) over $UPSTREAM_HOME, creates one sandbox,
# warms it up, then measures:
#   - exec latency: REQUESTS sequential `true` commands, p50 and p99;
#   - exec throughput: REQUESTS commands spread over CONCURRENCY keep-alive connections;
#   - the reference in the same run: GET /healthz latency and throughput, which is the
#     server's HTTP cost without a guest.
# The sandbox is destroyed and the server stopped with SIGTERM at the end.
#
# Usage: UPSTREAM_HOME=/path/to/prepared/home scripts/load-test.sh [REQUESTS] [CONCURRENCY]
# Needs a data directory prepared by `upstream setup` and a built `upstream` binary
# (target/release/upstream, else target/debug/upstream, else UPSTREAM_BIN).
set -euo pipefail
cd "$(dirname "$0")/.."

requests=${1:-200}
concurrency=${2:-4}
if (( requests < 1 || requests > 5000 || concurrency < 1 || concurrency > 32 )); then
  echo "load-test: use 1 to 5000 requests and a concurrency of 1 to 32" >&2
  exit 2
fi
bin=${UPSTREAM_BIN:-}
if [[ -z $bin ]]; then
  for candidate in target/release/upstream target/debug/upstream; do
    [[ -x $candidate ]] && { bin=$candidate; break; }
  done
fi
[[ -n $bin ]] || { echo "load-test: build upstream first (cargo build -p upstream-cli)" >&2; exit 2; }
: "${UPSTREAM_HOME:?set UPSTREAM_HOME to a data directory prepared by upstream setup}"

log=$(mktemp)
"$bin" serve --listen 127.0.0.1:0 2>"$log" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT

url=
for _ in $(seq 300); do
  url=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$log" | head -n1)
  [[ -n $url ]] && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
[[ -n $url ]] || { echo "load-test: the server did not start" >&2; cat "$log" >&2; exit 1; }

python3 - "$url" "$requests" "$concurrency" <<'PYTHON'
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

url, requests, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
address = urllib.parse.urlsplit(url)


def connect():
    return http.client.HTTPConnection(address.hostname, address.port, timeout=120)


def call(connection, method, path, body=None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    data = json.dumps(body).encode() if body is not None else None
    connection.request(method, path, body=data, headers=headers)
    response = connection.getresponse()
    payload = response.read()
    if response.status >= 300:
        raise SystemExit(f"{method} {path} failed: {response.status} {payload[:200]!r}")
    return json.loads(payload) if payload else None


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def sequential(method, path, body):
    connection = connect()
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        call(connection, method, path, body)
        latencies.append(time.perf_counter() - started)
    return latencies


def parallel(method, path, body):
    counts = [requests // concurrency + (1 if i < requests % concurrency else 0)
              for i in range(concurrency)]

    def worker(count):
        connection = connect()
        for _ in range(count):
            call(connection, method, path, body)

    threads = [threading.Thread(target=worker, args=(count,)) for count in counts]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return requests / (time.perf_counter() - started)


control = connect()
boot_started = time.perf_counter()
sandbox = call(control, "POST", "/v1/sandboxes", {"metadata": {"purpose": "load-test"}})
create_secs = time.perf_counter() - boot_started
exec_path = f"/v1/sandboxes/{sandbox['id']}/exec"
exec_body = {"command": ["true"]}
for _ in range(10):
    call(control, "POST", exec_path, exec_body)

rows = []
for name, method, path, body in [
    ("GET /healthz (reference)", "GET", "/healthz", None),
    ("POST exec `true`", "POST", exec_path, exec_body),
]:
    latencies = sequential(method, path, body)
    throughput = parallel(method, path, body)
    rows.append((name, statistics.median(latencies), percentile(latencies, 0.99), throughput))

call(control, "DELETE", f"/v1/sandboxes/{sandbox['id']}")

print(f"requests per measurement: {requests}, concurrency: {concurrency}")
print(f"sandbox create (cold boot): {create_secs * 1000:.0f} ms")
print(f"{'request':<28} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
for name, p50, p99, throughput in rows:
    print(f"{name:<28} {p50 * 1000:>8.2f} {p99 * 1000:>8.2f} {throughput:>8.1f}")
reference, execs = rows
print(f"exec p50 / healthz p50: {execs[1] / reference[1]:.1f}x; "
      f"healthz req/s / exec req/s: {reference[3] / execs[3]:.1f}x")
PYTHON
