//go:build tools

// The command this module builds (etcd's server/main.go is package main).
package tools

import _ "go.etcd.io/etcd/server/v3"
