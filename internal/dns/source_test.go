package dns

import (
	"maps"
	"reflect"
	"testing"

	"github.com/berth-dev/berth/api"
	"github.com/miekg/dns"
)

// TestHandlerLeavesSourceSlices: the server's Source hands out the slices
// of its index, shared by every query; the handler must never change them
// (nor the endpoints' maps), whatever it is asked.
func TestHandlerLeavesSourceSlices(t *testing.T) {
	src := testSource()
	want := map[string][]api.Endpoint{}
	for svc, eps := range src {
		if eps == nil {
			want[svc] = nil
			continue
		}
		cp := make([]api.Endpoint, len(eps))
		for i, ep := range eps {
			cp[i] = ep
			cp[i].Ports = maps.Clone(ep.Ports)
		}
		want[svc] = cp
	}
	h := newTestHandler(t, src)
	names := []string{"web", "web-1.web", "_http._tcp.web", "_tcp.web", "v6", "_dns._udp.v6", "big", "down", "odd", "empty"}
	for range 3 { // answers rotate: ask more than once
		for _, n := range names {
			for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeSRV, dns.TypeANY, dns.TypeTXT} {
				serve(t, h, question(n+".svc.berth.", qt), true)
				serve(t, h, question(n+".svc.berth.", qt), false)
			}
		}
	}
	for svc, eps := range src {
		if !reflect.DeepEqual(eps, want[svc]) {
			t.Fatalf("the handler changed the source's endpoints of %s:\n got %+v\nwant %+v", svc, eps, want[svc])
		}
	}
}
