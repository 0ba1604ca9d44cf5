package agent

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"
)

func TestParsePodSpec(t *testing.T) {
	long := func(n int) string { return strings.Repeat("a", n) }
	for _, tc := range []struct {
		name string
		in   string
		want PodSpec
		err  string // substring of the error; "" for success
	}{
		{
			name: "full",
			in:   "uid: 3f1c-77\nname: client\nnamespace: default\nserviceAccount: client-sa\nnetns: /var/run/netns/pod-a1\n",
			want: PodSpec{UID: "3f1c-77", Name: "client", Namespace: "default", ServiceAccount: "client-sa", Netns: "/var/run/netns/pod-a1"},
		},
		{
			name: "defaults",
			in:   "name: client\nnamespace: default\nnetns: /proc/42/ns/net\n",
			want: PodSpec{UID: "default/client", Name: "client", Namespace: "default", ServiceAccount: "default", Netns: "/proc/42/ns/net"},
		},
		{
			name: "json",
			in:   `{"name": "web-0", "namespace": "shop", "serviceAccount": "web", "netns": "/var/run/netns/x"}`,
			want: PodSpec{UID: "shop/web-0", Name: "web-0", Namespace: "shop", ServiceAccount: "web", Netns: "/var/run/netns/x"},
		},
		{
			name: "null service account takes the default",
			in:   "name: a\nnamespace: b\nserviceAccount:\nnetns: /n\n",
			want: PodSpec{UID: "b/a", Name: "a", Namespace: "b", ServiceAccount: "default", Netns: "/n"},
		},
		{
			name: "numeric uid, comments, document marker",
			in:   "---\n# a pod\nuid: 12345\nname: a.b\nnamespace: b\nnetns: /n # here\n",
			want: PodSpec{UID: "12345", Name: "a.b", Namespace: "b", ServiceAccount: "default", Netns: "/n"},
		},
		{
			name: "longest fields",
			in:   "uid: " + long(maxUID) + "\nname: " + long(63) + "." + long(63) + "." + long(63) + "." + long(61) + "\nnamespace: " + long(63) + "\nnetns: /n\n",
			want: PodSpec{UID: long(maxUID), Name: long(63) + "." + long(63) + "." + long(63) + "." + long(61), Namespace: long(63), ServiceAccount: "default", Netns: "/n"},
		},
		{name: "empty", in: "", err: "empty"},
		{name: "comments only", in: "# nothing\n", err: "empty"},
		{name: "not a mapping", in: "- a\n- b\n", err: "want a mapping of uid, name, namespace, serviceAccount, netns, got list"},
		{name: "scalar", in: "hello\n", err: "want a mapping"},
		{name: "syntax", in: "name: [a\n", err: "pod file: yaml:"},
		{name: "half written", in: "name: client\nnamespace: default\nnet", err: "pod file:"},
		{name: "unknown field", in: "name: a\nnamespace: b\nnetns: /n\nnodeName: x\n", err: `line 4: unknown field "nodeName"`},
		{name: "wrong case", in: "name: a\nnamespace: b\nnetns: /n\nserviceaccount: x\n", err: `unknown field "serviceaccount"`},
		{name: "duplicate field", in: "name: a\nname: b\nnamespace: b\nnetns: /n\n", err: `field "name" given twice`},
		{name: "list value", in: "name: [a]\nnamespace: b\nnetns: /n\n", err: `field "name": want a string, got a list`},
		{name: "mapping value", in: "name: a\nnamespace: {x: 1}\nnetns: /n\n", err: `field "namespace": want a string, got a mapping`},
		{name: "alias value", in: "name: &x a\nnamespace: *x\nnetns: /n\n", err: `field "namespace": want a string, got a alias`},
		{name: "two documents", in: "name: a\nnamespace: b\nnetns: /n\n---\nname: c\n", err: "second document"},
		{name: "no name", in: "namespace: b\nnetns: /n\n", err: `field "name" is required`},
		{name: "no namespace", in: "name: a\nnetns: /n\n", err: `field "namespace" is required`},
		{name: "no netns", in: "name: a\nnamespace: b\n", err: `field "netns" is required`},
		{name: "relative netns", in: "name: a\nnamespace: b\nnetns: netns/x\n", err: `field "netns": "netns/x" is not an absolute path`},
		{name: "upper-case name", in: "name: Client\nnamespace: b\nnetns: /n\n", err: `field "name": "Client" is not a DNS-1123 subdomain`},
		{name: "name with underscore", in: "name: a_b\nnamespace: b\nnetns: /n\n", err: `field "name"`},
		{name: "name ends with dash", in: "name: a-\nnamespace: b\nnetns: /n\n", err: `field "name"`},
		{name: "name with empty label", in: "name: a..b\nnamespace: b\nnetns: /n\n", err: `field "name"`},
		{name: "name too long", in: "name: " + long(254) + "\nnamespace: b\nnetns: /n\n", err: `field "name": 254 bytes, more than 253`},
		{name: "namespace with dot", in: "name: a\nnamespace: b.c\nnetns: /n\n", err: `field "namespace": "b.c" is not a DNS-1123 label`},
		{name: "namespace too long", in: "name: a\nnamespace: " + long(64) + "\nnetns: /n\n", err: `field "namespace": 64 bytes`},
		{name: "bad service account", in: "name: a\nnamespace: b\nserviceAccount: -sa\nnetns: /n\n", err: `field "serviceAccount"`},
		{name: "uid with space", in: "uid: \"a b\"\nname: a\nnamespace: b\nnetns: /n\n", err: `field "uid": "a b" has a space or control character at byte 1`},
		{name: "uid with control", in: "uid: \"a\\tb\"\nname: a\nnamespace: b\nnetns: /n\n", err: `field "uid"`},
		{name: "uid too long", in: "uid: " + long(maxUID+1) + "\nname: a\nnamespace: b\nnetns: /n\n", err: `field "uid": 257 bytes`},
		{name: "file too large", in: "name: a\n" + strings.Repeat("#", maxPodFile), err: "more than 65536"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParsePodSpec([]byte(tc.in))
			if tc.err != "" {
				if err == nil {
					t.Fatalf("got %+v, want error containing %q", got, tc.err)
				}
				if !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %q, want it to contain %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestLargestPodFitsInPacket: the largest valid pod, as a ZDS add, fits the 1024 bytes a
// client reads.
func TestLargestPodFitsInPacket(t *testing.T) {
	label := strings.Repeat("a", 63)
	sub := label + "." + label + "." + label + "." + strings.Repeat("a", 61)
	for _, uid := range []string{strings.Repeat("u", maxUID), label + "/" + sub} {
		b, err := proto.Marshal(&zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{
			Uid:          uid,
			WorkloadInfo: &zdsapi.WorkloadInfo{Name: sub, Namespace: label, ServiceAccount: sub},
		}}})
		if err != nil {
			t.Fatal(err)
		}
		if len(b) > maxPacket {
			t.Fatalf("largest add is %d bytes, more than %d", len(b), maxPacket)
		}
	}
}

func FuzzParsePodSpec(f *testing.F) {
	for _, s := range []string{
		"uid: 3f1c\nname: client\nnamespace: default\nserviceAccount: client\nnetns: /var/run/netns/pod-a1\n",
		`{"name": "a", "namespace": "b", "netns": "/n"}`,
		"name: a\nnamespace: b\nnetns: /n\n---\n",
		"name: &x a\nnamespace: *x\n",
		"{name: [1, {a: b}], namespace: !!binary aGVsbG8=}",
		"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePodSpec(data)
		if err != nil {
			if p != (PodSpec{}) {
				t.Fatalf("error %v with a non-zero spec %+v", err, p)
			}
			if !strings.HasPrefix(err.Error(), "pod file: ") {
				t.Fatalf("error %q does not say it is about the pod file", err)
			}
			return
		}
		// A valid spec is complete and survives a round trip through its own YAML.
		if p.UID == "" || p.Name == "" || p.Namespace == "" || p.ServiceAccount == "" || !strings.HasPrefix(p.Netns, "/") {
			t.Fatalf("incomplete spec %+v", p)
		}
		if err := p.validate(); err != nil {
			t.Fatalf("parsed spec %+v does not validate: %v", p, err)
		}
		again, err := ParsePodSpec(encodeSpec(p))
		if err != nil || again != p {
			t.Fatalf("round trip of %+v: %+v, %v", p, again, err)
		}
	})
}

// encodeSpec writes p as a pod file, every value quoted.
func encodeSpec(p PodSpec) []byte {
	var b strings.Builder
	for _, kv := range [][2]string{
		{fieldUID, p.UID}, {fieldName, p.Name}, {fieldNamespace, p.Namespace},
		{fieldServiceAccount, p.ServiceAccount}, {fieldNetns, p.Netns},
	} {
		b.WriteString(kv[0] + ": " + quoteYAML(kv[1]) + "\n")
	}
	return []byte(b.String())
}

// quoteYAML quotes s as a YAML double-quoted scalar.
func quoteYAML(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
			b.WriteString(`\x`)
			b.WriteString(strings.ToUpper(string("0123456789abcdef"[r>>4]) + string("0123456789abcdef"[r&15])))
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}
