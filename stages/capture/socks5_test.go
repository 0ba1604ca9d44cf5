package capture

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"testing"
)

type rw struct {
	in  *bytes.Reader
	out bytes.Buffer
}

func (r *rw) Read(p []byte) (int, error)  { return r.in.Read(p) }
func (r *rw) Write(p []byte) (int, error) { return r.out.Write(p) }

func req(atyp byte, addr []byte, port uint16, cmd byte) []byte {
	b := []byte{5, 1, 0, 5, cmd, 0, atyp}
	b = append(b, addr...)
	return append(b, byte(port>>8), byte(port))
}

func TestHandshake(t *testing.T) {
	tests := []struct {
		name      string
		in        []byte
		want      Target
		wantErr   bool
		wantReply []byte // bytes after the method answer
	}{
		{name: "ipv4", in: req(1, []byte{10, 0, 0, 1}, 80, 1), want: Target{Addr: netip.MustParseAddrPort("10.0.0.1:80")}},
		{name: "ipv6", in: req(4, netip.MustParseAddr("fd00::1").AsSlice(), 443, 1), want: Target{Addr: netip.MustParseAddrPort("[fd00::1]:443")}},
		{name: "domain", in: req(3, append([]byte{11}, "example.com"...), 8080, 1), want: Target{Host: "example.com", Port: 8080}},
		{name: "domain that is an IP", in: req(3, append([]byte{8}, "10.1.2.3"...), 81, 1), want: Target{Addr: netip.MustParseAddrPort("10.1.2.3:81")}},
		{name: "bind command", in: req(1, []byte{10, 0, 0, 1}, 80, 2), wantErr: true, wantReply: []byte{5, ReplyCommandUnsupported}},
		{name: "bad atyp", in: req(9, nil, 80, 1), wantErr: true, wantReply: []byte{5, ReplyAddressUnsupported}},
		{name: "port zero", in: req(1, []byte{10, 0, 0, 1}, 0, 1), wantErr: true, wantReply: []byte{5, ReplyAddressUnsupported}},
		{name: "socks4", in: []byte{4, 1, 0, 80, 10, 0, 0, 1, 0}, wantErr: true},
		{name: "no noauth method", in: []byte{5, 1, 2}, wantErr: true},
		{name: "truncated", in: []byte{5, 1, 0, 5, 1, 0, 1, 10}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &rw{in: bytes.NewReader(tt.in)}
			got, err := Handshake(c)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("target = %+v, want %+v", got, tt.want)
			}
			if tt.wantReply != nil {
				out := c.out.Bytes()
				if len(out) < 4 || !bytes.Equal(out[2:4], tt.wantReply) {
					t.Fatalf("reply = %v, want prefix %v after method answer", out, tt.wantReply)
				}
			}
		})
	}
}

func TestWriteReply(t *testing.T) {
	var b bytes.Buffer
	WriteReply(&b, ReplySucceeded, netip.MustParseAddrPort("127.0.0.1:1080"))
	if !bytes.Equal(b.Bytes(), []byte{5, 0, 0, 1, 127, 0, 0, 1, 0x04, 0x38}) {
		t.Fatalf("reply = %v", b.Bytes())
	}
	b.Reset()
	WriteReply(&b, ReplyNotAllowed, netip.MustParseAddrPort("[fd00::2]:1"))
	if b.Len() != 22 || b.Bytes()[1] != ReplyNotAllowed || b.Bytes()[3] != 4 {
		t.Fatalf("v6 reply = %v", b.Bytes())
	}
}

func FuzzHandshake(f *testing.F) {
	f.Add(req(1, []byte{10, 0, 0, 1}, 80, 1))
	f.Add(req(3, append([]byte{3}, "a.b"...), 1, 1))
	f.Add(req(4, make([]byte, 16), 1, 1))
	f.Fuzz(func(t *testing.T, in []byte) {
		got, err := Handshake(&rw{in: bytes.NewReader(in)})
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || errors.Is(err, ErrProtocol) {
				return
			}
			t.Fatalf("unexpected error kind: %v", err)
		}
		if got.Host == "" && !got.Addr.IsValid() {
			t.Fatalf("success without a target: %+v", got)
		}
	})
}
