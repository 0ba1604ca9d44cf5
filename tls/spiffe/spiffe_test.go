package spiffe

import "testing"

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		want    ID
		wantErr bool
	}{
		{in: "spiffe://cluster.local/ns/default/sa/app", want: ID{"cluster.local", "default", "app"}},
		{in: "spiffe://td/ns/a-b/sa/c.d", want: ID{"td", "a-b", "c.d"}},
		{in: "cluster.local/ns/default/sa/app", wantErr: true},
		{in: "spiffe://cluster.local/ns/default/sa", wantErr: true},
		{in: "spiffe://cluster.local/ns/default/sa/app/extra", wantErr: true},
		{in: "spiffe://cluster.local/namespace/default/sa/app", wantErr: true},
		{in: "spiffe://cluster.local/ns//sa/app", wantErr: true},
		{in: "spiffe:///ns/default/sa/app", wantErr: true},
		{in: "spiffe://cluster.local/ns/default/sa/a b", wantErr: true},
		{in: "spiffe://cluster.local/ns/default/sa/a?x", wantErr: true},
		{in: "", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := Parse(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Parse(%q) error = %v, wantErr %v", tt.in, err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("Parse(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if err == nil && got.String() != tt.in {
				t.Fatalf("round trip: %q != %q", got.String(), tt.in)
			}
		})
	}
}

func TestPrincipalAndZero(t *testing.T) {
	id := ID{"td", "ns1", "sa1"}
	if got := id.Principal(); got != "td/ns/ns1/sa/sa1" {
		t.Fatalf("Principal = %q", got)
	}
	if (ID{}).String() != "" || (ID{}).Principal() != "" || !(ID{}).IsZero() {
		t.Fatal("zero ID must format empty")
	}
	if _, err := New("td", "", "sa"); err == nil {
		t.Fatal("New with empty namespace must fail")
	}
}

func TestMatchAny(t *testing.T) {
	a := "spiffe://td/ns/a/sa/x"
	b := "spiffe://td/ns/b/sa/y"
	if !MatchAny([]string{a}, []string{b, a}) {
		t.Fatal("expected match")
	}
	if MatchAny([]string{a}, []string{b}) || MatchAny(nil, []string{a}) || MatchAny([]string{a}, nil) {
		t.Fatal("unexpected match")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"spiffe://cluster.local/ns/default/sa/app", "spiffe://a/ns/b/sa/c", "spiffe://", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := Parse(s)
		if err != nil {
			return
		}
		again, err := Parse(id.String())
		if err != nil || again != id {
			t.Fatalf("round trip of %q failed: %v %+v", s, err, again)
		}
	})
}
