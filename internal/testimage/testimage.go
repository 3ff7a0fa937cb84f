// Package testimage builds tiny OCI images for tests and the demo from the
// machine's static busybox (Debian's busybox-static puts it at /bin/busybox),
// entirely offline. It is used by tests, the demo, and benchmarks — never by
// berth itself at run time.
//
// An image has one layer: /bin/busybox with a symlink in /bin for each of
// its applets, /etc/passwd and /etc/group with root and a non-root user
// "app" (uid/gid 1000), home directories for both, and an empty /tmp (mode
// 1777). Build is deterministic: the same busybox and the same Options give
// the same digest.
//
// WriteOCIArchive and WriteDockerArchive write an image in the two archive
// formats that `ctr import` and containerd's client.Import accept;
// WriteNotAnImage writes a tarball that is no image at all.
package testimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const (
	// DefaultBusybox is where Debian's busybox-static installs busybox.
	DefaultBusybox = "/bin/busybox"
	// DefaultRef is the name the demo and tests give the default image.
	DefaultRef = "localhost/berth-demo:1"

	// AppUID and AppGID are the ids of the image's non-root user "app".
	AppUID = 1000
	AppGID = 1000

	// Annotation keys of the manifest descriptor in an OCI archive's
	// index.json that name the image.
	AnnotationRefName       = "org.opencontainers.image.ref.name"
	AnnotationContainerdRef = "io.containerd.image.name"
)

// DefaultCmd and DefaultEnv are the config's Cmd and Env when Options leaves
// them empty.
var (
	DefaultCmd = []string{"sh"}
	DefaultEnv = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
)

// RequiredApplets are the busybox applets tests and the demo rely on. Build
// fails if the busybox lacks one of them. Every other applet the busybox
// lists gets a symlink too.
var RequiredApplets = []string{
	"sh", "ls", "cat", "echo", "sleep", "true", "false", "id", "env",
	"head", "tail", "dd", "httpd", "wget", "nc", "ps", "kill", "grep",
	"hostname", "mkdir", "rm", "touch", "yes", "cut", "seq", "date",
	"uname", "top", "free",
}

// epoch is the modification time of every file in the layer and the
// creation time in the config, so that builds are reproducible.
var epoch = time.Unix(0, 0).UTC()

// Options describe an image. The zero value is the default image.
type Options struct {
	Busybox string            // path of a static busybox; default DefaultBusybox
	Cmd     []string          // image config Cmd; default DefaultCmd
	Env     []string          // image config Env; default DefaultEnv
	Files   map[string]string // extra regular files, absolute path -> content (mode 0644, parents 0755); may replace /etc/passwd etc.
	Labels  map[string]string // image config labels (e.g. to make distinct images with distinct digests)
}

// Build builds the image described by o: an OCI image for linux/GOARCH with
// one gzip layer. The busybox must be a static executable for this machine's
// architecture.
func Build(o Options) (v1.Image, error) {
	bb := o.Busybox
	if bb == "" {
		bb = DefaultBusybox
	}
	bin, err := readStaticBusybox(bb)
	if err != nil {
		return nil, err
	}
	applets, err := listApplets(bb)
	if err != nil {
		return nil, err
	}

	layerTar, err := buildLayerTar(bin, applets, o.Files)
	if err != nil {
		return nil, err
	}
	gz, err := gzipBytes(layerTar)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(gz)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("testimage: layer: %w", err)
	}

	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   v1.Time{Time: epoch},
			CreatedBy: "berth testimage: busybox",
			Comment:   "built by github.com/berth-dev/berth/internal/testimage",
		},
	})
	if err != nil {
		return nil, fmt.Errorf("testimage: append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("testimage: config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.Created = v1.Time{Time: epoch}
	cf.OS = "linux"
	cf.Architecture = runtime.GOARCH
	if runtime.GOARCH == "arm64" {
		cf.Variant = "v8"
	}
	cf.Config.Cmd = slices.Clone(o.Cmd)
	if len(cf.Config.Cmd) == 0 {
		cf.Config.Cmd = slices.Clone(DefaultCmd)
	}
	cf.Config.Env = slices.Clone(o.Env)
	if len(cf.Config.Env) == 0 {
		cf.Config.Env = slices.Clone(DefaultEnv)
	}
	cf.Config.WorkingDir = "/"
	if len(o.Labels) > 0 {
		cf.Config.Labels = make(map[string]string, len(o.Labels))
		for k, v := range o.Labels {
			cf.Config.Labels[k] = v
		}
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("testimage: config: %w", err)
	}
	// Compute the digest now so that any error surfaces here, not later.
	if _, err := img.Digest(); err != nil {
		return nil, fmt.Errorf("testimage: digest: %w", err)
	}
	return img, nil
}

// readStaticBusybox reads the busybox binary after checking that it is a
// static ELF executable (no PT_INTERP) for this machine's architecture, so
// that it runs in an image with nothing else in it.
func readStaticBusybox(p string) ([]byte, error) {
	bin, err := os.ReadFile(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("testimage: busybox %s not found (install Debian's busybox-static): %w", p, err)
		}
		return nil, fmt.Errorf("testimage: busybox: %w", err)
	}
	f, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		return nil, fmt.Errorf("testimage: busybox %s is not an ELF executable: %w", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return nil, fmt.Errorf("testimage: busybox %s is dynamically linked (it has an ELF interpreter); a static one is needed (install Debian's busybox-static)", p)
		}
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return nil, fmt.Errorf("testimage: busybox %s is not an executable (ELF type %v)", p, f.Type)
	}
	if want, ok := elfMachine[runtime.GOARCH]; ok && f.Machine != want {
		return nil, fmt.Errorf("testimage: busybox %s is for %v, not %s", p, f.Machine, runtime.GOARCH)
	}
	return bin, nil
}

