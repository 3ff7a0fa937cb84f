package cli

import (
	"context"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
)

func rolloutCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "rollout", Short: "Follow, list and undo a service's rollouts"}
	var timeout time.Duration
	status := &cobra.Command{Use: "status NAME", Short: "Wait for the current rollout, printing its progress", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.callLong(func(ctx context.Context, c *client.Client) error {
				deadline := time.Now().Add(timeout)
				last := ""
				var started int64 // the generation whose rollout is followed
				for {
					svc, err := c.GetService(ctx, args[0])
					if err != nil {
						return err
					}
					if started == 0 {
						started = svc.Generation
					}
					st := svc.Status
					line := fmt.Sprintf("generation %d: %s", svc.Generation, orDash(st.Rollout))
					if st.Message != "" {
						line += ": " + st.Message
					}
					if line != last {
						fmt.Fprintln(g.stdout, line)
						last = line
					}
					switch {
					case st.Rollout == api.RolloutRolledBack && svc.Generation > started,
						st.Rollout == api.RolloutFailed:
						return errors.New("the rollout did not complete")
					case svc.Generation > started:
						return fmt.Errorf("generation %d was superseded by %d", started, svc.Generation)
					case st.StableGeneration == started && (st.Rollout == api.RolloutComplete || st.Rollout == api.RolloutRolledBack):
						return nil
					}
					if time.Now().After(deadline) {
						return fmt.Errorf("still rolling out after %v", timeout)
					}
					select {
					case <-ctx.Done():
						return nil
					case <-time.After(200 * time.Millisecond):
					}
				}
			})
		}}
	status.Flags().DurationVar(&timeout, "timeout", 5*time.Minute, "give up after this long")
	history := &cobra.Command{Use: "history NAME", Short: "List a service's generations", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				svc, err := c.GetService(ctx, args[0])
				if err != nil {
					return err
				}
				revs := append(append([]api.SpecRevision{}, svc.History...),
					api.SpecRevision{Generation: svc.Generation, Spec: svc.Spec, AppliedAt: svc.UpdatedAt})
				return render(g.stdout, g.output, revs, func(tw *tabwriter.Writer) {
					row(tw, "GENERATION", "APPLIED", "IMAGE", "REPLICAS", "")
					for _, r := range revs {
						mark := ""
						if r.Generation == svc.Generation {
							mark = "current"
						} else if r.Generation == svc.Status.StableGeneration {
							mark = "stable"
						}
						row(tw, r.Generation, ago(r.AppliedAt), r.Spec.Image, replicas(r.Spec), mark)
					}
				})
			})
		}}
	addOutput(history, g)
	undo := &cobra.Command{Use: "undo NAME", Short: "Apply the previous generation's spec again", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c *client.Client) error {
				svc, err := c.GetService(ctx, args[0])
				if err != nil {
					return err
				}
				if len(svc.History) == 0 {
					return fmt.Errorf("service %s has no earlier generation", args[0])
				}
				prev := svc.History[len(svc.History)-1]
				res, err := c.ApplyService(ctx, prev.Spec)
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "service %s: spec of generation %d applied as generation %d\n", args[0], prev.Generation, res.Service.Generation)
				return nil
			})
		}}
	cmd.AddCommand(status, history, undo)
	return cmd
}
