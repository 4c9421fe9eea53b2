//go:build tools

// Package tools pins Prometheus for the real nodes: Debian's package is built without
// Kubernetes service discovery, which the chart's scrape config uses (kubernetes_sd_configs).
// deploy/local/build.sh builds it with only that discovery mechanism (remove_all_sd,
// enable_kubernetes_sd).
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
)
