package replication

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

// The wire protocol (docs/PROTOCOL.md) is a stream of frames in both
// directions over one mutual-TLS connection per agent. Segment files on the
// process server hold DATA frames as they arrived (compressed by the process
// server if the agent sent them plain), so one codec serves the wire, the
// cache and the target.

// FrameType says what a frame carries.
type FrameType uint8

// Frame types. Persisted in segments: never renumber.
const (
	FrameHello   FrameType = 1  // agent -> server, JSON Hello
	FrameWelcome FrameType = 2  // server -> agent, JSON Welcome
	FrameData    FrameType = 3  // agent -> server, a batch of records
	FrameAck     FrameType = 4  // server -> agent, Seq = last durable sequence number
	FrameStatus  FrameType = 5  // agent -> server, JSON Status (also a heartbeat)
	FrameTagReq  FrameType = 6  // server -> agent, JSON TagRequest
	FrameError   FrameType = 7  // either way, JSON ErrorMessage; the sender closes
	FrameSeal    FrameType = 8  // segments only: Seq = last sequence number, Count = records
	FramePolicy  FrameType = 9  // server -> agent, JSON AgentPolicy: the point schedule changed
	FrameHold    FrameType = 10 // server -> agent, JSON Cut: hold write completions for a group cut
	FrameHeld    FrameType = 11 // agent -> server, JSON Cut: completions are held
	FrameCut     FrameType = 12 // server -> agent, JSON Cut: tag now and release
	FrameRelease FrameType = 13 // server -> agent, JSON Cut: release without a tag (cut abandoned)
	FrameResync  FrameType = 14 // server -> agent, JSON ResyncJob: compare and send the differences
	FrameHashes  FrameType = 15 // agent -> server, JSON Hashes: the source's chunk hashes
	FrameWant    FrameType = 16 // server -> agent, JSON Want: the replica's block hashes of differing chunks
	FrameFreeze  FrameType = 17 // server -> agent, JSON Freeze: refuse every write from now on, then tag the final point
	FrameThaw    FrameType = 18 // server -> agent, JSON Freeze: the planned failover is cancelled, writes allowed again
	// Failback (reverse.go): the server writes the failed-over machine's
	// changes into the original disks through the frozen agent.
	FrameReverse    FrameType = 19 // server -> agent, binary ReverseData: write this range into the original disk
	FrameReverseAck FrameType = 20 // agent -> server, JSON ReverseAck: durable (or refused), or a disk's sum
	FrameReverseSum FrameType = 21 // server -> agent, JSON ReverseSum: the SHA-256 of a whole original disk
)

func (t FrameType) String() string {
	names := [...]string{"", "hello", "welcome", "data", "ack", "status", "tagreq", "error", "seal", "policy",
		"hold", "held", "cut", "release", "resync", "hashes", "want", "freeze", "thaw", "reverse", "reverse-ack", "reverse-sum"}
	if int(t) < len(names) && t != 0 {
		return names[t]
	}
	return fmt.Sprintf("frame(%d)", uint8(t))
}

// ProtocolVersion is the frame format version this build speaks.
const ProtocolVersion = 1

// Frame limits: a peer that announces more is cut off before anything is allocated.
const (
	MaxFramePayload = 16 << 20 // bytes on the wire
	MaxFrameRaw     = 40 << 20 // bytes after decompression
	FrameHeaderSize = 36
	// MaxControlPayload bounds the payload of every frame but DATA: JSON
	// decoding costs a multiple of the bytes it reads, and the largest
	// message (a Hello of MaxDisks disks with MaxDivergedRanges ranges
	// each) takes under 3 MiB.
	MaxControlPayload = 4 << 20
)

// Frame flags.
const (
	// FlagZstd marks a payload compressed with zstd.
	FlagZstd uint8 = 1 << 0
	// FlagTag marks a DATA frame holding a recovery-point tag or the end of a
	// resync: the process server seals its segment at once so the point
	// becomes recoverable, or the disk protected again, quickly.
	FlagTag uint8 = 1 << 1
	// FlagS2 marks a DATA payload compressed with S2 (the block format of
	// github.com/klauspost/compress/s2): on the bench disk's text about 4x
	// faster than zstd's fastest level to compress and 2x to decompress,
	// for about a quarter more bytes, and 8x faster on incompressible data.
	// An agent sends it only to a process server whose Welcome lists
	// CodecS2; at most one of FlagZstd and FlagS2 is set.
	FlagS2 uint8 = 1 << 2
)

