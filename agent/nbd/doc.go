// Package nbd serves block devices over the Network Block Device protocol
// and contains a small client for it.
//
// The agent runs one Server per guest and exports every protected disk
// through it; each export's Backend is the write-splitter that applies a
// write to the backing file and appends it to the replication log. The
// server speaks the fixed newstyle handshake with NBD_OPT_GO/NBD_OPT_INFO
// and simple replies only; qemu and libnbd (nbdinfo, nbdcopy, fio's nbd
// engine) work with it, as the e2e tests check. Protocol reference:
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
//
// Protocol decisions a caller must know:
//
//   - Requests on one connection run concurrently (up to
//     Server.MaxInFlight) and are answered in completion order, so a Backend
//     is called concurrently, also for overlapping ranges. Flush and FUA
//     must cover writes from every connection: the server advertises
//     NBD_FLAG_CAN_MULTI_CONN. The replies that complete while one is
//     being written go out together in the next write (one writev), never
//     held for a request still being handled. A connection's requests are
//     served by handler goroutines started as needed, up to MaxInFlight,
//     each serving one request after another.
//   - A request that does not fit the export fails with EINVAL (READ, TRIM)
//     or ENOSPC (WRITE, WRITE_ZEROES), as the protocol recommends; the
//     payload of such a WRITE is read and discarded so the connection stays
//     usable. Unknown commands and command flags fail with EINVAL.
//   - READ and WRITE are limited to MaxPayload (32 MiB), which is also the
//     advertised maximum block size. A larger READ fails with EINVAL; a
//     larger WRITE closes the connection, because the stream cannot be
//     resynchronised without reading the oversize payload. TRIM and
//     WRITE_ZEROES carry no payload and may be as long as the export.
//   - Zero-length READ, WRITE, TRIM and WRITE_ZEROES succeed without
//     calling the Backend.
//   - Options other than NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO,
//     NBD_OPT_LIST and NBD_OPT_ABORT (structured replies, meta contexts,
//     STARTTLS, extended headers) get NBD_REP_ERR_UNSUP and negotiation
//     goes on. Option data is limited to 8 KiB and export names to 4096
//     bytes.
//   - Malformed input (bad magic, truncated message, oversize option or
//     payload, unknown client flags) closes only that connection and is
//     logged with the reason and the peer's address.
package nbd
