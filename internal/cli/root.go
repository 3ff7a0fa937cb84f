// Package cli is berth's command line: cobra commands that start the daemons
// or talk to the API through the public client. It prints, it does not decide.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
)

// Version is set at build time.
var Version = "dev"

type globals struct {
	addr     string
	output   string
	logLevel string
	stdout   io.Writer
	stderr   io.Writer
}

// Main runs the command line with args and returns the process exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	g := &globals{stdout: stdout, stderr: stderr}
	defer startProfile(stderr)()
	root := newRoot(g)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	if err := root.Execute(); err != nil {
		var code exitCode
		if errors.As(err, &code) {
			return int(code)
		}
		fmt.Fprintf(stderr, "berth: %s\n", describeErr(err))
		return 1
	}
	return 0
}

func describeErr(err error) string {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae.Message
	}
	return err.Error()
}

func newRoot(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:           "berth",
		Short:         "berth runs containers on a cluster, wires their networks and keeps a live service registry",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       Version,
	}
	defAddr := os.Getenv("BERTH_ADDR")
	if defAddr == "" {
		defAddr = client.DefaultAddr
	}
	root.PersistentFlags().StringVar(&g.addr, "addr", defAddr, "berth API address (env BERTH_ADDR)")
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level of daemons: debug, info, warn, error")
	root.AddCommand(devCmd(g), serverCmd(g), agentCmd(g),
		nodeCmd(g), networkCmd(g), serviceCmd(g), applyCmd(g), watchCmd(g), registryCmd(g),
		imageCmd(g), runCmd(g), scaleCmd(g), rolloutCmd(g), discoverCmd(g), psCmd(g), inspectCmd(g), logsCmd(g), execCmd(g), stopCmd(g), rmCmd(g))
	root.AddCommand(checkCmd(g))
	return root
}

// addOutput adds -o to a list or inspect command.
func addOutput(cmd *cobra.Command, g *globals) {
	cmd.Flags().StringVarP(&g.output, "output", "o", "table", "output format: table, json or yaml")
}

func (g *globals) client() (*client.Client, error) {
	return client.New(g.addr, client.WithHTTPClient(nil2default()))
}

func (g *globals) logger() *slog.Logger {
	var lvl slog.Level
	switch strings.ToLower(g.logLevel) {
	case "debug":
		lvl = slog.LevelDebug
	case "warn":
		lvl = slog.LevelWarn
	case "error":
		lvl = slog.LevelError
	default:
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: lvl}))
}

// signalContext ends on SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// cmdContext bounds a one-shot API call.
func cmdContext() (context.Context, context.CancelFunc) {
	ctx, stop := signalContext()
	tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	return tctx, func() { cancel(); stop() }
}
