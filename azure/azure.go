// Package azure implements replication.Target on an Azure Blob Storage
// container: the target of a replica site in Azure.
//
// # Design
//
// A vault is one blob container: catalog objects are block blobs
// objects/<key>, each written by one Put Blob (an atomic replace), and a
// replica disk is a page blob disks/<key>, its size rounded up to 512 bytes,
// the logical size in its metadata. A recovery point is a blob snapshot of
// the page blob, named in the snapshot's metadata. Azure bills page-blob
// snapshots incrementally, for the pages that differ from the next newer
// version, so a point costs the churn since the previous one, as with the
// local target's undo logs, but the service keeps the old pages itself: the
// target writes no undo data, a point is one call and so is its deletion,
// with no merge (a page rewritten with the same bytes counts as changed).
// Writes are buffered in memory (up to 64 MiB) and uploaded at Flush as Put
// Page calls of at most 4 MiB; zeroed ranges become Clear Page calls, which
// free the pages. Large reads list the written page ranges first, so holes
// are not downloaded. A snapshot deleted while a reader holds it is kept
// until the reader closes; the pending deletion is recorded in the page
// blob's metadata, so a crash in between leaves the snapshot only until the
// disk is next opened. Page blobs need a general-purpose v2 (or premium page
// blob) account without hierarchical namespace; a page blob holds 8 TiB.
// The disks' handles, snapshot order, readers and deferred deletion are
// replication/diskcore's, shared with every target; this package is the
// storage under them.
//
// A lock blob under a 60 s lease, renewed every 20 s, keeps two servers from
// writing one container. A server proposes the lease ID it keeps in its data
// directory, so after a restart it takes its own lease back at once, while
// another server must wait up to 60 s for a crashed one's lease to expire.
//
// Scale-out process servers share the container with the configuration
// server (Config.Shared): they take no lease on it, and each machine's
// blobs are written under that machine's lease, a lease on the blob
// leases/<machine id> (lease.go, replication.MachineLeaser), which every
// process server, the configuration server's built-in one included, takes
// before it opens the machine.
//
// # Layout
//
//	format            layout version: "ASRAZB", u16 version, u32 zero, CRC-32C
//	lock              empty block blob whose lease is the write lock (ErrLocked)
//	leases/<id>       empty block blob whose lease is machine <id>'s; metadata
//	                  asrholder (the holder's name, for the refused)
//	objects/<key>     one block blob per object
//	disks/<key>       the disk's newest contents, a page blob; metadata
//	                  asrversion (1), asrsize, and asrdeleting (snapshot IDs
//	                  deleted but held by readers, comma-separated)
//	disks/<key>@<id>  blob snapshot <id> (the service's timestamp) of the disk;
//	                  metadata asrversion, asrsize and asrsnap (the name)
//
// Objects and disks live under separate prefixes, so an object and a disk
// may share a key, and, the namespace being flat, "a" and "a/b" may both be
// objects or both disks.
//
// # Leases and fencing
//
// The leases fence writers, not requests: the other blobs take no lease
// condition. Every write checks first that the leases it depends on are
// held (checkWrite): the container's, in the configuration server, and the
// machine's for a blob under machines/<id>/ whose lease this Target holds.
// A check fails once a renewal finds the lease lost (the container's wraps
// replication.ErrLocked, a machine's replication.ErrMachineLeased), and
// for as long as no renewal has succeeded for 5/6 of the lease's duration
// (50 s of 60), before the service could let another holder take it. A
// shared Target (a scale-out process server) writes only the blobs of the
// machines it has leased: anything else (the vault descriptor, group
// points, another machine) is refused; the configuration server, fenced by
// the container's lease, also writes machines it has not leased (it
// deletes them and prunes their kept segments). Reads go on regardless, so
// a recovery still works. Each write request is also bounded by the
// earliest moment its leases may lapse (leaseBound: the start of the last
// renewal plus the duration), so a request the SDK is still retrying then
// is abandoned; only a request the service receives before that and
// applies after (held in the network) escapes the fence, as it would any
// fence without a lease condition on the written blob itself.
//
// # Errors
//
// Transient failures (timeouts, 408, 429, 5xx) are retried with exponential
// backoff by the SDK's pipeline: 6 retries, 0.5 s to 10 s apart, each try
// limited to a minute. A 403 fails at once with an error wrapping ErrAuth;
// a missing blob or snapshot wraps replication.ErrNotFound. Errors carry the
// service's code and message on one line, and never a SAS token.
package azure

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/google/uuid"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/diskcore"
)

