package client

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"

	"github.com/berth-dev/berth/api"
)

// StopInstance stops an instance: SIGTERM, then SIGKILL after grace.
func (c *Client) StopInstance(ctx context.Context, id string, grace time.Duration) (api.Instance, error) {
	var in api.Instance
	return in, c.do(ctx, http.MethodPost, "/v1/instances/"+pe(id)+"/stop?grace="+url.QueryEscape(grace.String()), nil, &in)
}

// RemoveInstance deletes an instance (force: even a running one).
func (c *Client) RemoveInstance(ctx context.Context, id string, force bool) error {
	q := ""
	if force {
		q = "?force=1"
	}
	return c.do(ctx, http.MethodDelete, "/v1/instances/"+pe(id)+q, nil, nil)
}

// Logs streams an instance's stored output to fn: the last tail lines (all
// when tail < 0), then with follow new lines until ctx ends.
func (c *Client) Logs(ctx context.Context, id string, tail int, follow bool, fn func(api.LogLine) error) error {
	v := url.Values{}
	if tail >= 0 {
		v.Set("tail", strconv.Itoa(tail))
	}
	if follow {
		v.Set("follow", "1")
	}
	resp, err := c.stream(ctx, http.MethodGet, "/v1/instances/"+pe(id)+"/logs?"+v.Encode(), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 8<<20)
	for sc.Scan() {
		var l api.LogLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return fmt.Errorf("logs: bad line: %w", err)
		}
		if err := fn(l); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return sc.Err()
}

// Exec runs a command in an instance, copying its output, and returns its
// exit code.
func (c *Client) Exec(ctx context.Context, id string, cmd []string, stdout, stderr io.Writer) (int, error) {
	resp, err := c.stream(ctx, http.MethodPost, "/v1/instances/"+pe(id)+"/exec", api.ExecRequest{Command: cmd})
	if err != nil {
		return -1, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for {
		var f api.ExecFrame
		if err := dec.Decode(&f); err != nil {
			return -1, fmt.Errorf("exec: the answer ended without an exit code: %w", err)
		}
		switch {
		case f.Error != "":
			return -1, fmt.Errorf("exec: %s", f.Error)
		case f.Exit != nil:
			return *f.Exit, nil
		case f.Stream == "stderr":
			_, _ = io.WriteString(stderr, f.Data)
		default:
			_, _ = io.WriteString(stdout, f.Data)
		}
	}
}

// stream makes a request whose answer lasts as long as ctx.
func (c *Client) stream(ctx context.Context, method, path string, in any) (*http.Response, error) {
	hc := *c.hc
	hc.Timeout = 0
	cc := *c
	cc.hc = &hc
	return cc.request(ctx, method, path, in)
}

func nodeQuery(node string) string {
	if node == "" {
		return ""
	}
	return "?node=" + url.QueryEscape(node)
}

// Images lists the images on every ready node (or one).
func (c *Client) Images(ctx context.Context, node string) ([]api.Image, error) {
	var l api.List[api.Image]
	return l.Items, c.do(ctx, http.MethodGet, "/v1/images"+nodeQuery(node), nil, &l)
}

// ImportImage sends an OCI layout or docker-archive tarball to every ready
// node (or one).
func (c *Client) ImportImage(ctx context.Context, path, node string) ([]api.Image, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	defer f.Close()
	resp, err := c.stream(ctx, http.MethodPost, "/v1/images/import"+nodeQuery(node), readerBody{f})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var l api.List[api.Image]
	if err := json.NewDecoder(resp.Body).Decode(&l); err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	return l.Items, nil
}

// readerBody marks a request body to send as it is.
type readerBody struct{ io.Reader }

// PullImage makes every ready node (or one) pull ref.
func (c *Client) PullImage(ctx context.Context, ref, node string) ([]api.Image, error) {
	var l api.List[api.Image]
	resp, err := c.stream(ctx, http.MethodPost, "/v1/images/pull"+nodeQuery(node), api.PullRequest{Ref: ref})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return l.Items, json.NewDecoder(resp.Body).Decode(&l)
}

// RemoveImage deletes an image from every ready node (or one).
func (c *Client) RemoveImage(ctx context.Context, ref, node string) ([]api.Image, error) {
	var l api.List[api.Image]
	q := "?ref=" + url.QueryEscape(ref)
	if node != "" {
		q += "&node=" + url.QueryEscape(node)
	}
	return l.Items, c.do(ctx, http.MethodDelete, "/v1/images"+q, nil, &l)
}
