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

echo "== fuzz smoke (10s each)"
for f in $(grep -ho '^func Fuzz[A-Za-z0-9]*' api/*_test.go 2>/dev/null | sed 's/func //'); do
  go test ./api/ -run '^$' -fuzz "^$f\$" -fuzztime 10s >/dev/null
done

echo "== end-to-end tests"
BERTH_BIN="$(pwd)/bin/berth" go test -count=1 -timeout 20m ./e2e/...

echo "== leak check"
left=$(ip netns list 2>/dev/null | grep -c '^berthe2e-' || true)
if [ "$left" != 0 ]; then echo "tests left $left network namespaces behind" >&2; ip netns list >&2; exit 1; fi
echo "all tests passed"
