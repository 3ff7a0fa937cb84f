// Package api holds berth's versioned wire types (v1): the objects stored and
// served by the HTTP+JSON API, their validation, and the strict decoder that
// turns outside input into them with errors naming the field at fault.
//
// The API types are the contract; etcd keys are an implementation detail.
package api

import (
	"encoding/json"
	"time"
)

// Version is the API version served under /v1/.
const Version = "v1"

// Meta is set by the server on every stored object.
type Meta struct {
	// Revision is the store revision of the object's last change. Watches
	// resume from a revision.
	Revision  int64     `json:"revision,omitempty"`
	CreatedAt time.Time `json:"createdAt,omitzero"`
	UpdatedAt time.Time `json:"updatedAt,omitzero"`
}

// Resources is an amount of CPU and memory.
type Resources struct {
	CPU    CPU   `json:"cpu"`
	Memory Bytes `json:"memory"`
}

// NodeState is the liveness of a node.
type NodeState string

// Node states.
const (
	NodeReady NodeState = "ready"
	NodeDown  NodeState = "down"
)

// NodeRegistration is what an agent sends to register (or re-register) its node.
type NodeRegistration struct {
	Address     string            `json:"address"`
	Labels      map[string]string `json:"labels,omitempty"`
	Capacity    Resources         `json:"capacity"`
	Allocatable Resources         `json:"allocatable"`
	// TTL is how long the node stays ready without a heartbeat.
	TTL          Duration `json:"ttl,omitempty"`
	AgentVersion string   `json:"agentVersion,omitempty"`
	// AgentAddr is where the node's agent serves logs, exec and images
	// (host:port); the server proxies to it.
	AgentAddr string `json:"agentAddr,omitempty"`
}

// Node is a machine that runs an agent.
type Node struct {
	Name string `json:"name"`
	NodeRegistration
	Status NodeStatus `json:"status"`
	Meta
}

// NodeStatus is the observed state of a node.
type NodeStatus struct {
	State         NodeState `json:"state"`
	LastHeartbeat time.Time `json:"lastHeartbeat,omitzero"`
	Message       string    `json:"message,omitempty"`
}

// HeartbeatResponse answers a node heartbeat.
type HeartbeatResponse struct {
	// Registered is false when the server no longer knows the node (its
	// record was removed); the agent then registers again.
	Registered bool     `json:"registered"`
	TTL        Duration `json:"ttl"`
}

// Network drivers.
const (
	DriverBridge  = "bridge"
	DriverOverlay = "overlay"
)

// NetworkSpec is what a user declares for a virtual network.
type NetworkSpec struct {
	Name   string `json:"name"`
	Subnet string `json:"subnet"`
	// Gateway defaults to the first address of the subnet.
	Gateway string `json:"gateway,omitempty"`
	// Driver is bridge (one node) or overlay (VXLAN across nodes).
	Driver string `json:"driver,omitempty"`
}

// Network is a virtual network: a virtual switch on every node that uses it.
type Network struct {
	NetworkSpec
	Status NetworkStatus `json:"status"`
	Meta
}

// NetworkStatus is what berth assigned to a network.
type NetworkStatus struct {
	// VNI is the VXLAN id of an overlay network.
	VNI int `json:"vni,omitempty"`
	// NodeSubnets is the slice of an overlay's subnet given to each node.
	NodeSubnets map[string]string `json:"nodeSubnets,omitempty"`
	// Attached, AddressesUsed and AddressesFree are computed when one
	// network is read: the instances' VNICs on it.
	Attached      []Attachment `json:"attached,omitempty"`
	AddressesUsed int          `json:"addressesUsed,omitempty"`
	AddressesFree int          `json:"addressesFree,omitempty"`
}

// Attachment is one instance's VNIC on a network.
type Attachment struct {
	Instance string `json:"instance"`
	Node     string `json:"node"`
	MAC      string `json:"mac"`
	IP       string `json:"ip"`
}

// The network every instance joins when its spec names none.
const (
	DefaultNetwork       = "default"
	DefaultNetworkSubnet = "10.88.0.0/16"
)

// NoNetwork, as a service's only network, gives its instances a network
// namespace of their own with nothing but loopback (docker's --network
// none): no VNIC, no address, no published ports, not discoverable. It is
// a reserved name, not a network object.
const NoNetwork = "none"

// HasNoNetwork says whether a service's instances get no VNIC.
func (s *ServiceSpec) HasNoNetwork() bool {
	return len(s.Networks) == 1 && s.Networks[0] == NoNetwork
}

