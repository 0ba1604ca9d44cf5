package snapshot

import (
	"cmp"
	"fmt"
	"slices"
)

// Delta is a set of changes to a snapshot, as an incremental source (xDS) delivers them.
// Upserts replace the resource with the same key (workload uid, service namespace/hostname,
// policy namespace/name); removals name keys. Apply takes ownership of the upserted objects.
type Delta struct {
	Workloads        []*Workload
	RemovedWorkloads []string
	Services         []*Service
	RemovedServices  []NamespacedHostname
	Policies         []*Policy
	RemovedPolicies  []string
}

// Empty reports whether d changes nothing.
func (d *Delta) Empty() bool {
	return len(d.Workloads)+len(d.RemovedWorkloads)+len(d.Services)+len(d.RemovedServices)+
		len(d.Policies)+len(d.RemovedPolicies) == 0
}

// ResourceError is the rejection of one resource of a Delta: the resource is not applied, the
// rest of the delta is.
type ResourceError struct {
	// Kind is "workload", "service" or "policy"; Name its key.
	Kind, Name string
	Err        error
}

func (e ResourceError) Error() string { return e.Kind + " " + e.Name + ": " + e.Err.Error() }
func (e ResourceError) Unwrap() error { return e.Err }

// Apply returns a new snapshot with d applied; s is not changed. Each upserted resource is
// validated on its own: an invalid one is reported in the returned errors and left out (the
// snapshot keeps its previous version of that resource, if any), and the valid ones apply.
func (s *Snapshot) Apply(d Delta) (*Snapshot, []ResourceError) {
	var rerrs []ResourceError
	wl := make(map[string]*Workload, len(s.workloads)+len(d.Workloads))
	for _, w := range s.workloads {
		wl[w.UID] = w
	}
	for _, uid := range d.RemovedWorkloads {
		delete(wl, uid)
	}
	for _, w := range d.Workloads {
		if err := validateWorkload(w); err != nil {
			rerrs = append(rerrs, ResourceError{Kind: "workload", Name: workloadName(w), Err: err})
			continue
		}
		wl[w.UID] = w
	}
	svcs := make(map[NamespacedHostname]*Service, len(s.services)+len(d.Services))
	for _, svc := range s.services {
		svcs[svc.Key()] = svc
	}
	for _, k := range d.RemovedServices {
		delete(svcs, k)
	}
	for _, svc := range d.Services {
		if err := validateService(svc); err != nil {
			rerrs = append(rerrs, ResourceError{Kind: "service", Name: serviceName(svc), Err: err})
			continue
		}
		svcs[svc.Key()] = svc
	}
	pols := make(map[string]*Policy, len(s.policies)+len(d.Policies))
	for _, p := range s.policies {
		pols[p.Key()] = p
	}
	for _, k := range d.RemovedPolicies {
		delete(pols, k)
	}
	for _, p := range d.Policies {
		if err := validatePolicy(p); err != nil {
			rerrs = append(rerrs, ResourceError{Kind: "policy", Name: policyName(p), Err: err})
			continue
		}
		pols[p.Namespace+"/"+p.Name] = p
	}
	cfg := Config{
		Workloads: sortedValues(wl, func(a, b *Workload) int { return cmp.Compare(a.UID, b.UID) }),
		Services:  sortedValues(svcs, compareServices),
		Policies:  sortedValues(pols, func(a, b *Policy) int { return cmp.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name) }),
	}
	ns, err := Build(cfg)
	if err != nil {
		// Every resource was valid on its own, and keys are unique by construction, so this is
		// a bug; keep the old view rather than publish a broken one.
		return s, append(rerrs, ResourceError{Kind: "snapshot", Name: "", Err: fmt.Errorf("apply delta: %w", err)})
	}
	return ns, rerrs
}

func sortedValues[K comparable, V any](m map[K]V, less func(a, b V) int) []V {
	out := make([]V, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	slices.SortFunc(out, less)
	return out
}

// The validators run the same checks as Build on a scratch snapshot, so a resource is judged
// alone; they also fill the defaults Build would.
func validateWorkload(w *Workload) error {
	if w == nil {
		return fmt.Errorf("nil workload")
	}
	scratch := newScratch()
	return scratch.addWorkload(w)
}

func validateService(svc *Service) error {
	if svc == nil {
		return fmt.Errorf("nil service")
	}
	var lens [2][129]bool
	return newScratch().addService(svc, &lens)
}

func validatePolicy(p *Policy) error {
	if p == nil {
		return fmt.Errorf("nil policy")
	}
	return newScratch().addPolicy(p)
}

func newScratch() *Snapshot {
	return &Snapshot{
		workloadByUID:  map[string]*Workload{},
		workloadByAddr: map[NetworkAddress]*Workload{},
		servicesByVIP:  map[NetworkAddress][]*Service{},
		servicesByCIDR: map[NetworkPrefix][]*Service{},
		serviceByKey:   map[NamespacedHostname]*Service{},
		servicesByHost: map[string][]*Service{},
		endpoints:      map[*Service][]Endpoint{},
		policyByKey:    map[string]*Policy{},
		policiesByNS:   map[string][]*Policy{},
	}
}
