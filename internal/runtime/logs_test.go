package runtime

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
)

func TestRotatorAndReadLogs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.log")
	w, err := newRotator(path, 600, 3)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 40 {
		w.write(LogLine{Time: time.Unix(int64(i), 0).UTC(), Stream: "stdout", Line: fmt.Sprintf("line %02d", i)})
	}
	w.Close()
	for _, p := range []string{path, path + ".1", path + ".2"} {
		st, err := os.Stat(p)
		if err != nil || st.Size() > 600 {
			t.Fatalf("%s: %v %v", p, st, err)
		}
	}
	if _, err := os.Stat(path + ".3"); err == nil {
		t.Fatal("more rotated files than max-files")
	}
	var got []string
	collect := func(l LogLine) error { got = append(got, l.Line); return nil }
	if err := ReadLogs(context.Background(), path, 5, false, collect); err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, ",") != "line 35,line 36,line 37,line 38,line 39" {
		t.Fatalf("tail 5: %v", got)
	}
	got = nil
	if err := ReadLogs(context.Background(), path, -1, false, collect); err != nil {
		t.Fatal(err)
	}
	// The oldest lines rotated away; the rest come in order.
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] {
			t.Fatalf("out of order: %v", got)
		}
	}
	if got[len(got)-1] != "line 39" || len(got) < 10 {
		t.Fatalf("all: %v", got)
	}
}

func TestFollowAcrossRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.log")
	w, err := newRotator(path, 300, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	ctx, cancel := context.WithCancel(context.Background())
	lines := make(chan string, 100)
	done := make(chan error, 1)
	go func() {
		done <- ReadLogs(ctx, path, 0, true, func(l LogLine) error { lines <- l.Line; return nil })
	}()
	time.Sleep(150 * time.Millisecond)
	for i := range 12 {
		w.write(LogLine{Stream: "stdout", Line: fmt.Sprintf("n%02d", i)})
		time.Sleep(30 * time.Millisecond)
	}
	var got []string
	deadline := time.After(3 * time.Second)
	for len(got) < 12 {
		select {
		case l := <-lines:
			got = append(got, l)
		case <-deadline:
			t.Fatalf("followed %d of 12 lines across rotations: %v", len(got), got)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestLinuxResources(t *testing.T) {
	r := linuxResources(api.ResourceSpec{CPU: 500, Memory: 64 << 20, Limits: &api.Limit{CPU: 1500}})
	if *r.CPU.Shares != 512 || *r.Memory.Limit != 64<<20 || *r.CPU.Quota != 150000 || *r.CPU.Period != 100000 {
		t.Fatalf("%+v %+v", r.CPU, r.Memory)
	}
	r = linuxResources(api.ResourceSpec{Memory: 64 << 20, Limits: &api.Limit{Memory: 128 << 20}})
	if *r.Memory.Limit != 128<<20 || r.CPU.Quota != nil {
		t.Fatalf("%+v", r)
	}
	r = linuxResources(api.ResourceSpec{})
	if r.Memory.Limit != nil || r.CPU.Shares != nil {
		t.Fatalf("no resources, no limits: %+v", r)
	}
}

func TestNormalizeRef(t *testing.T) {
	for in, want := range map[string]string{
		"busybox":                "docker.io/library/busybox:latest",
		"localhost/berth-demo:1": "localhost/berth-demo:1",
		"127.0.0.1:5000/a/b:2":   "127.0.0.1:5000/a/b:2",
	} {
		if got := NormalizeRef(in); got != want {
			t.Errorf("%s: %s, want %s", in, got, want)
		}
	}
	if ValidateRef("Not An Image!") == nil {
		t.Error("a malformed reference was accepted")
	}
}
