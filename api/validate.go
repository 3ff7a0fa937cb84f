package api

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"time"
)

var (
	labelRE    = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)
	hostnameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$`)
	labelKeyRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$`)
	envKeyRE   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	imageRE    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$`)
	idRE       = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$`)
	userRE     = regexp.MustCompile(`^[0-9]+(:[0-9]+)?$|^[a-z_][a-z0-9_-]*$`)
)

// ValidName reports why s is not a DNS label (RFC 1123), or "" if it is one.
func ValidName(s string) string {
	switch {
	case s == "":
		return "is required"
	case len(s) > 63:
		return "must be at most 63 characters"
	case !labelRE.MatchString(s):
		return fmt.Sprintf("%q is not a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit", s)
	}
	return ""
}

// ValidNodeName reports why s is not a node name (a DNS name), or "".
func ValidNodeName(s string) string {
	switch {
	case s == "":
		return "is required"
	case len(s) > 253:
		return "must be at most 253 characters"
	case !hostnameRE.MatchString(s):
		return fmt.Sprintf("%q is not a node name: lower-case letters, digits, '-' and '.'", s)
	}
	return ""
}

// ValidID reports why s is not an instance or registration id, or "".
func ValidID(s string) string {
	switch {
	case s == "":
		return "is required"
	case !idRE.MatchString(s):
		return fmt.Sprintf("%q is not an id: 1 to 128 letters, digits, '.', '_' and '-'", s)
	}
	return ""
}

func validLabels(e *errs, field string, labels map[string]string) {
	for k, v := range labels {
		if !labelKeyRE.MatchString(k) {
			e.add(field+"."+k, "is not a valid label key: up to 63 letters, digits, '.', '_', '/' and '-'")
		}
		if len(v) > 253 || strings.ContainsAny(v, "\x00\n") {
			e.add(field+"."+k, "label value must be at most 253 characters, on one line")
		}
	}
}

func validPort(e *errs, field string, p int, zeroOK bool) {
	if zeroOK && p == 0 {
		return
	}
	if p < 1 || p > 65535 {
		e.add(field, "must be a port number from 1 to 65535, not %d", p)
	}
}

// Validate checks a node registration.
func (r *NodeRegistration) Validate(name string) error {
	var e errs
	if why := ValidNodeName(name); why != "" {
		e.add("name", "%s", why)
	}
	if _, err := netip.ParseAddr(r.Address); err != nil {
		e.add("address", "%q is not an IP address", r.Address)
	}
	validLabels(&e, "labels", r.Labels)
	if r.Capacity.CPU <= 0 {
		e.add("capacity.cpu", "must be > 0")
	}
	if r.Capacity.Memory <= 0 {
		e.add("capacity.memory", "must be > 0")
	}
	if r.Allocatable.CPU < 0 || r.Allocatable.CPU > r.Capacity.CPU {
		e.add("allocatable.cpu", "must be between 0 and capacity.cpu")
	}
	if r.Allocatable.Memory < 0 || r.Allocatable.Memory > r.Capacity.Memory {
		e.add("allocatable.memory", "must be between 0 and capacity.memory")
	}
	if r.TTL != 0 && (r.TTL.D() < 2*time.Second || r.TTL.D() > 10*time.Minute) {
		e.add("ttl", "must be between 2s and 10m, not %s", r.TTL)
	}
	return e.err()
}

// Network subnet bounds: a subnet must have room for a gateway and instances.
const (
	MinNetworkPrefixV4 = 8
	MaxNetworkPrefixV4 = 29
)

// Normalize fills a network spec's defaults.
func (n *NetworkSpec) Normalize() {
	if n.Driver == "" {
		n.Driver = DriverBridge
	}
	if p, err := netip.ParsePrefix(n.Subnet); err == nil {
		n.Subnet = p.Masked().String()
		if n.Gateway == "" {
			n.Gateway = p.Masked().Addr().Next().String()
		}
	}
}