// CodecS2 names S2 in Welcome.Codecs.
const CodecS2 = "s2"

// ServerCodecs are the payload codecs beyond zstd this build decodes: a
// process server lists them in its Welcome.
var ServerCodecs = []string{CodecS2}

// Compressed reports whether f's payload is compressed (zstd or S2).
func (f *Frame) Compressed() bool { return f.Flags&(FlagZstd|FlagS2) != 0 }

var frameMagic = [4]byte{'A', 'S', 'R', 'F'}

// Frame is one protocol unit. For FrameData, Payload is the (possibly
// compressed) encoded records, Seq the first record's sequence number and
// Count the number of records.
type Frame struct {
	Type    FrameType
	Flags   uint8
	Seq     uint64
	Count   uint32
	RawLen  uint32 // payload length after decompression
	Payload []byte
}

// Frame header layout (little endian):
//
//	0  magic   "ASRF"
//	4  version u8
//	5  type    u8
//	6  flags   u8
//	7  -       u8 (zero)
//	8  plen    u32 payload bytes that follow
//	12 rlen    u32 payload bytes after decompression
//	16 seq     u64
//	24 count   u32
//	28 pcrc    u32 CRC-32C of the payload bytes that follow
//	32 hcrc    u32 CRC-32C of bytes 0..31

// AppendFrame appends the encoding of f to dst.
func AppendFrame(dst []byte, f *Frame) []byte {
	var h [FrameHeaderSize]byte
	encodeFrameHeader(h[:], f)
	dst = append(dst, h[:]...)
	return append(dst, f.Payload...)
}

func encodeFrameHeader(h []byte, f *Frame) {
	copy(h[0:4], frameMagic[:])
	h[4] = ProtocolVersion
	h[5] = byte(f.Type)
	h[6] = f.Flags
	h[7] = 0
	binary.LittleEndian.PutUint32(h[8:], uint32(len(f.Payload)))
	raw := f.RawLen
	if !f.Compressed() {
		raw = uint32(len(f.Payload))
	}
	binary.LittleEndian.PutUint32(h[12:], raw)
	binary.LittleEndian.PutUint64(h[16:], f.Seq)
	binary.LittleEndian.PutUint32(h[24:], f.Count)
	binary.LittleEndian.PutUint32(h[28:], Checksum(f.Payload))
	binary.LittleEndian.PutUint32(h[32:], Checksum(h[:32]))
}

// FrameKey names a DATA frame's exact bytes: the fields of its header and
// the CRC-32C of its payload. Two frames with the same key hold the same
// payload, up to a CRC-32C collision (the strength of every frame check).
// The process server keys the records its reader decoded by it, so the
// applier takes them only for the frame a sealed segment holds.
type FrameKey struct {
	Seq                uint64
	Count, RawLen, Len uint32
	PCRC               uint32
	Flags              uint8
}

// EncodeFrameHeader writes f's header to h and returns the key of the
// frame it starts (its payload checksum computed once, here).
func EncodeFrameHeader(h *[FrameHeaderSize]byte, f *Frame) FrameKey {
	encodeFrameHeader(h[:], f)
	return headerKey(h[:])
}

// headerKey is the key of the frame whose (valid) header is h.
func headerKey(h []byte) FrameKey {
	return FrameKey{Seq: binary.LittleEndian.Uint64(h[16:]), Count: binary.LittleEndian.Uint32(h[24:]),
		RawLen: binary.LittleEndian.Uint32(h[12:]), Len: binary.LittleEndian.Uint32(h[8:]),
		PCRC: frameCRC(h), Flags: h[6]}
}

// WriteFrame writes f to w as header and payload.
func WriteFrame(w io.Writer, f *Frame) error {
	var h [FrameHeaderSize]byte
	encodeFrameHeader(h[:], f)
	if _, err := w.Write(h[:]); err != nil {
		return err
	}
	if len(f.Payload) > 0 {
		if _, err := w.Write(f.Payload); err != nil {
			return err
		}
	}
	return nil
}

