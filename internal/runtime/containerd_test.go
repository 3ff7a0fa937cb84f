package runtime

import (
	"slices"
	"testing"
)

func TestRuntimeEnv(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []string
		want []string
	}{
		{"only PATH and TMPDIR pass", []string{"GODEBUG=x=1", "PATH=/opt/bin:/usr/bin", "GOGC=50", "TMPDIR=/var/tmp", "HTTP_PROXY=http://p"},
			[]string{"PATH=/opt/bin:/usr/bin", "TMPDIR=/var/tmp"}},
		{"a default PATH", []string{"HOME=/root"}, []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := runtimeEnv(tc.in); !slices.Equal(got, tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}
