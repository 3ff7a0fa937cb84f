package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/network"
	"github.com/berth-dev/berth/internal/runtime"
)

// exitCode ends the CLI with a code and no message (exec passes its
// command's code on).
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func imageCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Images on the nodes"}
	var node string
	show := func(imgs []api.Image) error {
		failed := 0
		for _, i := range imgs {
			if i.Error != "" {
				failed++
				fmt.Fprintf(g.stderr, "node %s: %s\n", i.Node, i.Error)
				continue
			}
			fmt.Fprintf(g.stdout, "%s\t%s\t%s\n", i.Node, i.Ref, i.Digest)
		}
		if failed > 0 {
			return fmt.Errorf("%d node(s) failed", failed)
		}
		return nil
	}
	imp := &cobra.Command{Use: "import FILE", Short: "Import an OCI layout or docker-archive tarball", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.callLong(func(ctx context.Context, c *client.Client) error {
				imgs, err := c.ImportImage(ctx, args[0], node)
				if err != nil {
					return err
				}
				return show(imgs)
			})
		}}
	pull := &cobra.Command{Use: "pull REF", Short: "Pull an image from a registry", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.callLong(func(ctx context.Context, c *client.Client) error {
				imgs, err := c.PullImage(ctx, args[0], node)
				if err != nil {
					return err
				}
				return show(imgs)
			})
		}}
	ls := &cobra.Command{Use: "ls", Short: "List images", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				imgs, err := c.Images(ctx, node)
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, imgs, func(tw *tabwriter.Writer) {
					row(tw, "NODE", "REF", "DIGEST", "SIZE", "CREATED")
					for _, i := range imgs {
						if i.Error != "" {
							row(tw, i.Node, "error: "+i.Error, "", "", "")
							continue
						}
						d := i.Digest
						if len(d) > 19 {
							d = d[:19]
						}
						row(tw, i.Node, i.Ref, d, i.Size.Human(), ago(i.Created))
					}
				})
			})
		}}
	addOutput(ls, g)
	rm := &cobra.Command{Use: "rm REF", Short: "Remove an image no container uses", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				imgs, err := c.RemoveImage(ctx, args[0], node)
				if err != nil {
					return err
				}
				for _, i := range imgs {
					if i.Error != "" {
						return fmt.Errorf("node %s: %s", i.Node, i.Error)
					}
				}
				fmt.Fprintf(g.stdout, "image %s removed\n", args[0])
				return nil
			})
		}}
	for _, c := range []*cobra.Command{imp, pull, ls, rm} {
		c.Flags().StringVar(&node, "node", "", "only this node (default: every ready node)")
	}
	cmd.AddCommand(imp, pull, ls, rm)
	return cmd
}

// callLong is call without the 30 s bound, for transfers.
func (g *globals) callLong(fn func(ctx context.Context, c *client.Client) error) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	return fn(ctx, c)
}

type runFlags struct {
	image, cpu, memory, cpuLimit, memoryLimit, restart, user string
	replicas, maxRestarts                                    int
	env, networks, publish                                   []string
	readOnly, detach, allow32                                bool
}

