package dns

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func startTestServer(t *testing.T) (*Server, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s, err := Start(ctx, Config{Addr: "127.0.0.1:0"}, testSource())
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s, cancel
}

func exchange(t *testing.T, net, addr string, q *dns.Msg) *dns.Msg {
	t.Helper()
	c := &dns.Client{Net: net, Timeout: 2 * time.Second}
	r, _, err := c.Exchange(q, addr)
	if err != nil {
		t.Fatalf("%s: %v", net, err)
	}
	return r
}

func TestServer(t *testing.T) {
	s, _ := startTestServer(t)
	addr := s.Addr()
	if _, port, _ := net.SplitHostPort(addr); port == "0" {
		t.Fatalf("Addr() = %s", addr)
	}

	for _, proto := range []string{"udp", "tcp"} {
		r := exchange(t, proto, addr, question("web.svc.berth.", dns.TypeA))
		if r.Rcode != dns.RcodeSuccess || !r.Authoritative || len(r.Answer) != 4 {
			t.Errorf("%s: A web: %v", proto, r)
		}
		r = exchange(t, proto, addr, question("_http._tcp.web.svc.berth.", dns.TypeSRV))
		if len(r.Answer) != 3 || len(r.Extra) != 4 {
			t.Errorf("%s: SRV: %v", proto, r)
		}
		r = exchange(t, proto, addr, question("nope.svc.berth.", dns.TypeA))
		if r.Rcode != dns.RcodeNameError || len(r.Ns) != 1 {
			t.Errorf("%s: NXDOMAIN: %v", proto, r)
		}
		r = exchange(t, proto, addr, question("example.com.", dns.TypeA))
		if r.Rcode != dns.RcodeRefused {
			t.Errorf("%s: outside: %v", proto, r)
		}
	}

	// Truncated over UDP, whole over TCP.
	r := exchange(t, "udp", addr, question("big.svc.berth.", dns.TypeA))
	if !r.Truncated || len(r.Answer) >= 100 {
		t.Errorf("UDP: TC %v, %d answers", r.Truncated, len(r.Answer))
	}
	r = exchange(t, "tcp", addr, question("big.svc.berth.", dns.TypeA))
	if r.Truncated || len(r.Answer) != 100 {
		t.Errorf("TCP: TC %v, %d answers", r.Truncated, len(r.Answer))
	}
}

// Malformed messages get FORMERR or nothing, and the server lives on.
func TestServerMalformed(t *testing.T) {
	s, _ := startTestServer(t)
	conn, err := net.Dial("udp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	noQuestion, _ := new(dns.Msg).Pack()
	var header [12]byte
	header[0], header[1] = 0xbe, 0xef
	header[5] = 1 // one question, which isn't there
	for _, tt := range []struct {
		name    string
		b       []byte
		formerr bool // an answer must come, FORMERR
	}{
		{"no question", noQuestion, true},
		{"missing question", header[:], true},
		{"garbage", []byte("\x12\x34this is no DNS message at all\xff\xff\xff\xff"), false},
		{"short", []byte{1, 2, 3}, false},
		{"empty", nil, false},
	} {
		if _, err := conn.Write(tt.b); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		buf := make([]byte, 512)
		n, err := conn.Read(buf)
		if err != nil {
			if tt.formerr {
				t.Errorf("%s: no answer: %v", tt.name, err)
			}
			continue
		}
		r := new(dns.Msg)
		if err := r.Unpack(buf[:n]); err != nil {
			t.Errorf("%s: answer does not unpack: %v", tt.name, err)
			continue
		}
		if r.Rcode != dns.RcodeFormatError {
			t.Errorf("%s: rcode %s, want FORMERR", tt.name, dns.RcodeToString[r.Rcode])
		}
	}

	// Still serving.
	r := exchange(t, "udp", s.Addr(), question("web.svc.berth.", dns.TypeA))
	if len(r.Answer) != 4 {
		t.Errorf("after garbage: %v", r)
	}
}

func TestServerStopsWithContext(t *testing.T) {
	s, cancel := startTestServer(t)
	cancel()
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		t.Fatal("server still running after its context ended")
	}
	c := &dns.Client{Net: "tcp", Timeout: 500 * time.Millisecond}
	if _, _, err := c.Exchange(question("web.svc.berth.", dns.TypeA), s.Addr()); err == nil {
		t.Error("stopped server answered over TCP")
	}
}

func TestStartFails(t *testing.T) {
	s, _ := startTestServer(t)
	if _, err := Start(context.Background(), Config{Addr: s.Addr()}, testSource()); err == nil {
		t.Error("second server on the same address started")
	}
	if _, err := Start(context.Background(), Config{Addr: "nonsense"}, testSource()); err == nil {
		t.Error("bad address accepted")
	}
	if _, err := Start(context.Background(), Config{Addr: "127.0.0.1:0", Zone: ".."}, testSource()); err == nil {
		t.Error("bad zone accepted")
	}
}
