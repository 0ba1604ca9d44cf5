// Package grafana holds ztgo's Grafana dashboard, ztgo-dashboard.json (deploy/README.md says
// how to import it), and the test that keeps it honest: every metric a panel or variable
// queries must be one that a running ztgo node exports.
package grafana
