package hbone

import (
	"math/rand/v2"
	"net/netip"
	"regexp"
	"strings"
	"testing"
)

func TestBaggageRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		b    Baggage
		want string
	}{
		{name: "empty", b: Baggage{}, want: ""},
		{name: "full", b: Baggage{ClusterID: "Kubernetes", Namespace: "default", WorkloadType: "deployment", WorkloadName: "web",
			Service: "web", Version: "v1", Region: "eu", Zone: "eu-1a"},
			want: "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=web,service.name=web,service.version=v1,cloud.region=eu,cloud.availability_zone=eu-1a"},
		{name: "pod, partial", b: Baggage{Namespace: "ns", WorkloadType: "pod", WorkloadName: "p"},
			want: "k8s.namespace.name=ns,k8s.pod.name=p"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.b.String(); got != tt.want {
				t.Fatalf("String() = %q, want %q", got, tt.want)
			}
			if got := ParseBaggage(tt.want); got != tt.b {
				t.Fatalf("ParseBaggage = %+v, want %+v", got, tt.b)
			}
		})
	}
	// Properties and unknown members are tolerated.
	got := ParseBaggage(" k8s.namespace.name=a;prop=1 , other=x,k8s.job.name=j")
	if got.Namespace != "a" || got.WorkloadType != "job" || got.WorkloadName != "j" {
		t.Fatalf("lenient parse = %+v", got)
	}
}

func TestForwarded(t *testing.T) {
	v := Forwarded(netip.MustParseAddrPort("10.0.0.1:3456"), "echo.default.svc.cluster.local")
	if v != `for="10.0.0.1:3456";host=echo.default.svc.cluster.local` {
		t.Fatalf("Forwarded = %q", v)
	}
	if Forwarded(netip.MustParseAddrPort("[fd00::1]:1"), "") != `for="[fd00::1]:1"` {
		t.Fatal("v6 forwarded without host")
	}
	for in, want := range map[string]string{
		`for="1.2.3.4:5";host=a.b`:    "a.b",
		`for="1.2.3.4:5";host="a.b"`:  "a.b",
		`for=x, for=y;Host=svc.local`: "svc.local",
		`for="1.2.3.4:5"`:             "",
		``:                            "",
		`host`:                        "",
	} {
		if got := ForwardedHost(in); got != want {
			t.Errorf("ForwardedHost(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestTraceParent(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	re := regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-00$`)
	a, b := NewTraceParent(r), NewTraceParent(r)
	if !re.MatchString(a) || !re.MatchString(b) || a == b {
		t.Fatalf("traceparents %q %q", a, b)
	}
}

func FuzzParseBaggage(f *testing.F) {
	f.Add("k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=web")
	f.Add(";;,=,k8s.pod.name=")
	f.Fuzz(func(t *testing.T, s string) {
		b := ParseBaggage(s)
		// What was parsed formats and parses back to itself (ignoring values with separators).
		if strings.ContainsAny(b.ClusterID+b.Namespace+b.WorkloadName+b.Service+b.Version+b.Region+b.Zone, ",;=") {
			return
		}
		if again := ParseBaggage(b.String()); again != b && b.WorkloadName != "" {
			t.Fatalf("round trip of %q: %+v != %+v", s, again, b)
		}
	})
}
