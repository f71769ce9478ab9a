//go:build e2e

package azuritetest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob"
)

// TestKillRestart: a blob written just before Kill is there after Restart,
// at the same address.
func TestKillRestart(t *testing.T) {
	a := New(t)
	cs := a.ConnString()
	c, err := azblob.NewClientFromConnectionString(cs, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := c.CreateContainer(ctx, "ctr", nil); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("azurite"), 100000)
	if _, err := c.UploadBuffer(ctx, "ctr", "b", data, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	a.Kill()
	t.Logf("stopped in %s", time.Since(start).Round(time.Millisecond))
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := c.ServiceClient().NewContainerClient("ctr").GetProperties(short, nil); err == nil {
		t.Fatal("Azurite answers after Kill")
	}
	a.Restart()
	if a.ConnString() != cs {
		t.Fatalf("the connection string changed: %s", a.ConnString())
	}
	path := filepath.Join(t.TempDir(), "b")
	if err := a.Download("ctr", "b", path); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("blob after Restart: %d bytes, %v", len(got), err)
	}
}
