package argon2id

import (
	"syscall"
	"unsafe"
)

// hugePage is the size of a transparent huge page on amd64 and arm64.
const hugePage = 2 << 20

// blocks maps n zeroed blocks of their own, aligned to huge pages and
// advised to be backed by them (MADV_HUGEPAGE), and returns them with the
// function that unmaps them. Without a mapping (the address space or the
// process's limits) they are a Go heap allocation, as in x/crypto.
func blocks(n uint32) ([]block, func()) {
	size := int(n) * int(unsafe.Sizeof(block{}))
	m, err := syscall.Mmap(-1, 0, size+hugePage, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return make([]block, n), func() {}
	}
	off := 0
	if r := int(uintptr(unsafe.Pointer(&m[0])) % hugePage); r != 0 {
		off = hugePage - r
	}
	mem := m[off : off+size]
	// Advice only: a kernel without THP (or with it off) maps small pages.
	syscall.Madvise(mem, madvHugePage)
	return unsafe.Slice((*block)(unsafe.Pointer(&mem[0])), n), func() { syscall.Munmap(m) }
}

// madvHugePage is MADV_HUGEPAGE (the syscall package does not name it).
const madvHugePage = 14
