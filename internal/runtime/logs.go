package runtime

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/berth-dev/berth/api"
)

// Log rotation defaults.
const (
	DefaultLogMaxSize  = 10 << 20
	DefaultLogMaxFiles = 3
)

// LogLine is one line of a container's output as stored.
type LogLine = api.LogLine

// rotator appends JSON lines to a file, keeping maxFiles-1 rotated copies.
type rotator struct {
	mu       sync.Mutex
	path     string
	f        *os.File
	size     int64
	maxSize  int64
	maxFiles int
}

func newRotator(path string, maxSize int64, maxFiles int) (*rotator, error) {
	r := &rotator{path: path, maxSize: maxSize, maxFiles: maxFiles}
	return r, r.open()
}

func (r *rotator) open() error {
	f, err := os.OpenFile(r.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open log %s: %w", r.path, err)
	}
	st, _ := f.Stat()
	r.f, r.size = f, st.Size()
	return nil
}

func (r *rotator) write(l LogLine) {
	b, _ := json.Marshal(l)
	b = append(b, '\n')
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.size+int64(len(b)) > r.maxSize && r.size > 0 {
		r.rotate()
	}
	n, _ := r.f.Write(b)
	r.size += int64(n)
}

func (r *rotator) rotate() {
	_ = r.f.Close()
	for i := r.maxFiles - 1; i >= 1; i-- {
		from := r.path
		if i > 1 {
			from = r.path + "." + strconv.Itoa(i-1)
		}
		_ = os.Rename(from, r.path+"."+strconv.Itoa(i))
	}
	if err := r.open(); err != nil {
		// Nowhere to write: drop output rather than block the container.
		r.f, _ = os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	}
}

func (r *rotator) Close() error { return r.f.Close() }

// ReadLogs writes a container's stored output to fn, oldest first: the last
// tail lines (all when tail < 0), then, with follow, new lines as they come
// until ctx ends.
func ReadLogs(ctx context.Context, path string, tail int, follow bool, fn func(LogLine) error) error {
	var files []string
	for i := DefaultLogMaxFiles - 1; i >= 1; i-- {
		files = append(files, path+"."+strconv.Itoa(i))
	}
	files = append(files, path)
	var lines []LogLine
	var readOfCurrent int64 // bytes of the current file already read
	for _, p := range files {
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			if p == path {
				readOfCurrent += int64(len(sc.Bytes())) + 1
			}
			var l LogLine
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				lines = append(lines, l)
				if tail >= 0 && len(lines) > 2*tail+1024 {
					lines = append([]LogLine(nil), lines[len(lines)-tail:]...)
				}
			}
		}
		f.Close()
	}
	if tail >= 0 && len(lines) > tail {
		lines = lines[len(lines)-tail:]
	}
	for _, l := range lines {
		if err := fn(l); err != nil {
			return err
		}
	}
	if !follow {
		return nil
	}
	return followFile(ctx, path, readOfCurrent, fn)
}

// followFile polls path for appended lines. It keeps the file open, so that
// after a rotation it first drains what was appended to the old file, then
// goes on from the start of the new one.
func followFile(ctx context.Context, path string, from int64, fn func(LogLine) error) error {
	var f *os.File
	var offset int64
	var partial []byte
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	open := func(from int64) {
		if nf, err := os.Open(path); err == nil {
			f, offset, partial = nf, from, nil
		}
	}
	// drain reads f from offset to its end and emits whole lines.
	drain := func() error {
		st, err := f.Stat()
		if err != nil || st.Size() <= offset {
			return nil
		}
		buf := make([]byte, st.Size()-offset)
		n, _ := f.ReadAt(buf, offset)
		offset += int64(n)
		data := append(partial, buf[:n]...)
		for {
			i := bytes.IndexByte(data, '\n')
			if i < 0 {
				break
			}
			var l LogLine
			if json.Unmarshal(data[:i], &l) == nil {
				if err := fn(l); err != nil {
					return err
				}
			}
			data = data[i+1:]
		}
		partial = append([]byte(nil), data...)
		return nil
	}
	open(from) // what came before was already sent
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if f == nil {
			open(0)
		}
		if f != nil {
			if err := drain(); err != nil {
				return err
			}
			cur, err1 := os.Stat(path)
			old, err2 := f.Stat()
			if err1 == nil && err2 == nil && !os.SameFile(cur, old) {
				// Rotated: finish the old file, then start the new one.
				if err := drain(); err != nil {
					return err
				}
				f.Close()
				f = nil
				open(0)
				continue
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}
