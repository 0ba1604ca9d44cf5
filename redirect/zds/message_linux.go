package zds

import (
	"encoding/binary"
	"net"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"
)

// oobSize has room for one fd, as ztunnel's receive buffer: more fds set MSG_CTRUNC.
var oobSize = unix.CmsgSpace(4)

// readRequest receives one packet and decodes it. Every fd the packet carried is closed
// unless it is returned in the request. A packet the protocol forbids is a *protocolError.
func readRequest(conn *net.UnixConn, buf, oob []byte) (request, error) {
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	oobn = min(max(oobn, 0), len(oob))
	if err != nil {
		// A packet can carry fds even when it reads as EOF (no bytes).
		fds, _ := parseRights(oob[:oobn])
		closeFds(fds)
		return request{}, err
	}
	req, fds, err := decodePacket(buf[:max(n, 0)], oob[:oobn], flags)
	if err != nil {
		closeFds(fds)
		return request{}, err
	}
	return req, nil
}

// decodePacket is the receive path without the syscall: it turns a packet's bytes, control
// messages and recvmsg flags into a request. It closes nothing: on success an add's fd is in
// the request; on error it returns every fd the packet carried, for the caller to close.
func decodePacket(data, oob []byte, flags int) (request, []int, error) {
	fds, err := parseRights(oob)
	if err != nil {
		return request{}, fds, err
	}
	req, err := decodeRequest(data, fds, flags)
	if err != nil {
		return request{}, fds, err
	}
	return req, nil, nil
}

func closeFds(fds []int) {
	for _, fd := range fds {
		closeFd(fd)
	}
}

// parseRights returns the fds of the SCM_RIGHTS control messages in oob, as far as oob
// parses; it closes nothing. Other control messages are ignored, as ztunnel does.
func parseRights(oob []byte) ([]int, error) {
	var fds []int
	for len(oob) >= unix.CmsgLen(0) {
		h, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return fds, protocolErrorf("parse control message: %v", err)
		}
		oob = rest
		if h.Level != unix.SOL_SOCKET || h.Type != unix.SCM_RIGHTS {
			continue
		}
		for ; len(data) >= 4; data = data[4:] {
			fds = append(fds, int(int32(binary.NativeEndian.Uint32(data))))
		}
		if len(data) != 0 {
			return fds, protocolErrorf("SCM_RIGHTS control message with %d stray bytes", len(data))
		}
	}
	return fds, nil
}

// decodeRequest applies ztunnel's rules to a packet: no truncation, a WorkloadRequest with a
// payload, exactly one fd with add and none with anything else.
func decodeRequest(data []byte, fds []int, flags int) (request, error) {
	if flags&unix.MSG_TRUNC != 0 {
		return request{}, protocolErrorf("received truncated message")
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return request{}, protocolErrorf("received truncated control message")
	}
	if len(fds) > 1 {
		return request{}, protocolErrorf("expected 1 fd, got %d", len(fds))
	}
	var m zdsapi.WorkloadRequest
	if err := proto.Unmarshal(data, &m); err != nil {
		return request{}, protocolErrorf("decode WorkloadRequest: %v", err)
	}
	req := request{fd: -1}
	switch p := m.GetPayload().(type) {
	case *zdsapi.WorkloadRequest_Add:
		if len(fds) == 0 {
			return request{}, protocolErrorf("add %q without a netns fd", p.Add.GetUid())
		}
		return request{kind: kindAdd, uid: p.Add.GetUid(), info: p.Add.GetWorkloadInfo(), fd: fds[0]}, nil
	case *zdsapi.WorkloadRequest_Keep:
		req.kind, req.uid = kindKeep, p.Keep.GetUid()
	case *zdsapi.WorkloadRequest_Del:
		req.kind, req.uid = kindDel, p.Del.GetUid()
	case *zdsapi.WorkloadRequest_SnapshotSent:
		req.kind = kindSnapshotSent
	default:
		return request{}, protocolErrorf("no payload")
	}
	if len(fds) != 0 {
		return request{}, protocolErrorf("unexpected fd with %s", req.kind)
	}
	return req, nil
}