// ProtocolError is a protocol violation by the peer: bad magic, unknown version,
// a length over the limits or a checksum mismatch. The connection that
// produced it must be closed; nothing it carried may be used.
type ProtocolError struct{ Reason string }

func (e *ProtocolError) Error() string { return "protocol error: " + e.Reason }

// Is makes every ProtocolError match ErrCorrupt.
func (e *ProtocolError) Is(target error) bool { return target == ErrCorrupt }

// ParseFrameHeader validates a frame header and returns the frame it
// announces, with Payload unset, and the payload length to read next.
func ParseFrameHeader(h []byte) (Frame, int, error) {
	var f Frame
	if len(h) < FrameHeaderSize {
		return f, 0, &ProtocolError{"short header"}
	}
	if [4]byte(h[0:4]) != frameMagic {
		return f, 0, &ProtocolError{fmt.Sprintf("bad magic %q", h[0:4])}
	}
	if got, want := Checksum(h[:32]), binary.LittleEndian.Uint32(h[32:]); got != want {
		return f, 0, &ProtocolError{fmt.Sprintf("header checksum %08x, want %08x", got, want)}
	}
	if h[4] != ProtocolVersion {
		return f, 0, &ProtocolError{fmt.Sprintf("unsupported protocol version %d (this build speaks %d)", h[4], ProtocolVersion)}
	}
	f.Type = FrameType(h[5])
	if f.Type < FrameHello || f.Type > FrameReverseSum {
		return f, 0, &ProtocolError{fmt.Sprintf("unknown frame type %d", h[5])}
	}
	f.Flags = h[6]
	if f.Flags&^(FlagZstd|FlagTag|FlagS2) != 0 || h[7] != 0 {
		return f, 0, &ProtocolError{fmt.Sprintf("unknown flags %#x", h[6])}
	}
	if f.Flags&FlagZstd != 0 && f.Flags&FlagS2 != 0 {
		return f, 0, &ProtocolError{fmt.Sprintf("flags %#x: both zstd and s2", h[6])}
	}
	plen := binary.LittleEndian.Uint32(h[8:])
	f.RawLen = binary.LittleEndian.Uint32(h[12:])
	f.Seq = binary.LittleEndian.Uint64(h[16:])
	f.Count = binary.LittleEndian.Uint32(h[24:])
	if plen > MaxFramePayload {
		return f, 0, &ProtocolError{fmt.Sprintf("payload of %d bytes over the %d limit", plen, MaxFramePayload)}
	}
	if f.Type != FrameData && plen > MaxControlPayload {
		return f, 0, &ProtocolError{fmt.Sprintf("%s payload of %d bytes over the %d limit", f.Type, plen, MaxControlPayload)}
	}
	if f.RawLen > MaxFrameRaw {
		return f, 0, &ProtocolError{fmt.Sprintf("raw payload of %d bytes over the %d limit", f.RawLen, MaxFrameRaw)}
	}
	if !f.Compressed() && f.RawLen != plen {
		return f, 0, &ProtocolError{"uncompressed payload with raw length != length"}
	}
	return f, int(plen), nil
}

// frameCRC returns the payload checksum recorded in a header.
func frameCRC(h []byte) uint32 { return binary.LittleEndian.Uint32(h[28:]) }

// ReadFrame reads one frame from r into buf (grown as needed) and verifies
// its header and payload checksum. The returned Payload aliases buf. io.EOF is
// returned only at a clean frame boundary.
func ReadFrame(r io.Reader, buf []byte) (Frame, []byte, error) {
	return readFrame(r, buf, MaxFramePayload)
}

// ReadFrameMax is ReadFrame for a frame whose payload may be at most max
// bytes (a Hello, whose size is known to be small): a header announcing
// more is refused before anything else is read or allocated.
func ReadFrameMax(r io.Reader, buf []byte, max int) (Frame, []byte, error) {
	return readFrame(r, buf, max)
}