// ErrAuth is returned (wrapped) when the storage account refuses the
// credentials: a wrong key, a SAS token that expired or lacks a permission,
// or an address the account's firewall does not admit.
var ErrAuth = errors.New("storage account rejected the credentials")

const (
	formatBlob     = "format"
	formatSize     = 16
	formatVersion  = 1
	lockBlob       = "lock"
	objectsPrefix  = "objects/"
	disksPrefix    = "disks/"
	maxBlobNameLen = 1024 // the service's limit
	maxKeyLen      = maxBlobNameLen - len(objectsPrefix)

	// leaseSeconds is the container's write lease's duration (lease.go
	// says how a lease is renewed and trusted).
	leaseSeconds = 60

	// closeTimeout bounds the release of a lease.
	closeTimeout = 30 * time.Second
)

var formatMagic = [6]byte{'A', 'S', 'R', 'A', 'Z', 'B'}

// retryOptions are the SDK pipeline's: transient errors are retried with
// exponential backoff for about a minute in all, each try limited to one.
var retryOptions = policy.RetryOptions{
	MaxRetries:    6,
	TryTimeout:    time.Minute,
	RetryDelay:    500 * time.Millisecond,
	MaxRetryDelay: 10 * time.Second,
}

// Target is a replication.Target on an Azure blob container. Open it with
// Open.
type Target struct {
	name    string // azure://ACCOUNT/CONTAINER
	account string // the storage account, for FailoverDisk's resource ID
	cc      *container.Client
	leaseID string     // proposed for every lease this Target takes
	lock    *blobLease // the container's write lease; nil when shared
	log     *slog.Logger
	now     func() time.Time

	// ctx lives until Close; it serves the calls that take no context
	// (WriteAt, ZeroAt, ReadAt) and the leases' renewals.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	machineSecs  int32 // a machine lease's duration (Config.MachineLease)
	mmu          sync.Mutex
	machines     map[string]*machineLease // the machine leases held, by machine id (lease.go)
	leasesClosed bool                     // Close has released them: no more are taken

	disks     *diskcore.Disks // the open disks, and whether t is closed
	closeOnce sync.Once
}

var _ replication.Target = (*Target)(nil)

// Open opens the vault in cfg's container, creating the container if it is
// missing (unless cfg.NoCreate or cfg.Shared), and takes the container's
// write lease (unless cfg.Shared). It returns an error wrapping
// replication.ErrLocked if another server holds the lease, one wrapping
// ErrAuth if the account refuses the credentials, and, with cfg.NoCreate
// or cfg.Shared, one wrapping replication.ErrNotFound if the container
// holds no vault.
func Open(ctx context.Context, cfg Config) (*Target, error) {
	cfg, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	cc, err := newContainerClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", cfg, err)
	}
	leaseID := cfg.LeaseID
	if leaseID == "" {
		leaseID = uuid.NewString()
	}
	if cfg.MachineLease == 0 {
		cfg.MachineLease = DefaultMachineLease
	}
	t := &Target{
		name:        cfg.String(),
		account:     cfg.Account,
		cc:          cc,
		leaseID:     leaseID,
		log:         slog.Default().With("component", "azure", "target", cfg.String()),
		now:         time.Now,
		machineSecs: int32(cfg.MachineLease / time.Second),
		machines:    map[string]*machineLease{},
	}
	var createErr error
	if cfg.NoCreate || cfg.Shared {
		// Before the lease, whose lock blob a new vault would get.
		if err := t.checkExists(ctx); err != nil {
			return nil, err
		}
	} else if createErr, err = t.createContainer(ctx, cfg.Key == ""); err != nil {
		return nil, fmt.Errorf("open %s: %w", t, err)
	}
	if !cfg.Shared {
		if t.lock, err = t.newLease(lockBlob, "the write lease", leaseSeconds, func(answer error) error {
			return fmt.Errorf("%s: the write lease is lost (%v); another asr server may be writing the container, so this one stops: %w", t, answer, replication.ErrLocked)
		}); err != nil {
			return nil, fmt.Errorf("open %s: %w", cfg, err)
		}
		if err := t.take(ctx, t.lock, lockBlob); err != nil {
			if createErr != nil && bloberror.HasCode(err, bloberror.ContainerNotFound) {
				return nil, fmt.Errorf("open %s: the container does not exist and the SAS token cannot create it (Create Container: %v): create the container, or use a SAS with the create permission on containers, or the account key", t, createErr)
			}
			if leaseHeld(err) {
				err = fmt.Errorf("another asr server holds the container (the lease on its %q blob; a crashed server's lease expires within %d s): %w", lockBlob, leaseSeconds, replication.ErrLocked)
			} else {
				err = fmt.Errorf("take the write lease: %w", azError(err))
			}
			return nil, fmt.Errorf("open %s: %w", t, err)
		}
	}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.disks = diskcore.New(diskStorage{t}, diskcore.Config{
		Name:        t.name,
		MaxKeyLen:   maxKeyLen,
		BufferLimit: bufferLimit,
		Context:     t.ctx,
		CheckWrite:  t.checkWrite,
		Logger:      t.log,
	})
	if err := t.checkFormat(ctx, !cfg.NoCreate && !cfg.Shared); err != nil {
		t.cancel()
		if t.lock != nil {
			t.lock.release()
		}
		return nil, fmt.Errorf("open %s: %w", t, err)
	}
	if t.lock != nil {
		t.lock.start(t.ctx, &t.wg)
	}
	return t, nil
}