// Validate checks a network spec (after Normalize).
func (n *NetworkSpec) Validate() error {
	var e errs
	if why := ValidName(n.Name); why != "" {
		e.add("name", "%s", why)
	} else if n.Name == NoNetwork {
		e.add("name", "%q is reserved: a service with networks [%q] gets no network", NoNetwork, NoNetwork)
	}
	p, err := netip.ParsePrefix(n.Subnet)
	switch {
	case n.Subnet == "":
		e.add("subnet", "is required (a CIDR such as 10.90.0.0/24)")
	case err != nil:
		e.add("subnet", "%q is not a CIDR (like 10.90.0.0/24)", n.Subnet)
	case !p.Addr().Is4():
		e.add("subnet", "must be an IPv4 CIDR")
	case p.Bits() < MinNetworkPrefixV4:
		e.add("subnet", "/%d is too large: the prefix must be at least /%d", p.Bits(), MinNetworkPrefixV4)
	case p.Bits() > MaxNetworkPrefixV4:
		e.add("subnet", "/%d is too small: the prefix must be at most /%d", p.Bits(), MaxNetworkPrefixV4)
	default:
		if g, err := netip.ParseAddr(n.Gateway); err != nil {
			e.add("gateway", "%q is not an IP address", n.Gateway)
		} else if !p.Contains(g) || g == p.Masked().Addr() || g == lastAddr(p) {
			e.add("gateway", "%s is not a usable address of %s", g, p.Masked())
		}
	}
	if n.Driver != DriverBridge && n.Driver != DriverOverlay {
		e.add("driver", "must be %q or %q, not %q", DriverBridge, DriverOverlay, n.Driver)
	}
	return e.err()
}

// lastAddr is the broadcast address of an IPv4 prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// UsableAddresses is how many instance addresses an IPv4 subnet has: all
// but the network, broadcast and gateway addresses.
func UsableAddresses(cidr string) int {
	p, err := netip.ParsePrefix(cidr)
	if err != nil || !p.Addr().Is4() || p.Bits() > 30 {
		return 0
	}
	return 1<<(32-p.Bits()) - 3
}

// Overlaps reports whether two CIDRs share an address.
func Overlaps(a, b string) bool {
	pa, err1 := netip.ParsePrefix(a)
	pb, err2 := netip.ParsePrefix(b)
	return err1 == nil && err2 == nil && pa.Overlaps(pb)
}

// Defaults of a service spec.
const (
	DefaultCheckInterval  = 10 * time.Second
	DefaultCheckTimeout   = 2 * time.Second
	DefaultHealthDeadline = 30 * time.Second
	DefaultMinHealthyTime = 2 * time.Second
	DefaultRestartDelay   = time.Second
	DefaultRestartMax     = time.Minute
)

// Normalize fills a service spec's defaults so that two specs that mean the
// same compare equal.
func (s *ServiceSpec) Normalize() {
	if s.Replicas == nil {
		one := 1
		s.Replicas = &one
	}
	if len(s.Networks) == 0 {
		s.Networks = []string{DefaultNetwork}
	}
	for i := range s.Ports {
		if s.Ports[i].Protocol == "" {
			s.Ports[i].Protocol = "tcp"
		}
	}
	if c := s.Check; c != nil {
		// Defaults never contradict what the user wrote: an interval
		// defaults to at least the timeout, a timeout to at most the interval.
		if c.Interval == 0 && c.TTL == 0 {
			c.Interval = Duration(max(DefaultCheckInterval, c.Timeout.D()))
		}
		if c.Timeout == 0 && c.TTL == 0 {
			c.Timeout = Duration(min(DefaultCheckTimeout, c.Interval.D()))
		}
		if c.HTTP != nil && c.HTTP.Path == "" {
			c.HTTP.Path = "/"
		}
	}
	if s.Update.MaxParallel == 0 {
		s.Update.MaxParallel = 1
	}
	if s.Update.MaxSurge == nil {
		one := 1
		s.Update.MaxSurge = &one
	}
	if s.Update.HealthDeadline == 0 {
		s.Update.HealthDeadline = Duration(DefaultHealthDeadline)
	}
	if s.Update.MinHealthyTime == 0 && s.Update.HealthDeadline > 0 {
		s.Update.MinHealthyTime = Duration(min(DefaultMinHealthyTime, s.Update.HealthDeadline.D()/2))
	}
	if s.Restart.Policy == "" {
		s.Restart.Policy = RestartAlways
	}
	if s.Restart.Delay == 0 {
		s.Restart.Delay = Duration(DefaultRestartDelay)
	}
	if s.Restart.MaxDelay == 0 {
		s.Restart.MaxDelay = Duration(max(DefaultRestartMax, s.Restart.Delay.D()))
	}
	if s.Placement.Strategy == "" {
		s.Placement.Strategy = StrategyBinpack
	}
}

