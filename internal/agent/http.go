package agent

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/runtime"
)

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

func agentError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(&api.Error{Status: status, Code: code, Message: msg})
}

func runtimeError(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, runtime.ErrNotFound), errors.Is(err, runtime.ErrImageNotFound):
		agentError(w, http.StatusNotFound, api.CodeNotFound, err.Error())
	case errors.Is(err, runtime.ErrImageInUse):
		agentError(w, http.StatusConflict, api.CodeConflict, err.Error())
	default:
		agentError(w, http.StatusBadRequest, api.CodeInvalid, err.Error())
	}
}

func toAPI(imgs []runtime.Image) []api.Image {
	out := make([]api.Image, 0, len(imgs))
	for _, i := range imgs {
		out = append(out, api.Image{Ref: i.Ref, Digest: i.Digest, Size: api.Bytes(i.Size), Created: i.Created})
	}
	return out
}

// handler serves the agent's own endpoints, which the server proxies to:
// logs, exec, TTL check updates and images of this node.
func (a *Agent) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/agent/instances/{id}/logs", a.serveLogs)
	mux.HandleFunc("POST /v1/agent/instances/{id}/exec", a.serveExec)
	mux.HandleFunc("PUT /v1/agent/instances/{id}/check", a.serveCheck)
	mux.HandleFunc("GET /v1/agent/images", func(w http.ResponseWriter, r *http.Request) {
		imgs, err := a.rt.Images(r.Context())
		if err != nil {
			runtimeError(w, err)
			return
		}
		writeJSON(w, toAPI(imgs))
	})
	mux.HandleFunc("POST /v1/agent/images/import", func(w http.ResponseWriter, r *http.Request) {
		imgs, err := a.rt.Import(r.Context(), r.Body)
		if err != nil {
			runtimeError(w, err)
			return
		}
		writeJSON(w, toAPI(imgs))
	})
	mux.HandleFunc("POST /v1/agent/images/pull", func(w http.ResponseWriter, r *http.Request) {
		var req api.PullRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			agentError(w, http.StatusBadRequest, api.CodeInvalid, "pull: "+err.Error())
			return
		}
		img, err := a.rt.Pull(r.Context(), req.Ref)
		if err != nil {
			runtimeError(w, err)
			return
		}
		writeJSON(w, toAPI([]runtime.Image{img}))
	})
	mux.HandleFunc("DELETE /v1/agent/images", func(w http.ResponseWriter, r *http.Request) {
		if err := a.rt.RemoveImage(r.Context(), r.URL.Query().Get("ref")); err != nil {
			runtimeError(w, err)
			return
		}
		writeJSON(w, []api.Image{})
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func (a *Agent) serveLogs(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	tail := -1
	if v := r.URL.Query().Get("tail"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			agentError(w, http.StatusBadRequest, api.CodeInvalid, "tail: must be a non-negative integer")
			return
		}
		tail = n
	}
	follow := r.URL.Query().Get("follow") == "1"
	w.Header().Set("Content-Type", "application/x-ndjson")
	flusher, _ := w.(http.Flusher)
	enc := json.NewEncoder(w)
	n := 0
	err := runtime.ReadLogs(r.Context(), a.logPath(id), tail, follow, func(l runtime.LogLine) error {
		if err := enc.Encode(l); err != nil {
			return err
		}
		if n++; follow && flusher != nil {
			flusher.Flush()
		}
		return nil
	})
	if err != nil && r.Context().Err() == nil {
		a.log.Warn("agent: logs", "instance", id, "err", err)
	}
}

// frameWriter turns an exec's output into ExecFrames.
type frameWriter struct {
	mu     *sync.Mutex
	enc    *json.Encoder
	fl     http.Flusher
	stream string
}

func (f frameWriter) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enc.Encode(api.ExecFrame{Stream: f.stream, Data: string(p)}); err != nil {
		return 0, err
	}
	if f.fl != nil {
		f.fl.Flush()
	}
	return len(p), nil
}

func (a *Agent) serveExec(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var req api.ExecRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil || len(req.Command) == 0 {
		agentError(w, http.StatusBadRequest, api.CodeInvalid, "command: a non-empty list is required")
		return
	}
	if _, err := a.rt.Inspect(r.Context(), id); err != nil {
		runtimeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	fl, _ := w.(http.Flusher)
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	code, err := a.rt.Exec(r.Context(), id, req.Command,
		frameWriter{&mu, enc, fl, "stdout"}, frameWriter{&mu, enc, fl, "stderr"})
	mu.Lock()
	defer mu.Unlock()
	if err != nil {
		_ = enc.Encode(api.ExecFrame{Error: err.Error()})
		return
	}
	_ = enc.Encode(api.ExecFrame{Exit: &code})
}
