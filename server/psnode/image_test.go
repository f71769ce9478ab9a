package psnode

import (
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// An image's request body keeps the first read error (why the stream
// stopped: a damaged block), is read no more once closed, and leaves its
// stall timer pending while data moves.
func TestImageBody(t *testing.T) {
	stall := time.AfterFunc(time.Hour, func() {})
	damaged := errors.New("damaged block")
	b := &imageBody{r: io.MultiReader(strings.NewReader("abcd"), iotest.ErrReader(damaged)), stall: stall}
	buf := make([]byte, 8)
	if n, err := b.Read(buf); n != 4 || err != nil {
		t.Fatalf("first read: %d, %v", n, err)
	}
	if _, err := b.Read(buf); !errors.Is(err, damaged) {
		t.Fatalf("second read: %v", err)
	}
	if err := b.Close(); !errors.Is(err, damaged) {
		t.Fatalf("Close: %v, want the read's error", err)
	}
	if n, err := b.Read(buf); n != 0 || err == nil {
		t.Fatalf("a read after Close: %d, %v", n, err)
	}
	if !stall.Stop() {
		t.Fatal("the stall timer is not pending after reads with data")
	}

	ok := &imageBody{r: strings.NewReader("x"), stall: time.AfterFunc(time.Hour, func() {})}
	if _, err := io.ReadAll(ok); err != nil {
		t.Fatal(err)
	}
	if err := ok.Close(); err != nil {
		t.Fatalf("Close of a whole stream: %v", err)
	}
	ok.stall.Stop()
}