// MaxReplicas bounds one service's replica count.
const MaxReplicas = 100000

// Validate checks a service spec; field paths start with "spec".
func (s *ServiceSpec) Validate() error {
	var e errs
	if why := ValidName(s.Name); why != "" {
		e.add("spec.name", "%s", why)
	}
	switch {
	case s.Image == "":
		e.add("spec.image", "is required")
	case len(s.Image) > 512 || !imageRE.MatchString(s.Image):
		e.add("spec.image", "%q is not an image reference", s.Image)
	}
	for i, c := range s.Command {
		if strings.ContainsRune(c, 0) {
			e.add(fmt.Sprintf("spec.command[%d]", i), "must not contain NUL")
		}
	}
	for i, c := range s.Args {
		if strings.ContainsRune(c, 0) {
			e.add(fmt.Sprintf("spec.args[%d]", i), "must not contain NUL")
		}
	}
	for k, v := range s.Env {
		if !envKeyRE.MatchString(k) {
			e.add("spec.env."+k, "is not an environment variable name")
		}
		if strings.ContainsRune(v, 0) {
			e.add("spec.env."+k, "must not contain NUL")
		}
	}
	if s.Replicas != nil && *s.Replicas < 0 {
		e.add("spec.replicas", "must be >= 0")
	} else if s.Replicas != nil && *s.Replicas > MaxReplicas {
		e.add("spec.replicas", "must be <= %d", MaxReplicas)
	}
	r := s.Resources
	if r.CPU < 0 {
		e.add("spec.resources.cpu", "must be >= 0")
	}
	if r.Memory < 0 {
		e.add("spec.resources.memory", "must be >= 0")
	}
	if l := r.Limits; l != nil {
		if l.CPU != 0 && l.CPU < r.CPU {
			e.add("spec.resources.limits.cpu", "must be >= the request (%s)", r.CPU)
		}
		if l.Memory != 0 && l.Memory < r.Memory {
			e.add("spec.resources.limits.memory", "must be >= the request (%s)", r.Memory)
		}
	}
	seenNet := map[string]bool{}
	for i, n := range s.Networks {
		f := fmt.Sprintf("spec.networks[%d]", i)
		if why := ValidName(n); why != "" {
			e.add(f, "%s", why)
		} else if seenNet[n] {
			e.add(f, "network %q is listed twice", n)
		} else if n == NoNetwork && len(s.Networks) > 1 {
			e.add(f, "%q (no network) cannot be combined with other networks", NoNetwork)
		}
		seenNet[n] = true
	}
	none := s.HasNoNetwork()
	seenName, seenPort := map[string]bool{}, map[string]bool{}
	for i, p := range s.Ports {
		f := fmt.Sprintf("spec.ports[%d]", i)
		if why := ValidName(p.Name); why != "" {
			e.add(f+".name", "%s", why)
		} else if len(p.Name) > 15 {
			e.add(f+".name", "a port name is at most 15 characters (RFC 6335)")
		} else if seenName[p.Name] {
			e.add(f+".name", "port name %q is used twice", p.Name)
		}
		seenName[p.Name] = true
		validPort(&e, f+".port", p.Port, false)
		validPort(&e, f+".hostPort", p.HostPort, true)
		if none && p.HostPort != 0 {
			e.add(f+".hostPort", "cannot be published: the service's network is %q", NoNetwork)
		}
		if p.Protocol != "" && p.Protocol != "tcp" && p.Protocol != "udp" {
			e.add(f+".protocol", "must be tcp or udp, not %q", p.Protocol)
		}
		key := fmt.Sprintf("%d/%s", p.Port, p.Protocol)
		if seenPort[key] {
			e.add(f+".port", "port %d is declared twice", p.Port)
		}
		seenPort[key] = true
	}
	if s.Check != nil {
		s.Check.validate(&e, "spec.check")
		if none && s.Check.HTTP != nil {
			e.add("spec.check.http", "needs an address: the service's network is %q (use an exec or TTL check)", NoNetwork)
		}
		if none && s.Check.TCP != nil {
			e.add("spec.check.tcp", "needs an address: the service's network is %q (use an exec or TTL check)", NoNetwork)
		}
	}
	u := s.Update
	if u.MaxParallel < 0 {
		e.add("spec.update.maxParallel", "must be >= 1")
	}
	if u.MaxSurge != nil && *u.MaxSurge < 0 {
		e.add("spec.update.maxSurge", "must be >= 0")
	}
	if u.HealthDeadline < 0 {
		e.add("spec.update.healthDeadline", "must be > 0")
	}
	if u.MinHealthyTime < 0 || (u.HealthDeadline > 0 && u.MinHealthyTime >= u.HealthDeadline) {
		e.add("spec.update.minHealthyTime", "must be >= 0 and shorter than spec.update.healthDeadline")
	}
	switch s.Restart.Policy {
	case "", RestartAlways, RestartOnFailure, RestartNever:
	default:
		e.add("spec.restart.policy", "must be always, on-failure or never, not %q", s.Restart.Policy)
	}
	if s.Restart.MaxRestarts < 0 {
		e.add("spec.restart.maxRestarts", "must be >= 0")
	}
	if s.Restart.Delay < 0 {
		e.add("spec.restart.delay", "must be >= 0")
	}
	if s.Restart.MaxDelay < 0 || (s.Restart.MaxDelay != 0 && s.Restart.MaxDelay < s.Restart.Delay) {
		e.add("spec.restart.maxDelay", "must be >= spec.restart.delay")
	}
	switch s.Placement.Strategy {
	case "", StrategyBinpack, StrategySpread:
	default:
		e.add("spec.placement.strategy", "must be binpack or spread, not %q", s.Placement.Strategy)
	}
	for i, c := range s.Placement.Constraints {
		if _, err := ParseConstraint(c); err != nil {
			e.add(fmt.Sprintf("spec.placement.constraints[%d]", i), "%v", err)
		}
	}
	if s.Placement.MaxPerNode < 0 {
		e.add("spec.placement.maxPerNode", "must be >= 0")
	}
	validLabels(&e, "spec.meta", s.Meta)
	if u := s.Security.User; u != "" && !userRE.MatchString(u) {
		e.add("spec.security.user", "%q is not a user: a uid[:gid] or a user name", u)
	}
	return e.err()
}

