package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/e2e/testhost"
	"github.com/berth-dev/berth/internal/testimage"
)

// TestSeccomp32Bit: the default seccomp filter allows the node's native
// architecture only, so a 32-bit program cannot make a system call; a
// service with security.allow32bit runs it.
func TestSeccomp32Bit(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	if runtime.GOARCH != "amd64" {
		t.Skip("needs amd64 (a 386 program)")
	}
	// A static 386 program; the machine itself runs it (IA-32 emulation).
	dir := t.TempDir()
	src := filepath.Join(dir, "main.go")
	if err := os.WriteFile(src, []byte("package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello from 32-bit\") }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "hello32")
	build := exec.Command("go", "build", "-o", bin, src)
	build.Dir = dir
	build.Env = append(os.Environ(), "GOARCH=386", "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build a 386 program: %v\n%s", err, out)
	}
	if out, err := exec.Command(bin).CombinedOutput(); err != nil {
		t.Skipf("this kernel does not run 32-bit programs: %v %s", err, out)
	}
	prog, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}

	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	const ref = "localhost/berth-test32:1"
	importImage(t, b, ref, testimage.Options{Files: map[string]string{"/hello32": string(prog)}})
	b.mustCLI("run", "native", "--image", ref, "--", "sleep", "1000")
	b.mustCLI("run", "compat", "--image", ref, "--allow-32bit", "--", "sleep", "1000")
	native := b.waitInstances("native", 1, 30*time.Second, "native running", running)[0].ID
	compat := b.waitInstances("compat", 1, 30*time.Second, "compat running", running)[0].ID

	run32 := []string{"--", "sh", "-c", "cp /hello32 /tmp/h && chmod +x /tmp/h && /tmp/h"}
	if out, errOut, err := b.cli(append([]string{"exec", native}, run32...)...); err == nil || strings.Contains(out, "hello from 32-bit") {
		t.Fatalf("a 32-bit program ran under the default filter: %v %q %q", err, out, errOut)
	}
	if out := b.mustCLI(append([]string{"exec", compat}, run32...)...); !strings.Contains(out, "hello from 32-bit") {
		t.Fatalf("allow32bit: %q", out)
	}
}
