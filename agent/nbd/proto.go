package nbd

import (
	"errors"
	"fmt"
)

// MaxPayload is the largest READ or WRITE the server accepts, and the
// maximum block size it advertises: 32 MiB, the size every NBD client
// treats as safe.
const MaxPayload = 32 << 20

// maxNameLen is the protocol's limit on strings such as export names.
const maxNameLen = 4096

// maxOptionLen bounds the data of one handshake option. It leaves room for
// a maximum-length export name plus NBD_OPT_GO's information requests.
const maxOptionLen = 8192

// Handshake magic numbers.
const (
	nbdMagic      = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic      = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic = 0x0003e889045565a9
)

// Handshake flags sent by the server.
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1
)

// Client flags.
const (
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1
)

// Transmission flags.
const (
	flagHasFlags        = 1 << 0
	flagSendFlush       = 1 << 2
	flagSendFUA         = 1 << 3
	flagSendTrim        = 1 << 5
	flagSendWriteZeroes = 1 << 6
	flagCanMultiConn    = 1 << 8
)

// serverTransmissionFlags is what every export advertises.
const serverTransmissionFlags = flagHasFlags | flagSendFlush | flagSendFUA |
	flagSendTrim | flagSendWriteZeroes | flagCanMultiConn

// Option types.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
)

// Option reply types.
const (
	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repErrBit     = 1 << 31
	repErrUnsup   = repErrBit | 1
	repErrPolicy  = repErrBit | 2
	repErrInvalid = repErrBit | 3
	repErrUnknown = repErrBit | 6
)

// Information types for NBD_OPT_INFO and NBD_OPT_GO.
const (
	infoExport    = 0
	infoName      = 1
	infoBlockSize = 3
)

// Block size constraints advertised through NBD_INFO_BLOCK_SIZE: any byte
// alignment works on the backends, 4 KiB is what they are efficient at.
const (
	minBlockSize       = 1
	preferredBlockSize = 4096
)

// Transmission magic numbers.
const (
	requestMagic     = 0x25609513
	simpleReplyMagic = 0x67446698
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
)

// Command flags.
const (
	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1
)

// Message sizes.
const (
	requestSize     = 28
	simpleReplySize = 16
	optHeaderSize   = 16
)

func cmdName(typ uint16) string {
	switch typ {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdWriteZeroes:
		return "write_zeroes"
	}
	return fmt.Sprintf("cmd(%d)", typ)
}

// Errno is an error value carried in an NBD reply. A Backend may return
// one (possibly wrapped) to choose the value the client sees; the Client
// returns one, wrapped with the operation, when the server fails a request.
type Errno uint32

// Error values defined by the protocol.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

// Error returns the conventional name of the error value.
func (e Errno) Error() string {
	switch e {
	case EPERM:
		return "operation not permitted (EPERM)"
	case EIO:
		return "input/output error (EIO)"
	case ENOMEM:
		return "cannot allocate memory (ENOMEM)"
	case EINVAL:
		return "invalid argument (EINVAL)"
	case ENOSPC:
		return "no space left on device (ENOSPC)"
	case EOVERFLOW:
		return "value too large (EOVERFLOW)"
	case ENOTSUP:
		return "operation not supported (ENOTSUP)"
	case ESHUTDOWN:
		return "server is shutting down (ESHUTDOWN)"
	}
	return fmt.Sprintf("NBD error %d", uint32(e))
}

// ErrProtocol is wrapped by errors that report a peer breaking the
// protocol: bad magic, truncated or oversize messages, unknown flags.
var ErrProtocol = errors.New("nbd: protocol violation")

// ErrUnknownExport is wrapped by errors that report a request for an export
// that does not exist.
var ErrUnknownExport = errors.New("nbd: unknown export")

// ErrClosed is returned by Client methods called after Close.
var ErrClosed = errors.New("nbd: client closed")

// ErrUnsupported is returned by Client methods whose command the server did
// not advertise.
var ErrUnsupported = errors.New("nbd: command not supported by server")

func protocolErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}
