package network

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// bridgeNFDir holds br_netfilter's switches for the current network
// namespace; they exist only while the module is loaded.
var bridgeNFDir = "/proc/sys/net/bridge"

// bridgeNFKeys are the switches that send bridged frames through the IP,
// IPv6 and ARP hooks of netfilter.
var bridgeNFKeys = []string{"bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"}

// bridgeNFSaved is the file, under the manager's data dir, that keeps the
// values found before berth turned the switches off.
const bridgeNFSaved = "bridge-nf.saved"

// bridgeNetfilterOff turns br_netfilter's switches off in this network
// namespace. berth needs none of them: isolation and masquerade act on
// routed traffic, and published ports SNAT their hairpin traffic (portmap
// "snat"). With them on, every frame switched inside a network also
// passes the IP hooks, which costs about 5% of a bridge's throughput
// (bench/network). The values found are saved in dir once, so that
// RestoreBridgeNetfilter can put them back.
func bridgeNetfilterOff(dir string, log *slog.Logger) error {
	var saved strings.Builder
	var errs []error
	for _, k := range bridgeNFKeys {
		p := filepath.Join(bridgeNFDir, k)
		v, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue // br_netfilter is not loaded: nothing passes the hooks
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		v = bytes.TrimSpace(v)
		fmt.Fprintf(&saved, "%s=%s\n", k, v)
		if string(v) == "0" {
			continue
		}
		if err := os.WriteFile(p, []byte("0"), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("turn off net.bridge.%s: %w", k, err))
			continue
		}
		log.Info("network: turned off net.bridge."+k+" (berth's rules do not need it and it slows bridged traffic; the agent's --keep-bridge-netfilter leaves it)", "was", string(v))
	}
	if saved.Len() > 0 {
		f := filepath.Join(dir, bridgeNFSaved)
		if _, err := os.Stat(f); errors.Is(err, fs.ErrNotExist) {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				errs = append(errs, err)
			} else if err := os.WriteFile(f, []byte(saved.String()), 0o600); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// RestoreBridgeNetfilter puts back the br_netfilter switches that the
// manager whose data dir is dataDir found before turning them off.
func RestoreBridgeNetfilter(dataDir string) error {
	f := filepath.Join(dataDir, "cni", bridgeNFSaved)
	b, err := os.ReadFile(f)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok || !slices.Contains(bridgeNFKeys, k) || (v != "0" && v != "1") {
			continue
		}
		p := filepath.Join(bridgeNFDir, k)
		if _, err := os.Stat(p); err != nil {
			continue // the module went away
		}
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore net.bridge.%s: %w", k, err))
		}
	}
	if len(errs) == 0 {
		errs = append(errs, os.Remove(f))
	}
	return errors.Join(errs...)
}
