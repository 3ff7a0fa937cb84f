package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/network"
)

const (
	setupNet, setupSubnet, setupGateway = "nbsetup", "10.211.0.0/24", "10.211.0.1"
	setupWarmup                         = 3
)

// setupTimes is what the setup helper prints.
type setupTimes struct {
	Setup    []time.Duration `json:"setup"`
	Teardown []time.Duration `json:"teardown"`
}

// setupBench runs the setup helper in the run's namespace "s" and returns
// the sorted Setup and Teardown times.
func (e *env) setupBench(ctx context.Context) (setupTimes, error) {
	exe, err := os.Executable()
	if err != nil {
		return setupTimes{}, err
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := nsCommand(cctx, e.l.nsPath("s"), exe, cmdSetup, e.l.setupData, e.l.setupRun, strconv.Itoa(e.o.setups))
	var t setupTimes
	if err := e.runJSON(cmd, "setup helper", &t); err != nil {
		return setupTimes{}, err
	}
	sort.Slice(t.Setup, func(i, j int) bool { return t.Setup[i] < t.Setup[j] })
	sort.Slice(t.Teardown, func(i, j int) bool { return t.Teardown[i] < t.Teardown[j] })
	return t, nil
}

// setupHelper (inside the namespace "s"): what the agent does for an
// instance on one bridge network between creating its container and
// starting it (network.Manager.Setup: a namespace, its loopback, the CNI
// ADD of bridge + host-local, the isolation rules), and what it does when
// the instance goes (Teardown), timed over warm-up + N cycles.
func setupHelper(args []string) int {
	if len(args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: __setup DATADIR RUNDIR N")
		return 2
	}
	n, err := strconv.Atoi(args[2])
	if err != nil || n < 1 {
		fmt.Fprintln(os.Stderr, "bad N:", args[2])
		return 2
	}
	ctx := context.Background()
	m, err := network.New(args[0], args[1], slog.New(slog.NewTextHandler(io.Discard, nil)), network.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	atts := []network.Attachment{{Network: api.Network{NetworkSpec: api.NetworkSpec{
		Name: setupNet, Subnet: setupSubnet, Gateway: setupGateway, Driver: api.DriverBridge}}}}
	var t setupTimes
	var errs []error
	for i := range setupWarmup + n {
		id := fmt.Sprintf("setup-%d", i)
		start := time.Now()
		_, vnics, err := m.Setup(ctx, id, atts)
		ds := time.Since(start)
		if err == nil && (len(vnics) != 1 || vnics[0].IP == "") {
			err = fmt.Errorf("no address: %+v", vnics)
		}
		start = time.Now()
		terr := m.Teardown(ctx, id, atts)
		dt := time.Since(start)
		if err != nil || terr != nil {
			errs = append(errs, fmt.Errorf("cycle %d: setup: %v, teardown: %v", i, err, terr))
			break
		}
		if i >= setupWarmup {
			t.Setup = append(t.Setup, ds)
			t.Teardown = append(t.Teardown, dt)
		}
	}
	if err := m.RemoveNetwork(setupNet); err != nil {
		errs = append(errs, fmt.Errorf("remove network: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	b, _ := json.Marshal(t)
	fmt.Println(string(b))
	return 0
}
