package runtime

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	digest "github.com/opencontainers/go-digest"
)

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// Image is a stored image.
type Image struct {
	Ref     string    `json:"ref"`
	Digest  string    `json:"digest"`
	Size    int64     `json:"size"`
	Created time.Time `json:"created"`
}

// NormalizeRef fills a short reference the way Docker does:
// "busybox" → "docker.io/library/busybox:latest".
func NormalizeRef(ref string) string {
	n, err := reference.ParseDockerRef(ref)
	if err != nil {
		return ref
	}
	return n.String()
}

// ValidateRef says why ref is not an image reference.
func ValidateRef(ref string) error {
	if _, err := reference.ParseDockerRef(ref); err != nil {
		return fmt.Errorf("%q is not an image reference: %v", ref, err)
	}
	return nil
}

func (r *Containerd) describe(ctx context.Context, img images.Image) Image {
	out := Image{Ref: img.Name, Digest: img.Target.Digest.String(), Created: img.CreatedAt}
	if ci, err := r.c.GetImage(ctx, img.Name); err == nil {
		if sz, err := ci.Size(ctx); err == nil {
			out.Size = sz
		}
	}
	return out
}

// Import reads an OCI layout or docker-archive tarball into the store and
// unpacks it; it returns the images it named.
func (r *Containerd) Import(ctx context.Context, rd io.Reader) ([]Image, error) {
	defer r.forgetImages()
	imgs, err := r.c.Import(ctx, rd, containerd.WithImportPlatform(platformMatcher()), containerd.WithDigestRef(func(d digest.Digest) string { return "import-" + d.String() }))
	if err != nil {
		return nil, fmt.Errorf("import: not an OCI or docker-archive image tarball: %w", err)
	}
	if len(imgs) == 0 {
		return nil, errors.New("import: the archive holds no image")
	}
	var out []Image
	for _, img := range imgs {
		ci := containerd.NewImage(r.c, img)
		if err := ci.Unpack(ctx, snapshotter); err != nil {
			return nil, fmt.Errorf("import %s: unpack: %w", img.Name, err)
		}
		if strings.HasPrefix(img.Name, "import-") && len(imgs) > 1 {
			continue // containerd's own digest name beside the image's real name
		}
		out = append(out, r.describe(ctx, img))
	}
	return out, nil
}

// Pull fetches ref from its registry and unpacks it. Registries on loopback
// are spoken to over plain HTTP.
func (r *Containerd) Pull(ctx context.Context, ref string) (Image, error) {
	defer r.forgetImages()
	if err := ValidateRef(ref); err != nil {
		return Image{}, err
	}
	full := NormalizeRef(ref)
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(isLoopbackHost)),
	})
	img, err := r.c.Pull(ctx, full, containerd.WithResolver(resolver), containerd.WithPullUnpack,
		containerd.WithPlatformMatcher(platformMatcher()))
	if err != nil {
		if errdefs.IsNotFound(err) {
			return Image{}, fmt.Errorf("%w: %s: %v", ErrImageNotFound, ref, err)
		}
		return Image{}, fmt.Errorf("pull %s: %w", ref, err)
	}
	return r.describe(ctx, img.Metadata()), nil
}

// isLoopbackHost says whether a registry host is on this machine.
func isLoopbackHost(host string) (bool, error) {
	h, _, err := net.SplitHostPort(host)
	if err != nil {
		h = host
	}
	if h == "localhost" {
		return true, nil
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback(), nil
}

// Images lists stored images.
func (r *Containerd) Images(ctx context.Context) ([]Image, error) {
	imgs, err := r.c.ImageService().List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	out := make([]Image, 0, len(imgs))
	for _, img := range imgs {
		if strings.HasPrefix(img.Name, "import-") {
			continue
		}
		out = append(out, r.describe(ctx, img))
	}
	return out, nil
}

// RemoveImage deletes an image no container uses.
func (r *Containerd) RemoveImage(ctx context.Context, ref string) error {
	defer r.forgetImages()
	full := NormalizeRef(ref)
	if _, err := r.c.ImageService().Get(ctx, full); errdefs.IsNotFound(err) {
		return fmt.Errorf("%w: %s", ErrImageNotFound, ref)
	}
	ctrs, err := r.c.Containers(ctx)
	if err != nil {
		return err
	}
	var users []string
	for _, c := range ctrs {
		if info, err := c.Info(ctx); err == nil && info.Image == full {
			users = append(users, c.ID())
		}
	}
	if len(users) > 0 {
		return fmt.Errorf("%w by %s", ErrImageInUse, strings.Join(users, ", "))
	}
	if err := r.c.ImageService().Delete(ctx, full, images.SynchronousDelete()); err != nil {
		return fmt.Errorf("remove image %s: %w", ref, err)
	}
	return nil
}
