#!/usr/bin/env bash
# Runs berth's whole test suite: install, static checks, unit tests, fuzz
# smoke runs and end-to-end tests (as root: they make network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
export PATH="/usr/local/go/bin:$(go env GOPATH)/bin:$PATH"

echo "== static checks"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then echo "gofmt would change: $unformatted" >&2; exit 1; fi
go vet ./...
staticcheck ./...

echo "== unit tests"
go test -count=1 -race $(go list ./... | grep -v /e2e)

# A count, not a duration: Go 1.26's fuzz coordinator can fail a run at a
# -fuzztime deadline with "context deadline exceeded" and no finding
# (golang/go#75804, fixed in 1.27).
echo "== fuzz smoke (300,000 inputs each)"
for f in $(grep -ho '^func Fuzz[A-Za-z0-9]*' api/*_test.go 2>/dev/null | sed 's/func //'); do
  if ! out=$(go test ./api/ -run '^$' -fuzz "^$f\$" -fuzztime 300000x 2>&1); then
    echo "fuzz $f failed:" >&2; echo "$out" | tail -40 >&2; exit 1
  fi
done

echo "== end-to-end tests"
BERTH_BIN="$(pwd)/bin/berth" go test -count=1 -timeout 20m ./e2e/...

echo "== leak check"
leaks=0
left=$(ip netns list 2>/dev/null | grep -c '^berthe2e-' || true)
if [ "$left" != 0 ]; then echo "tests left $left network namespaces behind" >&2; ip netns list >&2; leaks=1; fi
# Live (not zombie) runtime processes of test data dirs.
for p in /proc/[0-9]*; do
  [ "$(awk '{print $3}' "$p/stat" 2>/dev/null)" = Z ] && continue
  cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
  case "$cmd" in
    *containerd*--config\ /tmp/*|*containerd-shim*/run/berth-*) echo "left running: ${p#/proc/} $cmd" >&2; leaks=1 ;;
  esac
done
if grep -q ' /tmp/Test' /proc/self/mountinfo; then echo "tests left mounts:" >&2; grep ' /tmp/Test' /proc/self/mountinfo >&2; leaks=1; fi
if ls -d /run/berth-* >/dev/null 2>&1 && [ ! -f .berth/dev.pid ]; then echo "left: $(ls -d /run/berth-*)" >&2; leaks=1; fi
if [ ! -f .berth/dev.pid ]; then
  for c in /sys/fs/cgroup/berth /sys/fs/cgroup/*/berth; do
    [ -d "$c" ] && { echo "left a container cgroup: $c" >&2; leaks=1; break; }
  done
fi
[ "$leaks" = 0 ] || exit 1
echo "all tests passed"