var elfMachine = map[string]elf.Machine{
	"amd64":   elf.EM_X86_64,
	"arm64":   elf.EM_AARCH64,
	"386":     elf.EM_386,
	"arm":     elf.EM_ARM,
	"riscv64": elf.EM_RISCV,
	"ppc64le": elf.EM_PPC64,
	"s390x":   elf.EM_S390,
}

// listApplets asks the busybox for its applets (`busybox --list`), sorted,
// and checks that RequiredApplets are among them.
func listApplets(bb string) ([]string, error) {
	cmd := exec.Command(bb, "--list")
	cmd.Env = []string{} // the list must not depend on the caller's environment
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("testimage: %s --list: %w: %s", bb, err, strings.TrimSpace(stderr.String()))
	}
	seen := map[string]bool{}
	var applets []string
	for _, a := range strings.Fields(string(out)) {
		// Applet names are plain file names; anything else would escape /bin.
		if a == "busybox" || a == "." || a == ".." || strings.ContainsRune(a, '/') || seen[a] {
			continue
		}
		seen[a] = true
		applets = append(applets, a)
	}
	var missing []string
	for _, a := range RequiredApplets {
		if !seen[a] {
			missing = append(missing, a)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("testimage: busybox %s lacks applets %s", bb, strings.Join(missing, ", "))
	}
	slices.Sort(applets)
	return applets, nil
}

// entry is one file of the layer.
type entry struct {
	hdr  tar.Header
	data []byte
}

const (
	passwd = "root:x:0:0:root:/root:/bin/sh\n" +
		"app:x:1000:1000:app:/home/app:/bin/sh\n" +
		"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
	group = "root:x:0:\n" +
		"app:x:1000:\n" +
		"nogroup:x:65534:\n"
)

