package api

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func ptr[T any](v T) *T { return &v }

// wantFieldError checks that err is exactly one field error, on field with
// reason.
func wantFieldError(t *testing.T, err error, field, reason string) {
	t.Helper()
	if err == nil {
		t.Errorf("error = nil, want %s: %s", field, reason)
		return
	}
	fe, ok := AsFieldErrors(err)
	if !ok {
		t.Errorf("error = %v (%T), want field errors", err, err)
		return
	}
	if len(fe) != 1 || fe[0].Field != field || fe[0].Reason != reason {
		t.Errorf("errors = %q\nwant     [%q]", fe, FieldError{Field: field, Reason: reason}.Error())
	}
}

type ruleCase[T any] struct {
	name   string
	mutate func(*T)
	field  string
	reason string
}

func TestValidName(t *testing.T) {
	for _, s := range []string{"a", "web", "web-1", "1web", strings.Repeat("a", 63)} {
		if why := ValidName(s); why != "" {
			t.Errorf("ValidName(%q) = %q", s, why)
		}
	}
	for _, s := range []string{"", "Web", "-web", "web-", "web_1", "web.1", "wéb", strings.Repeat("a", 64), "web\n"} {
		if ValidName(s) == "" {
			t.Errorf("ValidName(%q) accepted", s)
		}
	}
	for _, s := range []string{"node-1", "node-1.example.com", "10.0.0.1"} {
		if why := ValidNodeName(s); why != "" {
			t.Errorf("ValidNodeName(%q) = %q", s, why)
		}
	}
	for _, s := range []string{"", "Node", "-node", "node.", "node_1", strings.Repeat("a", 254)} {
		if ValidNodeName(s) == "" {
			t.Errorf("ValidNodeName(%q) accepted", s)
		}
	}
	for _, s := range []string{"a", "web-1", "Web_1.x", "0f9c2d", strings.Repeat("a", 128)} {
		if why := ValidID(s); why != "" {
			t.Errorf("ValidID(%q) = %q", s, why)
		}
	}
	for _, s := range []string{"", "-a", "a-", "a/b", "a b", strings.Repeat("a", 129)} {
		if ValidID(s) == "" {
			t.Errorf("ValidID(%q) accepted", s)
		}
	}
}

func validNodeRegistration() NodeRegistration {
	return NodeRegistration{
		Address:      "10.0.0.1",
		Labels:       map[string]string{"zone": "a", "example.com/disk": "ssd"},
		Capacity:     Resources{CPU: 4000, Memory: 8 << 30},
		Allocatable:  Resources{CPU: 3500, Memory: 7 << 30},
		TTL:          Duration(10 * time.Second),
		AgentVersion: "v0.1.0",
	}
}

func TestNodeRegistrationValidate(t *testing.T) {
	base := validNodeRegistration()
	if err := base.Validate("node-1"); err != nil {
		t.Fatalf("baseline: %v", err)
	}
	for _, mut := range []func(*NodeRegistration){
		func(r *NodeRegistration) { r.TTL = 0 },
		func(r *NodeRegistration) { r.TTL = Duration(2 * time.Second) },
		func(r *NodeRegistration) { r.TTL = Duration(10 * time.Minute) },
		func(r *NodeRegistration) { r.Address = "fd00::1" },
		func(r *NodeRegistration) { r.Labels = nil },
		func(r *NodeRegistration) { r.Allocatable = Resources{} },
		func(r *NodeRegistration) { r.Allocatable = r.Capacity },
	} {
		r := validNodeRegistration()
		mut(&r)
		if err := r.Validate("node-1"); err != nil {
			t.Errorf("%+v: %v", r, err)
		}
	}

	t.Run("name", func(t *testing.T) {
		r := validNodeRegistration()
		wantFieldError(t, r.Validate(""), "name", "is required")
		wantFieldError(t, r.Validate("Node_1"), "name", `"Node_1" is not a node name: lower-case letters, digits, '-' and '.'`)
		wantFieldError(t, r.Validate(strings.Repeat("a", 254)), "name", "must be at most 253 characters")
	})

	tests := []ruleCase[NodeRegistration]{
		{"bad address", func(r *NodeRegistration) { r.Address = "node-1.local" }, "address", `"node-1.local" is not an IP address`},
		{"no address", func(r *NodeRegistration) { r.Address = "" }, "address", `"" is not an IP address`},
		{"bad label key", func(r *NodeRegistration) { r.Labels["-zone"] = "a" }, "labels.-zone", "is not a valid label key: up to 63 letters, digits, '.', '_', '/' and '-'"},
		{"label value newline", func(r *NodeRegistration) { r.Labels["zone"] = "a\nb" }, "labels.zone", "label value must be at most 253 characters, on one line"},
		{"label value too long", func(r *NodeRegistration) { r.Labels["zone"] = strings.Repeat("a", 254) }, "labels.zone", "label value must be at most 253 characters, on one line"},
		{"capacity cpu zero", func(r *NodeRegistration) { r.Capacity.CPU, r.Allocatable.CPU = 0, 0 }, "capacity.cpu", "must be > 0"},
		{"capacity memory zero", func(r *NodeRegistration) { r.Capacity.Memory, r.Allocatable.Memory = 0, 0 }, "capacity.memory", "must be > 0"},
		{"allocatable cpu above capacity", func(r *NodeRegistration) { r.Allocatable.CPU = 4001 }, "allocatable.cpu", "must be between 0 and capacity.cpu"},
		{"allocatable cpu negative", func(r *NodeRegistration) { r.Allocatable.CPU = -1 }, "allocatable.cpu", "must be between 0 and capacity.cpu"},
		{"allocatable memory above capacity", func(r *NodeRegistration) { r.Allocatable.Memory = 9 << 30 }, "allocatable.memory", "must be between 0 and capacity.memory"},
		{"allocatable memory negative", func(r *NodeRegistration) { r.Allocatable.Memory = -1 }, "allocatable.memory", "must be between 0 and capacity.memory"},
		{"ttl too short", func(r *NodeRegistration) { r.TTL = Duration(time.Second) }, "ttl", "must be between 2s and 10m, not 1s"},
		{"ttl too long", func(r *NodeRegistration) { r.TTL = Duration(11 * time.Minute) }, "ttl", "must be between 2s and 10m, not 11m0s"},
		{"ttl negative", func(r *NodeRegistration) { r.TTL = Duration(-time.Second) }, "ttl", "must be between 2s and 10m, not -1s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := validNodeRegistration()
			tt.mutate(&r)
			wantFieldError(t, r.Validate("node-1"), tt.field, tt.reason)
		})
	}
}

