package zds

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"
)

// The fds in these tests are plain numbers: decodeRequest and parseRights close nothing.

func TestDecodeRequest(t *testing.T) {
	m := func(req *zdsapi.WorkloadRequest) []byte {
		b, err := proto.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	info := &zdsapi.WorkloadInfo{Name: "n", Namespace: "ns", ServiceAccount: "sa"}
	for _, tc := range []struct {
		name    string
		data    []byte
		fds     []int
		flags   int
		want    request
		wantErr string
	}{
		{name: "add", data: m(&zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: "u", WorkloadInfo: info}}}), fds: []int{7},
			want: request{kind: kindAdd, uid: "u", info: info, fd: 7}},
		{name: "add without info", data: m(&zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: "u"}}}), fds: []int{7},
			want: request{kind: kindAdd, uid: "u", fd: 7}}, // rejected later, as ztunnel does
		{name: "keep", data: m(keepReq("k")), want: request{kind: kindKeep, uid: "k", fd: -1}},
		// DelWorkload's uid is field 2: 12 03 12 01 'd'.
		{name: "del", data: []byte{0x12, 0x03, 0x12, 0x01, 'd'}, want: request{kind: kindDel, uid: "d", fd: -1}},
		{name: "snapshot_sent", data: []byte{0x1a, 0x00}, want: request{kind: kindSnapshotSent, fd: -1}},
		{name: "unknown field ignored", data: append([]byte{0x48, 0x01}, m(keepReq("k"))...), want: request{kind: kindKeep, uid: "k", fd: -1}},
		{name: "add without fd", data: m(addReq("u")), wantErr: `add "u" without a netns fd`},
		{name: "add with two fds", data: m(addReq("u")), fds: []int{7, 8}, wantErr: "expected 1 fd, got 2"},
		{name: "del with fd", data: m(delReq("d")), fds: []int{7}, wantErr: "unexpected fd with del"},
		{name: "keep with fd", data: m(keepReq("k")), fds: []int{7}, wantErr: "unexpected fd with keep"},
		{name: "snapshot with fd", data: m(snapshotReq()), fds: []int{7}, wantErr: "unexpected fd with snapshot_sent"},
		{name: "truncated", data: m(keepReq("k")), flags: unix.MSG_TRUNC, wantErr: "received truncated message"},
		{name: "control truncated", data: m(addReq("u")), fds: []int{7}, flags: unix.MSG_CTRUNC, wantErr: "received truncated control message"},
		{name: "empty", data: nil, wantErr: "no payload"},
		{name: "garbage", data: []byte{0xff}, wantErr: "decode WorkloadRequest"},
		{name: "bad utf-8 uid", data: []byte{0x2a, 0x03, 0x0a, 0x01, 0xff}, wantErr: "decode WorkloadRequest"},
	} {
		got, err := decodeRequest(tc.data, tc.fds, tc.flags)
		if tc.wantErr != "" {
			var perr *protocolError
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.As(err, &perr) {
				t.Errorf("%s: err %v, want protocol error %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if got.kind != tc.want.kind || got.uid != tc.want.uid || got.fd != tc.want.fd || !proto.Equal(got.info, tc.want.info) {
			t.Errorf("%s: got %+v, want %+v", tc.name, got, tc.want)
		}
	}
}

func TestParseRights(t *testing.T) {
	creds := unix.UnixCredentials(&unix.Ucred{Pid: 1})
	for _, tc := range []struct {
		name    string
		oob     []byte
		want    []int
		wantErr bool
	}{
		{name: "none", oob: nil},
		{name: "one", oob: unix.UnixRights(5), want: []int{5}},
		{name: "three", oob: unix.UnixRights(5, 6, 7), want: []int{5, 6, 7}},
		{name: "two messages", oob: append(unix.UnixRights(5), unix.UnixRights(6)...), want: []int{5, 6}},
		{name: "credentials ignored", oob: append(creds, unix.UnixRights(5)...), want: []int{5}},
		{name: "short tail ignored", oob: append(unix.UnixRights(5), 1, 2, 3), want: []int{5}},
		{name: "bad length", oob: func() []byte { b := unix.UnixRights(5); b[0] = 200; return b }(), wantErr: true},
		{name: "stray bytes", oob: func() []byte { b := unix.UnixRights(5, 6); b[0]--; return b }(), want: []int{5}, wantErr: true},
	} {
		got, err := parseRights(tc.oob)
		if (err != nil) != tc.wantErr || !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, %v; want %v (error %v)", tc.name, got, err, tc.want, tc.wantErr)
		}
	}
}

// FuzzDecode feeds the receive path's pure part (control message parsing and request
// decoding) arbitrary packets: it must never panic, and what it accepts must obey the
// protocol's fd rule.
func FuzzDecode(f *testing.F) {
	for _, req := range []*zdsapi.WorkloadRequest{addReq("uid-1"), keepReq("k"), delReq("d"), snapshotReq(), {}} {
		b, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, []byte(nil), 0)
		f.Add(b, unix.UnixRights(3), 0)
		f.Add(b, unix.UnixRights(3, 4), unix.MSG_CTRUNC)
		f.Add(b, unix.UnixRights(3), unix.MSG_TRUNC)
	}
	f.Add([]byte{0xff, 0xff}, append(unix.UnixRights(3), 0xff), 0)
	f.Fuzz(func(t *testing.T, data, oob []byte, flags int) {
		all, _ := parseRights(oob)
		req, fds, err := decodePacket(data, oob, flags)
		if err != nil {
			var perr *protocolError
			if !errors.As(err, &perr) {
				t.Fatalf("error %v is not a protocol error", err)
			}
			if req != (request{}) || !slices.Equal(fds, all) {
				t.Fatalf("error %v with request %+v and fds %v to close, want all of %v", err, req, fds, all)
			}
			return
		}
		if fds != nil {
			t.Fatalf("success left fds %v to close", fds)
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			t.Fatalf("accepted flags %#x", flags)
		}
		switch req.kind {
		case kindAdd:
			if len(all) != 1 || req.fd != all[0] {
				t.Fatalf("add with fds %v, request fd %d", all, req.fd)
			}
		case kindKeep, kindDel, kindSnapshotSent:
			if len(all) != 0 || req.fd != -1 {
				t.Fatalf("%s with fds %v, request fd %d", req.kind, all, req.fd)
			}
		default:
			t.Fatalf("accepted kind %v", req.kind)
		}
		var m zdsapi.WorkloadRequest
		if err := proto.Unmarshal(data, &m); err != nil {
			t.Fatalf("accepted bytes proto rejects: %v", err)
		}
	})
}
