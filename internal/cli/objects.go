package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/network"
)

// call runs fn with a client and a bounded context.
func (g *globals) call(fn func(ctx context.Context, c *client.Client) error) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	ctx, cancel := cmdContext()
	defer cancel()
	return fn(ctx, c)
}

func nodeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Nodes: machines that run an agent"}
	ls := &cobra.Command{Use: "ls", Short: "List nodes", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				l, err := c.ListNodes(ctx)
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, l.Items, func(tw *tabwriter.Writer) {
					row(tw, "NAME", "STATUS", "ADDRESS", "CPU", "MEMORY", "LABELS", "HEARTBEAT")
					for _, n := range l.Items {
						row(tw, n.Name, n.Status.State, n.Address, n.Allocatable.CPU, n.Allocatable.Memory.Human(), labels(n.Labels), ago(n.Status.LastHeartbeat))
					}
				})
			})
		}}
	addOutput(ls, g)
	inspect := &cobra.Command{Use: "inspect NAME", Short: "Show one node", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				n, err := c.GetNode(ctx, args[0])
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, n, func(tw *tabwriter.Writer) {
					row(tw, "Name:", n.Name)
					row(tw, "Status:", n.Status.State)
					if n.Status.Message != "" {
						row(tw, "Message:", n.Status.Message)
					}
					row(tw, "Address:", n.Address)
					row(tw, "Labels:", labels(n.Labels))
					row(tw, "Capacity:", fmt.Sprintf("cpu %s, memory %s", n.Capacity.CPU, n.Capacity.Memory.Human()))
					row(tw, "Allocatable:", fmt.Sprintf("cpu %s, memory %s", n.Allocatable.CPU, n.Allocatable.Memory.Human()))
					row(tw, "Lease TTL:", n.TTL)
					row(tw, "Last heartbeat:", ago(n.Status.LastHeartbeat))
					row(tw, "Agent:", orDash(n.AgentVersion))
					row(tw, "Registered:", ago(n.CreatedAt))
				})
			})
		}}
	addOutput(inspect, g)
	var force bool
	rm := &cobra.Command{Use: "rm NAME", Short: "Forget a node that is down", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				if err := c.DeleteNode(ctx, args[0], force); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "node %s removed\n", args[0])
				return nil
			})
		}}
	rm.Flags().BoolVar(&force, "force", false, "remove even a ready node")
	cmd.AddCommand(ls, inspect, rm)
	return cmd
}

func networkCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "network", Short: "Virtual networks"}
	var spec api.NetworkSpec
	create := &cobra.Command{Use: "create NAME --subnet CIDR", Short: "Create a network", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			spec.Name = args[0]
			return g.call(func(ctx context.Context, c *client.Client) error {
				n, err := c.CreateNetwork(ctx, spec)
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "network %s created: %s (gateway %s, %s)\n", n.Name, n.Subnet, n.Gateway, n.Driver)
				return nil
			})
		}}
	create.Flags().StringVar(&spec.Subnet, "subnet", "", "the network's CIDR, e.g. 10.90.0.0/24")
	create.Flags().StringVar(&spec.Gateway, "gateway", "", "gateway address (default: the subnet's first)")
	create.Flags().StringVar(&spec.Driver, "driver", "bridge", "bridge (one node) or overlay (VXLAN across nodes)")
	ls := &cobra.Command{Use: "ls", Short: "List networks", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				l, err := c.ListNetworks(ctx)
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, l.Items, func(tw *tabwriter.Writer) {
					row(tw, "NAME", "DRIVER", "SUBNET", "GATEWAY", "CREATED")
					for _, n := range l.Items {
						row(tw, n.Name, n.Driver, n.Subnet, n.Gateway, ago(n.CreatedAt))
					}
				})
			})
		}}
	addOutput(ls, g)
	inspect := &cobra.Command{Use: "inspect NAME", Short: "Show one network", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				n, err := c.GetNetwork(ctx, args[0])
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, n, func(tw *tabwriter.Writer) {
					row(tw, "Name:", n.Name)
					row(tw, "Driver:", n.Driver)
					row(tw, "Subnet:", n.Subnet)
					row(tw, "Gateway:", n.Gateway)
					row(tw, "Bridge:", network.BridgeName(n.Name))
					row(tw, "Addresses:", fmt.Sprintf("%d used, %d free", n.Status.AddressesUsed, n.Status.AddressesFree))
					row(tw, "Created:", ago(n.CreatedAt))
					for _, a := range n.Status.Attached {
						row(tw, "Attached:", fmt.Sprintf("%s on %s: ip %s mac %s", a.Instance, a.Node, a.IP, a.MAC))
					}
				})
			})
		}}
	addOutput(inspect, g)
	rm := &cobra.Command{Use: "rm NAME", Short: "Remove a network nothing uses", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				if err := c.DeleteNetwork(ctx, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "network %s removed\n", args[0])
				return nil
			})
		}}
	cmd.AddCommand(create, ls, inspect, rm)
	return cmd
}

