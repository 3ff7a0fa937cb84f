package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/berth-dev/berth/internal/testimage"
)

func TestRun(t *testing.T) {
	if _, err := os.Stat(testimage.DefaultBusybox); err != nil {
		t.Skipf("no %s: %v", testimage.DefaultBusybox, err)
	}
	dir := t.TempDir()
	oci := filepath.Join(dir, "oci.tar")
	if err := run([]string{"-o", oci, "-cmd", `["httpd","-f"]`, "-file", "/www/index.html=a=b", "-label", "k=v"}); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(oci); err != nil || st.Size() == 0 {
		t.Fatalf("oci archive: %v, %v", st, err)
	}

	docker := filepath.Join(dir, "docker.tar")
	if err := run([]string{"-o", docker, "-format", "docker", "-ref", "localhost/x:2", "-label", "k=v"}); err != nil {
		t.Fatal(err)
	}
	tag, _ := name.NewTag("localhost/x:2")
	img, err := tarball.ImageFromPath(docker, &tag)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil || cf.Config.Labels["k"] != "v" || cf.Config.Cmd[0] != "sh" {
		t.Errorf("config = %+v, %v", cf, err)
	}

	for _, args := range [][]string{
		{},
		{"-o", filepath.Join(dir, "a.tar"), "-format", "zip"},
		{"-o", filepath.Join(dir, "b.tar"), "-cmd", "sh"},
		{"-o", filepath.Join(dir, "c.tar"), "-cmd", "[]"},
		{"-o", filepath.Join(dir, "d.tar"), "-file", "nocontent"},
		{"-o", filepath.Join(dir, "e.tar"), "-file", "/a=1", "-file", "/a=2"},
		{"-o", filepath.Join(dir, "f.tar"), "extra"},
	} {
		if err := run(args); err == nil {
			t.Errorf("run(%q) succeeded, want an error", args)
		}
	}
}
