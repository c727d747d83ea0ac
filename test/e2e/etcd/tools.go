//go:build tools

// Package tools pins the main packages test/e2e/build-kube.sh builds.
package tools

import (
	_ "go.etcd.io/etcd/etcdctl/v3"
	_ "go.etcd.io/etcd/server/v3"
)