func (c *CheckSpec) validate(e *errs, f string) {
	kinds := 0
	if c.HTTP != nil {
		kinds++
		validPort(e, f+".http.port", c.HTTP.Port, false)
		if c.HTTP.Path != "" && !strings.HasPrefix(c.HTTP.Path, "/") {
			e.add(f+".http.path", "must start with /")
		}
	}
	if c.TCP != nil {
		kinds++
		validPort(e, f+".tcp.port", c.TCP.Port, false)
	}
	if c.Exec != nil {
		kinds++
		if len(c.Exec.Command) == 0 {
			e.add(f+".exec.command", "is required")
		}
	}
	if c.TTL != 0 {
		kinds++
		if c.TTL.D() < time.Second || c.TTL.D() > time.Hour {
			e.add(f+".ttl", "must be between 1s and 1h")
		}
	}
	if kinds != 1 {
		e.add(f, "exactly one of http, tcp, exec and ttl must be set")
	}
	if c.Interval < 0 || (c.Interval != 0 && c.Interval.D() < 100*time.Millisecond) {
		e.add(f+".interval", "must be at least 100ms")
	}
	if c.Timeout < 0 || (c.Timeout != 0 && c.Interval != 0 && c.Timeout > c.Interval) {
		e.add(f+".timeout", "must be > 0 and at most the interval")
	}
	if c.SuccessBeforePassing < 0 {
		e.add(f+".successBeforePassing", "must be >= 0")
	}
	if c.FailuresBeforeCritical < 0 {
		e.add(f+".failuresBeforeCritical", "must be >= 0")
	}
}

