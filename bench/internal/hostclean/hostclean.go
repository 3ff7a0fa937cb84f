// Package hostclean finds and removes what a benchmark run left on the
// host: processes in a network namespace or in the run's cgroups, the
// cgroups themselves, and mounts under the run's directories.
//
// Everything here reads /proc and /sys/fs/cgroup directly and kills or
// removes only by PID or path; it is Linux-only and needs root.
// bench/internal/benchhost puts these together into a run's sweep.
package hostclean

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Exists says whether p exists (a dangling symlink counts).
func Exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// WaitGone polls cond every 20ms until it holds or timeout passes.
func WaitGone(cond func() bool, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for !cond() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
}

// NSID identifies a namespace by the device and inode of its file.
type NSID struct{ dev, ino uint64 }

// Inode returns the identity of the namespace file at path (a bind mount
// under /run/netns or /proc/<pid>/ns/net); false if it cannot be stat'd.
func Inode(path string) (NSID, bool) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return NSID{}, false
	}
	return NSID{uint64(st.Dev), st.Ino}, true
}

// PIDs lists the processes of the machine but this one, zombies left out
// (a zombie is dead; it waits for its parent or init to reap it).
func PIDs() []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) && b[i+2] == 'Z' {
				continue
			}
			out = append(out, pid)
		}
	}
	return out
}

// Alive says whether pid runs (a zombie does not).
func Alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// NetnsProcs lists the processes in the network namespace id.
func NetnsProcs(id NSID) []int {
	var out []int
	for _, pid := range PIDs() {
		if got, ok := Inode(fmt.Sprintf("/proc/%d/ns/net", pid)); ok && got == id {
			out = append(out, pid)
		}
	}
	return out
}

// CgroupProcs lists the processes in a cgroup whose name starts with
// prefix+"-". A run's containers are in such cgroups: containerd puts them
// in /berth/<id>, runc in <its own cgroup>/<id>, and every container id of
// the run starts with its prefix.
func CgroupProcs(prefix string) []int {
	var out []int
	for _, pid := range PIDs() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if err != nil {
			continue
		}
		if strings.Contains(string(b), "/"+prefix+"-") {
			out = append(out, pid)
		}
	}
	return out
}

// CgroupDirs lists the cgroup directories whose name starts with
// prefix+"-", looking at most five levels below /sys/fs/cgroup.
func CgroupDirs(prefix string) []string {
	var out []string
	root := "/sys/fs/cgroup"
	_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if strings.HasPrefix(d.Name(), prefix+"-") {
			out = append(out, p)
			return filepath.SkipDir
		}
		if strings.Count(strings.TrimPrefix(p, root), "/") >= 5 {
			return filepath.SkipDir
		}
		return nil
	})
	return out
}

// RemoveCgroups removes the (empty) cgroups that CgroupDirs finds for
// prefix, with their sub-cgroups, deepest first. Failures are ignored: what
// stays is reported by a later CgroupDirs.
func RemoveCgroups(prefix string) {
	for _, d := range CgroupDirs(prefix) {
		var sub []string
		_ = filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				sub = append(sub, p)
			}
			return nil
		})
		for i := len(sub) - 1; i >= 0; i-- {
			_ = syscall.Rmdir(sub[i])
		}
	}
}

// ProcsMentioning lists the processes whose command line names one of dirs.
func ProcsMentioning(dirs []string) []int {
	var out []int
	for _, pid := range PIDs() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		s := string(b)
		for _, d := range dirs {
			if strings.Contains(s, d) {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

// MountsUnder lists the mount points, in this process's mount namespace, at
// or below one of dirs, in mount order.
func MountsUnder(dirs []string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) <= 4 {
			continue
		}
		for _, d := range dirs {
			if f[4] == d || strings.HasPrefix(f[4], d+"/") {
				out = append(out, f[4])
				break
			}
		}
	}
	return out
}

// UnmountUnder lazily unmounts every mount point at or below dir, deepest
// first. A point that is already gone is not an error.
func UnmountUnder(dir string) error {
	points := MountsUnder([]string{dir})
	var errs []error
	for i := len(points) - 1; i >= 0; i-- {
		if err := syscall.Unmount(points[i], syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", points[i], err))
		}
	}
	return errors.Join(errs...)
}

// KillInNetns kills, by PID, every process in one of the network namespaces
// whose files are at paths (bind mounts or /proc/<pid>/ns/net), and returns
// how many there were. A path that cannot be stat'd is passed over.
func KillInNetns(paths []string) int {
	n := 0
	for _, p := range paths {
		id, ok := Inode(p)
		if !ok {
			continue
		}
		for _, pid := range NetnsProcs(id) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			n++
		}
	}
	return n
}
