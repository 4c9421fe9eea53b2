//go:build tools

// Package tools pins the CNCF distribution registry that deploy/local/build.sh builds.
package tools

import (
	_ "github.com/distribution/distribution/v3/cmd/registry"
)
