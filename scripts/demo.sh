#!/usr/bin/env bash
# Brings up berth on this machine (berth dev: server, embedded etcd and an
# agent, on loopback) and runs the demo end to end. Leaves berth running;
# `scripts/demo.sh stop` stops it and removes its containers and data.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
state="$top/.berth"
export BERTH_ADDR="${BERTH_ADDR:-127.0.0.1:7480}"
berth="$top/bin/berth"

stop() {
  if [ -f "$state/dev.pid" ]; then
    pid=$(cat "$state/dev.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "berth dev (pid $pid) stopped"
    fi
    rm -f "$state/dev.pid"
  fi
  # Containers and the runtime outlive berth by design; the demo removes them,
  # then its data (the log stays in .berth/dev.log).
  if [ -d "$state/data" ] && [ -x "$berth" ]; then
    "$berth" agent cleanup --data-dir "$state/data" >/dev/null && echo "demo containers and runtime removed"
    if ! grep -q " $state/data" /proc/self/mountinfo; then
      rm -rf "$state/data" "$state/demo-image.tar"
    fi
  fi
}
if [ "${1:-}" = stop ]; then stop; exit 0; fi

./scripts/install.sh
stop
rm -rf "$state/data"   # each demo starts from a fresh berth
mkdir -p "$state"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

# --keep-bridge-netfilter: a try-out leaves the host's br_netfilter switches
# as they are (README, "Networks").
"$berth" dev --data-dir "$state/data" --api-addr "$BERTH_ADDR" --dns-addr 127.0.0.1:5353 --keep-bridge-netfilter >"$state/dev.out" 2>"$state/dev.log" &
echo $! >"$state/dev.pid"
for _ in $(seq 200); do
  grep -q "ready in" "$state/dev.out" 2>/dev/null && break
  kill -0 "$(cat "$state/dev.pid")" 2>/dev/null || { cat "$state/dev.log" >&2; exit 1; }
  sleep 0.05
done
cat "$state/dev.out"

step berth node ls
"$berth" node ls
step berth node ls -o json
"$berth" node ls -o json
step berth network create demo --subnet 10.90.0.0/24
"$berth" network create demo --subnet 10.90.0.0/24 2>/dev/null || "$berth" network inspect demo
step "go run ./hack/mkimage  (a tiny OCI image from this machine's static busybox)"
go run ./hack/mkimage -o "$state/demo-image.tar" -ref localhost/berth-demo:1 \
  -file "/www/index.html=hello from a berth container"
step berth image import .berth/demo-image.tar
"$berth" image import "$state/demo-image.tar"
step "berth run hello --image localhost/berth-demo:1 --replicas 2 --network demo --memory 32Mi -- sh -c '...httpd...'"
"$berth" run hello --image localhost/berth-demo:1 --replicas 2 --network demo --memory 32Mi \
  -- sh -c 'echo "hello from $(hostname)"; exec httpd -f -p 8080 -h /www'
step "berth ps -o wide   (each instance's VNIC: network=IP/MAC)"
"$berth" ps -o wide
id=$("$berth" ps -o json | sed -n 's/^    "id": "\(.*\)",$/\1/p' | head -1)
other=$("$berth" ps -o json | sed -n 's/^    "id": "\(.*\)",$/\1/p' | sed -n 2p)
otherip=$("$berth" inspect "$other" -o json | sed -n 's/^        "ip": "\(.*\)"$/\1/p' | head -1)
step "berth network inspect demo"
"$berth" network inspect demo
step "berth exec $id -- wget -q -O - http://$otherip:8080/index.html   (one instance calls the other over the demo network)"
"$berth" exec "$id" -- wget -q -O - "http://$otherip:8080/index.html"; echo
step "berth discover hello   (every running instance is an endpoint)"
"$berth" discover hello
step "dig @127.0.0.1 -p 5353 +short hello.svc.berth   (berth's DNS)"
dig @127.0.0.1 -p 5353 +short hello.svc.berth || true
step "berth exec $id -- nslookup hello.svc.berth   (containers resolve names through their network's gateway)"
"$berth" exec "$id" -- nslookup hello.svc.berth || true
step "berth logs $id"
"$berth" logs "$id"
step "berth exec $id -- wget -q -O - http://127.0.0.1:8080/index.html"
"$berth" exec "$id" -- wget -q -O - http://127.0.0.1:8080/index.html; echo
step "cat /sys/fs/cgroup/memory/berth/$id/memory.limit_in_bytes   (the cgroup limit: 32Mi)"
cat "/sys/fs/cgroup/memory/berth/$id/memory.limit_in_bytes"
step berth apply -f examples/web.yaml
"$berth" apply -f examples/web.yaml
step berth service ls
"$berth" service ls

# Discovery of web (examples/web.yaml): 3 instances behind an HTTP check.
for _ in $(seq 150); do
  [ "$("$berth" discover web --healthy -o json | grep -c '^    "id": ')" -ge 3 ] && break
  sleep 0.2
done
step "berth discover web --healthy   (the instances passing their HTTP check)"
"$berth" discover web --healthy
step "go run ./examples/client web   (the Go client's Discoverer: round robin over web's healthy instances)"
go run ./examples/client web
step "curl 'http://$BERTH_ADDR/v1/prometheus/targets?service=web'   (Prometheus's HTTP service discovery)"
curl -s "http://$BERTH_ADDR/v1/prometheus/targets?service=web" | sed 's/},{"targets"/},\n{"targets"/g'
victim=$("$berth" discover web --healthy -o json | sed -n 's/^    "id": "\(.*\)",$/\1/p' | head -1)
victimip=$("$berth" inspect "$victim" -o json | sed -n 's/^        "ip": "\(.*\)"$/\1/p' | head -1)
step "kill -9 \$(cat /sys/fs/cgroup/pids/berth/$victim/cgroup.procs)   (the processes of $victim die)"
kill -9 $(cat "/sys/fs/cgroup/pids/berth/$victim/cgroup.procs")
for _ in $(seq 50); do
  "$berth" discover web --healthy -o json | grep -q "\"$victim\"" || break
  sleep 0.1
done
step "berth discover web   ($victim is critical at once: out of the healthy view, DNS and the clients)"
"$berth" discover web
step "dig @127.0.0.1 -p 5353 +short web.svc.berth   (no $victimip)"
dig @127.0.0.1 -p 5353 +short web.svc.berth || true
step "go run ./examples/client web   (the client only calls the live instances)"
go run ./examples/client web
# Its restart policy (always) starts it again after a back-off; its check
# then passes and it is back in every view.
for _ in $(seq 150); do
  "$berth" discover web --healthy -o json | grep -q "\"$victim\"" && break
  sleep 0.2
done
step "berth ps   ($victim restarted by its policy: RESTARTS 1, same address)"
"$berth" ps
step "dig @127.0.0.1 -p 5353 +short web.svc.berth   ($victimip is back)"
dig @127.0.0.1 -p 5353 +short web.svc.berth || true
step "berth scale web 5   (horizontal scaling)"
"$berth" scale web 5
step "berth rollout status web   (waits until the 5 are healthy)"
"$berth" rollout status web
step "berth apply   (VERSION v2: a rolling update, one new instance at a time, each gated on its check)"
sed -e 's/VERSION: v1/VERSION: v2/' -e 's/replicas: 3/replicas: 5/' examples/web.yaml | "$berth" apply -f -
step "berth rollout status web   (progress until every instance runs the new generation)"
"$berth" rollout status web
step "berth rollout history web"
"$berth" rollout history web
step "berth scale web 2   (scale down: the unhealthiest, then the newest, go first)"
"$berth" scale web 2
"$berth" rollout status web
"$berth" ps
step "berth apply -f - (a bad spec is refused, naming the field)"
printf 'name: web\nimage: busybox:1\nreplicas: -1\n' | "$berth" apply -f - || true

printf '\nberth dev is running (pid %s, API http://%s, log %s).\n' "$(cat "$state/dev.pid")" "$BERTH_ADDR" "$state/dev.log"
printf 'Try: bin/berth node inspect %s   |   Stop it: scripts/demo.sh stop\n' "$("$berth" node ls -o json | sed -n 's/^    "name": "\(.*\)",$/\1/p' | head -1)"
