//go:build tools

// Package tools pins the kwok binary that deploy/local/build.sh builds.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
