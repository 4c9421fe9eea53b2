//go:build tools

// Package tools pins the etcd binary that deploy/local/build.sh builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