// newContainerClient makes the SDK client: retries as retryOptions says, and
// an HTTP client that speaks TLS 1.2 or later and follows no redirect (the
// service sends none, and one could lead off https or off the endpoint).
func newContainerClient(cfg Config) (*container.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	tr.MaxIdleConnsPerHost = 16
	hc := &http.Client{
		Transport:     tr,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	opts := &container.ClientOptions{ClientOptions: policy.ClientOptions{
		Retry:     retryOptions,
		Transport: hc,
		Telemetry: policy.TelemetryOptions{ApplicationID: "asr"},
	}}
	u := cfg.Endpoint + "/" + cfg.Container
	if cfg.Key != "" {
		cred, err := container.NewSharedKeyCredential(cfg.Account, cfg.Key)
		if err != nil {
			return nil, errors.New("the account key is not valid base64")
		}
		return container.NewClientWithSharedKeyCredential(u, cred, opts)
	}
	return container.NewClientWithNoCredential(u+"?"+cfg.SAS, opts)
}

// createContainer creates the container if it is missing. With a SAS token
// (sas), a refusal is not final: the token may be scoped to an existing
// container, which it cannot create. createErr reports that refusal.
func (t *Target) createContainer(ctx context.Context, sas bool) (createErr, err error) {
	_, err = t.cc.Create(ctx, nil)
	var se *serviceError
	switch {
	case err == nil, bloberror.HasCode(err, bloberror.ContainerAlreadyExists):
		return nil, nil
	case sas && errors.As(azError(err), &se) && se.kind == ErrAuth:
		// Whether the token is bad or only lacks the permission, the
		// lease, taken next, tells.
		return errors.New(se.answer()), nil
	}
	return nil, fmt.Errorf("create container: %w", azError(err))
}

// checkExists returns an error wrapping replication.ErrNotFound unless the
// container holds a vault's layout blob. It creates nothing.
func (t *Target) checkExists(ctx context.Context) error {
	_, err := getBlob(ctx, t.cc.NewBlobClient(formatBlob))
	switch {
	case err == nil:
		return nil
	case bloberror.HasCode(err, bloberror.ContainerNotFound):
		return fmt.Errorf("%s holds no asr vault (no such container): %w", t, replication.ErrNotFound)
	case errors.Is(err, replication.ErrNotFound):
		return fmt.Errorf("%s holds no asr vault (no %s blob in the container): %w", t, formatBlob, replication.ErrNotFound)
	}
	return fmt.Errorf("open %s: read the %s blob: %w", t, formatBlob, err)
}

// checkFormat verifies the layout blob, writing it into a new vault if
// create is set.
func (t *Target) checkFormat(ctx context.Context, create bool) error {
	bc := t.cc.NewBlockBlobClient(formatBlob)
	b, err := getBlob(ctx, bc.BlobClient())
	if errors.Is(err, replication.ErrNotFound) && !create {
		return fmt.Errorf("no %s blob: %w", formatBlob, err)
	}
	if errors.Is(err, replication.ErrNotFound) {
		h := make([]byte, formatSize)
		copy(h, formatMagic[:])
		binary.LittleEndian.PutUint16(h[6:], formatVersion)
		binary.LittleEndian.PutUint32(h[12:], replication.Checksum(h[:12]))
		if _, err := bc.Upload(ctx, streaming.NopCloser(bytes.NewReader(h)), nil); err != nil {
			return fmt.Errorf("write the %s blob: %w", formatBlob, azError(err))
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("read the %s blob: %w", formatBlob, err)
	}
	if len(b) != formatSize || [6]byte(b[:6]) != formatMagic {
		return fmt.Errorf("blob %s: not an asr vault layout blob: %w", formatBlob, replication.ErrCorrupt)
	}
	if got, want := replication.Checksum(b[:12]), binary.LittleEndian.Uint32(b[12:]); got != want {
		return fmt.Errorf("blob %s: checksum %08x, want %08x: %w", formatBlob, got, want, replication.ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(b[6:]); v != formatVersion {
		return fmt.Errorf("blob %s: layout version %d not supported (this build reads %d): %w", formatBlob, v, formatVersion, replication.ErrCorrupt)
	}
	return nil
}

// String returns "azure://ACCOUNT/CONTAINER".
func (t *Target) String() string { return t.name }

// Close closes every disk still open (flushing them), stops renewing the
// lease and releases it. Snapshot readers fail afterwards. Closing again is
// nil.
func (t *Target) Close() (err error) {
	t.closeOnce.Do(func() {
		err = t.disks.Close()
		err = errors.Join(err, t.releaseMachines())
		t.cancel()
		t.wg.Wait()
		if t.lock != nil {
			err = errors.Join(err, t.lock.release())
		}
		if err != nil {
			err = fmt.Errorf("close %s: %w", t, err)
		}
	})
	return err
}

// OpenDisk opens the replica disk at key, creating an all-zero page blob of
// the given size if it does not exist (replication.Target).
func (t *Target) OpenDisk(ctx context.Context, key string, size int64) (replication.ReplicaDisk, error) {
	return t.disks.OpenDisk(ctx, key, size)
}

// DeleteDisk removes the disk at key with its snapshots (replication.Target).
func (t *Target) DeleteDisk(ctx context.Context, key string) error {
	return t.disks.DeleteDisk(ctx, key)
}

// PutObject stores data at key with one Put Blob: atomic, and durable when it
// returns.
func (t *Target) PutObject(ctx context.Context, key string, data []byte) error {
	if err := t.disks.Check(ctx, "put object", key, false); err != nil {
		return err
	}
	if err := t.checkWrite(key); err != nil {
		return fmt.Errorf("put object %s: %w", key, err)
	}
	bc := t.cc.NewBlockBlobClient(objectsPrefix + key)
	ctx, cancel := t.leaseBound(ctx, key)
	defer cancel()
	if _, err := bc.Upload(ctx, streaming.NopCloser(bytes.NewReader(data)), nil); err != nil {
		return fmt.Errorf("put object %s: %w", key, azError(err))
	}
	return nil
}

// GetObject returns the object at key, or an error wrapping
// replication.ErrNotFound.
func (t *Target) GetObject(ctx context.Context, key string) ([]byte, error) {
	if err := t.disks.Check(ctx, "get object", key, false); err != nil {
		return nil, err
	}
	b, err := getBlob(ctx, t.cc.NewBlobClient(objectsPrefix+key))
	if err != nil {
		return nil, fmt.Errorf("get object %s: %w", key, err)
	}
	return b, nil
}

// maxPrealloc bounds the buffer getBlob makes from a blob's announced
// length before its bytes arrive.
const maxPrealloc = 64 << 20

// getAttempts bounds the downloads of a blob that keeps being replaced.
const getAttempts = 3

// getBlob downloads a whole blob. A broken download resumes where it
// stopped, on the condition that the blob is the same (If-Match); if it was
// replaced meanwhile, the download starts over, so the bytes are always one
// version's.
func getBlob(ctx context.Context, bc *blob.Client) ([]byte, error) {
	for attempt := 1; ; attempt++ {
		resp, err := bc.DownloadStream(ctx, nil)
		if err != nil {
			return nil, azError(err)
		}
		body := resp.NewRetryReader(ctx, &blob.RetryReaderOptions{MaxRetries: 5})
		var buf bytes.Buffer
		if resp.ContentLength != nil && *resp.ContentLength > 0 {
			// The announced length, not the bytes received: grow ahead
			// of them only up to a bound (objects are catalog entries
			// and segments of a few MiB).
			buf.Grow(int(min(*resp.ContentLength, maxPrealloc)))
		}
		_, err = io.Copy(&buf, body)
		body.Close()
		if err == nil {
			return buf.Bytes(), nil
		}
		if attempt == getAttempts || !bloberror.HasCode(err, bloberror.ConditionNotMet) {
			return nil, azError(err)
		}
	}
}

// ListObjects returns the objects whose keys start with prefix, sorted.
func (t *Target) ListObjects(ctx context.Context, prefix string) ([]replication.ObjectInfo, error) {
	if err := t.disks.Check(ctx, "list objects", prefix, true); err != nil {
		return nil, err
	}
	out := []replication.ObjectInfo{}
	pager := t.cc.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{Prefix: to.Ptr(objectsPrefix + prefix)})
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("list objects %q: %w", prefix, azError(err))
		}
		for _, it := range page.Segment.BlobItems {
			if it.Name == nil || it.Properties == nil || it.Properties.ContentLength == nil {
				continue
			}
			key := strings.TrimPrefix(*it.Name, objectsPrefix)
			if checkKey(key) != nil {
				continue // not written by this package
			}
			out = append(out, replication.ObjectInfo{Key: key, Size: *it.Properties.ContentLength})
		}
	}
	// The service lists in name order already; sorting keeps the contract
	// independent of that.
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, nil
}

// DeleteObject removes the object at key; a missing object is not an error.
func (t *Target) DeleteObject(ctx context.Context, key string) error {
	if err := t.disks.Check(ctx, "delete object", key, false); err != nil {
		return err
	}
	if err := t.checkWrite(key); err != nil {
		return fmt.Errorf("delete object %s: %w", key, err)
	}
	ctx, cancel := t.leaseBound(ctx, key)
	defer cancel()
	_, err := t.cc.NewBlobClient(objectsPrefix+key).Delete(ctx, nil)
	if err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		return fmt.Errorf("delete object %s: %w", key, azError(err))
	}
	return nil
}

