package runtime

import (
	"github.com/containerd/platforms"
)

// snapshotter unpacks image layers; overlayfs works on these machines.
const snapshotter = "overlayfs"

func platformMatcher() platforms.MatchComparer { return platforms.Default() }