func runCmd(g *globals) *cobra.Command {
	var f runFlags
	cmd := &cobra.Command{Use: "run NAME --image IMG [flags] [-- COMMAND ARGS...]",
		Short: "Run a service from flags (a shorthand for a spec)", Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec := map[string]any{"name": args[0], "image": f.image, "replicas": f.replicas}
			if len(args) > 1 {
				spec["command"] = args[1:]
			}
			res := map[string]any{}
			if f.cpu != "" {
				res["cpu"] = f.cpu
			}
			if f.memory != "" {
				res["memory"] = f.memory
			}
			lim := map[string]any{}
			if f.cpuLimit != "" {
				lim["cpu"] = f.cpuLimit
			}
			if f.memoryLimit != "" {
				lim["memory"] = f.memoryLimit
			}
			if len(lim) > 0 {
				res["limits"] = lim
			}
			if len(res) > 0 {
				spec["resources"] = res
			}
			env, err := parseKV("env", f.env)
			if err != nil {
				return err
			}
			if len(env) > 0 {
				spec["env"] = env
			}
			spec["restart"] = map[string]any{"policy": f.restart, "maxRestarts": f.maxRestarts}
			if len(f.networks) > 0 {
				spec["networks"] = f.networks
			}
			var ports []map[string]any
			for _, p := range f.publish {
				hp, cp, ok := strings.Cut(p, ":")
				proto := "tcp"
				if c, pr, has := strings.Cut(cp, "/"); has {
					cp, proto = c, pr
				}
				h, err1 := strconv.Atoi(hp)
				c, err2 := strconv.Atoi(cp)
				if !ok || err1 != nil || err2 != nil {
					return fmt.Errorf("--publish %q: expected HOSTPORT:PORT[/tcp|udp]", p)
				}
				ports = append(ports, map[string]any{"name": fmt.Sprintf("p%d", c), "port": c, "hostPort": h, "protocol": proto})
			}
			if len(ports) > 0 {
				spec["ports"] = ports
			}
			if f.user != "" || f.readOnly || f.allow32 {
				spec["security"] = map[string]any{"user": f.user, "readOnlyRootFilesystem": f.readOnly, "allow32bit": f.allow32}
			}
			body, _ := json.Marshal(spec)
			return g.callLong(func(ctx context.Context, c *client.Client) error {
				ar, err := c.ApplyServiceJSON(ctx, body)
				if err != nil {
					return err
				}
				verb := "updated"
				if ar.Created {
					verb = "created"
				} else if len(ar.Changed) == 0 {
					verb = "unchanged"
				}
				fmt.Fprintf(g.stdout, "service %s %s (generation %d)\n", ar.Service.Name, verb, ar.Service.Generation)
				if f.detach {
					return nil
				}
				return waitInstances(ctx, g, c, ar.Service, 60*time.Second)
			})
		}}
	fl := cmd.Flags()
	fl.StringVar(&f.image, "image", "", "image reference (required)")
	fl.IntVar(&f.replicas, "replicas", 1, "number of instances")
	fl.StringVar(&f.cpu, "cpu", "", "CPU request, e.g. 500m")
	fl.StringVar(&f.memory, "memory", "", "memory request and limit, e.g. 128Mi")
	fl.StringVar(&f.cpuLimit, "cpu-limit", "", "CPU limit (CFS quota), e.g. 1")
	fl.StringVar(&f.memoryLimit, "memory-limit", "", "memory limit above the request")
	fl.StringArrayVar(&f.env, "env", nil, "environment variable K=V (repeatable)")
	fl.StringArrayVar(&f.networks, "network", nil, "join this network (repeatable; default: the default network; \"none\": loopback only)")
	fl.StringArrayVarP(&f.publish, "publish", "p", nil, "publish a port on the node, HOSTPORT:PORT[/proto] (repeatable)")
	fl.StringVar(&f.restart, "restart", "always", "restart policy: always, on-failure or never")
	fl.IntVar(&f.maxRestarts, "max-restarts", 0, "with on-failure: at most this many restarts (0: no bound)")
	fl.StringVar(&f.user, "user", "", "run as this user (uid[:gid] or name)")
	fl.BoolVar(&f.readOnly, "read-only", false, "mount the root filesystem read-only")
	fl.BoolVar(&f.allow32, "allow-32bit", false, "allow 32-bit system calls (x86, x32) in the seccomp filter")
	fl.BoolVarP(&f.detach, "detach", "d", false, "do not wait for the instances to start")
	return cmd
}