// buildLayerTar returns the uncompressed layer: entries sorted by path,
// parents before children, fixed owners and times.
func buildLayerTar(bin []byte, applets []string, files map[string]string) ([]byte, error) {
	entries := map[string]*entry{}
	dir := func(p string, mode int64, uid, gid int) {
		entries[p] = &entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: mode, Uid: uid, Gid: gid}}
	}
	file := func(p string, mode int64, data []byte) {
		entries[p] = &entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(data))}, data: data}
	}

	dir("bin", 0o755, 0, 0)
	dir("etc", 0o755, 0, 0)
	dir("home", 0o755, 0, 0)
	dir("home/app", 0o755, AppUID, AppGID)
	dir("root", 0o700, 0, 0)
	dir("tmp", 0o1777, 0, 0)
	file("bin/busybox", 0o755, bin)
	for _, a := range applets {
		entries["bin/"+a] = &entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + a, Linkname: "busybox", Mode: 0o777}}
	}
	file("etc/passwd", 0o644, []byte(passwd))
	file("etc/group", 0o644, []byte(group))

	for p, content := range files {
		clean, err := cleanPath(p)
		if err != nil {
			return nil, err
		}
		if e, ok := entries[clean]; ok && e.hdr.Typeflag == tar.TypeDir {
			return nil, fmt.Errorf("testimage: file %q: is a directory in the image", p)
		}
		// Create the missing parents; an existing non-directory parent
		// (bin/sh, say) is an error.
		for parent := path.Dir(clean); parent != "."; parent = path.Dir(parent) {
			e, ok := entries[parent]
			if !ok {
				dir(parent, 0o755, 0, 0)
				continue
			}
			if e.hdr.Typeflag != tar.TypeDir {
				return nil, fmt.Errorf("testimage: file %q: parent /%s is not a directory", p, parent)
			}
		}
		file(clean, 0o644, []byte(content))
	}
	names := make([]string, 0, len(entries))
	for p := range entries {
		names = append(names, p)
	}
	// Sorting by path components puts every directory right before its
	// contents.
	slices.SortFunc(names, func(a, b string) int {
		return slices.Compare(strings.Split(a, "/"), strings.Split(b, "/"))
	})

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range names {
		e := entries[p]
		e.hdr.ModTime = epoch
		if err := tw.WriteHeader(&e.hdr); err != nil {
			return nil, fmt.Errorf("testimage: tar %s: %w", p, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, fmt.Errorf("testimage: tar %s: %w", p, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("testimage: tar: %w", err)
	}
	return buf.Bytes(), nil
}

// cleanPath turns an absolute image path into a layer entry name.
func cleanPath(p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("testimage: file %q: path must be absolute", p)
	}
	clean := strings.TrimPrefix(path.Clean(p), "/")
	if clean == "" || clean == "." {
		return "", fmt.Errorf("testimage: file %q: not a file path", p)
	}
	return clean, nil
}

func gzipBytes(b []byte) ([]byte, error) {
	var buf bytes.Buffer
	// The header carries no name and a zero mtime: the output depends on b
	// alone.
	zw, err := gzip.NewWriterLevel(&buf, gzip.DefaultCompression)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(b); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteOCIArchive writes img to path as a tar of an OCI image layout. The
// manifest's descriptor in index.json carries the annotations
// "org.opencontainers.image.ref.name" and "io.containerd.image.name", both
// set to ref verbatim, so that `ctr import` and containerd's client.Import
// name the image ref. containerd takes the name as given: pass a fully
// qualified ref (e.g. "localhost/berth-demo:1" or
// "docker.io/library/foo:1"), not "foo:1".
func WriteOCIArchive(img v1.Image, ref string, path string) error {
	if _, err := name.ParseReference(ref); err != nil {
		return fmt.Errorf("testimage: ref %q: %w", ref, err)
	}
	manifest, err := img.RawManifest()
	if err != nil {
		return fmt.Errorf("testimage: manifest: %w", err)
	}
	mt, err := img.MediaType()
	if err != nil {
		return fmt.Errorf("testimage: manifest media type: %w", err)
	}
	digest, err := img.Digest()
	if err != nil {
		return fmt.Errorf("testimage: digest: %w", err)
	}
	cfgName, err := img.ConfigName()
	if err != nil {
		return fmt.Errorf("testimage: config digest: %w", err)
	}
	cfg, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("testimage: config: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("testimage: layers: %w", err)
	}

	index := v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Manifests: []v1.Descriptor{{
			MediaType: mt,
			Size:      int64(len(manifest)),
			Digest:    digest,
			Annotations: map[string]string{
				AnnotationRefName:       ref,
				AnnotationContainerdRef: ref,
			},
		}},
	}
	indexJSON, err := json.Marshal(index)
	if err != nil {
		return err
	}

	return writeFileAtomic(path, func(w io.Writer) error {
		tw := tar.NewWriter(w)
		written := map[v1.Hash]bool{}
		dirs := map[string]bool{}
		put := func(name string, r io.Reader, size int64) error {
			for _, d := range []string{"blobs", "blobs/sha256"} {
				if strings.HasPrefix(name, d+"/") && !dirs[d] {
					dirs[d] = true
					if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch}); err != nil {
						return err
					}
				}
			}
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: size, ModTime: epoch}); err != nil {
				return err
			}
			n, err := io.Copy(tw, r)
			if err == nil && n != size {
				err = fmt.Errorf("%s: wrote %d bytes, want %d", name, n, size)
			}
			return err
		}
		blob := func(h v1.Hash, r io.Reader, size int64) error {
			if written[h] {
				return nil
			}
			written[h] = true
			return put("blobs/"+h.Algorithm+"/"+h.Hex, r, size)
		}
		layout := []byte(`{"imageLayoutVersion":"1.0.0"}`)
		if err := put("oci-layout", bytes.NewReader(layout), int64(len(layout))); err != nil {
			return err
		}
		if err := put("index.json", bytes.NewReader(indexJSON), int64(len(indexJSON))); err != nil {
			return err
		}
		if digest.Algorithm != "sha256" || cfgName.Algorithm != "sha256" {
			return fmt.Errorf("only sha256 digests are supported")
		}
		if err := blob(digest, bytes.NewReader(manifest), int64(len(manifest))); err != nil {
			return err
		}
		if err := blob(cfgName, bytes.NewReader(cfg), int64(len(cfg))); err != nil {
			return err
		}
		for _, l := range layers {
			if err := writeLayer(l, blob); err != nil {
				return err
			}
		}
		return tw.Close()
	})
}