func validNetwork() NetworkSpec {
	return NetworkSpec{Name: "backend", Subnet: "10.90.0.0/24", Gateway: "10.90.0.1", Driver: DriverBridge}
}

func TestNetworkNormalize(t *testing.T) {
	tests := []struct {
		in, want NetworkSpec
	}{
		{
			NetworkSpec{Name: "n", Subnet: "10.90.0.0/24"},
			NetworkSpec{Name: "n", Subnet: "10.90.0.0/24", Gateway: "10.90.0.1", Driver: DriverBridge},
		},
		{ // host bits are masked off; the gateway is the first address of the network
			NetworkSpec{Name: "n", Subnet: "10.90.3.77/16", Driver: DriverOverlay},
			NetworkSpec{Name: "n", Subnet: "10.90.0.0/16", Gateway: "10.90.0.1", Driver: DriverOverlay},
		},
		{ // an explicit gateway is kept
			NetworkSpec{Name: "n", Subnet: "192.168.1.0/24", Gateway: "192.168.1.254"},
			NetworkSpec{Name: "n", Subnet: "192.168.1.0/24", Gateway: "192.168.1.254", Driver: DriverBridge},
		},
		{ // an invalid subnet is left for Validate
			NetworkSpec{Name: "n", Subnet: "nope"},
			NetworkSpec{Name: "n", Subnet: "nope", Driver: DriverBridge},
		},
		{
			NetworkSpec{Name: "n"},
			NetworkSpec{Name: "n", Driver: DriverBridge},
		},
	}
	for _, tt := range tests {
		got := tt.in
		got.Normalize()
		if got != tt.want {
			t.Errorf("Normalize(%+v) = %+v, want %+v", tt.in, got, tt.want)
		}
		again := got
		again.Normalize()
		if again != got {
			t.Errorf("Normalize is not idempotent: %+v then %+v", got, again)
		}
	}
}

func TestNetworkValidate(t *testing.T) {
	base := validNetwork()
	if err := base.Validate(); err != nil {
		t.Fatalf("baseline: %v", err)
	}
	for _, n := range []NetworkSpec{
		{Name: "wide", Subnet: "10.0.0.0/8", Gateway: "10.0.0.1", Driver: DriverOverlay},
		{Name: "narrow", Subnet: "10.0.0.8/29", Gateway: "10.0.0.14", Driver: DriverBridge},
		{Name: "n", Subnet: "10.90.0.0/24", Gateway: "10.90.0.254", Driver: DriverBridge},
	} {
		if err := n.Validate(); err != nil {
			t.Errorf("%+v: %v", n, err)
		}
	}

	tests := []ruleCase[NetworkSpec]{
		{"no name", func(n *NetworkSpec) { n.Name = "" }, "name", "is required"},
		{"name not a DNS label", func(n *NetworkSpec) { n.Name = "Back_End" }, "name", `"Back_End" is not a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit`},
		{"name too long", func(n *NetworkSpec) { n.Name = strings.Repeat("n", 64) }, "name", "must be at most 63 characters"},
		{"name reserved", func(n *NetworkSpec) { n.Name = NoNetwork }, "name", `"none" is reserved: a service with networks ["none"] gets no network`},
		{"no subnet", func(n *NetworkSpec) { n.Subnet = "" }, "subnet", "is required (a CIDR such as 10.90.0.0/24)"},
		{"subnet not a CIDR", func(n *NetworkSpec) { n.Subnet = "10.90.0.0" }, "subnet", `"10.90.0.0" is not a CIDR (like 10.90.0.0/24)`},
		{"subnet garbage", func(n *NetworkSpec) { n.Subnet = "backend" }, "subnet", `"backend" is not a CIDR (like 10.90.0.0/24)`},
		{"subnet IPv6", func(n *NetworkSpec) { n.Subnet, n.Gateway = "fd00::/64", "fd00::1" }, "subnet", "must be an IPv4 CIDR"},
		{"subnet IPv4-mapped", func(n *NetworkSpec) { n.Subnet = "::ffff:10.90.0.0/120" }, "subnet", "must be an IPv4 CIDR"},
		{"subnet too small", func(n *NetworkSpec) { n.Subnet = "10.90.0.0/30" }, "subnet", "/30 is too small: the prefix must be at most /29"},
		{"subnet /32", func(n *NetworkSpec) { n.Subnet = "10.90.0.1/32" }, "subnet", "/32 is too small: the prefix must be at most /29"},
		{"subnet too large", func(n *NetworkSpec) { n.Subnet = "10.0.0.0/7" }, "subnet", "/7 is too large: the prefix must be at least /8"},
		{"gateway outside subnet", func(n *NetworkSpec) { n.Gateway = "10.91.0.1" }, "gateway", "10.91.0.1 is not a usable address of 10.90.0.0/24"},
		{"gateway network address", func(n *NetworkSpec) { n.Gateway = "10.90.0.0" }, "gateway", "10.90.0.0 is not a usable address of 10.90.0.0/24"},
		{"gateway broadcast address", func(n *NetworkSpec) { n.Gateway = "10.90.0.255" }, "gateway", "10.90.0.255 is not a usable address of 10.90.0.0/24"},
		{"gateway broadcast of /29", func(n *NetworkSpec) { n.Subnet, n.Gateway = "10.0.0.8/29", "10.0.0.15" }, "gateway", "10.0.0.15 is not a usable address of 10.0.0.8/29"},
		{"gateway IPv6", func(n *NetworkSpec) { n.Gateway = "fd00::1" }, "gateway", "fd00::1 is not a usable address of 10.90.0.0/24"},
		{"gateway not an IP", func(n *NetworkSpec) { n.Gateway = "router" }, "gateway", `"router" is not an IP address`},
		{"gateway missing (not normalized)", func(n *NetworkSpec) { n.Gateway = "" }, "gateway", `"" is not an IP address`},
		{"driver unknown", func(n *NetworkSpec) { n.Driver = "macvlan" }, "driver", `must be "bridge" or "overlay", not "macvlan"`},
		{"driver missing (not normalized)", func(n *NetworkSpec) { n.Driver = "" }, "driver", `must be "bridge" or "overlay", not ""`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := validNetwork()
			tt.mutate(&n)
			wantFieldError(t, n.Validate(), tt.field, tt.reason)
		})
	}
}

