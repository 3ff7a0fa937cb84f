#!/usr/bin/env bash
# Installs what berth needs on Debian 12 (as root), pinned, and builds bin/berth.
# Safe to run again: it installs only what is missing or at another version.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="/usr/local/go/bin:$PATH"
export PATH="$(go env GOPATH 2>/dev/null || echo /root/go)/bin:$PATH"

STATICCHECK_VERSION=v0.8.2   # honnef.co/go/tools; supports Go 1.26
CONTAINERD_VERSION=v2.4.2    # containerd and its runc shim, built from the Go module proxy
GO_MIN=1.26

log() { printf 'install: %s\n' "$*"; }

if ! command -v go >/dev/null; then
  echo "install: Go $GO_MIN or newer is required (expected at /usr/local/go)" >&2
  exit 1
fi
gov=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$GO_MIN" "$gov" | sort -V | head -1)" != "$GO_MIN" ]; then
  echo "install: Go $GO_MIN or newer is required, found $gov" >&2
  exit 1
fi

# Debian packages, by the command each provides.
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
command -v curl >/dev/null || need+=(curl)
command -v runc >/dev/null || need+=(runc)                       # the OCI runtime (1.1.x)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)  # static busybox for test and demo images
command -v docker-registry >/dev/null || need+=(docker-registry) # a real registry for pull tests
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins) # bridge, host-local, portmap (1.1.x)
command -v iptables >/dev/null || need+=(iptables)               # portmap's rules
command -v nft >/dev/null || need+=(nftables)                    # to inspect berth's table
command -v iperf3 >/dev/null || need+=(iperf3)                   # network benchmarks
command -v dig >/dev/null || need+=(bind9-dnsutils)              # DNS tests
command -v prometheus >/dev/null || need+=(prometheus)           # e2e: a stock Prometheus discovers berth's services
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install: run as root to install ${need[*]}" >&2
    exit 1
  fi
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # docker-registry's package would start a system-wide registry on :5000;
  # berth's tests start their own, inside test namespaces.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# containerd v2 and its runc shim, pinned, built from the Go module proxy.
if ! containerd --version 2>/dev/null | grep -q " ${CONTAINERD_VERSION#v}" || ! command -v containerd-shim-runc-v2 >/dev/null; then
  log "go install containerd $CONTAINERD_VERSION (takes a minute or two)"
  GOBIN=/usr/local/bin go install \
    "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
fi

# Go tools, pinned.
if ! staticcheck -version 2>/dev/null | grep -q "${STATICCHECK_VERSION#v}"; then
  log "go install staticcheck@$STATICCHECK_VERSION"
  go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION"
fi

log "go mod download"
go mod download
log "building bin/berth"
mkdir -p bin
go build -o bin/berth ./cmd/berth
log "done: $(bin/berth --version)"
