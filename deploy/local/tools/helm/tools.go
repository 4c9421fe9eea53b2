//go:build tools

// Package tools pins the helm binary that deploy/local/build.sh builds.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