func TestLastAddr(t *testing.T) {
	for _, tt := range []struct{ prefix, want string }{
		{"10.90.0.0/24", "10.90.0.255"},
		{"10.0.0.0/8", "10.255.255.255"},
		{"10.0.0.8/29", "10.0.0.15"},
		{"192.168.77.1/16", "192.168.255.255"},
	} {
		p := mustPrefix(t, tt.prefix)
		if got := lastAddr(p).String(); got != tt.want {
			t.Errorf("lastAddr(%s) = %s, want %s", tt.prefix, got, tt.want)
		}
	}
}

func TestOverlaps(t *testing.T) {
	tests := []struct {
		a, b string
		want bool
	}{
		{"10.0.0.0/8", "10.1.0.0/16", true},
		{"10.1.0.0/16", "10.0.0.0/8", true},
		{"10.90.0.0/24", "10.90.0.0/24", true},
		{"10.90.0.0/24", "10.90.1.0/24", false},
		{"10.90.0.0/24", "10.90.0.255/32", true},
		{"10.90.0.0/25", "10.90.0.128/25", false},
		{"10.90.0.77/24", "10.90.0.0/24", true}, // host bits do not matter
		{"10.0.0.0/8", "fd00::/8", false},
		{"10.0.0.0/8", "nope", false},
		{"", "10.0.0.0/8", false},
		{"10.0.0.1", "10.0.0.0/8", false}, // an address is not a CIDR
	}
	for _, tt := range tests {
		if got := Overlaps(tt.a, tt.b); got != tt.want {
			t.Errorf("Overlaps(%q, %q) = %v, want %v", tt.a, tt.b, got, tt.want)
		}
	}
}

func validService() ServiceSpec {
	return ServiceSpec{
		Name:     "web",
		Image:    "registry.example.com:5000/team/nginx:1.27@sha256:0123abcd",
		Command:  []string{"nginx"},
		Args:     []string{"-g", "daemon off;"},
		Env:      map[string]string{"MODE": "prod", "_X1": ""},
		Replicas: ptr(3),
		Resources: ResourceSpec{
			CPU: 250, Memory: 64 << 20,
			Limits: &Limit{CPU: 500, Memory: 128 << 20},
		},
		Networks: []string{"backend", "frontend"},
		Ports: []PortSpec{
			{Name: "http", Port: 80},
			{Name: "metrics", Port: 9090, Protocol: "tcp", HostPort: 9090},
			{Name: "dns", Port: 80, Protocol: "udp"},
		},
		Check:  &CheckSpec{HTTP: &HTTPCheck{Port: 80, Path: "/healthz"}, Interval: Duration(5 * time.Second), Timeout: Duration(time.Second)},
		Update: UpdatePolicy{MaxParallel: 2, MaxSurge: ptr(0), HealthDeadline: Duration(time.Minute), AutoRollback: true},
		Restart: RestartPolicy{
			Policy: RestartOnFailure, MaxRestarts: 5,
			Delay: Duration(time.Second), MaxDelay: Duration(30 * time.Second),
		},
		Placement: Placement{
			Strategy:    StrategySpread,
			Constraints: []string{"zone==a", "disk != hdd", "gpu"},
			MaxPerNode:  1,
		},
		Security: SecuritySpec{User: "1000:1000", ReadOnlyRootFilesystem: true},
		Meta:     map[string]string{"team": "web"},
	}
}

