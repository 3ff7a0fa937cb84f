// Command berth is the one binary of berth: server, agent, dev mode, CLI,
// and (called as berth-logger by containerd's shim) the container log driver.
package main

import (
	"os"
	"path/filepath"

	"github.com/berth-dev/berth/internal/cli"
	"github.com/berth-dev/berth/internal/runtime"
)

func main() {
	if filepath.Base(os.Args[0]) == runtime.LoggerName {
		runtime.RunLogger(os.Args[1:])
		return
	}
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
