package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

var be = binary.BigEndian

// readFull reads len(p) bytes for the message part named what. At a
// message boundary a clean EOF means the peer went away and is returned as
// io.EOF; anywhere else a short read is a truncated message.
func readFull(r io.Reader, p []byte, what string, boundary bool) error {
	_, err := io.ReadFull(r, p)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, io.EOF) && boundary:
		return io.EOF
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return protocolErrorf("%s: truncated message", what)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// quoteName renders a client-supplied name for logs and error replies,
// cut short so that a hostile name cannot flood either.
func quoteName(b []byte) string {
	const limit = 64
	if len(b) > limit {
		return fmt.Sprintf("%q...", b[:limit])
	}
	return fmt.Sprintf("%q", b)
}

// handshake runs the fixed newstyle negotiation. It returns the export the
// client selected, or nil and a nil error when the client aborted or left
// between options.
func (c *conn) handshake() (*export, error) {
	bw := bufio.NewWriterSize(c.nc, 4096)
	var greet [18]byte
	be.PutUint64(greet[0:], nbdMagic)
	be.PutUint64(greet[8:], optMagic)
	be.PutUint16(greet[16:], flagFixedNewstyle|flagNoZeroes)
	bw.Write(greet[:])
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("send greeting: %w", err)
	}

	var b4 [4]byte
	if err := readFull(c.br, b4[:], "read client flags", true); err != nil {
		if err == io.EOF {
			return nil, nil
		}
		return nil, err
	}
	cflags := be.Uint32(b4[:])
	if cflags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		return nil, protocolErrorf("unknown client flags %#x", cflags)
	}
	noZeroes := cflags&flagCNoZeroes != 0

	var hdr [optHeaderSize]byte
	data := make([]byte, maxOptionLen)
	for {
		if err := readFull(c.br, hdr[:], "read option header", true); err != nil {
			if err == io.EOF {
				c.log.Debug("client left during the handshake")
				return nil, nil
			}
			return nil, err
		}
		if m := be.Uint64(hdr[0:]); m != optMagic {
			return nil, protocolErrorf("bad option magic %#x", m)
		}
		opt := be.Uint32(hdr[8:])
		n := be.Uint32(hdr[12:])
		if n > maxOptionLen {
			return nil, protocolErrorf("option %d: data length %d exceeds %d", opt, n, maxOptionLen)
		}
		d := data[:n]
		if err := readFull(c.br, d, fmt.Sprintf("read option %d data", opt), false); err != nil {
			return nil, err
		}

		switch opt {
		case optExportName:
			if n > maxNameLen {
				return nil, protocolErrorf("NBD_OPT_EXPORT_NAME: name of %d bytes exceeds %d", n, maxNameLen)
			}
			exp, ok := c.srv.resolve(string(d))
			if !ok {
				// The option cannot fail gracefully: the protocol
				// requires dropping the connection.
				return nil, fmt.Errorf("%w %s (NBD_OPT_EXPORT_NAME)", ErrUnknownExport, quoteName(d))
			}
			var rep [10 + 124]byte
			be.PutUint64(rep[0:], uint64(exp.size))
			be.PutUint16(rep[8:], serverTransmissionFlags)
			out := rep[:]
			if noZeroes {
				out = rep[:10]
			}
			bw.Write(out)
			if err := bw.Flush(); err != nil {
				return nil, fmt.Errorf("send export info: %w", err)
			}
			return exp, nil

		case optAbort:
			// The client may already be gone; its loss.
			writeOptReply(bw, opt, repAck, nil)
			bw.Flush()
			c.log.Debug("client aborted the handshake")
			return nil, nil

		case optList:
			c.optList(bw, n)

		case optInfo, optGo:
			exp := c.optInfo(bw, opt, d)
			if exp != nil && opt == optGo {
				if err := bw.Flush(); err != nil {
					return nil, fmt.Errorf("send option reply: %w", err)
				}
				return exp, nil
			}

		default:
			// Includes NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, meta
			// contexts and extended headers: the client falls back to
			// plain, simple-reply NBD.
			writeOptReply(bw, opt, repErrUnsup, fmt.Appendf(nil, "option %d is not supported", opt))
		}
		if err := bw.Flush(); err != nil {
			return nil, fmt.Errorf("send option reply: %w", err)
		}
	}
}

