package cli

import (
	"fmt"
	"os"
	"runtime/debug"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/agent"
	"github.com/berth-dev/berth/internal/daemon"
)

func sortStrings(s []string) { sort.Strings(s) }

// parseKV reads k=v pairs.
func parseKV(flag string, pairs []string) (map[string]string, error) {
	if len(pairs) == 0 {
		return nil, nil
	}
	m := map[string]string{}
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--%s %q: expected key=value", flag, p)
		}
		m[k] = v
	}
	return m, nil
}

type agentFlags struct {
	listen        string
	name, address string
	labels        []string
	ttl           time.Duration
	reserveCPU    string
	reserveMemory string
	keepBridgeNF  bool
}

func (f *agentFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.name, "node-name", "", "this node's name (default: the host name)")
	cmd.Flags().StringVar(&f.address, "node-address", "", "this node's address (default: its first global IPv4 address)")
	cmd.Flags().StringArrayVar(&f.labels, "label", nil, "node label key=value (repeatable)")
	cmd.Flags().DurationVar(&f.ttl, "node-ttl", 10*time.Second, "how long the node stays ready without a heartbeat (2s to 10m)")
	cmd.Flags().StringVar(&f.reserveCPU, "reserve-cpu", "100m", "CPU kept back for the system")
	cmd.Flags().StringVar(&f.reserveMemory, "reserve-memory", "256Mi", "memory kept back for the system")
	cmd.Flags().BoolVar(&f.keepBridgeNF, "keep-bridge-netfilter", false, "leave net.bridge.bridge-nf-call-* as they are (by default the agent turns them off in its network namespace: berth's rules do not need bridged traffic to pass iptables, and it slows bridge networks by about 5%)")
	cmd.Flags().StringVar(&f.listen, "agent-addr", "", "where the agent serves logs, exec and images to the server (default: node address, port 7481; dev: a free loopback port)")
}

func (f *agentFlags) config() (agent.Config, error) {
	lbl, err := parseKV("label", f.labels)
	if err != nil {
		return agent.Config{}, err
	}
	cpu, err := api.ParseCPU(f.reserveCPU)
	if err != nil {
		return agent.Config{}, fmt.Errorf("--reserve-cpu: %w", err)
	}
	mem, err := api.ParseBytes(f.reserveMemory)
	if err != nil {
		return agent.Config{}, fmt.Errorf("--reserve-memory: %w", err)
	}
	if f.ttl < 2*time.Second || f.ttl > 10*time.Minute {
		return agent.Config{}, fmt.Errorf("--node-ttl %v: must be between 2s and 10m", f.ttl)
	}
	return agent.Config{Name: f.name, Address: f.address, Labels: lbl, TTL: f.ttl,
		Reserved: api.Resources{CPU: cpu, Memory: mem}, Version: Version, Listen: f.listen, KeepBridgeNetfilter: f.keepBridgeNF}, nil
}

func devCmd(g *globals) *cobra.Command {
	var dataDir, apiAddr, dnsAddr string
	var grace time.Duration
	var af agentFlags
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a server with an embedded etcd and an agent for this machine, in one process",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			acfg, err := af.config()
			if err != nil {
				return err
			}
			acfg.DataDir = dataDir
			if acfg.Listen == "" {
				acfg.Listen = "127.0.0.1:0"
			}
			leanGC()
			ctx, stop := signalContext()
			defer stop()
			return daemon.RunDev(ctx, daemon.ServerConfig{DataDir: dataDir, APIAddr: apiAddr, NodeTTL: acfg.TTL, NodeDownGrace: grace, DNSAddr: dnsAddr},
				acfg, g.stdout, g.logger())
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/berth", "where berth keeps its state")
	cmd.Flags().StringVar(&apiAddr, "api-addr", "127.0.0.1:7480", "where the API listens")
	cmd.Flags().DurationVar(&grace, "node-down-grace", 5*time.Second, "how long a node may be down before its instances are replaced elsewhere")
	cmd.Flags().StringVar(&dnsAddr, "dns-addr", "", "answer NAME.svc.berth here, e.g. 127.0.0.1:5353 (default: no DNS)")
	af.add(cmd)
	return cmd
}

func serverCmd(g *globals) *cobra.Command {
	var cfg daemon.ServerConfig
	var endpoints string
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run a berth server: the API, the store and the controllers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, e := range strings.Split(endpoints, ",") {
				if e = strings.TrimSpace(e); e != "" {
					cfg.EtcdEndpoints = append(cfg.EtcdEndpoints, e)
				}
			}
			ctx, stop := signalContext()
			defer stop()
			return daemon.RunServer(ctx, cfg, g.stdout, g.logger())
		},
	}
	cmd.Flags().StringVar(&cfg.DataDir, "data-dir", "/var/lib/berth", "where the embedded etcd keeps its data")
	cmd.Flags().StringVar(&cfg.APIAddr, "api-addr", "127.0.0.1:7480", "where the API listens")
	cmd.Flags().StringVar(&endpoints, "etcd-endpoints", "", "use an external etcd cluster (comma-separated client URLs) instead of the embedded one")
	cmd.Flags().DurationVar(&cfg.NodeTTL, "node-ttl", 10*time.Second, "default node lease when an agent asks for none")
	cmd.Flags().DurationVar(&cfg.NodeDownGrace, "node-down-grace", 5*time.Second, "how long a node may be down before its instances are replaced elsewhere")
	cmd.Flags().StringVar(&cfg.DNSAddr, "dns-addr", "", "answer NAME.svc.berth here, e.g. 127.0.0.1:5353 (default: no DNS)")
	return cmd
}

func agentCmd(g *globals) *cobra.Command {
	var serverAddr, agentDataDir string
	var af agentFlags
	var simulate int
	var simPrefix string
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run a berth agent for this machine, joined to a server",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			acfg, err := af.config()
			if err != nil {
				return err
			}
			if serverAddr == "" {
				serverAddr = g.addr
			}
			if simulate > 0 {
				return runSimulated(g, serverAddr, simulate, simPrefix, af)
			}
			acfg.DataDir = agentDataDir
			ctx, stop := signalContext()
			defer stop()
			return daemon.RunAgent(ctx, daemon.AgentConfig{Server: serverAddr, Config: acfg}, g.stdout, g.logger())
		},
	}
	cmd.Flags().StringVar(&serverAddr, "server", "", "the server's API address (default: --addr)")
	cmd.Flags().StringVar(&agentDataDir, "data-dir", "/var/lib/berth", "where the agent keeps its runtime, logs and instance files")
	cmd.Flags().IntVar(&simulate, "simulate", 0, "FOR TESTS AND BENCHMARKS ONLY: run N simulated nodes whose fake runtime reports instances running at once (nothing is run)")
	cmd.Flags().StringVar(&simPrefix, "simulate-prefix", "sim-", "name prefix of the simulated nodes")
	af.add(cmd)
	cmd.AddCommand(agentCleanupCmd(g))
	return cmd
}

// devGCPercent is the garbage collector's target in `berth dev`: the heap
// may grow to 1.5 times what is live instead of Go's default twice. One
// machine running everything is where memory counts most; the collector
// costs a little more CPU (with 10,000 registrations: 92 instead of 110
// MiB resident, registrations within noise). GOGC, when set, wins.
const devGCPercent = 50

func leanGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(devGCPercent)
	}
}
