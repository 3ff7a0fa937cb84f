package server

import (
	"bytes"
	"cmp"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/berth-dev/berth/api"
)

// once is a value that its first caller computes; callers that come
// meanwhile wait on a channel, which wakes them all at once (a watched
// service's change wakes every stream of it together), and later ones
// read it with one atomic load.
type once[T any] struct {
	state atomic.Int32 // onceNew, onceRunning, onceDone
	done  chan struct{}
	v     T
}

const (
	onceNew = iota
	onceRunning
	onceDone
)

func newOnce[T any]() *once[T] { return &once[T]{done: make(chan struct{})} }

// doneOnce is a once holding v already.
func doneOnce[T any](v T) *once[T] {
	o := &once[T]{v: v}
	o.state.Store(onceDone)
	return o
}

// get returns the value, computing it with f if it is the first caller.
func (o *once[T]) get(f func() T) T {
	if o.state.Load() == onceDone {
		return o.v
	}
	if o.state.CompareAndSwap(onceNew, onceRunning) {
		o.v = f()
		o.state.Store(onceDone)
		close(o.done)
		return o.v
	}
	<-o.done
	return o.v
}

// peek returns the value if it is computed.
func (o *once[T]) peek() (T, bool) {
	if o.state.Load() == onceDone {
		return o.v, true
	}
	var zero T
	return zero, false
}

// snapshot is a service's endpoints as of one change of it. Its view of
// every endpoint is built once, by the first reader after the change, and
// its views for each filter on demand; all are immutable and shared by
// every reader: discovery answers, watch streams, DNS.
type snapshot struct {
	changed int64 // the revision of the service's change
	exists  bool  // a service object of that name is stored
	built   *once[*view]

	mu    sync.Mutex                              // serialises additions to views
	views atomic.Pointer[map[string]*once[*view]] // by filter key; replaced on addition
}

// all is the view of every endpoint.
func (s *snapshot) all() *view {
	if v, ok := s.built.peek(); ok && v != nil {
		return v
	}
	return emptyView // not reached: the index builds it before handing it out
}

// known reports whether the service exists or has any endpoint.
func (s *snapshot) known() bool { return s.exists || len(s.all().eps) > 0 }

// filtered is the view of the endpoints f keeps; key is f.key().
func (s *snapshot) filtered(f discoveryFilter, key string) *view {
	all := s.all()
	if key == "" {
		return all
	}
	o := s.filterView(key)
	return o.get(func() *view { return all.filter(f) })
}

// maxFilterViews bounds the filters a snapshot keeps views for.
const maxFilterViews = 64