func readFrame(r io.Reader, buf []byte, max int) (Frame, []byte, error) {
	var h [FrameHeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return Frame{}, buf, &ProtocolError{"truncated header"}
		}
		return Frame{}, buf, err
	}
	f, n, err := ParseFrameHeader(h[:])
	if err != nil {
		return f, buf, err
	}
	if n > max {
		return f, buf, &ProtocolError{fmt.Sprintf("%s frame of %d bytes over the %d this message may have", f.Type, n, max)}
	}
	buf, err = readPayload(r, buf, n)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return f, buf, &ProtocolError{"truncated payload"}
		}
		return f, buf, err
	}
	if got, want := Checksum(buf), frameCRC(h[:]); got != want {
		return f, buf, &ProtocolError{fmt.Sprintf("payload checksum %08x, want %08x", got, want)}
	}
	f.Payload = buf
	return f, buf, nil
}

// payloadStep is the most readPayload allocates ahead of the bytes that
// have arrived.
const payloadStep = 64 << 10

// readPayload reads n bytes into buf, reusing its storage when it is large
// enough. Otherwise the buffer grows with the bytes that actually arrive
// (doubling, from payloadStep), never to the length a header announced
// before they are there: a peer that announces 16 MiB and sends 10 bytes
// costs 64 KiB, not 16 MiB.
func readPayload(r io.Reader, buf []byte, n int) ([]byte, error) {
	if cap(buf) >= n {
		buf = buf[:n]
		_, err := io.ReadFull(r, buf)
		return buf, err
	}
	buf = buf[:0]
	for len(buf) < n {
		step := min(n-len(buf), max(len(buf), payloadStep))
		buf = slices.Grow(buf, step)
		m, err := io.ReadFull(r, buf[len(buf):len(buf)+step])
		buf = buf[:len(buf)+m]
		if err != nil {
			return buf, err
		}
	}
	return buf, nil
}

// Codec compresses and decompresses frame payloads. It is safe for concurrent use.
type Codec struct {
	enc *zstd.Encoder
	dec *zstd.Decoder
}

var (
	codecOnce, serverCodecOnce sync.Once
	sharedCodec, serverCodec   *Codec
)

// DefaultCodec returns a process-wide codec (zstd at its fastest level)
// with one encoder: an agent's, which compresses on the guest's CPU only
// when told to (`asr agent --compress`).
func DefaultCodec() *Codec {
	codecOnce.Do(func() { sharedCodec = newCodec(1) })
	return sharedCodec
}

// ServerCodec returns the process server's codec: the same format as
// DefaultCodec's, with an encoder per CPU, as it compresses the frames of
// every agent that sends them uncompressed (CompressData).
func ServerCodec() *Codec {
	serverCodecOnce.Do(func() { serverCodec = newCodec(0) })
	return serverCodec
}

// newCodec makes a codec with encoders encoders (0: one per CPU).
func newCodec(encoders int) *Codec {
	if encoders == 0 {
		encoders = runtime.GOMAXPROCS(0)
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(encoders), zstd.WithLowerEncoderMem(true))
	if err != nil {
		panic(err)
	}
	// DecodeAll writes at most cap(dst): Records gives it room for
	// exactly the raw length the frame header announced.
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxMemory(MaxFrameRaw), zstd.WithDecoderLowmem(true),
		zstd.WithDecodeAllCapLimit(true))
	if err != nil {
		panic(err)
	}
	return &Codec{enc: enc, dec: dec}
}

// DataFrame builds a DATA frame from encoded records, compressed into dst's
// storage when that makes it smaller.
func (c *Codec) DataFrame(raw []byte, first uint64, count uint32, dst []byte) Frame {
	comp := c.enc.EncodeAll(raw, dst[:0])
	if len(comp) >= len(raw) {
		return PlainDataFrame(raw, first, count)
	}
	return Frame{Type: FrameData, Flags: FlagZstd, Seq: first, Count: count, RawLen: uint32(len(raw)), Payload: comp}
}