func TestServiceValidateBaseline(t *testing.T) {
	s := validService()
	if err := s.Validate(); err != nil {
		t.Fatalf("baseline: %v", err)
	}
	s.Normalize()
	if err := s.Validate(); err != nil {
		t.Fatalf("normalized baseline: %v", err)
	}
	minimal := ServiceSpec{Name: "a", Image: "busybox"}
	if err := minimal.Validate(); err != nil {
		t.Fatalf("minimal: %v", err)
	}
	minimal.Normalize()
	if err := minimal.Validate(); err != nil {
		t.Fatalf("normalized minimal: %v", err)
	}

	for name, mut := range map[string]func(*ServiceSpec){
		"zero replicas": func(s *ServiceSpec) { s.Replicas = ptr(0) },
		"max replicas":  func(s *ServiceSpec) { s.Replicas = ptr(MaxReplicas) },
		"no limits":     func(s *ServiceSpec) { s.Resources.Limits = &Limit{} },
		"tcp check":     func(s *ServiceSpec) { s.Check = &CheckSpec{TCP: &TCPCheck{Port: 80}} },
		"exec check":    func(s *ServiceSpec) { s.Check = &CheckSpec{Exec: &ExecCheck{Command: []string{"true"}}} },
		"ttl check":     func(s *ServiceSpec) { s.Check = &CheckSpec{TTL: Duration(time.Minute)} },
		"ttl check 1h":  func(s *ServiceSpec) { s.Check = &CheckSpec{TTL: Duration(time.Hour)} },
		"user name":     func(s *ServiceSpec) { s.Security.User = "nginx" },
		"uid":           func(s *ServiceSpec) { s.Security.User = "0" },
		"restart never": func(s *ServiceSpec) { s.Restart = RestartPolicy{Policy: RestartNever} },
		"port 65535":    func(s *ServiceSpec) { s.Ports[0].Port, s.Ports[0].HostPort = 65535, 65535 },
		"port name 15":  func(s *ServiceSpec) { s.Ports[0].Name = strings.Repeat("p", 15) },
		"no check":      func(s *ServiceSpec) { s.Check = nil },
		"binpack":       func(s *ServiceSpec) { s.Placement.Strategy = StrategyBinpack },
		"interval 100ms": func(s *ServiceSpec) {
			s.Check.Interval, s.Check.Timeout = Duration(100*time.Millisecond), Duration(100*time.Millisecond)
		},
		"timeout no limit": func(s *ServiceSpec) { s.Check.Interval = 0 },
		"maxDelay = delay": func(s *ServiceSpec) { s.Restart.MaxDelay = s.Restart.Delay },
		"unnormalized zero": func(s *ServiceSpec) {
			s.Update = UpdatePolicy{}
			s.Restart = RestartPolicy{}
			s.Placement.Strategy = ""
		},
	} {
		s := validService()
		mut(&s)
		if err := s.Validate(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestServiceValidate(t *testing.T) {
	tests := []ruleCase[ServiceSpec]{
		{"no name", func(s *ServiceSpec) { s.Name = "" }, "spec.name", "is required"},
		{"name not a DNS label", func(s *ServiceSpec) { s.Name = "Web" }, "spec.name", `"Web" is not a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit`},
		{"name too long", func(s *ServiceSpec) { s.Name = strings.Repeat("w", 64) }, "spec.name", "must be at most 63 characters"},
		{"no image", func(s *ServiceSpec) { s.Image = "" }, "spec.image", "is required"},
		{"bad image", func(s *ServiceSpec) { s.Image = "nginx latest" }, "spec.image", `"nginx latest" is not an image reference`},
		{"image leading dash", func(s *ServiceSpec) { s.Image = "-nginx" }, "spec.image", `"-nginx" is not an image reference`},
		{"image too long", func(s *ServiceSpec) { s.Image = strings.Repeat("i", 513) }, "spec.image", `"` + strings.Repeat("i", 513) + `" is not an image reference`},
		{"NUL in command", func(s *ServiceSpec) { s.Command = []string{"sh", "a\x00b"} }, "spec.command[1]", "must not contain NUL"},
		{"NUL in args", func(s *ServiceSpec) { s.Args[0] = "\x00" }, "spec.args[0]", "must not contain NUL"},
		{"bad env name", func(s *ServiceSpec) { s.Env["1BAD"] = "x" }, "spec.env.1BAD", "is not an environment variable name"},
		{"env name with dash", func(s *ServiceSpec) { s.Env["A-B"] = "x" }, "spec.env.A-B", "is not an environment variable name"},
		{"NUL in env value", func(s *ServiceSpec) { s.Env["MODE"] = "a\x00" }, "spec.env.MODE", "must not contain NUL"},
		{"negative replicas", func(s *ServiceSpec) { s.Replicas = ptr(-1) }, "spec.replicas", "must be >= 0"},
		{"too many replicas", func(s *ServiceSpec) { s.Replicas = ptr(MaxReplicas + 1) }, "spec.replicas", "must be <= 100000"},
		{"negative cpu", func(s *ServiceSpec) { s.Resources.CPU = -1 }, "spec.resources.cpu", "must be >= 0"},
		{"negative memory", func(s *ServiceSpec) { s.Resources.Memory = -1 }, "spec.resources.memory", "must be >= 0"},
		{"cpu limit below request", func(s *ServiceSpec) { s.Resources.Limits.CPU = 100 }, "spec.resources.limits.cpu", "must be >= the request (250m)"},
		{"memory limit below request", func(s *ServiceSpec) { s.Resources.Limits.Memory = 32 << 20 }, "spec.resources.limits.memory", "must be >= the request (64Mi)"},
		{"bad network name", func(s *ServiceSpec) { s.Networks[1] = "Front" }, "spec.networks[1]", `"Front" is not a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit`},
		{"empty network name", func(s *ServiceSpec) { s.Networks[0] = "" }, "spec.networks[0]", "is required"},
		{"network twice", func(s *ServiceSpec) { s.Networks[1] = "backend" }, "spec.networks[1]", `network "backend" is listed twice`},
		{"none beside a network", func(s *ServiceSpec) { s.Networks[1] = NoNetwork }, "spec.networks[1]", `"none" (no network) cannot be combined with other networks`},
		{"none with a published port", func(s *ServiceSpec) { s.Networks, s.Check = []string{NoNetwork}, nil }, "spec.ports[1].hostPort", `cannot be published: the service's network is "none"`},
		{"none with an http check", func(s *ServiceSpec) { s.Networks, s.Ports[1].HostPort = []string{NoNetwork}, 0 }, "spec.check.http", `needs an address: the service's network is "none" (use an exec or TTL check)`},
		{"none with a tcp check", func(s *ServiceSpec) {
			s.Networks, s.Ports[1].HostPort = []string{NoNetwork}, 0
			s.Check = &CheckSpec{TCP: &TCPCheck{Port: 80}}
		}, "spec.check.tcp", `needs an address: the service's network is "none" (use an exec or TTL check)`},
		{"port zero", func(s *ServiceSpec) { s.Ports[0].Port = 0 }, "spec.ports[0].port", "must be a port number from 1 to 65535, not 0"},
		{"port too high", func(s *ServiceSpec) { s.Ports[0].Port = 65536 }, "spec.ports[0].port", "must be a port number from 1 to 65535, not 65536"},
		{"port negative", func(s *ServiceSpec) { s.Ports[2].Port = -80 }, "spec.ports[2].port", "must be a port number from 1 to 65535, not -80"},
		{"host port too high", func(s *ServiceSpec) { s.Ports[1].HostPort = 70000 }, "spec.ports[1].hostPort", "must be a port number from 1 to 65535, not 70000"},
		{"host port negative", func(s *ServiceSpec) { s.Ports[1].HostPort = -1 }, "spec.ports[1].hostPort", "must be a port number from 1 to 65535, not -1"},
		{"no port name", func(s *ServiceSpec) { s.Ports[0].Name = "" }, "spec.ports[0].name", "is required"},
		{"port name not a DNS label", func(s *ServiceSpec) { s.Ports[0].Name = "HTTP" }, "spec.ports[0].name", `"HTTP" is not a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit`},
		{"port name too long", func(s *ServiceSpec) { s.Ports[0].Name = strings.Repeat("p", 16) }, "spec.ports[0].name", "a port name is at most 15 characters (RFC 6335)"},
		{"port name twice", func(s *ServiceSpec) { s.Ports[2].Name = "http" }, "spec.ports[2].name", `port name "http" is used twice`},
		{"bad protocol", func(s *ServiceSpec) { s.Ports[0].Protocol = "sctp" }, "spec.ports[0].protocol", `must be tcp or udp, not "sctp"`},
		{"upper-case protocol", func(s *ServiceSpec) { s.Ports[0].Protocol = "TCP" }, "spec.ports[0].protocol", `must be tcp or udp, not "TCP"`},
		{"port twice", func(s *ServiceSpec) { s.Ports[1] = PortSpec{Name: "alt", Port: 80} }, "spec.ports[1].port", "port 80 is declared twice"},
		{"port twice, explicit tcp", func(s *ServiceSpec) { s.Ports[0].Protocol, s.Ports[1].Port = "tcp", 80 }, "spec.ports[1].port", "port 80 is declared twice"},
		{"check with no kind", func(s *ServiceSpec) { s.Check.HTTP = nil }, "spec.check", "exactly one of http, tcp, exec and ttl must be set"},
		{"check with two kinds", func(s *ServiceSpec) { s.Check.TCP = &TCPCheck{Port: 80} }, "spec.check", "exactly one of http, tcp, exec and ttl must be set"},
		{"check with http and ttl", func(s *ServiceSpec) { s.Check.TTL = Duration(time.Minute) }, "spec.check", "exactly one of http, tcp, exec and ttl must be set"},
		{"http check port", func(s *ServiceSpec) { s.Check.HTTP.Port = 0 }, "spec.check.http.port", "must be a port number from 1 to 65535, not 0"},
		{"http check path", func(s *ServiceSpec) { s.Check.HTTP.Path = "healthz" }, "spec.check.http.path", "must start with /"},
		{"tcp check port", func(s *ServiceSpec) { s.Check.HTTP, s.Check.TCP = nil, &TCPCheck{Port: 65536} }, "spec.check.tcp.port", "must be a port number from 1 to 65535, not 65536"},
		{"exec check without command", func(s *ServiceSpec) { s.Check.HTTP, s.Check.Exec = nil, &ExecCheck{} }, "spec.check.exec.command", "is required"},
		{"ttl check too short", func(s *ServiceSpec) { s.Check.HTTP, s.Check.TTL = nil, Duration(500*time.Millisecond) }, "spec.check.ttl", "must be between 1s and 1h"},
		{"ttl check too long", func(s *ServiceSpec) { s.Check.HTTP, s.Check.TTL = nil, Duration(2*time.Hour) }, "spec.check.ttl", "must be between 1s and 1h"},
		{"check interval too short", func(s *ServiceSpec) {
			s.Check.Interval, s.Check.Timeout = Duration(50*time.Millisecond), Duration(50*time.Millisecond)
		}, "spec.check.interval", "must be at least 100ms"},
		{"check interval negative", func(s *ServiceSpec) {
			s.Check = &CheckSpec{TTL: Duration(time.Minute), Interval: Duration(-time.Second)}
		}, "spec.check.interval", "must be at least 100ms"},
		{"check timeout above interval", func(s *ServiceSpec) { s.Check.Timeout = Duration(6 * time.Second) }, "spec.check.timeout", "must be > 0 and at most the interval"},
		{"check timeout negative", func(s *ServiceSpec) { s.Check.Timeout = Duration(-time.Second) }, "spec.check.timeout", "must be > 0 and at most the interval"},
		{"successBeforePassing negative", func(s *ServiceSpec) { s.Check.SuccessBeforePassing = -1 }, "spec.check.successBeforePassing", "must be >= 0"},
		{"failuresBeforeCritical negative", func(s *ServiceSpec) { s.Check.FailuresBeforeCritical = -1 }, "spec.check.failuresBeforeCritical", "must be >= 0"},
		{"maxParallel negative", func(s *ServiceSpec) { s.Update.MaxParallel = -1 }, "spec.update.maxParallel", "must be >= 1"},
		{"maxSurge negative", func(s *ServiceSpec) { s.Update.MaxSurge = ptr(-1) }, "spec.update.maxSurge", "must be >= 0"},
		{"healthDeadline negative", func(s *ServiceSpec) { s.Update.HealthDeadline = Duration(-time.Second) }, "spec.update.healthDeadline", "must be > 0"},
		{"restart policy unknown", func(s *ServiceSpec) { s.Restart.Policy = "sometimes" }, "spec.restart.policy", `must be always, on-failure or never, not "sometimes"`},
		{"maxRestarts negative", func(s *ServiceSpec) { s.Restart.MaxRestarts = -1 }, "spec.restart.maxRestarts", "must be >= 0"},
		{"restart delay negative", func(s *ServiceSpec) { s.Restart.Delay = Duration(-time.Second) }, "spec.restart.delay", "must be >= 0"},
		{"restart maxDelay below delay", func(s *ServiceSpec) { s.Restart.Delay = Duration(time.Minute) }, "spec.restart.maxDelay", "must be >= spec.restart.delay"},
		{"restart maxDelay negative", func(s *ServiceSpec) { s.Restart.MaxDelay = Duration(-time.Second) }, "spec.restart.maxDelay", "must be >= spec.restart.delay"},
		{"strategy unknown", func(s *ServiceSpec) { s.Placement.Strategy = "random" }, "spec.placement.strategy", `must be binpack or spread, not "random"`},
		{"constraint with one =", func(s *ServiceSpec) { s.Placement.Constraints[1] = "zone = a" }, "spec.placement.constraints[1]", `"zone = a" is not a constraint: use "key == value", "key != value" or "key"`},
		{"constraint without value", func(s *ServiceSpec) { s.Placement.Constraints[0] = "zone==" }, "spec.placement.constraints[0]", `"zone==": the value after == must be one word`},
		{"constraint with two words", func(s *ServiceSpec) { s.Placement.Constraints[0] = "zone != a b" }, "spec.placement.constraints[0]", `"zone != a b": the value after != must be one word`},
		{"constraint bad key", func(s *ServiceSpec) { s.Placement.Constraints[2] = "-gpu == yes" }, "spec.placement.constraints[2]", `"-gpu == yes": "-gpu" is not a label key`},
		{"maxPerNode negative", func(s *ServiceSpec) { s.Placement.MaxPerNode = -1 }, "spec.placement.maxPerNode", "must be >= 0"},
		{"meta bad key", func(s *ServiceSpec) { s.Meta["team!"] = "x" }, "spec.meta.team!", "is not a valid label key: up to 63 letters, digits, '.', '_', '/' and '-'"},
		{"meta value multi-line", func(s *ServiceSpec) { s.Meta["team"] = "a\nb" }, "spec.meta.team", "label value must be at most 253 characters, on one line"},
		{"bad user", func(s *ServiceSpec) { s.Security.User = "Root!" }, "spec.security.user", `"Root!" is not a user: a uid[:gid] or a user name`},
		{"bad uid:gid", func(s *ServiceSpec) { s.Security.User = "1000:" }, "spec.security.user", `"1000:" is not a user: a uid[:gid] or a user name`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := validService()
			tt.mutate(&s)
			wantFieldError(t, s.Validate(), tt.field, tt.reason)
			// Normalize fills defaults only: it neither hides nor adds the error.
			s.Normalize()
			wantFieldError(t, s.Validate(), tt.field, tt.reason)
		})
	}
}

func TestServiceValidateNoNetwork(t *testing.T) {
	s := validService()
	s.Networks, s.Ports[1].HostPort = []string{NoNetwork}, 0
	s.Check = &CheckSpec{Exec: &ExecCheck{Command: []string{"true"}}}
	s.Normalize()
	if err := s.Validate(); err != nil {
		t.Fatalf("no network, exec check, unpublished ports: %v", err)
	}
	if !s.HasNoNetwork() {
		t.Fatal("HasNoNetwork is false")
	}
	s.Check = &CheckSpec{TTL: Duration(time.Minute)}
	if err := s.Validate(); err != nil {
		t.Fatalf("no network, TTL check: %v", err)
	}
	if d := validService(); d.HasNoNetwork() {
		t.Fatal("HasNoNetwork of a service on two networks")
	}
}

func TestServiceValidateManyErrors(t *testing.T) {
	s := ServiceSpec{Replicas: ptr(-1), Ports: []PortSpec{{Name: "a", Port: 0}}}
	fe, ok := AsFieldErrors(s.Validate())
	if !ok {
		t.Fatal("want field errors")
	}
	var fields []string
	for _, f := range fe {
		fields = append(fields, f.Field)
	}
	want := []string{"spec.name", "spec.image", "spec.replicas", "spec.ports[0].port"}
	if !reflect.DeepEqual(fields, want) {
		t.Errorf("fields = %q, want %q", fields, want)
	}
}

func TestServiceNormalize(t *testing.T) {
	s := ServiceSpec{
		Name:  "web",
		Image: "nginx",
		Ports: []PortSpec{{Name: "http", Port: 80}, {Name: "dns", Port: 53, Protocol: "udp"}},
		Check: &CheckSpec{HTTP: &HTTPCheck{Port: 80}},
	}
	s.Normalize()
	want := ServiceSpec{
		Name:     "web",
		Image:    "nginx",
		Replicas: ptr(1),
		Networks: []string{DefaultNetwork},
		Ports:    []PortSpec{{Name: "http", Port: 80, Protocol: "tcp"}, {Name: "dns", Port: 53, Protocol: "udp"}},
		Check: &CheckSpec{
			HTTP:     &HTTPCheck{Port: 80, Path: "/"},
			Interval: Duration(DefaultCheckInterval),
			Timeout:  Duration(DefaultCheckTimeout),
		},
		Update:    UpdatePolicy{MaxParallel: 1, MaxSurge: ptr(1), HealthDeadline: Duration(DefaultHealthDeadline), MinHealthyTime: Duration(DefaultMinHealthyTime)},
		Restart:   RestartPolicy{Policy: RestartAlways, Delay: Duration(DefaultRestartDelay), MaxDelay: Duration(DefaultRestartMax)},
		Placement: Placement{Strategy: StrategyBinpack},
	}
	if !reflect.DeepEqual(s, want) {
		t.Errorf("Normalize =\n%+v\nwant\n%+v", s, want)
	}
	if err := s.Validate(); err != nil {
		t.Errorf("normalized spec: %v", err)
	}

	// Explicit values, including explicit zeros behind pointers, are kept.
	s = ServiceSpec{
		Name: "web", Image: "nginx",
		Replicas: ptr(0),
		Check:    &CheckSpec{TTL: Duration(time.Minute)},
		Update:   UpdatePolicy{MaxParallel: 4, MaxSurge: ptr(0), HealthDeadline: Duration(time.Minute)},
		Restart:  RestartPolicy{Policy: RestartNever, Delay: Duration(2 * time.Second), MaxDelay: Duration(time.Hour)},
		Placement: Placement{
			Strategy: StrategySpread,
		},
	}
	want = s
	want.Check = &CheckSpec{TTL: Duration(time.Minute)} // a TTL check gets no interval or timeout
	want.Replicas = ptr(0)
	want.Update.MaxSurge = ptr(0)
	want.Networks = []string{DefaultNetwork}
	want.Update.MinHealthyTime = Duration(DefaultMinHealthyTime)
	s.Normalize()
	if !reflect.DeepEqual(s, want) {
		t.Errorf("Normalize =\n%+v\nwant\n%+v", s, want)
	}
}

func TestServiceNormalizeIdempotent(t *testing.T) {
	for _, s := range []ServiceSpec{
		{},
		{Name: "a", Image: "b", Check: &CheckSpec{TTL: Duration(time.Second)}},
		{Name: "a", Image: "b", Check: &CheckSpec{Exec: &ExecCheck{Command: []string{"true"}}}},
		validService(),
	} {
		once := s
		once.Normalize()
		twice := deepCopyService(t, once)
		twice.Normalize()
		if !reflect.DeepEqual(once, twice) {
			t.Errorf("Normalize is not idempotent:\n%+v\n%+v", once, twice)
		}
	}
}

func TestRegistrationNormalize(t *testing.T) {
	var r RegistrationSpec
	r.Normalize()
	if r.TTL.D() != DefaultRegistrationTTL || r.Health != HealthPassing {
		t.Errorf("Normalize = %+v", r)
	}
	r = RegistrationSpec{TTL: Duration(time.Minute), Health: HealthCritical}
	r.Normalize()
	if r.TTL.D() != time.Minute || r.Health != HealthCritical {
		t.Errorf("Normalize changed explicit values: %+v", r)
	}
	again := r
	again.Normalize()
	if !reflect.DeepEqual(again, r) {
		t.Errorf("Normalize is not idempotent: %+v then %+v", r, again)
	}
}

func validRegistration() RegistrationSpec {
	return RegistrationSpec{
		Address: "192.0.2.10",
		Port:    8080,
		Ports:   map[string]int{"http": 8080, "admin": 9000},
		Meta:    map[string]string{"version": "1.2"},
		TTL:     Duration(30 * time.Second),
		Health:  HealthPassing,
	}
}

func TestRegistrationValidate(t *testing.T) {
	base := validRegistration()
	if err := base.Validate("web", "web-1"); err != nil {
		t.Fatalf("baseline: %v", err)
	}
	for _, mut := range []func(*RegistrationSpec){
		func(r *RegistrationSpec) { r.Address = "2001:db8::1" },
		func(r *RegistrationSpec) { r.TTL = Duration(MinRegistrationTTL) },
		func(r *RegistrationSpec) { r.TTL = Duration(MaxRegistrationTTL) },
		func(r *RegistrationSpec) { r.Health = HealthWarning },
		func(r *RegistrationSpec) { r.Health = HealthCritical },
		func(r *RegistrationSpec) { r.Ports, r.Meta = nil, nil },
	} {
		r := validRegistration()
		mut(&r)
		if err := r.Validate("web", "web-1"); err != nil {
			t.Errorf("%+v: %v", r, err)
		}
	}

	t.Run("service and id", func(t *testing.T) {
		r := validRegistration()
		wantFieldError(t, r.Validate("", "web-1"), "service", "is required")
		wantFieldError(t, r.Validate("Web", "web-1"), "service", `"Web" is not a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit`)
		wantFieldError(t, r.Validate("web", ""), "id", "is required")
		wantFieldError(t, r.Validate("web", "-1"), "id", `"-1" is not an id: 1 to 128 letters, digits, '.', '_' and '-'`)
		wantFieldError(t, r.Validate("web", "a/b"), "id", `"a/b" is not an id: 1 to 128 letters, digits, '.', '_' and '-'`)
	})

	tests := []ruleCase[RegistrationSpec]{
		{"no address", func(r *RegistrationSpec) { r.Address = "" }, "address", `"" is not an IP address`},
		{"host name address", func(r *RegistrationSpec) { r.Address = "web.example.com" }, "address", `"web.example.com" is not an IP address`},
		{"address with port", func(r *RegistrationSpec) { r.Address = "192.0.2.10:80" }, "address", `"192.0.2.10:80" is not an IP address`},
		{"port zero", func(r *RegistrationSpec) { r.Port = 0 }, "port", "must be a port number from 1 to 65535, not 0"},
		{"port too high", func(r *RegistrationSpec) { r.Port = 65536 }, "port", "must be a port number from 1 to 65535, not 65536"},
		{"named port zero", func(r *RegistrationSpec) { r.Ports["http"] = 0 }, "ports.http", "must be a port number from 1 to 65535, not 0"},
		{"bad port name", func(r *RegistrationSpec) { r.Ports["Admin_Port"] = 1 }, "ports.Admin_Port", `"Admin_Port" is not a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit`},
		{"empty port name", func(r *RegistrationSpec) { r.Ports[""] = 1 }, "ports.", "is required"},
		{"meta bad key", func(r *RegistrationSpec) { r.Meta["/v"] = "1" }, "meta./v", "is not a valid label key: up to 63 letters, digits, '.', '_', '/' and '-'"},
		{"ttl too short", func(r *RegistrationSpec) { r.TTL = Duration(time.Second) }, "ttl", "must be between 2s and 24h0m0s, not 1s"},
		{"ttl too long", func(r *RegistrationSpec) { r.TTL = Duration(25 * time.Hour) }, "ttl", "must be between 2s and 24h0m0s, not 25h0m0s"},
		{"ttl missing (not normalized)", func(r *RegistrationSpec) { r.TTL = 0 }, "ttl", "must be between 2s and 24h0m0s, not 0s"},
		{"health unknown", func(r *RegistrationSpec) { r.Health = "sick" }, "health", `must be passing, warning or critical, not "sick"`},
		{"health missing (not normalized)", func(r *RegistrationSpec) { r.Health = "" }, "health", `must be passing, warning or critical, not ""`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := validRegistration()
			tt.mutate(&r)
			wantFieldError(t, r.Validate("web", "web-1"), tt.field, tt.reason)
		})
	}
}

func TestInstanceStatusValidate(t *testing.T) {
	valid := func() InstanceStatus {
		return InstanceStatus{
			State:    InstanceRunning,
			Health:   HealthPassing,
			Restarts: 2,
			ExitCode: ptr(0),
			VNICs: []VNIC{
				{Network: "backend", Interface: "eth0", MAC: "02:00:00:00:00:01", IP: "10.90.0.2"},
				{Network: "frontend", Interface: "eth1"},
			},
			Ports: []PortBinding{{Name: "http", Port: 80, Protocol: "tcp"}},
		}
	}
	base := valid()
	if err := base.Validate(); err != nil {
		t.Fatalf("baseline: %v", err)
	}
	for _, st := range []string{InstancePending, InstanceStarting, InstanceRunning, InstanceExited, InstanceFailed, InstanceStopped, InstanceUnknown} {
		s := InstanceStatus{State: st}
		if err := s.Validate(); err != nil {
			t.Errorf("state %q: %v", st, err)
		}
	}

	tests := []ruleCase[InstanceStatus]{
		{"no state", func(s *InstanceStatus) { s.State = "" }, "status.state", `unknown instance state ""`},
		{"unknown state", func(s *InstanceStatus) { s.State = "zombie" }, "status.state", `unknown instance state "zombie"`},
		{"unknown health", func(s *InstanceStatus) { s.Health = "sick" }, "status.health", `must be passing, warning or critical, not "sick"`},
		{"negative restarts", func(s *InstanceStatus) { s.Restarts = -1 }, "status.restarts", "must be >= 0"},
		{"bad vnic ip", func(s *InstanceStatus) { s.VNICs[1].IP = "10.90.0.300" }, "status.vnics[1].ip", `"10.90.0.300" is not an IP address`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := valid()
			tt.mutate(&s)
			wantFieldError(t, s.Validate(), tt.field, tt.reason)
		})
	}
}

