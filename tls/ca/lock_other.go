//go:build !unix

package ca

// lockDir is a no-op where advisory file locks are not available.
func lockDir(dir string) (func(), error) { return func() {}, nil }
