package zds

import "github.com/ztgo/ztgo/redirect"

// NetnsID identifies a network namespace by the device and inode of its nsfs file: two fds
// name the same namespace exactly when their IDs are equal. ztunnel keys a pod's proxy by
// the same pair. A pod's namespace reaches the Handler as a redirect.Netns, validated when the
// fd arrives (redirect.NetnsFromFD).
type NetnsID = redirect.NetnsID