func writeLayer(l v1.Layer, blob func(v1.Hash, io.Reader, int64) error) error {
	h, err := l.Digest()
	if err != nil {
		return err
	}
	if h.Algorithm != "sha256" {
		return fmt.Errorf("only sha256 digests are supported")
	}
	size, err := l.Size()
	if err != nil {
		return err
	}
	rc, err := l.Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	return blob(h, rc, size)
}

// WriteDockerArchive writes img to path in the `docker save` format
// (manifest.json with RepoTags), tagged ref. ref must be a tag: a name
// without a registry is normalized the Docker way ("foo:1" is written as
// "index.docker.io/library/foo:1").
//
// containerd imports such an archive by making a Docker schema 2 manifest
// for it, so the imported image's manifest digest is not img.Digest(); its
// config digest (img.ConfigName()) is the same.
func WriteDockerArchive(img v1.Image, ref string, path string) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return fmt.Errorf("testimage: ref %q: %w", ref, err)
	}
	return writeFileAtomic(path, func(w io.Writer) error {
		return tarball.Write(tag, img, w)
	})
}

// WriteNotAnImage writes to path an uncompressed tarball of a few files of
// random junk (and one of random text), in no image format, for tests of an
// "image" that is not an image. Its contents differ on every call.
func WriteNotAnImage(path string) error {
	return writeFileAtomic(path, func(w io.Writer) error {
		tw := tar.NewWriter(w)
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "junk/", Mode: 0o755, ModTime: epoch}); err != nil {
			return err
		}
		for i, size := range []int{17, 1000, 4096, 65536} {
			data := make([]byte, size)
			if _, err := rand.Read(data); err != nil {
				return err
			}
			name := fmt.Sprintf("junk/%d-%s.bin", i, hex.EncodeToString(data[:4]))
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(size), ModTime: epoch}); err != nil {
				return err
			}
			if _, err := tw.Write(data); err != nil {
				return err
			}
		}
		text := make([]byte, 32)
		if _, err := rand.Read(text); err != nil {
			return err
		}
		note := []byte("this is not an image: " + hex.EncodeToString(text) + "\n")
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "README.txt", Mode: 0o644, Size: int64(len(note)), ModTime: epoch}); err != nil {
			return err
		}
		if _, err := tw.Write(note); err != nil {
			return err
		}
		return tw.Close()
	})
}

// writeFileAtomic writes a file through write into a temporary file next to
// path and renames it into place, so that a reader never sees a partial
// archive and a failed write leaves nothing behind. If path exists and is not
// a regular file (a device such as /dev/stdout or /dev/null, a FIFO, a
// symlink), it is written in place instead, never replaced.
func writeFileAtomic(path string, write func(io.Writer) error) (err error) {
	if st, err := os.Lstat(path); err == nil && !st.Mode().IsRegular() {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
		if err != nil {
			return fmt.Errorf("testimage: %w", err)
		}
		if err := write(f); err != nil {
			f.Close()
			return fmt.Errorf("testimage: write %s: %w", path, err)
		}
		if err := f.Close(); err != nil {
			return fmt.Errorf("testimage: %w", err)
		}
		return nil
	}

	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("testimage: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := write(f); err != nil {
		return fmt.Errorf("testimage: write %s: %w", path, err)
	}
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("testimage: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("testimage: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("testimage: %w", err)
	}
	return nil
}