func replicas(s api.ServiceSpec) int {
	if s.Replicas == nil {
		return 1
	}
	return *s.Replicas
}

func serviceCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "service", Short: "Services: declared specs and their state"}
	ls := &cobra.Command{Use: "ls", Short: "List services", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				l, err := c.ListServices(ctx)
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, l.Items, func(tw *tabwriter.Writer) {
					row(tw, "NAME", "IMAGE", "REPLICAS", "RUNNING", "GENERATION", "UPDATED")
					for _, s := range l.Items {
						row(tw, s.Name, s.Spec.Image, replicas(s.Spec), s.Status.Running, s.Generation, ago(s.UpdatedAt))
					}
				})
			})
		}}
	addOutput(ls, g)
	inspect := &cobra.Command{Use: "inspect NAME", Short: "Show one service", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				s, err := c.GetService(ctx, args[0])
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, s, func(tw *tabwriter.Writer) {
					row(tw, "Name:", s.Name)
					row(tw, "Image:", s.Spec.Image)
					row(tw, "Command:", orDash(strings.Join(append(append([]string{}, s.Spec.Command...), s.Spec.Args...), " ")))
					row(tw, "Replicas:", replicas(s.Spec))
					row(tw, "Resources:", fmt.Sprintf("cpu %s, memory %s", s.Spec.Resources.CPU, s.Spec.Resources.Memory))
					row(tw, "Networks:", orDash(strings.Join(s.Spec.Networks, ", ")))
					row(tw, "Generation:", s.Generation)
					row(tw, "Running:", s.Status.Running)
					row(tw, "Updated:", ago(s.UpdatedAt))
				})
			})
		}}
	addOutput(inspect, g)
	rm := &cobra.Command{Use: "rm NAME", Short: "Remove a service", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				if err := c.DeleteService(ctx, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "service %s removed\n", args[0])
				return nil
			})
		}}
	cmd.AddCommand(ls, inspect, rm)
	return cmd
}

// specJSON reads a YAML or JSON spec file ("-" for stdin) as JSON, so the
// server checks it exactly as written.
func specJSON(path string) ([]byte, error) {
	var data []byte
	var err error
	if path == "-" {
		data, err = io.ReadAll(os.Stdin)
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, fmt.Errorf("read spec: %w", err)
	}
	j, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("%s: not YAML or JSON: %w", path, err)
	}
	return j, nil
}

func applyCmd(g *globals) *cobra.Command {
	var file string
	cmd := &cobra.Command{Use: "apply -f FILE", Short: "Create or update a service from a YAML or JSON spec", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			if file == "" {
				return errors.New("-f FILE is required (a YAML or JSON service spec, or - for stdin)")
			}
			spec, err := specJSON(file)
			if err != nil {
				return err
			}
			return g.call(func(ctx context.Context, c *client.Client) error {
				res, err := c.ApplyServiceJSON(ctx, spec)
				if err != nil {
					return err
				}
				switch {
				case res.Created:
					fmt.Fprintf(g.stdout, "service %s created (generation %d)\n", res.Service.Name, res.Service.Generation)
				case len(res.Changed) == 0:
					fmt.Fprintf(g.stdout, "service %s unchanged (generation %d)\n", res.Service.Name, res.Service.Generation)
				default:
					fmt.Fprintf(g.stdout, "service %s updated (generation %d): changed %s\n", res.Service.Name, res.Service.Generation, strings.Join(res.Changed, ", "))
				}
				return nil
			})
		}}
	cmd.Flags().StringVarP(&file, "file", "f", "", "spec file (YAML or JSON; - for stdin)")
	return cmd
}

func scaleCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "scale NAME REPLICAS", Short: "Set a service's number of instances", Args: cobra.ExactArgs(2),
		RunE: func(_ *cobra.Command, args []string) error {
			n, err := strconv.Atoi(args[1])
			if err != nil {
				return fmt.Errorf("replicas: %q is not a number", args[1])
			}
			return g.call(func(ctx context.Context, c *client.Client) error {
				svc, err := c.GetService(ctx, args[0])
				if err != nil {
					return err
				}
				spec := svc.Spec
				spec.Replicas = &n
				res, err := c.ApplyService(ctx, spec)
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "service %s scaled to %d (generation %d)\n", res.Service.Name, n, res.Service.Generation)
				return nil
			})
		}}
}

func registryCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "registry", Short: "External registrations in the service registry"}
	ls := &cobra.Command{Use: "ls [SERVICE]", Short: "List registrations", Args: cobra.MaximumNArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			svc := ""
			if len(args) == 1 {
				svc = args[0]
			}
			return g.call(func(ctx context.Context, c *client.Client) error {
				l, err := c.ListRegistrations(ctx, svc)
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, l.Items, func(tw *tabwriter.Writer) {
					row(tw, "SERVICE", "ID", "ADDRESS", "PORT", "HEALTH", "TTL")
					for _, r := range l.Items {
						row(tw, r.Service, r.ID, r.Address, r.Port, r.Health, r.TTL)
					}
				})
			})
		}}
	addOutput(ls, g)
	var ttl time.Duration
	var meta []string
	register := &cobra.Command{Use: "register NAME ADDRESS PORT [--id ID] [--ttl 30s] [--meta k=v]",
		Short: "Register an external instance; it expires when not renewed within its TTL", Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			port, err := strconv.Atoi(args[2])
			if err != nil {
				return fmt.Errorf("port: %q is not a number", args[2])
			}
			m, err := parseKV("meta", meta)
			if err != nil {
				return err
			}
			id, _ := cmd.Flags().GetString("id")
			if id == "" {
				id = fmt.Sprintf("%s-%s-%d", args[0], strings.NewReplacer(".", "-", ":", "-").Replace(args[1]), port)
			}
			return g.call(func(ctx context.Context, c *client.Client) error {
				r, err := c.Register(ctx, args[0], id, api.RegistrationSpec{Address: args[1], Port: port, Meta: m, TTL: api.Duration(ttl)})
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "registered %s/%s at %s:%d (ttl %s)\n", r.Service, r.ID, r.Address, r.Port, r.TTL)
				return nil
			})
		}}
	register.Flags().String("id", "", "the instance id (default: derived from the address and port)")
	register.Flags().DurationVar(&ttl, "ttl", api.DefaultRegistrationTTL, "expire unless renewed within this long")
	register.Flags().StringArrayVar(&meta, "meta", nil, "metadata key=value (repeatable)")
	deregister := &cobra.Command{Use: "deregister NAME ID", Short: "Remove a registration", Args: cobra.ExactArgs(2),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				if err := c.Deregister(ctx, args[0], args[1]); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "deregistered %s/%s\n", args[0], args[1])
				return nil
			})
		}}
	cmd.AddCommand(ls, register, deregister)
	return cmd
}

func discoverCmd(g *globals) *cobra.Command {
	var o client.DiscoverOptions
	var meta []string
	var watch bool
	cmd := &cobra.Command{Use: "discover NAME [--healthy] [--watch]", Short: "A service's endpoints: its instances and registrations", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			m := map[string]string{}
			for _, kv := range meta {
				k, v, ok := strings.Cut(kv, ":")
				if !ok {
					return fmt.Errorf("--meta %q: expected key:value", kv)
				}
				m[k] = v
			}
			o.Meta = m
			if watch {
				return g.callLong(func(ctx context.Context, c *client.Client) error {
					return g.printStream(ctx, c, client.DiscoveryPath(args[0], o), 0, false)
				})
			}
			return g.call(func(ctx context.Context, c *client.Client) error {
				l, err := c.Discover(ctx, args[0], o)
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, l.Items, func(tw *tabwriter.Writer) {
					row(tw, "ID", "ADDRESS", "PORT", "NETWORK", "NODE", "HEALTH")
					for _, ep := range l.Items {
						net := ep.Network
						if ep.External {
							net = "(external)"
						}
						port := "-"
						if ep.Port != 0 {
							port = strconv.Itoa(ep.Port)
						}
						row(tw, ep.ID, ep.Address, port, orDash(net), orDash(ep.Node), ep.Health)
					}
				})
			})
		}}
	cmd.Flags().BoolVar(&o.Healthy, "healthy", false, "only passing and warning endpoints")
	cmd.Flags().StringVar(&o.Network, "network", "", "only endpoints on this network")
	cmd.Flags().StringArrayVar(&meta, "meta", nil, "only endpoints with metadata key:value (repeatable)")
	cmd.Flags().BoolVar(&watch, "watch", false, "stream the view's changes as JSON lines")
	addOutput(cmd, g)
	return cmd
}

func watchCmd(g *globals) *cobra.Command {
	var from int64
	paths := map[string]string{"nodes": client.WatchNodes, "networks": client.WatchNetworks,
		"services": client.WatchServices, "instances": client.WatchInstances, "registrations": client.WatchRegistrations}
	cmd := &cobra.Command{Use: "watch nodes|networks|services|instances|registrations",
		Short: "Stream changes as JSON lines", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			p, ok := paths[args[0]]
			if !ok {
				return fmt.Errorf("cannot watch %q: choose nodes, networks, services, instances or registrations", args[0])
			}
			return g.callLong(func(ctx context.Context, c *client.Client) error {
				return g.printStream(ctx, c, p, from, true)
			})
		}}
	cmd.Flags().Int64Var(&from, "revision", 0, "resume after this revision (default: start with the current objects)")
	return cmd
}

// printStream prints a watch stream's events as JSON lines until the
// command is interrupted (bookmarks only when asked for).
func (g *globals) printStream(ctx context.Context, c *client.Client, path string, from int64, bookmarks bool) error {
	s, err := c.Watch(ctx, path, from)
	if err != nil {
		return err
	}
	defer s.Close()
	enc := json.NewEncoder(g.stdout)
	for {
		ev, err := s.Next()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if ev.Type == api.EventBookmark && !bookmarks {
			continue
		}
		if err := enc.Encode(ev); err != nil {
			return err
		}
	}
}
