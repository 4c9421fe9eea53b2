//go:build tools

// Package tools pins crane (go-containerregistry), which pushes Tidal's images that deploy/local/build.sh builds.
package tools

import (
	_ "github.com/google/go-containerregistry/cmd/crane"
)
