// Package ca holds the certificate authorities ztgo asks for workload certificates: the
// contract every CA client implements ([Signer]) and the built-in local CA ([Local]) that lets
// one ztgo binary run a mesh without istiod. The istiod CreateCertificate client implements the
// same interface.
//
// The shape of a signing result mirrors Istio's IstioCertificateResponse.cert_chain, because the
// certificate manager treats every CA alike: element 0 is the leaf, the middle elements are
// intermediates (an element may hold several concatenated PEM certificates, as istiod sends its
// plug-in cert-chain.pem in one string), and the LAST element is the root bundle, which may hold
// several PEM roots (root rotation, multiple trust anchors). The root bundle is what peers are
// verified against, so a CA client must never drop it.
//
// The local CA reads and writes Istio's plug-in CA layout (the "cacerts" secret), so a directory
// prepared for istiod also works here and a directory written by ztgo can be handed to istiod:
//
//	ca-cert.pem     the signing certificate
//	ca-key.pem      its private key (PKCS#8, SEC 1 "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY")
//	root-cert.pem   the trust anchor(s)
//	cert-chain.pem  ca-cert.pem followed by its issuers up to the root; for a self-signed root
//	                it equals ca-cert.pem
//
// Leaves are issued the way istiod issues them: empty subject, exactly one URI SAN holding the
// SPIFFE identity in a critical SAN extension (RFC 5280 requires critical when the subject is
// empty), no DNS names, KeyUsage DigitalSignature|KeyEncipherment, ExtKeyUsage ServerAuth and
// ClientAuth, a random 128-bit serial, and NotBefore one minute in the past so that peers whose
// clocks lag slightly still accept a fresh certificate.
package ca

import (
	"context"
	"time"

	"github.com/ztgo/ztgo/tls/spiffe"
)

// Signer issues a workload certificate for one identity. Implementations must be safe for
// concurrent use: the certificate manager signs for several identities at once.
type Signer interface {
	// Sign signs csrPEM (a PEM "CERTIFICATE REQUEST") for id with a validity of about ttl.
	// The result is leaf first, then intermediates, and the root bundle last (see the package
	// doc). The CA may shorten the validity, never lengthen it.
	Sign(ctx context.Context, csrPEM []byte, id spiffe.ID, ttl time.Duration) (certChainPEM []string, err error)
}
