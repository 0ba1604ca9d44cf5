// Package xds is ztgo's xDS client: a delta ADS stream to istiod that keeps a snapshot.Store
// in step with the mesh, speaking what ztunnel speaks (src/xds/client.rs, src/xds.rs).
//
// # Wire flow
//
// One gRPC stream, envoy.service.discovery.v3.AggregatedDiscoveryService/
// DeltaAggregatedResources, over TLS (server authentication only) or plaintext:
//
//	client                                          server
//	DeltaDiscoveryRequest{node, type: Address,
//	    initial_resource_versions}          ->
//	DeltaDiscoveryRequest{node, type: Authorization,
//	    initial_resource_versions}          ->
//	                                        <-     DeltaDiscoveryResponse{type, nonce,
//	                                                   resources, removed_resources}
//	DeltaDiscoveryRequest{type, response_nonce
//	    [, error_detail.message]}           ->     (ACK, or NACK naming the rejected resources)
//	                                        <-     ... further pushes, each ACKed or NACKed
//
// Both types are wildcard subscriptions (no resource names), so the server sends every
// resource. Resource names: a workload is named by its uid, a service by
// "namespace/hostname", a policy by "namespace/name"; a removed Address name is read as a
// workload uid first and as a service key otherwise, as ztunnel reads it. The stream carries
// the metadata `authorization: Bearer <token>` and `clusterid: <cluster>` (the token file is
// read again at every connect) and any configured extra headers.
//
// # Applying a response
//
// Every resource of a response is decoded and converted on its own (ConvertWorkload,
// ConvertService, ConvertAuthorization); the good ones and the removals form one
// snapshot.Delta, applied to the store's current snapshot with Snapshot.Apply (which checks
// each resource again), and the result is published if anything changed. The response is
// then ACKed; if any resource was rejected it is NACKed instead, with error_detail.message
// "name: reason; name2: reason2", but the rest of the response stays applied, and a rejected
// resource keeps its previous version in the snapshot. This is ztunnel's behaviour: one bad
// resource must not hold back the rest of the mesh.
//
// Workloads may arrive before the services they name; the snapshot stages such endpoints and
// links them when the service arrives (Snapshot.StagedServices).
//
// # Reconnecting
//
// The client remembers the name and version of every resource it accepted. On reconnect it
// sends them as initial_resource_versions, and the delta protocol obliges the server to
// answer with what changed since: new and changed resources, and removed_resources for names
// the client claims that no longer exist. So the server's view replaces ours without a full
// resend, including removals that happened while the stream was down. A rejected resource is
// left out of the claim (or claimed at its previous, accepted version), so the server sends
// it again and each reconnect retries it.
//
// Backoff is ztunnel's: a failure before the first response (dial, TLS, token, an error
// status, an end of stream) and an error status on an established stream double the delay
// from 10 ms up to 15 s; the routine ends of a stream (Unknown, Cancelled, DeadlineExceeded,
// Unavailable with "transport is closing" or "received prior goaway", and OK) retry after
// 10 ms. Two refinements: a stream that received a response resets the backoff, and a clean
// end waits the initial backoff instead of reconnecting in a tight loop. grpc-go words some
// failures differently from ztunnel's tonic: a server that drops the connection without a
// GOAWAY surfaces as Unavailable "error reading from server: EOF", which counts as an Error
// (20 ms first retry) where ztunnel may see a Reconnect (10 ms).
//
// Each stream gets its own gRPC channel (a fresh dial, roots and token read again), with
// ztunnel's transport settings: 5 s connect timeout, TCP keepalive 300 s/75 s/9 probes,
// HTTP/2 pings every 30 s with a 10 s timeout, and responses up to 200 MiB.
//
// Ready is closed once the first response of each type has been ACKed, so the readiness probe
// does not pass with an empty view of the mesh.
//
// # Conversion
//
// The conversion follows ztunnel's TryFrom implementations. Rejected, as in ztunnel: an
// address that is not 4 or 16 bytes, a CIDR longer than its address, tunnel protocol
// LEGACY_ISTIO_MTLS, any unknown enum value (except workload type, which reads as
// DEPLOYMENT, and service visibility, which reads as PUBLIC), routing preference
// UNSPECIFIED_SCOPE, a gateway without a destination, a workload service key without "/", an
// Address holding neither a workload nor a service, an undecodable resource, and a policy
// action other than ALLOW or DENY. Also rejected, where ztunnel silently does something
// worse: a port above 65535 (ztunnel truncates it to 16 bits), and in a policy a string match
// with no match type or an address that does not parse (ztunnel drops the entry, which widens
// a positive match: an ALLOW on source_ips [bad] would allow every source). Snapshot.Apply
// then applies the snapshot's own checks, which are stricter than ztunnel's in one way that
// matters: names must be present. A workload with neither addresses nor a hostname (istiod's
// per-network stand-in for a service's endpoints on another network, reached through its
// network gateway) is accepted, as ztunnel accepts it. A workload's explicit capacity 0
// (never picked in ztunnel) reads as the default weight 1, which is all the snapshot can
// express. A workload with an empty uid is stored under its resource name, which istiod makes
// the uid anyway.
//
// Not used: extensions, app_protocol, ingress_use_waypoint (ztunnel ignores them too).
package xds