// filterView returns the once of the view of the filter of key, adding it.
func (s *snapshot) filterView(key string) *once[*view] {
	if m := s.views.Load(); m != nil {
		if o, ok := (*m)[key]; ok {
			return o
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var m map[string]*once[*view]
	if old := s.views.Load(); old != nil {
		if o, ok := (*old)[key]; ok {
			return o
		}
		if len(*old) >= maxFilterViews {
			return newOnce[*view]() // made for this reader alone
		}
		m = make(map[string]*once[*view], len(*old)+1)
		for k, o := range *old {
			m[k] = o
		}
	} else {
		m = map[string]*once[*view]{}
	}
	o := newOnce[*view]()
	m[key] = o
	s.views.Store(&m)
	return o
}

// view is endpoints sorted by key (endpointKey), with their JSON
// encodings. It is immutable, but for the memo of the watch lines rendered
// into it.
type view struct {
	id    uint64 // unique: memos name views by it, so as not to hold them
	eps   []api.Endpoint
	enc   [][]byte
	lines atomic.Pointer[linesMemo] // the last step of watch streams into it
}

var viewIDs atomic.Uint64

// emptyView has no endpoint.
var emptyView = newView(0)

func newView(n int) *view {
	return &view{id: viewIDs.Add(1), eps: make([]api.Endpoint, n), enc: make([][]byte, n)}
}

// filter is the view of the endpoints of v that f keeps (v itself when f
// keeps them all).
func (v *view) filter(f discoveryFilter) *view {
	keep := make([]int, 0, len(v.eps))
	for i, ep := range v.eps {
		if f.keep(ep) {
			keep = append(keep, i)
		}
	}
	if len(keep) == len(v.eps) {
		return v
	}
	out := newView(len(keep))
	for j, i := range keep {
		out.eps[j], out.enc[j] = v.eps[i], v.enc[i]
	}
	return out
}

// linesMemo is the watch lines that take a stream from the view with id
// from to a view, at revision rev.
type linesMemo struct {
	from  uint64 // 0: from nothing
	rev   int64
	lines *once[[]byte]
}

// linesFrom is what a watch stream that last sent prev (nil: nothing yet)
// sends to be current with v at revision rev: a put for every endpoint
// added or changed, in key order, a delete for every one gone, and a
// bookmark. Every stream making the same step shares the same bytes.
func (v *view) linesFrom(prev *view, rev int64) []byte {
	var from uint64
	if prev != nil {
		from = prev.id
	}
	render := func() []byte { return renderDiff(prev, v, rev) }
	for {
		m := v.lines.Load()
		if m != nil && m.from == from && m.rev == rev {
			return m.lines.get(render)
		}
		nm := &linesMemo{from: from, rev: rev, lines: newOnce[[]byte]()}
		if v.lines.CompareAndSwap(m, nm) {
			return nm.lines.get(render)
		}
	}
}

// renderDiff renders the events from prev (nil: empty) to cur at rev, as
// json.Encoder writes api.Events, and a bookmark.
func renderDiff(prev, cur *view, rev int64) []byte {
	if prev == nil {
		prev = emptyView
	}
	var b []byte
	j := 0
	for i := range cur.eps {
		ep := &cur.eps[i]
		for j < len(prev.eps) && compareKeys(&prev.eps[j], ep) < 0 {
			j++
		}
		if j < len(prev.eps) && compareKeys(&prev.eps[j], ep) == 0 && bytes.Equal(prev.enc[j], cur.enc[i]) {
			continue
		}
		b = appendEvent(b, api.EventPut, ep, rev, cur.enc[i])
	}
	j = 0
	for i := range prev.eps {
		ep := &prev.eps[i]
		for j < len(cur.eps) && compareKeys(&cur.eps[j], ep) < 0 {
			j++
		}
		if j < len(cur.eps) && compareKeys(&cur.eps[j], ep) == 0 {
			continue
		}
		b = appendEvent(b, api.EventDelete, ep, rev, prev.enc[i])
	}
	return appendBookmark(b, rev)
}

// appendEvent appends an endpoint event line, as json.Encoder encodes
// api.Event{Type: typ, Kind: "endpoint", Name: endpointKey(*ep),
// Revision: rev, Object: obj}.
func appendEvent(b []byte, typ string, ep *api.Endpoint, rev int64, obj []byte) []byte {
	b = append(b, `{"type":"`...)
	b = append(b, typ...)
	b = append(b, `","kind":"endpoint","name":`...)
	b = appendKey(b, ep)
	b = append(b, `,"revision":`...)
	b = strconv.AppendInt(b, rev, 10)
	b = append(b, `,"object":`...)
	b = append(b, obj...)
	return append(b, "}\n"...)
}

// compareKeys compares the keys of a and b (endpointKey: the id, "@" and
// the network) without making them.
func compareKeys(a, b *api.Endpoint) int {
	if a.ID == b.ID {
		return strings.Compare(a.Network, b.Network)
	}
	n := min(len(a.ID), len(b.ID))
	if c := strings.Compare(a.ID[:n], b.ID[:n]); c != 0 {
		return c
	}
	// One id is a prefix of the other: the shorter goes on with "@".
	switch {
	case len(a.ID) < len(b.ID) && b.ID[n] != '@':
		return cmp.Compare('@', b.ID[n])
	case len(b.ID) < len(a.ID) && a.ID[n] != '@':
		return cmp.Compare(a.ID[n], '@')
	}
	return compareParts([3]string{a.ID, "@", a.Network}, [3]string{b.ID, "@", b.Network})
}

// compareParts compares the concatenations of x and y.
func compareParts(x, y [3]string) int {
	i, j := 0, 0
	xs, ys := x[0], y[0]
	for {
		for len(xs) == 0 && i < len(x)-1 {
			i++
			xs = x[i]
		}
		for len(ys) == 0 && j < len(y)-1 {
			j++
			ys = y[j]
		}
		if len(xs) == 0 || len(ys) == 0 {
			return cmp.Compare(len(xs), len(ys))
		}
		n := min(len(xs), len(ys))
		if c := strings.Compare(xs[:n], ys[:n]); c != 0 {
			return c
		}
		xs, ys = xs[n:], ys[n:]
	}
}

// appendBookmark appends a bookmark line at rev.
func appendBookmark(b []byte, rev int64) []byte {
	b = append(b, `{"type":"bookmark","revision":`...)
	b = strconv.AppendInt(b, rev, 10)
	return append(b, "}\n"...)
}

// appendKey appends ep's key as a JSON string, escaped as encoding/json
// escapes it.
func appendKey(b []byte, ep *api.Endpoint) []byte {
	if needsEscape(ep.ID) || needsEscape(ep.Network) {
		q, _ := json.Marshal(endpointKey(*ep))
		return append(b, q...)
	}
	b = append(b, '"')
	b = append(b, ep.ID...)
	b = append(b, '@')
	b = append(b, ep.Network...)
	return append(b, '"')
}

// needsEscape reports whether encoding/json would escape a byte of s.
func needsEscape(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x80 || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return true
		}
	}
	return false
}

// listBufs are the buffers discovery answers are put together in.
var listBufs = sync.Pool{New: func() any { return new([]byte) }}

// writeList answers with v's endpoints at rev, as writeJSON writes
// api.List[api.Endpoint]{Items: v.eps, Revision: rev}.
func writeList(w http.ResponseWriter, v *view, rev int64) {
	bp := listBufs.Get().(*[]byte)
	b := append((*bp)[:0], `{"items":[`...)
	for i, enc := range v.enc {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, enc...)
	}
	b = append(b, `],"revision":`...)
	b = strconv.AppendInt(b, rev, 10)
	b = append(b, "}\n"...)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
	if cap(b) <= 1<<20 {
		*bp = b
		listBufs.Put(bp)
	}
}
