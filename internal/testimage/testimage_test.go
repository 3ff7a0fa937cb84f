package testimage

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// needBusybox skips the test when the machine has no static busybox.
func needBusybox(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(DefaultBusybox); err != nil {
		t.Skipf("no %s (install Debian's busybox-static): %v", DefaultBusybox, err)
	}
}

func build(t *testing.T, o Options) v1.Image {
	t.Helper()
	img, err := Build(o)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return img
}

func digest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// layerEntries returns the headers and regular-file contents of the image's
// only layer.
func layerEntries(t *testing.T, img v1.Image) ([]*tar.Header, map[string]string) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("got %d layers, want 1", len(layers))
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var hdrs []*tar.Header
	contents := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		hdrs = append(hdrs, h)
		if h.Typeflag == tar.TypeReg && h.Name != "bin/busybox" {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			contents[h.Name] = string(b)
		}
	}
	return hdrs, contents
}

func TestBuildDefault(t *testing.T) {
	needBusybox(t)
	img := build(t, Options{})

	mt, err := img.MediaType()
	if err != nil || mt != types.OCIManifestSchema1 {
		t.Errorf("manifest media type = %q, %v; want %q", mt, err, types.OCIManifestSchema1)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.Config.MediaType != types.OCIConfigJSON || len(m.Layers) != 1 || m.Layers[0].MediaType != types.OCILayer {
		t.Errorf("manifest = %+v, want an OCI config and one OCI gzip layer", m)
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform = %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	if !slices.Equal(cf.Config.Cmd, []string{"sh"}) {
		t.Errorf("Cmd = %q, want [sh]", cf.Config.Cmd)
	}
	if !slices.Equal(cf.Config.Env, []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}) {
		t.Errorf("Env = %q", cf.Config.Env)
	}
	if len(cf.RootFS.DiffIDs) != 1 {
		t.Errorf("rootfs diff ids = %v, want 1", cf.RootFS.DiffIDs)
	}

	hdrs, contents := layerEntries(t, img)
	byName := map[string]*tar.Header{}
	var names []string
	for _, h := range hdrs {
		if byName[h.Name] != nil {
			t.Errorf("duplicate entry %s", h.Name)
		}
		byName[h.Name] = h
		names = append(names, h.Name)
		if h.Uname != "" || h.Gname != "" || !h.ModTime.Equal(epoch) {
			t.Errorf("%s: uname %q gname %q mtime %v, want fixed", h.Name, h.Uname, h.Gname, h.ModTime)
		}
		if strings.HasPrefix(h.Name, "/") || strings.Contains(h.Name, "..") {
			t.Errorf("bad entry name %q", h.Name)
		}
	}
	bb := byName["bin/busybox"]
	if bb == nil || bb.Typeflag != tar.TypeReg || bb.Mode != 0o755 {
		t.Fatalf("bin/busybox = %+v, want a regular file with mode 0755", bb)
	}
	if st, err := os.Stat(DefaultBusybox); err == nil && st.Size() != bb.Size {
		t.Errorf("bin/busybox size = %d, want %d", bb.Size, st.Size())
	}
	for _, a := range append(slices.Clone(RequiredApplets), "sh") {
		h := byName["bin/"+a]
		if h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "busybox" {
			t.Errorf("bin/%s = %+v, want a symlink to busybox", a, h)
		}
	}
	if h := byName["tmp/"]; h == nil || h.Typeflag != tar.TypeDir || h.Mode != 0o1777 {
		t.Errorf("tmp/ = %+v, want a directory with mode 1777", h)
	}
	if h := byName["home/app/"]; h == nil || h.Uid != AppUID || h.Gid != AppGID {
		t.Errorf("home/app/ = %+v, want owned by app", h)
	}
	if !strings.Contains(contents["etc/passwd"], "root:x:0:0:") || !strings.Contains(contents["etc/passwd"], "\napp:x:1000:1000:") {
		t.Errorf("etc/passwd = %q", contents["etc/passwd"])
	}
	if !strings.Contains(contents["etc/group"], "root:x:0:") || !strings.Contains(contents["etc/group"], "\napp:x:1000:") {
		t.Errorf("etc/group = %q", contents["etc/group"])
	}
	// Parents come before their children.
	seen := map[string]bool{}
	for _, n := range names {
		trimmed := strings.TrimSuffix(n, "/")
		if dir := filepath.Dir(trimmed); dir != "." && !seen[dir] {
			t.Errorf("%s comes before its directory %s", n, dir)
		}
		seen[trimmed] = true
	}
}

func TestBuildDeterministic(t *testing.T) {
	needBusybox(t)
	o := Options{
		Cmd:    []string{"httpd", "-f", "-p", "8080", "-h", "/www"},
		Files:  map[string]string{"/www/index.html": "hello\n", "/a/b/c.txt": "c", "/etc/motd": "hi"},
		Labels: map[string]string{"a": "1", "b": "2", "c": "3"},
	}
	d1 := digest(t, build(t, o))
	for range 3 {
		if d := digest(t, build(t, o)); d != d1 {
			t.Fatalf("second build digest %s, first %s", d, d1)
		}
	}
	base := digest(t, build(t, Options{}))
	if base == d1 {
		t.Error("different options gave the same digest")
	}
	if base != digest(t, build(t, Options{})) {
		t.Error("default build not deterministic")
	}
	l1 := digest(t, build(t, Options{Labels: map[string]string{"n": "1"}}))
	l2 := digest(t, build(t, Options{Labels: map[string]string{"n": "2"}}))
	if l1 == l2 || l1 == base {
		t.Error("labels do not make distinct digests")
	}
}

func TestBuildOptions(t *testing.T) {
	needBusybox(t)
	img := build(t, Options{
		Cmd:    []string{"sleep", "3600"},
		Env:    []string{"PATH=/bin", "FOO=bar"},
		Files:  map[string]string{"/www/index.html": "hello\n", "/etc/passwd": "root:x:0:0::/:/bin/sh\n"},
		Labels: map[string]string{"berth.test": "yes"},
	})
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cf.Config.Cmd, []string{"sleep", "3600"}) || !slices.Equal(cf.Config.Env, []string{"PATH=/bin", "FOO=bar"}) || cf.Config.Labels["berth.test"] != "yes" {
		t.Errorf("config = %+v", cf.Config)
	}
	hdrs, contents := layerEntries(t, img)
	if contents["www/index.html"] != "hello\n" {
		t.Errorf("www/index.html = %q", contents["www/index.html"])
	}
	if contents["etc/passwd"] != "root:x:0:0::/:/bin/sh\n" {
		t.Errorf("etc/passwd not replaced: %q", contents["etc/passwd"])
	}
	var www bool
	for _, h := range hdrs {
		if h.Name == "www/" && h.Typeflag == tar.TypeDir {
			www = true
		}
	}
	if !www {
		t.Error("no www/ directory entry")
	}
}