// ServiceSpec declares a service: what to run, how many, where and how.
type ServiceSpec struct {
	Name    string            `json:"name"`
	Image   string            `json:"image"`
	Command []string          `json:"command,omitempty"`
	Args    []string          `json:"args,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	// Replicas defaults to 1 when absent.
	Replicas  *int         `json:"replicas,omitempty"`
	Resources ResourceSpec `json:"resources,omitzero"`
	// Networks the instances join (default: DefaultNetwork); NoNetwork
	// alone for none.
	Networks  []string          `json:"networks,omitempty"`
	Ports     []PortSpec        `json:"ports,omitempty"`
	Check     *CheckSpec        `json:"check,omitempty"`
	Update    UpdatePolicy      `json:"update,omitzero"`
	Restart   RestartPolicy     `json:"restart,omitzero"`
	Placement Placement         `json:"placement,omitzero"`
	Security  SecuritySpec      `json:"security,omitzero"`
	Meta      map[string]string `json:"meta,omitempty"`
}

// ResourceSpec holds requests (used for placement) and limits (enforced by cgroups).
type ResourceSpec struct {
	CPU    CPU    `json:"cpu,omitempty"`
	Memory Bytes  `json:"memory,omitempty"`
	Limits *Limit `json:"limits,omitempty"`
}

// Limit is a cgroup limit; zero means no limit beyond the request.
type Limit struct {
	CPU    CPU   `json:"cpu,omitempty"`
	Memory Bytes `json:"memory,omitempty"`
}

// PortSpec is a named port of a service's instances.
type PortSpec struct {
	Name     string `json:"name"`
	Port     int    `json:"port"`
	Protocol string `json:"protocol,omitempty"`
	// HostPort publishes the port on the node (0: not published).
	HostPort int `json:"hostPort,omitempty"`
}

// CheckSpec is a health check; exactly one of HTTP, TCP, Exec and TTL is set.
type CheckSpec struct {
	HTTP                   *HTTPCheck `json:"http,omitempty"`
	TCP                    *TCPCheck  `json:"tcp,omitempty"`
	Exec                   *ExecCheck `json:"exec,omitempty"`
	TTL                    Duration   `json:"ttl,omitempty"`
	Interval               Duration   `json:"interval,omitempty"`
	Timeout                Duration   `json:"timeout,omitempty"`
	SuccessBeforePassing   int        `json:"successBeforePassing,omitempty"`
	FailuresBeforeCritical int        `json:"failuresBeforeCritical,omitempty"`
}

// HTTPCheck passes on a 2xx answer.
type HTTPCheck struct {
	Port int    `json:"port"`
	Path string `json:"path,omitempty"`
}

// TCPCheck passes when a connection opens.
type TCPCheck struct {
	Port int `json:"port"`
}

// ExecCheck runs a command inside the container; exit 0 passes, 1 warns.
type ExecCheck struct {
	Command []string `json:"command"`
}

// UpdatePolicy governs rolling updates.
type UpdatePolicy struct {
	MaxParallel    int      `json:"maxParallel,omitempty"`
	MaxSurge       *int     `json:"maxSurge,omitempty"`
	HealthDeadline Duration `json:"healthDeadline,omitempty"`
	AutoRollback   bool     `json:"autoRollback,omitempty"`
	// MinHealthyTime is how long a new instance must stay healthy before
	// it counts as updated (an instance that starts and then crashes must
	// not let the rollout remove an old one).
	MinHealthyTime Duration `json:"minHealthyTime,omitempty"`
}

// Restart policies.
const (
	RestartAlways    = "always"
	RestartOnFailure = "on-failure"
	RestartNever     = "never"
)

// RestartPolicy says when a stopped container is restarted.
type RestartPolicy struct {
	Policy string `json:"policy,omitempty"`
	// MaxRestarts bounds on-failure restarts (0: unbounded).
	MaxRestarts int      `json:"maxRestarts,omitempty"`
	Delay       Duration `json:"delay,omitempty"`
	MaxDelay    Duration `json:"maxDelay,omitempty"`
}

// Placement strategies.
const (
	StrategyBinpack = "binpack"
	StrategySpread  = "spread"
)

// Placement constrains and scores where instances go.
type Placement struct {
	Strategy    string   `json:"strategy,omitempty"`
	Constraints []string `json:"constraints,omitempty"`
	MaxPerNode  int      `json:"maxPerNode,omitempty"`
}

// SecuritySpec hardens the container beyond berth's defaults.
type SecuritySpec struct {
	User                   string `json:"user,omitempty"`
	ReadOnlyRootFilesystem bool   `json:"readOnlyRootFilesystem,omitempty"`
	// Allow32Bit lets the container make 32-bit (x86, x32) system calls,
	// for images with 32-bit binaries. By default the seccomp filter allows
	// the node's native architecture only: the compat system call paths
	// are a large attack surface few images need, and a filter for one
	// architecture is much cheaper to build at every start.
	Allow32Bit bool `json:"allow32bit,omitempty"`
}

// Service is a stored service: its spec and what berth made of it.
type Service struct {
	Name string      `json:"name"`
	Spec ServiceSpec `json:"spec"`
	// Generation counts changes of the spec; it starts at 1.
	Generation int64         `json:"generation"`
	Status     ServiceStatus `json:"status"`
	// History holds earlier generations' specs, oldest first, at most
	// MaxHistory of them.
	History []SpecRevision `json:"history,omitempty"`
	Meta
}

// MaxHistory bounds a service's kept spec history.
const MaxHistory = 10

// SpecRevision is one earlier generation of a service's spec.
type SpecRevision struct {
	Generation int64       `json:"generation"`
	Spec       ServiceSpec `json:"spec"`
	AppliedAt  time.Time   `json:"appliedAt"`
}

// SpecOf returns the spec of a generation, current or in the history.
func (s *Service) SpecOf(gen int64) (ServiceSpec, bool) {
	if gen == s.Generation {
		return s.Spec, true
	}
	for _, h := range s.History {
		if h.Generation == gen {
			return h.Spec, true
		}
	}
	return ServiceSpec{}, false
}

// ServiceStatus summarises a service's instances and rollout.
type ServiceStatus struct {
	Running int `json:"running"`
	Healthy int `json:"healthy"`
	// Updated counts healthy instances of the current generation.
	Updated int `json:"updated"`
	// Rollout is progressing, complete or rolled-back.
	Rollout string `json:"rollout,omitempty"`
	Message string `json:"message,omitempty"`
	// StableGeneration is the last generation whose rollout completed: the
	// one an automatic rollback returns to.
	StableGeneration int64 `json:"stableGeneration,omitempty"`
}

// Rollout states.
const (
	RolloutProgressing = "progressing"
	RolloutComplete    = "complete"
	RolloutRolledBack  = "rolled-back"
	RolloutFailed      = "failed"
)

// ApplyResult answers an apply: the stored service and what changed.
type ApplyResult struct {
	Service Service  `json:"service"`
	Created bool     `json:"created"`
	Changed []string `json:"changed,omitempty"`
}

// Instance states.
const (
	InstancePending  = "pending"
	InstanceStarting = "starting"
	InstanceRunning  = "running"
	InstanceExited   = "exited"
	InstanceFailed   = "failed"
	InstanceStopped  = "stopped"
	InstanceUnknown  = "unknown"
)

// Health states.
const (
	HealthPassing  = "passing"
	HealthWarning  = "warning"
	HealthCritical = "critical"
)

// Instance is one placed copy of a service.
type Instance struct {
	ID         string `json:"id"`
	Service    string `json:"service"`
	Generation int64  `json:"generation"`
	Node       string `json:"node,omitempty"`
	// DesiredState is running or stopped.
	DesiredState string       `json:"desiredState"`
	Resources    ResourceSpec `json:"resources,omitzero"`
	// StopGrace is how long a stop waits after SIGTERM before SIGKILL.
	StopGrace Duration       `json:"stopGrace,omitempty"`
	Status    InstanceStatus `json:"status"`
	Meta
}

// Desired states of an instance.
const (
	DesiredRunning = "running"
	DesiredStopped = "stopped"
)

// DefaultStopGrace is the time between SIGTERM and SIGKILL on a stop.
const DefaultStopGrace = 10 * time.Second

// Reasons an instance is not running.
const (
	ReasonExited        = "exited"        // the process ended by itself
	ReasonKilled        = "killed"        // ended by a signal
	ReasonOOMKilled     = "OOMKilled"     // killed for exceeding its memory limit
	ReasonImageNotFound = "ImageNotFound" // the image is not on the node
	ReasonStartFailed   = "StartFailed"   // the runtime could not start it
	ReasonStopped       = "stopped"       // stopped on request
	ReasonUnschedulable = "Unschedulable" // no node can take it
)

// ExecRequest runs a command in an instance.
type ExecRequest struct {
	Command []string `json:"command"`
}

// ExecFrame is one line of an exec's answer: output, then the exit code.
type ExecFrame struct {
	Stream string `json:"stream,omitempty"` // stdout or stderr
	Data   string `json:"data,omitempty"`
	Exit   *int   `json:"exit,omitempty"`
	Error  string `json:"error,omitempty"`
}

// LogLine is one line of an instance's output.
type LogLine struct {
	Time   time.Time `json:"t"`
	Stream string    `json:"s"`
	Line   string    `json:"l"`
}

// Image is an image stored on a node.
type Image struct {
	Node    string    `json:"node"`
	Ref     string    `json:"ref"`
	Digest  string    `json:"digest"`
	Size    Bytes     `json:"size"`
	Created time.Time `json:"created,omitzero"`
	Error   string    `json:"error,omitempty"`
}

// PullRequest asks nodes to pull an image.
type PullRequest struct {
	Ref string `json:"ref"`
}

// InstanceStatus is what the node's agent observed.
type InstanceStatus struct {
	State      string        `json:"state"`
	Reason     string        `json:"reason,omitempty"`
	Message    string        `json:"message,omitempty"`
	ExitCode   *int          `json:"exitCode,omitempty"`
	Restarts   int           `json:"restarts,omitempty"`
	StartedAt  time.Time     `json:"startedAt,omitzero"`
	FinishedAt time.Time     `json:"finishedAt,omitzero"`
	Health     string        `json:"health,omitempty"`
	VNICs      []VNIC        `json:"vnics,omitempty"`
	Ports      []PortBinding `json:"ports,omitempty"`
}

// VNIC is an instance's virtual NIC on one network.
type VNIC struct {
	Network   string `json:"network"`
	Interface string `json:"interface"`
	MAC       string `json:"mac"`
	IP        string `json:"ip"`
}

// PortBinding is a named port as reachable on an instance.
type PortBinding struct {
	Name     string `json:"name"`
	Port     int    `json:"port"`
	Protocol string `json:"protocol,omitempty"`
	HostPort int    `json:"hostPort,omitempty"`
}

// RegistrationSpec is what a client sends to register an external instance.
type RegistrationSpec struct {
	Address string            `json:"address"`
	Port    int               `json:"port"`
	Ports   map[string]int    `json:"ports,omitempty"`
	Meta    map[string]string `json:"meta,omitempty"`
	// TTL: the registration expires when no heartbeat comes for this long.
	TTL Duration `json:"ttl,omitempty"`
	// Health defaults to passing.
	Health string `json:"health,omitempty"`
}

// Registration is an external instance in the service registry.
type Registration struct {
	Service string `json:"service"`
	ID      string `json:"id"`
	RegistrationSpec
	Meta
}

// Event types of a watch stream.
const (
	EventPut      = "put"
	EventDelete   = "delete"
	EventBookmark = "bookmark"
	EventError    = "error"
)

// Event is one line of a watch stream. Revisions increase along a stream; a
// client that reconnects with ?revision=R gets every event after R.
type Event struct {
	Type     string          `json:"type"`
	Kind     string          `json:"kind,omitempty"`
	Name     string          `json:"name,omitempty"`
	Revision int64           `json:"revision"`
	Object   json.RawMessage `json:"object,omitempty"`
	Error    *Error          `json:"error,omitempty"`
}

// List is the answer of a list endpoint.
type List[T any] struct {
	Items []T `json:"items"`
	// Revision is the store revision the list was read at; a watch from it
	// sees every later change.
	Revision int64 `json:"revision"`
}

// Kinds of objects, as named in watch events and URLs.
const (
	KindNode         = "node"
	KindNetwork      = "network"
	KindService      = "service"
	KindInstance     = "instance"
	KindRegistration = "registration"
)

// SetRevision records the store revision on an object.
func (m *Meta) SetRevision(rev int64) { m.Revision = rev }

// Endpoint is one instance of a service as discovery serves it: an
// orchestrated instance's address on one network, or an external
// registration.
type Endpoint struct {
	Service string `json:"service"`
	// ID is the instance's or registration's id.
	ID      string `json:"id"`
	Address string `json:"address"`
	// Port is the first declared port; Ports names them all.
	Port     int               `json:"port,omitempty"`
	Ports    map[string]int    `json:"ports,omitempty"`
	Network  string            `json:"network,omitempty"`
	Node     string            `json:"node,omitempty"`
	Health   string            `json:"health"`
	Meta     map[string]string `json:"meta,omitempty"`
	External bool              `json:"external,omitempty"`
}
