// Command mkimage is a developer tool that writes the demo/test image: a
// tiny busybox image built offline by internal/testimage from the machine's
// static busybox (Debian's busybox-static), as an archive that `ctr import`
// and containerd's client.Import load.
//
// Usage:
//
//	go run ./hack/mkimage -o demo.tar [-format oci|docker] [-ref NAME]
//	    [-cmd '["httpd","-f","-p","8080"]'] [-file /www/index.html=hello]...
//	    [-label key=value]... [-busybox /bin/busybox]
//
// It prints one line, "REF DIGEST", where DIGEST is the image's manifest
// digest (on stderr if the archive goes to stdout, with -o -). containerd
// keeps that digest when it imports the OCI archive; it makes a new manifest
// when it imports a docker archive, so only the config digest (printed with
// -v) survives that.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/berth-dev/berth/internal/testimage"
)

// keyValues is a repeatable "key=value" flag.
type keyValues struct {
	m    map[string]string
	what string
}

func (kv *keyValues) String() string { return "" }

func (kv *keyValues) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want %s=content, got %q", kv.what, s)
	}
	if kv.m == nil {
		kv.m = map[string]string{}
	}
	if _, dup := kv.m[k]; dup {
		return fmt.Errorf("%s %q given twice", kv.what, k)
	}
	kv.m[k] = v
	return nil
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	out := fs.String("o", "", "output `file` (required; - for stdout)")
	format := fs.String("format", "oci", "archive format: oci (OCI image layout tar) or docker (docker save tar)")
	ref := fs.String("ref", testimage.DefaultRef, "image `name` recorded in the archive")
	cmdJSON := fs.String("cmd", "", "image Cmd as a JSON array (default [\"sh\"])")
	busybox := fs.String("busybox", testimage.DefaultBusybox, "`path` of a static busybox")
	verbose := fs.Bool("v", false, "also print the config digest and platform on stderr")
	files := &keyValues{what: "path"}
	labels := &keyValues{what: "key"}
	fs.Var(files, "file", "extra file `path=content` (repeatable), e.g. /www/index.html=hello")
	fs.Var(labels, "label", "config label `key=value` (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *out == "" {
		return fmt.Errorf("-o FILE is required")
	}
	// The summary line goes to stderr when the archive goes to stdout.
	summary := os.Stdout
	if *out == "-" || *out == "/dev/stdout" {
		*out, summary = "/dev/stdout", os.Stderr
	}
	if *format != "oci" && *format != "docker" {
		return fmt.Errorf("-format: %q is neither oci nor docker", *format)
	}

	o := testimage.Options{Busybox: *busybox, Files: files.m, Labels: labels.m}
	if *cmdJSON != "" {
		if err := json.Unmarshal([]byte(*cmdJSON), &o.Cmd); err != nil {
			return fmt.Errorf("-cmd: want a JSON array of strings: %w", err)
		}
		if len(o.Cmd) == 0 {
			return fmt.Errorf("-cmd: empty")
		}
	}
	img, err := testimage.Build(o)
	if err != nil {
		return err
	}

	switch *format {
	case "oci":
		err = testimage.WriteOCIArchive(img, *ref, *out)
	case "docker":
		err = testimage.WriteDockerArchive(img, *ref, *out)
	}
	if err != nil {
		return err
	}

	digest, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Fprintf(summary, "%s %s\n", *ref, digest)
	if *verbose {
		cfg, err := img.ConfigName()
		if err != nil {
			return err
		}
		cf, err := img.ConfigFile()
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "config %s\nplatform %s/%s\nwrote %s (%s)\n", cfg, cf.OS, cf.Architecture, *out, *format)
	}
	return nil
}
