package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/store"
)

// agentClient talks to node agents; streaming calls set their own deadlines.
var agentClient = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8, IdleConnTimeout: time.Minute}}

// stopInstance asks the instance's agent to stop it (SIGTERM, grace, SIGKILL).
func (s *Server) stopInstance(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	grace := api.DefaultStopGrace
	if v := r.URL.Query().Get("grace"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > time.Hour {
			return invalid("stop", api.FieldErrors{{Field: "grace", Reason: fmt.Sprintf("%q is not a duration between 0s and 1h", v)}})
		}
		grace = d
	}
	in, err := s.updateInstance(r.Context(), id, func(in *api.Instance) {
		in.DesiredState = api.DesiredStopped
		in.StopGrace = api.Duration(grace)
	})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, in)
	return nil
}

// removeInstance deletes an instance; its agent removes the container. A
// running instance needs force.
func (s *Server) removeInstance(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	ctx := r.Context()
	var in api.Instance
	rev, err := s.st.Get(ctx, keyInstances+id, &in)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("instance", id)
	}
	if err != nil {
		return err
	}
	if in.DesiredState == api.DesiredRunning && !boolParam(r, "force") {
		return apiError(http.StatusConflict, api.CodeConflict, "instance %s is running: stop it first, or remove it with force", id)
	}
	if _, err := s.st.Delete(ctx, keyInstances+id, rev); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// agentURL finds the agent of a node.
func (s *Server) agentURL(ctx context.Context, node string) (string, error) {
	var n api.Node
	if _, err := s.st.Get(ctx, keyNodes+node, &n); errors.Is(err, store.ErrNotFound) {
		return "", notFound("node", node)
	} else if err != nil {
		return "", err
	}
	if n.Status.State != api.NodeReady {
		return "", apiError(http.StatusServiceUnavailable, api.CodeInternal, "node %s is %s", node, n.Status.State)
	}
	if n.AgentAddr == "" {
		return "", apiError(http.StatusServiceUnavailable, api.CodeInternal, "node %s has no agent address", node)
	}
	return "http://" + n.AgentAddr, nil
}

// proxyInstance forwards a logs or exec request to the instance's agent.
func (s *Server) proxyInstance(suffix string) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		id := r.PathValue("id")
		var in api.Instance
		if _, err := s.st.Get(r.Context(), keyInstances+id, &in); errors.Is(err, store.ErrNotFound) {
			return notFound("instance", id)
		} else if err != nil {
			return err
		}
		if in.Node == "" {
			return apiError(http.StatusConflict, api.CodeConflict, "instance %s is not placed on a node yet", id)
		}
		base, err := s.agentURL(r.Context(), in.Node)
		if err != nil {
			return err
		}
		target, _ := url.Parse(base)
		rp := &httputil.ReverseProxy{
			Rewrite: func(pr *httputil.ProxyRequest) {
				pr.SetURL(target)
				pr.Out.URL.Path = "/v1/agent/instances/" + url.PathEscape(id) + "/" + suffix
				pr.Out.URL.RawPath = ""
				pr.Out.URL.RawQuery = r.URL.RawQuery
			},
			Transport:     agentClient.Transport,
			FlushInterval: -1,
			ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
				writeJSON(w, http.StatusBadGateway, apiError(http.StatusBadGateway, api.CodeInternal, "agent of node %s: %v", in.Node, err))
			},
		}
		rp.ServeHTTP(w, r)
		return nil
	}
}

// targetNodes is the node named by ?node=, or every ready node.
func (s *Server) targetNodes(ctx context.Context, r *http.Request) ([]api.Node, error) {
	kvs, _, err := s.st.List(ctx, keyNodes)
	if err != nil {
		return nil, err
	}
	want := r.URL.Query().Get("node")
	var out []api.Node
	for _, kv := range kvs {
		var n api.Node
		if json.Unmarshal(kv.Value, &n) != nil {
			continue
		}
		if want != "" && n.Name != want {
			continue
		}
		if n.Status.State == api.NodeReady && n.AgentAddr != "" {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		if want != "" {
			return nil, apiError(http.StatusServiceUnavailable, api.CodeInternal, "node %s is not ready or unknown", want)
		}
		return nil, apiError(http.StatusServiceUnavailable, api.CodeInternal, "no ready node")
	}
	return out, nil
}

// fanOut sends one request to the agent of each target node and gathers
// their image lists; a node's failure is reported in its entries.
func (s *Server) fanOut(w http.ResponseWriter, r *http.Request, method, path string, body func() (io.Reader, error)) error {
	nodes, err := s.targetNodes(r.Context(), r)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	var out []api.Image
	var firstErr *api.Error
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var rd io.Reader
			if body != nil {
				b, err := body()
				if err != nil {
					mu.Lock()
					out = append(out, api.Image{Node: n.Name, Error: err.Error()})
					mu.Unlock()
					return
				}
				rd = b
			}
			imgs, ae := callAgent(r.Context(), method, "http://"+n.AgentAddr+path, rd)
			mu.Lock()
			defer mu.Unlock()
			if ae != nil {
				if firstErr == nil {
					firstErr = ae
				}
				out = append(out, api.Image{Node: n.Name, Error: ae.Message})
				return
			}
			for i := range imgs {
				imgs[i].Node = n.Name
			}
			out = append(out, imgs...)
		}()
	}
	wg.Wait()
	// One target that failed: answer with its error as such.
	if len(nodes) == 1 && firstErr != nil {
		return firstErr
	}
	writeJSON(w, http.StatusOK, api.List[api.Image]{Items: out})
	return nil
}