// waitInstances waits until every instance of the service's generation is
// running or has failed, and prints them.
func waitInstances(ctx context.Context, g *globals, c *client.Client, svc api.Service, timeout time.Duration) error {
	want := 1
	if svc.Spec.Replicas != nil {
		want = *svc.Spec.Replicas
	}
	deadline := time.Now().Add(timeout)
	var list []api.Instance
	for {
		l, err := c.ListInstances(ctx, client.InstanceFilter{Service: svc.Name})
		if err != nil {
			return err
		}
		list = list[:0]
		settled := 0
		for _, in := range l.Items {
			if in.Generation != svc.Generation || in.DesiredState != api.DesiredRunning {
				continue
			}
			list = append(list, in)
			switch in.Status.State {
			case api.InstanceRunning, api.InstanceFailed, api.InstanceExited:
				settled++
			}
		}
		if settled >= want && len(list) >= want {
			break
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(g.stderr, "still waiting after %v; see berth ps\n", timeout)
			break
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
	failed := 0
	for _, in := range list {
		line := fmt.Sprintf("%s\t%s\t%s", in.ID, orDash(in.Node), in.Status.State)
		if in.Status.Message != "" {
			line += "\t" + in.Status.Message
		}
		fmt.Fprintln(g.stdout, line)
		if in.Status.State == api.InstanceFailed {
			failed++
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d instances failed (berth inspect ID shows why)", failed, len(list))
	}
	return nil
}

func exitText(in api.Instance) string {
	if in.Status.ExitCode == nil {
		return "-"
	}
	return fmt.Sprint(*in.Status.ExitCode)
}

func psCmd(g *globals) *cobra.Command {
	var f client.InstanceFilter
	cmd := &cobra.Command{Use: "ps", Short: "List instances", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				l, err := c.ListInstances(ctx, f)
				if err != nil {
					return err
				}
				format := g.output
				if format == "wide" {
					format = "table"
				}
				return render(g.stdout, format, l.Items, func(tw *tabwriter.Writer) {
					head := []any{"ID", "SERVICE", "NODE", "STATE", "EXIT", "RESTARTS", "STARTED"}
					if g.output == "wide" {
						head = append(head, "NETWORKS", "REASON", "MESSAGE")
					}
					row(tw, head...)
					for _, in := range l.Items {
						cols := []any{in.ID, in.Service, orDash(in.Node), in.Status.State, exitText(in), in.Status.Restarts, ago(in.Status.StartedAt)}
						if g.output == "wide" {
							var nets []string
							for _, v := range in.Status.VNICs {
								nets = append(nets, fmt.Sprintf("%s=%s/%s", v.Network, v.IP, v.MAC))
							}
							cols = append(cols, orDash(strings.Join(nets, ",")), orDash(in.Status.Reason), orDash(in.Status.Message))
						}
						row(tw, cols...)
					}
				})
			})
		}}
	cmd.Flags().StringVar(&f.Service, "service", "", "only this service's instances")
	cmd.Flags().StringVar(&f.Node, "node", "", "only this node's instances")
	cmd.Flags().StringVarP(&g.output, "output", "o", "table", "output format: table, wide, json or yaml")
	return cmd
}

func inspectCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "inspect ID", Short: "Show one instance", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				in, err := c.GetInstance(ctx, args[0])
				if err != nil {
					return err
				}
				return render(g.stdout, g.output, in, func(tw *tabwriter.Writer) {
					row(tw, "ID:", in.ID)
					row(tw, "Service:", fmt.Sprintf("%s (generation %d)", in.Service, in.Generation))
					row(tw, "Node:", orDash(in.Node))
					row(tw, "Desired:", in.DesiredState)
					row(tw, "State:", in.Status.State)
					row(tw, "Reason:", orDash(in.Status.Reason))
					row(tw, "Message:", orDash(in.Status.Message))
					row(tw, "Exit code:", exitText(in))
					row(tw, "Restarts:", in.Status.Restarts)
					row(tw, "Started:", ago(in.Status.StartedAt))
					row(tw, "Finished:", ago(in.Status.FinishedAt))
					row(tw, "Resources:", fmt.Sprintf("cpu %s, memory %s", in.Resources.CPU, in.Resources.Memory.Human()))
					for _, v := range in.Status.VNICs {
						row(tw, "VNIC:", fmt.Sprintf("%s %s ip %s mac %s", v.Network, v.Interface, v.IP, v.MAC))
					}
					for _, p := range in.Status.Ports {
						if p.HostPort != 0 {
							row(tw, "Published:", fmt.Sprintf("%d/%s -> %d", p.HostPort, p.Protocol, p.Port))
						}
					}
				})
			})
		}}
	addOutput(cmd, g)
	return cmd
}

