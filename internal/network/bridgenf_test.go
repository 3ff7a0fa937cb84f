package network

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
)

func TestBridgeNetfilterOffAndRestore(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tc := range []struct {
		name  string
		found map[string]string // switch -> value before; absent: no such file
		saved string
	}{
		{name: "module not loaded", found: nil, saved: ""},
		{name: "all on", found: map[string]string{"bridge-nf-call-iptables": "1", "bridge-nf-call-ip6tables": "1", "bridge-nf-call-arptables": "1"},
			saved: "bridge-nf-call-iptables=1\nbridge-nf-call-ip6tables=1\nbridge-nf-call-arptables=1\n"},
		{name: "mixed", found: map[string]string{"bridge-nf-call-iptables": "1", "bridge-nf-call-ip6tables": "0", "bridge-nf-call-arptables": "0"},
			saved: "bridge-nf-call-iptables=1\nbridge-nf-call-ip6tables=0\nbridge-nf-call-arptables=0\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proc, data := t.TempDir(), t.TempDir()
			old := bridgeNFDir
			bridgeNFDir = proc
			t.Cleanup(func() { bridgeNFDir = old })
			for k, v := range tc.found {
				if err := os.WriteFile(filepath.Join(proc, k), []byte(v+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			state := filepath.Join(data, "cni")
			if err := bridgeNetfilterOff(state, quiet); err != nil {
				t.Fatal(err)
			}
			for k := range tc.found {
				if b, _ := os.ReadFile(filepath.Join(proc, k)); string(b) != "0" && string(b) != "0\n" {
					t.Errorf("%s = %q after turning off, want 0", k, b)
				}
			}
			b, _ := os.ReadFile(filepath.Join(state, bridgeNFSaved))
			if string(b) != tc.saved {
				t.Errorf("saved %q, want %q", b, tc.saved)
			}
			// A second run (agent restart) keeps what was first found.
			if err := bridgeNetfilterOff(state, quiet); err != nil {
				t.Fatal(err)
			}
			if b2, _ := os.ReadFile(filepath.Join(state, bridgeNFSaved)); string(b2) != tc.saved {
				t.Errorf("saved after a restart %q, want %q", b2, tc.saved)
			}
			if err := RestoreBridgeNetfilter(data); err != nil {
				t.Fatal(err)
			}
			for k, v := range tc.found {
				if b, _ := os.ReadFile(filepath.Join(proc, k)); string(b) != v {
					t.Errorf("%s = %q after restore, want %q", k, b, v)
				}
			}
			if _, err := os.Stat(filepath.Join(state, bridgeNFSaved)); !os.IsNotExist(err) {
				t.Errorf("saved file left after restore: %v", err)
			}
		})
	}
}