// writeOptReply buffers one option reply; bufio.Writer keeps the first
// write error for Flush to report.
func writeOptReply(bw *bufio.Writer, opt, typ uint32, payload ...[]byte) {
	n := 0
	for _, p := range payload {
		n += len(p)
	}
	var hdr [20]byte
	be.PutUint64(hdr[0:], optReplyMagic)
	be.PutUint32(hdr[8:], opt)
	be.PutUint32(hdr[12:], typ)
	be.PutUint32(hdr[16:], uint32(n))
	bw.Write(hdr[:])
	for _, p := range payload {
		bw.Write(p)
	}
}

func (c *conn) optList(bw *bufio.Writer, n uint32) {
	if n != 0 {
		writeOptReply(bw, optList, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
		return
	}
	if c.srv.List == nil {
		writeOptReply(bw, optList, repErrPolicy, []byte("export listing is disabled"))
		return
	}
	for _, name := range c.srv.List() {
		if len(name) > maxNameLen {
			continue
		}
		var l [4]byte
		be.PutUint32(l[:], uint32(len(name)))
		writeOptReply(bw, optList, repServer, l[:], []byte(name))
	}
	writeOptReply(bw, optList, repAck, nil)
}

// parseInfoRequest decodes the data of NBD_OPT_INFO and NBD_OPT_GO: a
// length-prefixed export name and a counted list of information types.
func parseInfoRequest(d []byte) (name []byte, infos []uint16, ok bool) {
	if len(d) < 6 {
		return nil, nil, false
	}
	nl := be.Uint32(d)
	if uint64(nl) > uint64(len(d)-6) || nl > maxNameLen {
		return nil, nil, false
	}
	name = d[4 : 4+nl]
	rest := d[4+nl:]
	ni := int(be.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*ni {
		return nil, nil, false
	}
	infos = make([]uint16, ni)
	for i := range infos {
		infos[i] = be.Uint16(rest[2*i:])
	}
	return name, infos, true
}

// optInfo answers NBD_OPT_INFO or NBD_OPT_GO and returns the export when
// the reply ended in success.
func (c *conn) optInfo(bw *bufio.Writer, opt uint32, d []byte) *export {
	name, infos, ok := parseInfoRequest(d)
	if !ok {
		writeOptReply(bw, opt, repErrInvalid, []byte("malformed NBD_OPT_INFO/NBD_OPT_GO request"))
		return nil
	}
	exp, ok := c.srv.resolve(string(name))
	if !ok {
		writeOptReply(bw, opt, repErrUnknown, fmt.Appendf(nil, "unknown export %s", quoteName(name)))
		if opt == optGo {
			c.log.Info("client asked for an unknown export", "name", quoteName(name))
		}
		return nil
	}

	var ei [12]byte
	be.PutUint16(ei[0:], infoExport)
	be.PutUint64(ei[2:], uint64(exp.size))
	be.PutUint16(ei[10:], serverTransmissionFlags)
	writeOptReply(bw, opt, repInfo, ei[:])

	var sentName, sentBlock bool
	for _, info := range infos {
		switch {
		case info == infoName && !sentName:
			sentName = true
			var t [2]byte
			be.PutUint16(t[:], infoName)
			writeOptReply(bw, opt, repInfo, t[:], []byte(exp.name))
		case info == infoBlockSize && !sentBlock:
			sentBlock = true
			var bs [14]byte
			be.PutUint16(bs[0:], infoBlockSize)
			be.PutUint32(bs[2:], minBlockSize)
			be.PutUint32(bs[6:], preferredBlockSize)
			be.PutUint32(bs[10:], MaxPayload)
			writeOptReply(bw, opt, repInfo, bs[:])
		}
	}
	writeOptReply(bw, opt, repAck, nil)
	return exp
}