// S2DataFrame builds a DATA frame from encoded records, compressed with S2
// into dst's storage when that makes it smaller. Only for a peer that
// decodes S2 (Welcome.Codecs).
func S2DataFrame(raw []byte, first uint64, count uint32, dst []byte) Frame {
	if n := s2.MaxEncodedLen(len(raw)); n < 0 || len(raw) > MaxFrameRaw {
		return PlainDataFrame(raw, first, count)
	} else if cap(dst) < n {
		dst = make([]byte, n)
	}
	comp := s2.Encode(dst[:cap(dst)], raw)
	if len(comp) >= len(raw) {
		return PlainDataFrame(raw, first, count)
	}
	return Frame{Type: FrameData, Flags: FlagS2, Seq: first, Count: count, RawLen: uint32(len(raw)), Payload: comp}
}

// S2Room returns dst, or a new buffer if dst is too small, with the
// capacity S2DataFrame needs to compress n bytes of records into it
// without allocating (whether or not they compress).
func S2Room(dst []byte, n int) []byte {
	if m := s2.MaxEncodedLen(n); m > cap(dst) {
		return make([]byte, 0, m)
	}
	return dst
}

// PlainDataFrame builds an uncompressed DATA frame from encoded records.
func PlainDataFrame(raw []byte, first uint64, count uint32) Frame {
	return Frame{Type: FrameData, Seq: first, Count: count, RawLen: uint32(len(raw)), Payload: raw}
}

// CompressData compresses an uncompressed DATA frame f in place, into
// dst's storage, when that makes it smaller (its other flags kept); a
// compressed frame is left as it is. It returns dst's storage for reuse.
// The records inside keep their own checksums, so what the agent logged is
// still checked end to end after the process server compressed it.
func (c *Codec) CompressData(f *Frame, dst []byte) []byte {
	if f.Type != FrameData || f.Compressed() {
		return dst
	}
	cf := c.DataFrame(f.Payload, f.Seq, f.Count, dst)
	if cf.Flags&FlagZstd != 0 {
		cf.Flags |= f.Flags
		*f = cf
		return cf.Payload
	}
	return dst
}

// Records decodes the records of a DATA frame, decompressing into buf, and
// verifies every record checksum and the sequence numbers.
//
// Decompression is bounded by the frame's raw length (itself at most
// MaxFrameRaw, checked with the header): a payload whose zstd header
// announces more is refused before anything is allocated, and one that
// decodes to more stops at the raw length.
func (c *Codec) Records(f *Frame, buf []byte) ([]Record, []byte, error) {
	raw, buf, err := c.payload(f, buf)
	if err != nil {
		return nil, buf, err
	}
	recs, err := DecodeRecords(raw, f.Seq, f.Count)
	return recs, buf, err
}

// payload returns a DATA frame's records, decompressed into buf if need
// be: at most RawLen bytes, and exactly that many.
func (c *Codec) payload(f *Frame, buf []byte) ([]byte, []byte, error) {
	if f.Type != FrameData {
		return nil, buf, fmt.Errorf("frame type %s is not data: %w", f.Type, ErrCorrupt)
	}
	if f.RawLen > MaxFrameRaw {
		return nil, buf, fmt.Errorf("frame at seq %d: raw length %d over the %d limit: %w", f.Seq, f.RawLen, MaxFrameRaw, ErrCorrupt)
	}
	raw := f.Payload
	if f.Flags&FlagS2 != 0 {
		n := int(f.RawLen)
		dl, err := s2.DecodedLen(f.Payload)
		if err != nil {
			return nil, buf, fmt.Errorf("decompress frame at seq %d: %v: %w", f.Seq, err, ErrCorrupt)
		}
		if dl != n {
			return nil, buf, fmt.Errorf("frame at seq %d: compressed content of %d bytes, header says %d: %w", f.Seq, dl, n, ErrCorrupt)
		}
		if cap(buf) < n {
			buf = make([]byte, 0, n)
		}
		raw, err = s2.Decode(buf[:n], f.Payload)
		if err != nil {
			return nil, buf, fmt.Errorf("decompress frame at seq %d: %v: %w", f.Seq, err, ErrCorrupt)
		}
	} else if f.Flags&FlagZstd != 0 {
		n := int(f.RawLen)
		var zh zstd.Header
		if err := zh.Decode(f.Payload); err != nil {
			return nil, buf, fmt.Errorf("decompress frame at seq %d: %v: %w", f.Seq, err, ErrCorrupt)
		}
		if zh.HasFCS && zh.FrameContentSize > uint64(n) {
			return nil, buf, fmt.Errorf("frame at seq %d: compressed content of %d bytes, header says %d: %w", f.Seq, zh.FrameContentSize, n, ErrCorrupt)
		}
		if cap(buf) < n {
			buf = make([]byte, 0, n)
		}
		var err error
		raw, err = c.dec.DecodeAll(f.Payload, buf[:0:n])
		if err != nil {
			return nil, buf, fmt.Errorf("decompress frame at seq %d: %v: %w", f.Seq, err, ErrCorrupt)
		}
	}
	if len(raw) != int(f.RawLen) {
		return nil, buf, fmt.Errorf("frame at seq %d: %d bytes of records, header says %d: %w", f.Seq, len(raw), f.RawLen, ErrCorrupt)
	}
	return raw, buf, nil
}

