package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from power-of-two size classes between 4 KiB and
// MaxPayload so that a busy connection reuses the same few buffers instead
// of allocating one per request; the garbage collector still reclaims them
// when traffic stops.
const (
	minBufShift = 12
	maxBufShift = 25
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

func bufClass(n int) int {
	shift := bits.Len(uint(n - 1))
	if shift < minBufShift {
		shift = minBufShift
	}
	return shift - minBufShift
}

// getBuf returns a buffer of length n, 0 < n <= MaxPayload. Return it with
// putBuf once nothing refers to it any more.
func getBuf(n int) *[]byte {
	cls := bufClass(n)
	if p, ok := bufPools[cls].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(cls+minBufShift))
	return &b
}

func putBuf(p *[]byte) {
	if p == nil {
		return
	}
	c := cap(*p)
	cls := bufClass(c)
	if 1<<(cls+minBufShift) != c {
		return // not one of ours
	}
	*p = (*p)[:c]
	bufPools[cls].Put(p)
}