// The key rules are the Target contract's (replication.CheckKey).
func checkKey(key string) error       { return replication.CheckKey(key, maxKeyLen) }
func checkPrefix(prefix string) error { return replication.CheckPrefix(prefix, maxKeyLen) }

// serviceError is an error response of the storage service, told in one
// line (the SDK's own message spans a dozen, with the response body).
type serviceError struct {
	status int
	code   string
	msg    string // the service's message, its first line
	kind   error  // ErrAuth, replication.ErrNotFound, or nil
	resp   *azcore.ResponseError
}

func (e *serviceError) Error() string {
	if e.kind == ErrAuth {
		return fmt.Sprintf("%v (%s); check the account key or SAS token (its expiry and permissions) and the account's network rules", ErrAuth, e.answer())
	}
	return e.answer()
}

// answer is the service's answer: status, code and message.
func (e *serviceError) answer() string {
	s := fmt.Sprintf("HTTP %d %s", e.status, e.code)
	if e.msg != "" {
		s += ": " + e.msg
	}
	return s
}

func (e *serviceError) Unwrap() []error {
	if e.kind != nil {
		return []error{e.kind, e.resp}
	}
	return []error{e.resp}
}

// azError translates an error of the SDK: a service response becomes a
// serviceError (403 wraps ErrAuth, a missing blob replication.ErrNotFound),
// and a transport error loses its URL's query, which may hold a SAS token.
func azError(err error) error {
	if err == nil {
		return nil
	}
	if se := (*serviceError)(nil); errors.As(err, &se) {
		return err
	}
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		e := &serviceError{status: re.StatusCode, code: re.ErrorCode, resp: re}
		if re.RawResponse != nil {
			if body, perr := runtime.Payload(re.RawResponse); perr == nil && len(body) > 0 {
				var x struct{ Message string }
				if xml.Unmarshal(body, &x) == nil {
					e.msg, _, _ = strings.Cut(strings.TrimSpace(x.Message), "\n")
				}
			}
		}
		switch {
		case re.StatusCode == http.StatusForbidden:
			e.kind = ErrAuth
		case re.StatusCode == http.StatusNotFound && re.ErrorCode != string(bloberror.ContainerNotFound):
			e.kind = replication.ErrNotFound
		}
		return e
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		u, _, _ := strings.Cut(ue.URL, "?")
		return &url.Error{Op: ue.Op, URL: u, Err: ue.Err}
	}
	return err
}
