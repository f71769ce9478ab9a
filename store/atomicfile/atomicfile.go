// Package atomicfile writes files so that a crash leaves either the old
// contents or the new, never a mix, and so that a completed write survives a
// power loss: temporary file, fsync, rename, fsync of the directory.
package atomicfile

import (
	"os"
	"path/filepath"
)

// TempMarker is part of every temporary file's name ("NAME~tmp-RANDOM"), so
// listings can skip what a crash left behind.
const TempMarker = "~tmp-"

// Write replaces path with data, durably, with the given permissions.
func Write(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+TempMarker+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	return SyncDir(dir)
}

// SyncDir fsyncs a directory so the entries made or removed in it are durable.
func SyncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
