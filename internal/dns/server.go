package dns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// TCP limits: a client gets this long per message and this many queries per
// connection before the server closes it.
const (
	tcpTimeout    = 5 * time.Second
	tcpIdle       = 10 * time.Second
	tcpMaxQueries = 1024
)

// Server is the DNS server: the handler of NewHandler on UDP and TCP.
type Server struct {
	addr     net.Addr
	udp, tcp *dns.Server

	closeOnce sync.Once
	closeErr  error
	done      chan struct{} // closed when both serve loops returned
}

// Start serves cfg.Zone from src on cfg.Addr, UDP and TCP, until ctx is done
// or Close is called. With port 0 both get the same free port.
func Start(ctx context.Context, cfg Config, src Source) (*Server, error) {
	h, err := NewHandler(src, cfg)
	if err != nil {
		return nil, err
	}
	cfg, _ = cfg.withDefaults()
	pc, l, err := listen(cfg.Addr)
	if err != nil {
		return nil, err
	}
	s := &Server{
		addr: pc.LocalAddr(),
		done: make(chan struct{}),
	}
	started := make(chan struct{}, 2)
	notify := func() { started <- struct{}{} }
	s.udp = &dns.Server{
		PacketConn:        pc,
		Handler:           h,
		UDPSize:           maxUDPSize, // read buffer for queries
		MsgAcceptFunc:     accept,
		NotifyStartedFunc: notify,
	}
	s.tcp = &dns.Server{
		Listener:          l,
		Handler:           h,
		MsgAcceptFunc:     accept,
		ReadTimeout:       tcpTimeout,
		WriteTimeout:      tcpTimeout,
		IdleTimeout:       func() time.Duration { return tcpIdle },
		MaxTCPQueries:     tcpMaxQueries,
		NotifyStartedFunc: notify,
	}
	errc := make(chan error, 2)
	var wg sync.WaitGroup
	for _, srv := range []*dns.Server{s.udp, s.tcp} {
		wg.Go(func() { errc <- srv.ActivateAndServe() })
	}
	go func() { wg.Wait(); close(s.done) }()
	for range 2 {
		select {
		case <-started:
		case err := <-errc:
			// A serve loop ended before starting: give up on both.
			pc.Close()
			l.Close()
			_ = s.udp.Shutdown()
			_ = s.tcp.Shutdown()
			<-s.done
			return nil, fmt.Errorf("dns: serving on %s: %w", cfg.Addr, err)
		}
	}
	go func() {
		select {
		case <-ctx.Done():
			s.Close()
		case <-s.done:
		}
	}()
	return s, nil
}

// accept is the servers' first look at a query, before it is unpacked: it
// drops responses and leaves all other checks to the handler's validate
// stage. A query that does not unpack gets FORMERR from the server;
// anything shorter than a header is dropped.
func accept(h dns.Header) dns.MsgAcceptAction {
	const qr = 1 << 15
	if h.Bits&qr != 0 {
		return dns.MsgIgnore
	}
	return dns.MsgAccept
}

// listen opens UDP and TCP on addr, on the same port if addr's is 0.
func listen(addr string) (net.PacketConn, net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("dns: address %q: %w", addr, err)
	}
	for range 10 {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return nil, nil, fmt.Errorf("dns: %w", err)
		}
		bound := strconv.Itoa(pc.LocalAddr().(*net.UDPAddr).Port)
		l, err := net.Listen("tcp", net.JoinHostPort(host, bound))
		if err == nil {
			return pc, l, nil
		}
		pc.Close()
		if port != "0" {
			return nil, nil, fmt.Errorf("dns: %w", err)
		}
		// The free UDP port was taken for TCP: try another one.
	}
	return nil, nil, errors.New("dns: no port free for both UDP and TCP")
}

// Addr is the address the server listens on, UDP and TCP.
func (s *Server) Addr() string { return s.addr.String() }

// Close stops the server, waiting up to 5s for queries being answered.
// Calling it again does nothing and returns the same error.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.closeErr = errors.Join(s.udp.ShutdownContext(ctx), s.tcp.ShutdownContext(ctx))
		select {
		case <-s.done:
		case <-ctx.Done():
		}
	})
	return s.closeErr
}
