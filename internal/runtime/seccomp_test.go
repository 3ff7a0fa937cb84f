package runtime

import (
	"context"
	goruntime "runtime"
	"slices"
	"testing"

	"github.com/containerd/containerd/v2/contrib/seccomp"
	"github.com/containerd/containerd/v2/core/containers"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestSeccompArchitectures(t *testing.T) {
	native, ok := nativeArch[goruntime.GOARCH]
	if !ok {
		t.Skipf("no native seccomp architecture known for %s", goruntime.GOARCH)
	}
	for _, tc := range []struct {
		name    string
		allow32 bool
		want    func([]specs.Arch) bool
	}{
		{"native only by default", false, func(a []specs.Arch) bool { return slices.Equal(a, []specs.Arch{native}) }},
		{"profile kept with allow32bit", true, func(a []specs.Arch) bool { return len(a) > 1 && slices.Contains(a, native) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &specs.Spec{Linux: &specs.Linux{}, Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{}}}
			ctx := context.Background()
			if err := seccomp.WithDefaultProfile()(ctx, nil, &containers.Container{}, s); err != nil {
				t.Fatal(err)
			}
			if err := withSeccompArchitectures(tc.allow32)(ctx, nil, &containers.Container{}, s); err != nil {
				t.Fatal(err)
			}
			if got := s.Linux.Seccomp.Architectures; !tc.want(got) {
				t.Fatalf("architectures %v", got)
			}
			if len(s.Linux.Seccomp.Syscalls) == 0 {
				t.Fatal("the profile's rules are gone")
			}
		})
	}
	// No seccomp section (unconfined): nothing to narrow.
	s := &specs.Spec{Linux: &specs.Linux{}}
	if err := withSeccompArchitectures(false)(context.Background(), nil, &containers.Container{}, s); err != nil || s.Linux.Seccomp != nil {
		t.Fatalf("unconfined spec changed: %v %+v", err, s.Linux.Seccomp)
	}
}
