package runtime

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startCollector runs a collector in this process until the returned
// function stops it.
func startCollector(t *testing.T, p Paths) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := &collector{dir: p.LogFIFOs, log: slog.New(slog.NewTextHandler(io.Discard, nil)), att: map[string]*attachment{}}
	done := make(chan error, 1)
	go func() { done <- c.run(ctx, p.LogdSocket) }()
	l := &logs{p: p}
	deadline := time.Now().Add(5 * time.Second)
	for l.call(context.Background(), logdRequest{Op: "ping"}) != nil {
		if time.Now().After(deadline) {
			t.Fatal("the collector does not answer")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("collector: %v", err)
		}
	}
}

func readAll(t *testing.T, path string) []string {
	t.Helper()
	var got []string
	if err := ReadLogs(context.Background(), path, -1, false, func(l LogLine) error {
		got = append(got, l.Stream+":"+l.Line)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return got
}

func waitLines(t *testing.T, path string, want ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := readAll(t, path)
		if strings.Join(got, "|") == strings.Join(want, "|") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("log lines: got %q, want %q", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestLogCollector(t *testing.T) {
	dir := t.TempDir()
	p := Paths{LogdSocket: filepath.Join(dir, "logd.sock"), LogFIFOs: filepath.Join(dir, "fifos")}
	stop := startCollector(t, p)
	l := &logs{p: p, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	logPath := filepath.Join(dir, "logs", "c1.log")
	ioc, err := l.attach(context.Background(), "c1", logPath)
	if err != nil {
		t.Fatal(err)
	}
	cio, err := ioc("c1")
	if err != nil {
		t.Fatal(err)
	}
	cfg := cio.Config()
	// What the shim does: a writer, and a reader it never reads from.
	var held []*os.File
	open := func(path string, flag int) *os.File {
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, f)
		return f
	}
	defer func() {
		for _, f := range held {
			f.Close()
		}
	}()
	open(cfg.Stdout, os.O_RDONLY|syscall.O_NONBLOCK)
	open(cfg.Stderr, os.O_RDONLY|syscall.O_NONBLOCK)
	out := open(cfg.Stdout, os.O_WRONLY)
	errw := open(cfg.Stderr, os.O_WRONLY)

	if _, err := out.WriteString("hello\n"); err != nil {
		t.Fatal(err)
	}
	waitLines(t, logPath, "stdout:hello")
	if _, err := errw.WriteString("oops\n"); err != nil {
		t.Fatal(err)
	}
	waitLines(t, logPath, "stdout:hello", "stderr:oops")
	// An unterminated line is stored after a while.
	if _, err := out.WriteString("no newline"); err != nil {
		t.Fatal(err)
	}
	waitLines(t, logPath, "stdout:hello", "stderr:oops", "stdout:no newline")

	// Attaching again is a no-op.
	if _, err := l.attach(context.Background(), "c1", logPath); err != nil {
		t.Fatal(err)
	}
	// Without a collector, output waits in the FIFO; a new collector
	// takes the FIFOs back and stores it.
	stop()
	if _, err := out.WriteString("while away\n"); err != nil {
		t.Fatal(err)
	}
	stop = startCollector(t, p)
	defer func() { stop() }()
	waitLines(t, logPath, "stdout:hello", "stderr:oops", "stdout:no newline", "stdout:while away")

	l.detach(context.Background(), "c1")
	if _, err := os.Stat(fifoPath(p.LogFIFOs, "c1", "out")); !os.IsNotExist(err) {
		t.Fatalf("FIFOs left after detach: %v", err)
	}
}