// maxCompressSkip bounds how many frames an AdaptiveCompressor leaves
// plain, untried, after frames that did not compress.
const maxCompressSkip = 63

// adaptiveMinFrame is the smallest frame whose result an
// AdaptiveCompressor counts.
const adaptiveMinFrame = 64 << 10

// AdaptiveCompressor compresses a stream's plain DATA frames
// (CompressData) but stops trying on a stream that does not compress: after
// a frame that gained nothing it leaves the next 1, 3, 7 ... up to 63
// frames plain without trying, and tries again after them; a frame that
// compresses starts it over. Frames under 64 KiB are always tried and not
// counted. On incompressible data (fio's random buffers,
// encrypted or compressed files) trying costs a core about 1 s per GB for
// nothing. Not safe for concurrent use: one per connection.
type AdaptiveCompressor struct {
	Codec   *Codec
	skip    int // frames still to leave untried
	backoff int // the skip after the next frame that does not compress
}

// Compress is CompressData, unless the stream did not compress lately.
func (a *AdaptiveCompressor) Compress(f *Frame, dst []byte) []byte {
	if f.Type != FrameData || f.Compressed() {
		return dst
	}
	if len(f.Payload) < adaptiveMinFrame {
		// Small frames (a tag, a few writes at a low rate) cost little to
		// try and say little about the stream: tried, not counted.
		return a.Codec.CompressData(f, dst)
	}
	if a.skip > 0 {
		a.skip--
		return dst
	}
	dst = a.Codec.CompressData(f, dst)
	if f.Flags&FlagZstd != 0 {
		a.backoff = 0
		return dst
	}
	a.backoff = min(2*a.backoff+1, maxCompressSkip)
	a.skip = a.backoff
	return dst
}

// JSONFrame builds a control frame carrying v as JSON.
func JSONFrame(t FrameType, v any) (Frame, error) {
	p, err := json.Marshal(v)
	if err != nil {
		return Frame{}, err
	}
	return Frame{Type: t, Payload: p, RawLen: uint32(len(p))}, nil
}

// DecodeJSON decodes a control frame's payload into v, rejecting unknown fields
// only where that would hide a mistake: unknown fields are ignored so that a
// newer peer can add some.
func DecodeJSON(f *Frame, v any) error {
	if err := json.Unmarshal(f.Payload, v); err != nil {
		return &ProtocolError{fmt.Sprintf("%s frame: %v", f.Type, err)}
	}
	return nil
}

// Hello is the first frame an agent sends on a data connection.
type Hello struct {
	MachineID    string     `json:"machine_id"`
	AgentVersion string     `json:"agent_version"`
	Disks        []DiskInfo `json:"disks"`
	// NextSeq is the sequence number the agent will give its next record; the
	// agent's spool holds [SpoolFirst, NextSeq).
	NextSeq    uint64 `json:"next_seq"`
	SpoolFirst uint64 `json:"spool_first"`
	// Recovering is set after the machine went down hard: the agent's
	// spool may have lost records the server holds; the disks at risk are
	// marked diverged.
	Recovering bool `json:"recovering,omitempty"`
	// LogID names the agent's log (random, 16 hex digits, made with the
	// agent's state): sequence numbers mean something only within one log.
	// Another log id than the server's is a new log (the agent re-registered
	// or lost its state), which is never joined to the old one by number.
	LogID string `json:"log_id,omitempty"`
	// BIOSUUID is the guest's BIOS UUID (lower case, 8-4-4-4-12 hex), what
	// links the machine to its VM in the vCenter inventory; "" if the
	// agent cannot read it.
	BIOSUUID string `json:"bios_uuid,omitempty"`
}

