package cli

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
)

// checkCmd feeds instances' TTL checks: berth check pass|warn|fail ID.
func checkCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "check pass|warn|fail ID [--output TEXT]",
		Short: "Set the state of an instance's TTL check (its spec has check: {ttl: ...})",
		Long: "A TTL check is fed from outside: each update holds for the check's TTL, after which the\n" +
			"check turns critical unless another update came. A critical instance leaves the healthy\n" +
			"discovery view and DNS until its check passes again."}
	for _, v := range []struct{ verb, state, short string }{
		{"pass", api.HealthPassing, "Mark an instance's TTL check passing"},
		{"warn", api.HealthWarning, "Mark an instance's TTL check warning (still discovered as healthy)"},
		{"fail", api.HealthCritical, "Mark an instance's TTL check critical"},
	} {
		var output string
		sub := &cobra.Command{Use: v.verb + " ID", Short: v.short, Args: cobra.ExactArgs(1),
			RunE: func(_ *cobra.Command, args []string) error {
				return g.call(func(ctx context.Context, c *client.Client) error {
					in, err := c.UpdateCheck(ctx, args[0], api.CheckUpdate{State: v.state, Output: output})
					if err != nil {
						return err
					}
					health := in.Status.Health
					if health == "" {
						health = "-"
					}
					fmt.Fprintf(g.stdout, "%s: check %s (instance health %s)\n", in.ID, v.state, health)
					return nil
				})
			}}
		sub.Flags().StringVar(&output, "output", "", "what the check says (shown with its state)")
		cmd.AddCommand(sub)
	}
	return cmd
}
