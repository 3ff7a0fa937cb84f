// Command berth is the one binary of berth: server, agent, dev mode, CLI,
// and (run as berth-logd by the agent) a node's container log collector.
package main

import (
	"os"
	"path/filepath"

	"github.com/berth-dev/berth/internal/cli"
	"github.com/berth-dev/berth/internal/runtime"
)

func main() {
	if filepath.Base(os.Args[0]) == runtime.LogdName {
		os.Exit(runtime.RunLogd(os.Args[1:]))
	}
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