// DiskInfo describes one protected disk of a machine.
type DiskInfo struct {
	Index uint32 `json:"index"`
	Name  string `json:"name"`
	Size  int64  `json:"size"`
	// Diverged, when set, says why the agent can no longer prove its log
	// matches the disk: the server marks the disk for resync, of
	// DivergedRanges only if given.
	Diverged       string  `json:"diverged,omitempty"`
	DivergedRanges []Range `json:"diverged_ranges,omitempty"`
	// Mode is how the agent captures the disk's changes: DiskModeNBD
	// ("" from older agents) or DiskModeScan.
	Mode string `json:"mode,omitempty"`
}

// Disk capture modes (DiskInfo.Mode).
const (
	// DiskModeNBD: the guest's workload writes through the agent's NBD
	// export; every write is captured as it happens (seconds of RPO).
	DiskModeNBD = "nbd"
	// DiskModeScan: the workload uses the disk directly; the agent finds
	// changes by periodic block-hash scans (the RPO is the scan interval
	// plus the transfer, and a block rewritten twice between scans ships
	// once).
	DiskModeScan = "scan"
)

// Welcome answers Hello. DurableSeq is the last sequence number the process
// server holds durably for the machine (0: none); the agent resumes after it.
type Welcome struct {
	DurableSeq uint64 `json:"durable_seq"`
	// NewLog is set when the server took the agent's log as a new one:
	// the agent drops its whole spool and numbers its records from
	// DurableSeq+1. Nothing of the dropped records is lost: the server
	// resyncs (checksum compare) the disks listed in Copied, and the
	// others are copied again from the start.
	NewLog bool `json:"new_log,omitempty"`
	// Copied lists, with NewLog, the indexes of the disks whose replica is
	// complete or being resynced: the agent does not copy them again.
	Copied []uint32 `json:"copied,omitempty"`
	// Policy, when set, is the machine's point schedule, which overrides
	// the agent's flags.
	Policy *AgentPolicy `json:"policy,omitempty"`
	// Codecs lists the DATA payload codecs beyond zstd the server decodes
	// (ServerCodecs); an agent uses no other. An older server sends none.
	Codecs []string `json:"codecs,omitempty"`
}

// Decodes reports whether the server that sent w decodes codec.
func (w *Welcome) Decodes(codec string) bool { return slices.Contains(w.Codecs, codec) }

// AgentPolicy is the part of a replication policy the agent carries out:
// when it makes crash- and application-consistent points. Durations in ns.
type AgentPolicy struct {
	CrashInterval int64 `json:"crash_interval"`
	AppFrequency  int64 `json:"app_frequency"` // 0: no scheduled application-consistent points
	// Group is set when the machine is in a replication group: the server
	// then makes its points (group cuts) and the agent schedules none.
	Group string `json:"group,omitempty"`
}

// Cut identifies a replication-group cut: HOLD, HELD, CUT and RELEASE
// frames carry it. ID is also the request id of the tag each member makes.
type Cut struct {
	ID  uint64 `json:"id"`
	App bool   `json:"app,omitempty"`
}

// Status is the agent's periodic report; it doubles as a heartbeat.
type Status struct {
	Time          int64          `json:"time"`           // agent clock, Unix ns
	SpoolBytes    int64          `json:"spool_bytes"`    // bytes in the spool not yet acknowledged
	OldestPending int64          `json:"oldest_pending"` // time of the oldest unacknowledged change, 0 if none
	LastSeq       uint64         `json:"last_seq"`       // last sequence number given out
	Disks         []DiskProgress `json:"disks"`
	Events        []AgentEvent   `json:"events,omitempty"` // new since the last report
	Resync        *ResyncStatus  `json:"resync,omitempty"` // the resync running, if any
	// Failover is the ID of the planned failover the agent is frozen
	// under (FrameFreeze), "" if none: its guest writes are refused.
	Failover string `json:"failover,omitempty"`
}