func TestBuildErrors(t *testing.T) {
	needBusybox(t)
	for _, files := range []map[string]string{
		{"relative.txt": "x"},
		{"/": "x"},
		{"/tmp": "x"},
		{"/bin/sh/x": "x"},
		{"/a/b": "x", "/a/b/c": "y"},
	} {
		if _, err := Build(Options{Files: files}); err == nil {
			t.Errorf("Build(Files: %v) succeeded, want an error", files)
		}
	}

	if _, err := Build(Options{Busybox: filepath.Join(t.TempDir(), "nope")}); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("missing busybox: err = %v", err)
	}
	notELF := filepath.Join(t.TempDir(), "busybox")
	if err := os.WriteFile(notELF, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Build(Options{Busybox: notELF}); err == nil || !strings.Contains(err.Error(), "not an ELF") {
		t.Errorf("non-ELF busybox: err = %v", err)
	}
	// The test binary itself may be static or not; /bin/ls practically
	// never is.
	if _, err := os.Stat("/bin/ls"); err == nil {
		if _, err := Build(Options{Busybox: "/bin/ls"}); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
			t.Errorf("dynamic busybox: err = %v", err)
		}
	}
}

func TestWriteOCIArchive(t *testing.T) {
	needBusybox(t)
	img := build(t, Options{Labels: map[string]string{"x": "y"}})
	ref := "localhost/berth-test:oci"
	archive := filepath.Join(t.TempDir(), "img.tar")
	if err := WriteOCIArchive(img, ref, archive); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	untar(t, archive, dir)
	if _, err := os.Stat(filepath.Join(dir, "oci-layout")); err != nil {
		t.Error(err)
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("index has %d manifests, want 1", len(im.Manifests))
	}
	desc := im.Manifests[0]
	if desc.Annotations[AnnotationRefName] != ref || desc.Annotations[AnnotationContainerdRef] != ref {
		t.Errorf("annotations = %v, want both names = %s", desc.Annotations, ref)
	}
	want := digest(t, img)
	if desc.Digest != want || desc.MediaType != types.OCIManifestSchema1 {
		t.Errorf("descriptor = %+v, want digest %s", desc, want)
	}
	got, err := idx.Image(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if d := digest(t, got); d != want {
		t.Errorf("read back digest %s, want %s", d, want)
	}
	// Reading the layers back checks every blob's digest.
	hdrs, _ := layerEntries(t, got)
	if len(hdrs) < len(RequiredApplets) {
		t.Errorf("read back layer has %d entries", len(hdrs))
	}
	if cf, err := got.ConfigFile(); err != nil || cf.Config.Labels["x"] != "y" {
		t.Errorf("read back config = %+v, %v", cf, err)
	}

	// Same image, same archive.
	again := filepath.Join(t.TempDir(), "img.tar")
	if err := WriteOCIArchive(img, ref, again); err != nil {
		t.Fatal(err)
	}
	if a, b := readFile(t, archive), readFile(t, again); a != b {
		t.Error("OCI archive is not deterministic")
	}

	if err := WriteOCIArchive(img, "Not A Ref!", filepath.Join(t.TempDir(), "bad.tar")); err == nil {
		t.Error("bad ref accepted")
	}
}

func TestWriteDockerArchive(t *testing.T) {
	needBusybox(t)
	img := build(t, Options{})
	ref := "localhost/berth-test:docker"
	archive := filepath.Join(t.TempDir(), "img.tar")
	if err := WriteDockerArchive(img, ref, archive); err != nil {
		t.Fatal(err)
	}
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	got, err := tarball.ImageFromPath(archive, &tag)
	if err != nil {
		t.Fatal(err)
	}
	wantCfg, _ := img.ConfigName()
	gotCfg, err := got.ConfigName()
	if err != nil || gotCfg != wantCfg {
		t.Errorf("config digest = %s, %v; want %s", gotCfg, err, wantCfg)
	}
	hdrs, _ := layerEntries(t, got)
	if len(hdrs) < len(RequiredApplets) {
		t.Errorf("read back layer has %d entries", len(hdrs))
	}
	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(archive) })
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || !slices.Equal(m[0].RepoTags, []string{ref}) {
		t.Errorf("manifest.json = %+v, want RepoTags [%s]", m, ref)
	}
	if err := WriteDockerArchive(img, "localhost/x@sha256:"+strings.Repeat("0", 64), filepath.Join(t.TempDir(), "bad.tar")); err == nil {
		t.Error("digest ref accepted for a docker archive")
	}
}