func callAgent(ctx context.Context, method, u string, body io.Reader) ([]api.Image, *api.Error) {
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, apiError(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	resp, err := agentClient.Do(req)
	if err != nil {
		return nil, apiError(http.StatusBadGateway, api.CodeInternal, "agent: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode >= 400 {
		ae := &api.Error{}
		if json.Unmarshal(b, ae) != nil || ae.Message == "" {
			ae = apiError(resp.StatusCode, api.CodeInternal, "agent: %s", bytes.TrimSpace(b))
		}
		ae.Status = resp.StatusCode
		return nil, ae
	}
	var imgs []api.Image
	if len(bytes.TrimSpace(b)) > 0 {
		if err := json.Unmarshal(b, &imgs); err != nil {
			return nil, apiError(http.StatusBadGateway, api.CodeInternal, "agent answer: %v", err)
		}
	}
	return imgs, nil
}

// callAgentJSON sends in as JSON to an agent endpoint and decodes its
// answer into out (when not nil); an agent's error comes back as the API
// error it answered with.
func callAgentJSON(ctx context.Context, method, u string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("encode the request to the agent: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, bytes.NewReader(b))
	if err != nil {
		return apiError(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := agentClient.Do(req)
	if err != nil {
		return apiError(http.StatusBadGateway, api.CodeInternal, "agent: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode >= 400 {
		ae := &api.Error{}
		if json.Unmarshal(body, ae) != nil || ae.Message == "" {
			ae = apiError(resp.StatusCode, api.CodeInternal, "agent: %s", bytes.TrimSpace(body))
		}
		ae.Status = resp.StatusCode
		return ae
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			return apiError(http.StatusBadGateway, api.CodeInternal, "agent answer: %v", err)
		}
	}
	return nil
}

// maxImageBytes bounds an uploaded image archive.
const maxImageBytes = 4 << 30

func (s *Server) listImages(w http.ResponseWriter, r *http.Request) error {
	return s.fanOut(w, r, http.MethodGet, "/v1/agent/images", nil)
}

func (s *Server) importImage(w http.ResponseWriter, r *http.Request) error {
	// The archive is kept in a temporary file so each node can be sent it.
	f, err := os.CreateTemp("", "berth-import-*.tar")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	n, err := io.Copy(f, http.MaxBytesReader(nil, r.Body, maxImageBytes))
	if err != nil {
		return invalid("image", api.FieldErrors{{Field: "body", Reason: fmt.Sprintf("reading the archive: %v", err)}})
	}
	if n == 0 {
		return invalid("image", api.FieldErrors{{Field: "body", Reason: "empty: send an OCI layout or docker-archive tarball"}})
	}
	return s.fanOut(w, r, http.MethodPost, "/v1/agent/images/import", func() (io.Reader, error) {
		return os.Open(f.Name())
	})
}

func (s *Server) pullImage(w http.ResponseWriter, r *http.Request) error {
	var req api.PullRequest
	if err := decode(r, &req, "pull", ""); err != nil {
		return err
	}
	if req.Ref == "" {
		return invalid("pull", api.FieldErrors{{Field: "ref", Reason: "is required"}})
	}
	b, _ := json.Marshal(req)
	return s.fanOut(w, r, http.MethodPost, "/v1/agent/images/pull", func() (io.Reader, error) {
		return bytes.NewReader(b), nil
	})
}

func (s *Server) removeImage(w http.ResponseWriter, r *http.Request) error {
	ref := r.URL.Query().Get("ref")
	if ref == "" {
		return invalid("image", api.FieldErrors{{Field: "ref", Reason: "is required"}})
	}
	return s.fanOut(w, r, http.MethodDelete, "/v1/agent/images?ref="+url.QueryEscape(ref), nil)
}
