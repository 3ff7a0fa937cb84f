package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/cache"
	"github.com/berth-dev/berth/internal/store"
)

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v)
}

func apiError(status int, code, format string, args ...any) *api.Error {
	return &api.Error{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

func invalid(what string, fe api.FieldErrors) *api.Error {
	return &api.Error{Status: http.StatusBadRequest, Code: api.CodeInvalid,
		Message: fmt.Sprintf("invalid %s: %s", what, fe.Error()), Fields: fe}
}

// fail writes err as an API error, mapping store errors to statuses.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	var ae *api.Error
	if !errors.As(err, &ae) {
		switch {
		case errors.Is(err, store.ErrNotFound):
			ae = apiError(http.StatusNotFound, api.CodeNotFound, "%v", err)
		case errors.Is(err, store.ErrExists), errors.Is(err, store.ErrConflict):
			ae = apiError(http.StatusConflict, api.CodeConflict, "%v", err)
		case errors.Is(err, cache.ErrGone), errors.Is(err, store.ErrCompacted):
			ae = apiError(http.StatusGone, api.CodeGone, "%v", err)
		case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
			ae = apiError(http.StatusServiceUnavailable, api.CodeInternal, "request cancelled: %v", err)
		default:
			s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
			ae = apiError(http.StatusInternalServerError, api.CodeInternal, "internal error: %v", err)
		}
	}
	writeJSON(w, ae.Status, ae)
}

// bodyField names the whole request body in field errors when the decoded
// object has no root path of its own (root ""): a malformed or empty body is
// reported as "body: ..." rather than with an empty field.
const bodyField = "body"

// decode reads the request body strictly into v; field paths start at root.
func decode(r *http.Request, v any, what, root string) error {
	whole := root
	if whole == "" {
		whole = bodyField
	}
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, api.MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return invalid(what, api.FieldErrors{{Field: whole, Reason: fmt.Sprintf("body is larger than %d bytes", api.MaxBodyBytes)}})
		}
		return apiError(http.StatusBadRequest, api.CodeInvalid, "read body: %v", err)
	}
	if err := api.Decode(body, v, root); err != nil {
		fe, ok := api.AsFieldErrors(err)
		if !ok {
			fe = api.FieldErrors{{Field: whole, Reason: err.Error()}}
		}
		for i := range fe {
			if fe[i].Field == "" {
				fe[i].Field = whole
			}
		}
		return invalid(what, fe)
	}
	return nil
}

// validated turns a validation error into a 400.
func validated(what string, err error) error {
	if err == nil {
		return nil
	}
	if fe, ok := api.AsFieldErrors(err); ok {
		return invalid(what, fe)
	}
	return err
}

// withRevision splices the revision into a stored JSON object.
func withRevision(raw []byte, rev int64) json.RawMessage {
	if len(raw) < 2 || raw[len(raw)-1] != '}' {
		return raw
	}
	out := make([]byte, 0, len(raw)+32)
	out = append(out, raw[:len(raw)-1]...)
	if len(raw) > 2 {
		out = append(out, ',')
	}
	out = append(out, `"revision":`...)
	out = strconv.AppendInt(out, rev, 10)
	return append(out, '}')
}

func boolParam(r *http.Request, name string) bool {
	v := r.URL.Query().Get(name)
	return v == "1" || v == "true" || v == "yes"
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func logRequests(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w, status: 200}
		next.ServeHTTP(rec, r)
		if rec.status >= 500 {
			log.Warn("request", "method", r.Method, "path", r.URL.Path, "status", rec.status)
		} else {
			log.Debug("request", "method", r.Method, "path", r.URL.Path, "status", rec.status)
		}
	})
}