func TestWriteNotAnImage(t *testing.T) {
	p := filepath.Join(t.TempDir(), "junk.tar")
	if err := WriteNotAnImage(p); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	untar(t, p, dir)
	if _, err := layout.ImageIndexFromPath(dir); err == nil {
		t.Error("junk reads as an OCI layout")
	}
	if _, err := tarball.ImageFromPath(p, nil); err == nil {
		t.Error("junk reads as a docker archive")
	}
	entries, err := os.ReadDir(filepath.Join(dir, "junk"))
	if err != nil || len(entries) == 0 {
		t.Errorf("junk/ = %v, %v", entries, err)
	}
}

// TestWriteToNonRegularFile: an archive written to a FIFO (or a device such
// as /dev/stdout) goes into it; the path is never replaced by a file.
func TestWriteToNonRegularFile(t *testing.T) {
	needBusybox(t)
	img := build(t, Options{})
	fifo := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	got := make(chan int64, 1)
	go func() {
		f, err := os.Open(fifo)
		if err != nil {
			got <- -1
			return
		}
		defer f.Close()
		n, _ := io.Copy(io.Discard, f)
		got <- n
	}()
	if err := WriteOCIArchive(img, DefaultRef, fifo); err != nil {
		t.Fatal(err)
	}
	if n := <-got; n < 1<<19 {
		t.Errorf("read %d bytes from the FIFO", n)
	}
	st, err := os.Lstat(fifo)
	if err != nil || st.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("%s is no longer a FIFO: %v, %v", fifo, st.Mode(), err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(fifo)); len(entries) != 1 {
		t.Errorf("left behind: %v", entries)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// untar extracts the regular files and directories of a tar into dir.
func untar(t *testing.T, archive, dir string) {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(p, dir+string(filepath.Separator)) {
			t.Fatalf("entry %q escapes", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("unexpected entry %s type %c", h.Name, h.Typeflag)
		}
	}
}