// ResyncJob asks the agent to resync a disk: compare the source with the
// replica over Ranges (all of the disk if empty) and log what differs.
type ResyncJob struct {
	ID     uint64  `json:"id"`
	Disk   uint32  `json:"disk"`
	Reason string  `json:"reason"`
	Ranges []Range `json:"ranges,omitempty"`
	// Verify makes the job a verify (DRBD's online verify): the server
	// compares with the replica's contents read back, not with its
	// checksums, and the disk stays consistent unless differences are
	// found (which are then resent like any resync's).
	Verify bool `json:"verify,omitempty"`
}

// Hashes carries the source's hashes of a batch of chunks (HashChunk bytes
// each, at the given offsets) of a resync.
type Hashes struct {
	Job   uint64 `json:"job"`
	Disk  uint32 `json:"disk"`
	Batch uint64 `json:"batch"`
	// After is the sequence number of the resync's start record: the
	// server compares once it has applied the log up to it, so that what
	// the log held before the resync is in the replica it compares.
	After  uint64  `json:"after,omitempty"`
	Offs   []int64 `json:"offs"`
	Hashes []byte  `json:"hashes"` // 16 bytes per chunk
	// Verify is set for a verify job (ResyncJob.Verify).
	Verify bool `json:"verify,omitempty"`
}

// Want answers Hashes with the replica's block hashes of every chunk that
// differs (chunks not listed are identical).
type Want struct {
	Job    uint64      `json:"job"`
	Batch  uint64      `json:"batch"`
	Chunks []WantChunk `json:"chunks"`
	Error  string      `json:"error,omitempty"` // the server could not compare
}

// WantChunk is a differing chunk and the replica's hashes of its blocks.
type WantChunk struct {
	Off    int64  `json:"off"`
	Leaves []byte `json:"leaves"` // 16 bytes per block
}

// ResyncStatus is a running resync's progress, in the agent's status.
type ResyncStatus struct {
	Job      uint64 `json:"job"`
	Disk     uint32 `json:"disk"`
	Total    int64  `json:"total"`    // bytes to compare
	Compared int64  `json:"compared"` // bytes compared so far
	Sent     int64  `json:"sent"`     // bytes logged because they differed
	Error    string `json:"error,omitempty"`
}

// AgentEvent is something the agent reports for the console: a failed
// freeze, a failed post-thaw script, ...
type AgentEvent struct {
	Time    int64  `json:"time"` // Unix ns
	Kind    string `json:"kind"`
	Message string `json:"message"`
}

// DiskProgress is a disk's initial-replication state as the agent sees it.
type DiskProgress struct {
	Index  uint32 `json:"index"`
	Cursor int64  `json:"cursor"` // bytes of the source read so far
	Done   bool   `json:"done"`
}

// TagRequest asks the agent for a recovery point now.
type TagRequest struct {
	ID  uint64 `json:"id"`
	App bool   `json:"app,omitempty"`
}

// Freeze is the payload of FrameFreeze and FrameThaw: a planned failover.
// On FREEZE the agent refuses every guest write (write, write-zeroes,
// trim) on every disk from then on, until the THAW of the same ID, also
// across its restarts; once the writes that were in flight have completed
// (each is logged) it appends a tag record with request id Req, whose
// point is the failover's final point: it holds every write the guest was
// told had completed. A FREEZE of the ID the agent is already frozen under
// only tags again (with its Req).
type Freeze struct {
	// ID names the failover (ValidFreezeID): what a THAW must name.
	ID string `json:"id"`
	// Req is the request id the final point's tag record carries (FREEZE
	// only; 0: nobody waits for the point).
	Req uint64 `json:"req,omitempty"`
}

// FailoverTag is the name operators and logs give the final point of
// planned failover id (points themselves are named by sequence number).
func FailoverTag(id string) string { return "failover-" + id }

// ErrorMessage is the payload of FrameError: why the sender is closing.
type ErrorMessage struct {
	Message string `json:"message"`
	// Fatal tells the agent not to retry until an operator acts (for example
	// an unknown or revoked machine).
	Fatal bool `json:"fatal,omitempty"`
}