// Constraint is a placement rule on a node label: "key == value",
// "key != value", or "key" (the label exists).
type Constraint struct {
	Key   string
	Op    string // "==", "!=", "exists"
	Value string
}

// ParseConstraint reads a constraint expression.
func ParseConstraint(s string) (Constraint, error) {
	for _, op := range []string{"==", "!="} {
		if k, v, ok := strings.Cut(s, op); ok {
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			if !labelKeyRE.MatchString(k) {
				return Constraint{}, fmt.Errorf("%q: %q is not a label key", s, k)
			}
			if v == "" || strings.ContainsAny(v, " \t=!") {
				return Constraint{}, fmt.Errorf("%q: the value after %s must be one word", s, op)
			}
			return Constraint{Key: k, Op: op, Value: v}, nil
		}
	}
	k := strings.TrimSpace(s)
	if !labelKeyRE.MatchString(k) {
		return Constraint{}, fmt.Errorf("%q is not a constraint: use \"key == value\", \"key != value\" or \"key\"", s)
	}
	return Constraint{Key: k, Op: "exists"}, nil
}

// Match reports whether labels satisfy the constraint.
func (c Constraint) Match(labels map[string]string) bool {
	v, ok := labels[c.Key]
	switch c.Op {
	case "==":
		return ok && v == c.Value
	case "!=":
		return !ok || v != c.Value
	}
	return ok
}

func (c Constraint) String() string {
	if c.Op == "exists" {
		return c.Key
	}
	return c.Key + c.Op + c.Value
}

// Registration TTL bounds.
const (
	MinRegistrationTTL     = 2 * time.Second
	MaxRegistrationTTL     = 24 * time.Hour
	DefaultRegistrationTTL = 30 * time.Second
)

// Normalize fills a registration's defaults.
func (r *RegistrationSpec) Normalize() {
	if r.TTL == 0 {
		r.TTL = Duration(DefaultRegistrationTTL)
	}
	if r.Health == "" {
		r.Health = HealthPassing
	}
}

// Validate checks a registration of instance id of service.
func (r *RegistrationSpec) Validate(service, id string) error {
	var e errs
	if why := ValidName(service); why != "" {
		e.add("service", "%s", why)
	}
	if why := ValidID(id); why != "" {
		e.add("id", "%s", why)
	}
	if _, err := netip.ParseAddr(r.Address); err != nil {
		e.add("address", "%q is not an IP address", r.Address)
	}
	validPort(&e, "port", r.Port, false)
	for name, p := range r.Ports {
		if why := ValidName(name); why != "" {
			e.add("ports."+name, "%s", why)
		}
		validPort(&e, "ports."+name, p, false)
	}
	validLabels(&e, "meta", r.Meta)
	if r.TTL.D() < MinRegistrationTTL || r.TTL.D() > MaxRegistrationTTL {
		e.add("ttl", "must be between %s and %s, not %s", MinRegistrationTTL, MaxRegistrationTTL, r.TTL)
	}
	validHealth(&e, "health", r.Health)
	return e.err()
}

// validHealth adds an error unless h is a known health state.
func validHealth(e *errs, field, h string) {
	switch h {
	case HealthPassing, HealthWarning, HealthCritical:
	default:
		e.add(field, "must be passing, warning or critical, not %q", h)
	}
}

// Validate checks an instance status report from an agent.
func (s *InstanceStatus) Validate() error {
	var e errs
	switch s.State {
	case InstancePending, InstanceStarting, InstanceRunning, InstanceExited, InstanceFailed, InstanceStopped, InstanceUnknown:
	default:
		e.add("status.state", "unknown instance state %q", s.State)
	}
	if s.Health != "" {
		validHealth(&e, "status.health", s.Health)
	}
	if s.Restarts < 0 {
		e.add("status.restarts", "must be >= 0")
	}
	for i, v := range s.VNICs {
		f := fmt.Sprintf("status.vnics[%d]", i)
		if v.IP != "" {
			if _, err := netip.ParseAddr(v.IP); err != nil {
				e.add(f+".ip", "%q is not an IP address", v.IP)
			}
		}
	}
	return e.err()
}
