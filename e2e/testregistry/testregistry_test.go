package testregistry

import (
	"context"
	"io"
	"net/http"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berth-dev/berth/e2e/testhost"
	"github.com/berth-dev/berth/internal/testimage"
)

func TestMain(m *testing.M) {
	testhost.Sweep()
	os.Exit(m.Run())
}

func needBusybox(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(testimage.DefaultBusybox); err != nil {
		t.Skipf("no %s (install Debian's busybox-static): %v", testimage.DefaultBusybox, err)
	}
}

// TestPushAndGet starts a registry in a test host, pushes two test images to
// it, and reads them back through the same kind of transport.
func TestPushAndGet(t *testing.T) {
	SkipIfUnsupported(t)
	needBusybox(t)

	var (
		proc    *testhost.Process
		netns   string
		started bool
	)
	t.Run("registry", func(t *testing.T) {
		h := testhost.New(t)
		netns = h.NetnsPath
		addr, p := start(t, h)
		proc, started = p, true
		if addr != "127.0.0.1:5000" {
			t.Errorf("addr = %q", addr)
		}

		img1, err := testimage.Build(testimage.Options{Labels: map[string]string{"n": "1"}})
		if err != nil {
			t.Fatal(err)
		}
		img2, err := testimage.Build(testimage.Options{Labels: map[string]string{"n": "2"}})
		if err != nil {
			t.Fatal(err)
		}
		ref1 := Push(t, h, addr, "berth/demo:1", img1)
		if ref1 != "127.0.0.1:5000/berth/demo:1" {
			t.Errorf("Push returned %q", ref1)
		}
		ref2 := Push(t, h, addr, "berth/demo", img2)
		if ref2 != "127.0.0.1:5000/berth/demo:latest" {
			t.Errorf("Push returned %q", ref2)
		}

		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		tr := Transport(h)
		defer tr.CloseIdleConnections()
		opts := []remote.Option{remote.WithTransport(tr), remote.WithContext(ctx)}

		want1, _ := img1.Digest()
		ref, err := name.ParseReference(ref1, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		desc, err := remote.Get(ref, opts...)
		if err != nil {
			t.Fatalf("remote.Get %s: %v", ref, err)
		}
		if desc.Digest != want1 {
			t.Errorf("%s: digest %s, want %s", ref, desc.Digest, want1)
		}
		if mt, _ := img1.MediaType(); desc.MediaType != mt {
			t.Errorf("%s: media type %s, want %s", ref, desc.MediaType, mt)
		}

		// Pull the second image whole: every blob is checked against its
		// digest while it is read.
		ref, err = name.ParseReference(ref2, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		got, err := remote.Image(ref, opts...)
		if err != nil {
			t.Fatal(err)
		}
		want2, _ := img2.Digest()
		if d, err := got.Digest(); err != nil || d != want2 {
			t.Errorf("%s: digest %s, %v; want %s", ref, d, err, want2)
		}
		layers, err := got.Layers()
		if err != nil || len(layers) != 1 {
			t.Fatalf("%s: layers %v, %v", ref, layers, err)
		}
		rc, err := layers[0].Compressed()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, rc); err != nil {
			t.Errorf("read layer: %v", err)
		}
		if err := rc.Close(); err != nil {
			t.Errorf("layer digest: %v", err)
		}
		if cf, err := got.ConfigFile(); err != nil || cf.Config.Labels["n"] != "2" {
			t.Errorf("%s: config %+v, %v", ref, cf, err)
		}

		tags, err := remote.List(ref.Context(), opts...)
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(tags)
		if !slices.Equal(tags, []string{"1", "latest"}) {
			t.Errorf("tags = %q, want [1 latest]", tags)
		}

		// A missing manifest is a 404, not some other failure.
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://" + addr + "/v2/berth/demo/manifests/nope")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("missing manifest: %s, want 404", resp.Status)
		}
	})

	// The subtest's cleanups have stopped the registry and removed the host.
	if !started {
		return
	}
	if !proc.Exited() {
		t.Errorf("registry pid %d still running after the test", proc.Pid())
		proc.Kill()
	}
	if _, err := os.Stat(netns); !os.IsNotExist(err) {
		t.Errorf("namespace %s still there: %v", netns, err)
	}
}