func logsCmd(g *globals) *cobra.Command {
	var follow, stamps bool
	var tail int
	cmd := &cobra.Command{Use: "logs [-f] [--tail N] ID", Short: "Show an instance's output", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.callLong(func(ctx context.Context, c *client.Client) error {
				return c.Logs(ctx, args[0], tail, follow, func(l api.LogLine) error {
					w := g.stdout
					if l.Stream == "stderr" {
						w = g.stderr
					}
					if stamps {
						_, err := fmt.Fprintf(w, "%s %s\n", l.Time.Format(time.RFC3339Nano), l.Line)
						return err
					}
					_, err := fmt.Fprintln(w, l.Line)
					return err
				})
			})
		}}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output")
	cmd.Flags().IntVar(&tail, "tail", -1, "only the last N lines")
	cmd.Flags().BoolVarP(&stamps, "timestamps", "t", false, "prefix each line with its time")
	return cmd
}

func execCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "exec ID -- COMMAND [ARGS...]", Short: "Run a command inside an instance", Args: cobra.MinimumNArgs(2),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.callLong(func(ctx context.Context, c *client.Client) error {
				code, err := c.Exec(ctx, args[0], args[1:], g.stdout, g.stderr)
				if err != nil {
					return err
				}
				if code != 0 {
					return exitCode(code)
				}
				return nil
			})
		}}
	return cmd
}

func stopCmd(g *globals) *cobra.Command {
	var grace time.Duration
	cmd := &cobra.Command{Use: "stop ID", Short: "Stop an instance (SIGTERM, then SIGKILL after the grace period)", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.callLong(func(ctx context.Context, c *client.Client) error {
				if _, err := c.StopInstance(ctx, args[0], grace); err != nil {
					return err
				}
				deadline := time.Now().Add(grace + 15*time.Second)
				for time.Now().Before(deadline) {
					in, err := c.GetInstance(ctx, args[0])
					if err != nil {
						return err
					}
					if in.Status.State == api.InstanceStopped || in.Status.State == api.InstanceFailed || in.Status.State == api.InstanceExited || in.Status.State == api.InstancePending {
						fmt.Fprintf(g.stdout, "%s stopped (exit code %s)\n", in.ID, exitText(in))
						return nil
					}
					time.Sleep(100 * time.Millisecond)
				}
				return fmt.Errorf("%s: stop requested, not yet confirmed by its node", args[0])
			})
		}}
	cmd.Flags().DurationVar(&grace, "grace", api.DefaultStopGrace, "time between SIGTERM and SIGKILL")
	return cmd
}

func rmCmd(g *globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{Use: "rm ID", Short: "Remove a stopped instance (-f: even a running one)", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				if err := c.RemoveInstance(ctx, args[0], force); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "%s removed\n", args[0])
				return nil
			})
		}}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "remove even a running instance")
	return cmd
}

func agentCleanupCmd(g *globals) *cobra.Command {
	var dataDir string
	cmd := &cobra.Command{Use: "cleanup", Short: "Stop this node's containers and runtime, unmount what they left, remove berth's bridges and nftables table, and restore the br_netfilter switches it turned off (for resets and tests)", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			p, err := runtime.PathsFor(dataDir)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if err := runtime.Shutdown(ctx, p, g.logger()); err != nil {
				return err
			}
			if err := network.Cleanup(); err != nil {
				return err
			}
			if err := network.RestoreBridgeNetfilter(dataDir); err != nil {
				return err
			}
			fmt.Fprintf(g.stdout, "runtime of %s stopped and cleaned; berth's bridges and nftables table removed; br_netfilter switches restored\n", dataDir)
			return nil
		}}
	cmd.Flags().StringVar(&dataDir, "data-dir", "/var/lib/berth", "the agent's data directory")
	return cmd
}