func TestParseConstraint(t *testing.T) {
	tests := []struct {
		in   string
		want Constraint
		str  string
	}{
		{"zone==a", Constraint{Key: "zone", Op: "==", Value: "a"}, "zone==a"},
		{"  zone  ==  a  ", Constraint{Key: "zone", Op: "==", Value: "a"}, "zone==a"},
		{"disk != hdd", Constraint{Key: "disk", Op: "!=", Value: "hdd"}, "disk!=hdd"},
		{"gpu", Constraint{Key: "gpu", Op: "exists"}, "gpu"},
		{" gpu\t", Constraint{Key: "gpu", Op: "exists"}, "gpu"},
		{"example.com/role == web-1.x", Constraint{Key: "example.com/role", Op: "==", Value: "web-1.x"}, "example.com/role==web-1.x"},
		{"Zone_A==B", Constraint{Key: "Zone_A", Op: "==", Value: "B"}, "Zone_A==B"},
	}
	for _, tt := range tests {
		got, err := ParseConstraint(tt.in)
		if err != nil {
			t.Errorf("ParseConstraint(%q): %v", tt.in, err)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseConstraint(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
		if s := got.String(); s != tt.str {
			t.Errorf("String() = %q, want %q", s, tt.str)
		}
		if back, err := ParseConstraint(got.String()); err != nil || back != got {
			t.Errorf("ParseConstraint(%q) = %+v, %v; want %+v", got.String(), back, err, got)
		}
	}

	for _, tt := range []struct{ in, err string }{
		{"", `"" is not a constraint: use "key == value", "key != value" or "key"`},
		{"   ", `"   " is not a constraint: use "key == value", "key != value" or "key"`},
		{"zone = a", `"zone = a" is not a constraint: use "key == value", "key != value" or "key"`},
		{"zone a", `"zone a" is not a constraint: use "key == value", "key != value" or "key"`},
		{"-zone", `"-zone" is not a constraint: use "key == value", "key != value" or "key"`},
		{"==a", `"==a": "" is not a label key`},
		{"zone==", `"zone==": the value after == must be one word`},
		{"zone== a b", `"zone== a b": the value after == must be one word`},
		{"zone==a=b", `"zone==a=b": the value after == must be one word`},
		{"zone==a\tb", "\"zone==a\\tb\": the value after == must be one word"},
		{"zone!=a!b", `"zone!=a!b": the value after != must be one word`},
		{"a!=b==c", `"a!=b==c": "a!=b" is not a label key`},
	} {
		_, err := ParseConstraint(tt.in)
		if err == nil || err.Error() != tt.err {
			t.Errorf("ParseConstraint(%q) error = %v, want %s", tt.in, err, tt.err)
		}
	}
}

func TestConstraintMatch(t *testing.T) {
	labels := map[string]string{"zone": "a", "gpu": "", "disk": "ssd"}
	tests := []struct {
		c      string
		labels map[string]string
		want   bool
	}{
		{"zone==a", labels, true},
		{"zone==b", labels, false},
		{"region==a", labels, false},
		{"zone!=b", labels, true},
		{"zone!=a", labels, false},
		{"region!=a", labels, true}, // a missing label is not equal to anything
		{"gpu", labels, true},       // exists, even with an empty value
		{"tpu", labels, false},
		{"gpu==x", labels, false},
		{"zone==a", nil, false},
		{"zone!=a", nil, true},
		{"zone", nil, false},
		{"Zone==a", labels, false}, // keys are case-sensitive
	}
	for _, tt := range tests {
		c, err := ParseConstraint(tt.c)
		if err != nil {
			t.Fatalf("ParseConstraint(%q): %v", tt.c, err)
		}
		if got := c.Match(tt.labels); got != tt.want {
			t.Errorf("%q.Match(%v) = %v, want %v", tt.c, tt.labels, got, tt.want)
		}
	}
}

func mustPrefix(t *testing.T, s string) netip.Prefix {
	t.Helper()
	p, err := netip.ParsePrefix(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// deepCopyService copies s through JSON, so that Normalize on the copy
// cannot write through pointers or slices shared with s.
func deepCopyService(t *testing.T, s ServiceSpec) ServiceSpec {
	t.Helper()
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var c ServiceSpec
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c, s) {
		t.Fatalf("JSON copy differs:\n%+v\n%+v", c, s)
	}
	return c
}
