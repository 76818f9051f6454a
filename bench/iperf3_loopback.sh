# shellcheck shell=bash
# Sourced by bench/*_vs_iperf3.sh: the network baseline measured in the same
# run. measure_iperf3 runs one iperf3 stream on 127.0.0.1 for 5 s (server on
# $IPERF_PORT, default a free port), then sets
#   iperf_bps  received bits per second
#   iperf_cpu  CPU seconds per GB carried (sender + receiver)
# and prints them. iperf3_cleanup kills a server left behind (call it from
# the script's EXIT trap).
iperf_pid=""

iperf3_cleanup() {
  if [ -n "$iperf_pid" ] && kill -0 "$iperf_pid" 2>/dev/null; then
    kill "$iperf_pid" 2>/dev/null || true
    wait "$iperf_pid" 2>/dev/null || true
  fi
  iperf_pid=""
}

measure_iperf3() {
  local port json err
  port="${IPERF_PORT:-$(python3 -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}"
  echo "== iperf3, 1 stream on 127.0.0.1, 5 s"
  iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
  iperf_pid=$!
  json=""
  err=""
  for _ in $(seq 1 50); do  # the server needs a moment to listen
    if json="$(iperf3 -c 127.0.0.1 -p "$port" -t 5 -J 2>/dev/null)" &&
       echo "$json" | python3 -c '
import json, sys
sys.exit(0 if "sum_received" in json.load(sys.stdin).get("end", {}) else 1)
' 2>/dev/null; then
      break
    fi
    err="$json"
    json=""
    sleep 0.1
  done
  for _ in $(seq 1 50); do
    kill -0 "$iperf_pid" 2>/dev/null || break
    sleep 0.1
  done
  iperf3_cleanup
  if [ -z "$json" ]; then
    echo "iperf3 -c 127.0.0.1 -p $port failed:" >&2
    echo "$err" | tail -n 20 >&2
    return 1
  fi
  read -r iperf_bps iperf_cpu < <(echo "$json" | python3 -c '
import json, sys
end = json.load(sys.stdin)["end"]
r, cpu = end["sum_received"], end["cpu_utilization_percent"]
cpu_s = (cpu["host_total"] + cpu["remote_total"]) / 100 * r["seconds"]
print(r["bits_per_second"], cpu_s / (r["bytes"] / 1e9))')
  awk -v b="$iperf_bps" -v c="$iperf_cpu" 'BEGIN {
    printf "iperf3: %.2f GB/s (%.2f Gbit/s); cpu s/GB (sender + receiver): %.2f\n",
           b / 8e9, b / 1e9, c }'
}
