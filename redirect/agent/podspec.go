package agent

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"gopkg.in/yaml.v3"

	"github.com/ztgo/ztgo/redirect/zds"
)

// PodSpec is one pod file: a pod ztgo must capture and the network namespace it lives in.
type PodSpec struct {
	// UID keys the pod on the ZDS wire (where istio-cni sends the Kubernetes pod UID); the
	// default is "<namespace>/<name>".
	UID string
	// Name, Namespace and ServiceAccount are what ztgo finds the pod's workload by.
	// ServiceAccount defaults to "default".
	Name, Namespace, ServiceAccount string
	// Netns is the absolute path of the pod's network namespace: a bind mount such as
	// /var/run/netns/x, or /proc/<pid>/ns/net.
	Netns string
}

// Info returns the pod's workload identity as ZDS carries it.
func (p PodSpec) Info() zds.WorkloadInfo {
	return zds.WorkloadInfo{Name: p.Name, Namespace: p.Namespace, ServiceAccount: p.ServiceAccount}
}

// Limits of a pod file's fields. Kubernetes names pods and service accounts with DNS-1123
// subdomains and namespaces with DNS-1123 labels; the UID bound keeps the largest ZDS add
// (uid, name, namespace, service account) well inside the 1024-byte packet both ends read.
const (
	maxSubdomain = 253
	maxLabel     = 63
	maxUID       = 256
	// maxPodFile bounds what is read of a pod file; a larger file is rejected.
	maxPodFile = 64 << 10
)

// The pod file's field names, in the order the errors list them.
const (
	fieldUID            = "uid"
	fieldName           = "name"
	fieldNamespace      = "namespace"
	fieldServiceAccount = "serviceAccount"
	fieldNetns          = "netns"
)

var knownFields = []string{fieldUID, fieldName, fieldNamespace, fieldServiceAccount, fieldNetns}

// ParsePodSpec parses one pod file, YAML or JSON (a JSON object is YAML), strictly: the
// document must be a single mapping of known fields with scalar values, each at most once.
// Every error names the field it is about. Defaults are applied to the result.
func ParsePodSpec(data []byte) (PodSpec, error) {
	if len(data) > maxPodFile {
		return PodSpec{}, fmt.Errorf("pod file: %d bytes, more than %d", len(data), maxPodFile)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return PodSpec{}, errors.New("pod file: empty")
		}
		return PodSpec{}, fmt.Errorf("pod file: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return PodSpec{}, fmt.Errorf("pod file: %w", err)
		}
		return PodSpec{}, fmt.Errorf("pod file: line %d: a second document; one pod per file", extra.Line)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	if root.Kind != yaml.MappingNode {
		return PodSpec{}, fmt.Errorf("pod file: line %d: want a mapping of %s, got %s",
			root.Line, strings.Join(knownFields, ", "), kindName(root))
	}
	values := map[string]string{}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			return PodSpec{}, fmt.Errorf("pod file: line %d: key is a %s, want a field name", k.Line, kindName(k))
		}
		name := k.Value
		if !slices.Contains(knownFields, name) {
			return PodSpec{}, fmt.Errorf("pod file: line %d: unknown field %q (known: %s)",
				k.Line, name, strings.Join(knownFields, ", "))
		}
		if _, dup := values[name]; dup {
			return PodSpec{}, fmt.Errorf("pod file: line %d: field %q given twice", k.Line, name)
		}
		switch {
		case v.Kind == yaml.ScalarNode && v.ShortTag() == "!!null":
			values[name] = ""
		case v.Kind == yaml.ScalarNode:
			values[name] = v.Value
		default:
			return PodSpec{}, fmt.Errorf("pod file: line %d: field %q: want a string, got a %s", v.Line, name, kindName(v))
		}
	}
	p := PodSpec{
		UID:            values[fieldUID],
		Name:           values[fieldName],
		Namespace:      values[fieldNamespace],
		ServiceAccount: values[fieldServiceAccount],
		Netns:          values[fieldNetns],
	}
	if p.ServiceAccount == "" {
		p.ServiceAccount = "default"
	}
	if err := p.validate(); err != nil {
		return PodSpec{}, err
	}
	if p.UID == "" {
		p.UID = p.Namespace + "/" + p.Name
	}
	return p, nil
}

func (p PodSpec) validate() error {
	if err := checkDNS(fieldName, p.Name, maxSubdomain, true); err != nil {
		return err
	}
	if err := checkDNS(fieldNamespace, p.Namespace, maxLabel, false); err != nil {
		return err
	}
	if err := checkDNS(fieldServiceAccount, p.ServiceAccount, maxSubdomain, true); err != nil {
		return err
	}
	if p.UID != "" {
		if len(p.UID) > maxUID {
			return fmt.Errorf("pod file: field %q: %d bytes, more than %d", fieldUID, len(p.UID), maxUID)
		}
		if !utf8.ValidString(p.UID) {
			return fmt.Errorf("pod file: field %q: not valid UTF-8", fieldUID)
		}
		if i := strings.IndexFunc(p.UID, func(r rune) bool { return unicode.IsSpace(r) || !unicode.IsPrint(r) }); i >= 0 {
			return fmt.Errorf("pod file: field %q: %q has a space or control character at byte %d", fieldUID, p.UID, i)
		}
	}
	switch {
	case p.Netns == "":
		return fmt.Errorf("pod file: field %q is required", fieldNetns)
	case !filepath.IsAbs(p.Netns):
		return fmt.Errorf("pod file: field %q: %q is not an absolute path", fieldNetns, p.Netns)
	case strings.ContainsRune(p.Netns, 0):
		return fmt.Errorf("pod file: field %q: path contains a NUL byte", fieldNetns)
	}
	return nil
}

// checkDNS checks a DNS-1123 label (lower-case letters, digits and '-', starting and ending
// with a letter or digit) or, with dots, a subdomain of such labels.
func checkDNS(field, v string, maxLen int, dots bool) error {
	what := "DNS-1123 label (lower-case letters, digits, '-')"
	if dots {
		what = "DNS-1123 subdomain (lower-case letters, digits, '-', '.')"
	}
	if v == "" {
		return fmt.Errorf("pod file: field %q is required", field)
	}
	if len(v) > maxLen {
		return fmt.Errorf("pod file: field %q: %d bytes, more than %d", field, len(v), maxLen)
	}
	labels := []string{v}
	if dots {
		labels = strings.Split(v, ".")
	}
	for _, l := range labels {
		ok := l != "" && len(l) <= maxLabel && isAlnum(l[0]) && isAlnum(l[len(l)-1])
		for i := 0; ok && i < len(l); i++ {
			ok = isAlnum(l[i]) || l[i] == '-'
		}
		if !ok {
			return fmt.Errorf("pod file: field %q: %q is not a %s", field, v, what)
		}
	}
	return nil
}

func isAlnum(c byte) bool { return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' }

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.DocumentNode:
		return "document"
	case yaml.SequenceNode:
		return "list"
	case yaml.MappingNode:
		return "mapping"
	case yaml.ScalarNode:
		if n.ShortTag() == "!!null" {
			return "null"
		}
		return "scalar"
	case yaml.AliasNode:
		return "alias"
	}
	return "nothing"
}
