package azure

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/targettest"
)

const (
	testKey = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
	testSAS = "sv=2024-08-04&ss=b&srt=sco&sp=rwdlac&se=2030-01-01T00:00:00Z&sig=c2VjcmV0c2lnbmF0dXJl"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestParseURL(t *testing.T) {
	azurite := "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=" + testKey + ";BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
	tests := []struct {
		name string
		url  string
		env  map[string]string
		want Config // Key, SAS and Endpoint compared; ConnectionString ignored
	}{
		{"key", "azure://acct/vault", map[string]string{EnvKey: testKey},
			Config{Account: "acct", Container: "vault", Key: testKey, Endpoint: "https://acct.blob.core.windows.net"}},
		{"key with its account", "azure://acct/vault", map[string]string{EnvAccount: "acct", EnvKey: testKey},
			Config{Account: "acct", Container: "vault", Key: testKey, Endpoint: "https://acct.blob.core.windows.net"}},
		{"trailing slash", "azure://acct/vault/", map[string]string{EnvKey: testKey},
			Config{Account: "acct", Container: "vault", Key: testKey, Endpoint: "https://acct.blob.core.windows.net"}},
		{"sas with ?", "azure://acct/vault", map[string]string{EnvSAS: "?" + testSAS},
			Config{Account: "acct", Container: "vault", SAS: testSAS, Endpoint: "https://acct.blob.core.windows.net"}},
		{"key wins over sas", "azure://acct/vault", map[string]string{EnvKey: testKey, EnvSAS: testSAS},
			Config{Account: "acct", Container: "vault", Key: testKey, SAS: testSAS, Endpoint: "https://acct.blob.core.windows.net"}},
		{"azurite connection string", "azure://devstoreaccount1/vault", map[string]string{EnvConnectionString: azurite, EnvKey: "ignored"},
			Config{Account: "devstoreaccount1", Container: "vault", Key: testKey, Endpoint: "http://127.0.0.1:10000/devstoreaccount1"}},
		{"connection string with suffix", "azure://acct/vault", map[string]string{EnvConnectionString: "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=" + testKey + ";EndpointSuffix=core.chinacloudapi.cn"},
			Config{Account: "acct", Container: "vault", Key: testKey, Endpoint: "https://acct.blob.core.chinacloudapi.cn"}},
		{"connection string with a sas", "azure://acct/vault", map[string]string{EnvConnectionString: "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=" + testSAS},
			Config{Account: "acct", Container: "vault", SAS: testSAS, Endpoint: "https://acct.blob.core.windows.net"}},
		{"development storage", "azure://devstoreaccount1/vault", map[string]string{EnvConnectionString: "UseDevelopmentStorage=true"},
			Config{Account: "devstoreaccount1", Container: "vault", Key: testKey, Endpoint: "http://127.0.0.1:10000/devstoreaccount1"}},
		{"http to localhost", "azure://acct/vault", map[string]string{EnvConnectionString: "AccountName=acct;AccountKey=" + testKey + ";BlobEndpoint=http://localhost:10000/acct"},
			Config{Account: "acct", Container: "vault", Key: testKey, Endpoint: "http://localhost:10000/acct"}},
		{"http to ::1", "azure://acct/vault", map[string]string{EnvConnectionString: "AccountName=acct;AccountKey=" + testKey + ";BlobEndpoint=http://[::1]:10000/acct"},
			Config{Account: "acct", Container: "vault", Key: testKey, Endpoint: "http://[::1]:10000/acct"}},
		{"http to 127.0.0.0/8", "azure://acct/vault", map[string]string{EnvConnectionString: "AccountName=acct;AccountKey=" + testKey + ";BlobEndpoint=http://127.8.9.10/acct"},
			Config{Account: "acct", Container: "vault", Key: testKey, Endpoint: "http://127.8.9.10/acct"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseURL(tt.url, env(tt.env))
			if err != nil {
				t.Fatal(err)
			}
			got.ConnectionString = ""
			if got != tt.want {
				t.Errorf("ParseURL(%q) = %s, key %t, SAS %q, endpoint %q; want %s, key %t, SAS %q, endpoint %q", tt.url,
					got, got.Key == testKey, got.SAS, got.Endpoint, tt.want, tt.want.Key == testKey, tt.want.SAS, tt.want.Endpoint)
			}
			if got.String() != "azure://"+tt.want.Account+"/vault" {
				t.Errorf("String() = %q", got.String())
			}
		})
	}
}

func TestParseURLErrors(t *testing.T) {
	key := map[string]string{EnvKey: testKey}
	tests := []struct {
		name string
		url  string
		env  map[string]string
		want string // in the error
	}{
		{"other scheme", "https://acct/vault", key, "azure://ACCOUNT/CONTAINER"},
		{"no container", "azure://acct", key, "container name"},
		{"deeper path", "azure://acct/vault/sub", key, "nothing after the container"},
		{"port", "azure://acct:80/vault", key, "no port"},
		{"query", "azure://acct/vault?sig=x", key, "no port, query or fragment"},
		{"credentials in the URL", "azure://user:pw@acct/vault", key, "must not hold credentials"},
		{"account too short", "azure://ab/vault", key, "storage account name"},
		{"account upper case", "azure://Acct/vault", key, "storage account name"},
		{"container too short", "azure://acct/ab", key, "3 to 63"},
		{"container too long", "azure://acct/" + strings.Repeat("a", 64), key, "3 to 63"},
		{"container upper case", "azure://acct/Vault", key, "3 to 63"},
		{"container underscore", "azure://acct/my_vault", key, "3 to 63"},
		{"container leading hyphen", "azure://acct/-vault", key, "3 to 63"},
		{"container trailing hyphen", "azure://acct/vault-", key, "3 to 63"},
		{"container double hyphen", "azure://acct/my--vault", key, "3 to 63"},
		{"nothing set", "azure://acct/vault", nil, "no credentials: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN"},
		{"account only", "azure://acct/vault", map[string]string{EnvAccount: "acct"}, "no credentials"},
		{"other account", "azure://acct/vault", map[string]string{EnvAccount: "other", EnvKey: testKey}, `AZURE_STORAGE_ACCOUNT names account "other"`},
		{"connection string for another account", "azure://acct/vault", map[string]string{EnvConnectionString: "AccountName=other;AccountKey=" + testKey}, `connection string is for account "other"`},
		{"connection string without credentials", "azure://acct/vault", map[string]string{EnvConnectionString: "AccountName=acct"}, "no credentials"},
		{"connection string garbage", "azure://acct/vault", map[string]string{EnvConnectionString: "garbage"}, "has no '='"},
		{"key not base64", "azure://acct/vault", map[string]string{EnvKey: "not base64!"}, "not base64"},
		{"sas without sig", "azure://acct/vault", map[string]string{EnvSAS: "sv=2024-08-04&sp=r"}, "no sig"},
		{"http to a remote host", "azure://acct/vault", map[string]string{EnvConnectionString: "AccountName=acct;AccountKey=" + testKey + ";BlobEndpoint=http://10.0.0.5:10000/acct"}, "plain http is allowed only to a loopback host"},
		{"http by protocol", "azure://acct/vault", map[string]string{EnvConnectionString: "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=" + testKey}, "plain http is allowed only to a loopback host"},
		{"http to a name", "azure://acct/vault", map[string]string{EnvConnectionString: "AccountName=acct;AccountKey=" + testKey + ";BlobEndpoint=http://localhost.example.com/acct"}, "plain http is allowed only to a loopback host"},
		{"ftp", "azure://acct/vault", map[string]string{EnvConnectionString: "AccountName=acct;AccountKey=" + testKey + ";BlobEndpoint=ftp://127.0.0.1/acct"}, "want an https URL"},
		{"endpoint with a query", "azure://acct/vault", map[string]string{EnvConnectionString: "AccountName=acct;AccountKey=" + testKey + ";BlobEndpoint=https://h/?sig=secretsig"}, "no credentials or query"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseURL(tt.url, env(tt.env))
			if err == nil {
				t.Fatalf("ParseURL(%q) = %v, want an error", tt.url, cfg)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseURL(%q) = %v, want it to say %q", tt.url, err, tt.want)
			}
			for _, secret := range []string{testKey, "secretsig", "c2VjcmV0c2lnbmF0dXJl", "pw@", "sig=x", "not base64!"} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error quotes a secret: %v", err)
				}
			}
		})
	}
}

func TestConfigHidesSecrets(t *testing.T) {
	cfg := Config{Account: "acct", Container: "vault", Key: testKey, SAS: testSAS, ConnectionString: "AccountKey=" + testKey}
	for _, s := range []string{cfg.String(), fmt.Sprint(cfg), fmt.Sprintf("%v %+v %s %#v", cfg, cfg, cfg, cfg), fmt.Sprint(&cfg)} {
		if strings.Contains(s, testKey) || strings.Contains(s, "sig=") {
			t.Errorf("printed config holds a secret: %s", s)
		}
	}
	if cfg.String() != "azure://acct/vault" {
		t.Errorf("String() = %q", cfg.String())
	}
}

func TestOpenRefusesBadConfig(t *testing.T) {
	for _, cfg := range []Config{
		{Account: "acct", Container: "vault"},
		{Account: "acct", Container: "Vault", Key: testKey},
		{Account: "acct", Container: "vault", Key: testKey, Endpoint: "http://192.0.2.1"},
		{Account: "acct", Container: "vault", Key: testKey, LeaseID: "not-a-uuid"},
	} {
		if tg, err := Open(t.Context(), cfg); err == nil {
			tg.Close()
			t.Errorf("Open(%v) accepted a bad config", cfg)
		}
	}
}

func TestKeys(t *testing.T) {
	for _, k := range targettest.BadKeys {
		if checkKey(k) == nil {
			t.Errorf("checkKey(%q) accepted", k)
		}
	}
	if checkKey(strings.Repeat("a", maxKeyLen+1)) == nil {
		t.Error("a key too long for a blob name accepted")
	}
	for _, k := range []string{"a", "a/b", "..a", "seg/0000000000000001-00000000000000ff.seg", strings.Repeat("a", maxKeyLen)} {
		if err := checkKey(k); err != nil {
			t.Errorf("checkKey(%q) = %v", k, err)
		}
		if len(objectsPrefix+k) > maxBlobNameLen {
			t.Errorf("key %q makes a blob name too long", k)
		}
	}
	for _, p := range []string{"", "a", "a/", "a/b", "a/.", "a/b-"} {
		if err := checkPrefix(p); err != nil {
			t.Errorf("checkPrefix(%q) = %v", p, err)
		}
	}
	for _, p := range []string{"/a", "../", "a//", "a b", "a/../"} {
		if checkPrefix(p) == nil {
			t.Errorf("checkPrefix(%q) accepted", p)
		}
	}
}

func TestCheckContainer(t *testing.T) {
	for _, ok := range []string{"abc", "a-b-c", "vault1", strings.Repeat("a", 63), "0ab"} {
		if err := checkContainer(ok); err != nil {
			t.Errorf("checkContainer(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "ab", strings.Repeat("a", 64), "-ab", "ab-", "a--b", "aBc", "a_b", "a.b", "$root"} {
		if checkContainer(bad) == nil {
			t.Errorf("checkContainer(%q) accepted", bad)
		}
	}
}

// newTestDisk makes a disk with no blob behind it: enough for the buffer's
// logic as long as nothing needs to be read or uploaded.
func newTestDisk(size int64) *disk {
	return &disk{key: "test", size: size, pages: map[int64]*page{}}
}

func TestClearSpans(t *testing.T) {
	d := newTestDisk(1 << 20)
	steps := []struct {
		lo, hi int64
		want   []span
	}{
		{10, 20, []span{{10, 20}}},
		{30, 40, []span{{10, 20}, {30, 40}}},
		{0, 5, []span{{0, 5}, {10, 20}, {30, 40}}},
		{20, 30, []span{{0, 5}, {10, 40}}}, // adjacent on both sides
		{50, 60, []span{{0, 5}, {10, 40}, {50, 60}}},
		{5, 10, []span{{0, 40}, {50, 60}}},
		{45, 55, []span{{0, 40}, {45, 60}}},
		{1, 2, []span{{0, 40}, {45, 60}}}, // inside
		{0, 100, []span{{0, 100}}},        // over all
	}
	for _, s := range steps {
		d.clear(s.lo, s.hi)
		if !slices.Equal(d.clears, s.want) {
			t.Fatalf("after clear(%d, %d): %v, want %v", s.lo, s.hi, d.clears, s.want)
		}
	}
	for pg := range int64(110) {
		if got := d.cleared(pg); got != (pg < 100) {
			t.Errorf("cleared(%d) = %v", pg, got)
		}
	}
}

func TestBufferWriteAndZero(t *testing.T) {
	const size = 10*pageSize + 100 // a partial last page
	d := newTestDisk(size)
	model := make([]byte, size)
	check := func(what string) {
		t.Helper()
		got := make([]byte, size)
		for _, s := range d.clears {
			clear(got[s.lo*pageSize : min(s.hi*pageSize, size)])
		}
		for pg, buf := range d.pages {
			copy(got[pg*pageSize:min(pg*pageSize+pageSize, size)], buf[:])
			if end := pg*pageSize + pageSize; end > size && !bytes.Equal(buf[size-pg*pageSize:], make([]byte, end-size)) {
				t.Fatalf("%s: page %d is not zero past the disk's end", what, pg)
			}
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("%s: buffer differs from the model", what)
		}
	}
	// Clear everything first, so that partial pages need no download.
	if err := d.zero(0, size); err != nil {
		t.Fatal(err)
	}
	if len(d.pages) != 0 || !slices.Equal(d.clears, []span{{0, 11}}) {
		t.Fatalf("zeroing the whole disk buffered %d pages, clears %v", len(d.pages), d.clears)
	}
	check("zeroed")
	write := func(off int64, n int) {
		t.Helper()
		p := bytes.Repeat([]byte{byte(off) | 1}, n)
		if err := d.write(p, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
		check(fmt.Sprintf("write %d+%d", off, n))
	}
	zero := func(off, n int64) {
		t.Helper()
		if err := d.zero(off, n); err != nil {
			t.Fatal(err)
		}
		clear(model[off : off+n])
		check(fmt.Sprintf("zero %d+%d", off, n))
	}
	write(0, pageSize)
	write(100, 2000)
	write(size-100, 100) // the partial last page, whole
	write(size-50, 10)
	zero(1, 2*pageSize) // head and tail partial, one page cleared
	if !d.cleared(1) || d.pages[1] != nil {
		t.Fatalf("page 1 neither cleared nor dropped from the buffer")
	}
	write(pageSize+10, 10) // data on a cleared page
	zero(size-60, 60)      // inside the partial last page
	zero(size-100, 100)    // the partial last page: cleared whole
	if !d.cleared(10) || d.pages[10] != nil {
		t.Fatalf("last page not cleared whole")
	}
	zero(700, 100) // inside one page
	zero(1000, 100)
	if got, want := d.buffered(), int64(len(d.pages))*pageSize+int64(len(d.clears))*clearCost; got != want {
		t.Fatalf("buffered() = %d, want %d", got, want)
	}
}

// TestZeroLarge: zeroing a terabyte buffers spans, not data.
func TestZeroLarge(t *testing.T) {
	const size = 1 << 40
	d := newTestDisk(size)
	if err := d.zero(0, size); err != nil {
		t.Fatal(err)
	}
	if err := d.zero(3*pageSize+7, 1<<38); err != nil { // partial ends on cleared pages
		t.Fatal(err)
	}
	if len(d.pages) != 2 || len(d.clears) != 1 || d.buffered() > 4*pageSize {
		t.Fatalf("zeroing %d bytes buffered %d pages, %d clears", int64(size), len(d.pages), len(d.clears))
	}
}

func TestPagesUp(t *testing.T) {
	for _, c := range [][2]int64{{0, 0}, {1, 1}, {511, 1}, {512, 1}, {513, 2}, {1 << 20, 2048}} {
		if got := pagesUp(c[0]); got != c[1] {
			t.Errorf("pagesUp(%d) = %d, want %d", c[0], got, c[1])
		}
	}
}

func TestMachineLeaseBounds(t *testing.T) {
	for _, d := range []time.Duration{time.Second, 14 * time.Second, 61 * time.Second, 15500 * time.Millisecond} {
		cfg := Config{Account: "acct", Container: "vault", Key: testKey, MachineLease: d}
		if _, err := cfg.resolve(); err == nil || !strings.Contains(err.Error(), "machine lease") {
			t.Errorf("machine lease %s: %v, want a refusal", d, err)
		}
	}
	for _, d := range []time.Duration{0, 15 * time.Second, time.Minute} {
		cfg := Config{Account: "acct", Container: "vault", Key: testKey, MachineLease: d}
		if _, err := cfg.resolve(); err != nil {
			t.Errorf("machine lease %s: %v", d, err)
		}
	}
}

func TestCheckWrite(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	lost := func(answer error) error { return fmt.Errorf("lost: %w", replication.ErrLocked) }
	tg := &Target{name: "azure://acct/vault", now: clock, machines: map[string]*machineLease{},
		lock: &blobLease{what: "the write lease", secs: leaseSeconds, now: clock, renewed: now, lost: lost}}
	if err := tg.checkWrite("vault"); err != nil {
		t.Fatal(err)
	}
	now = now.Add(50 * time.Second)
	if err := tg.checkWrite("vault"); err != nil {
		t.Fatalf("at the limit: %v", err)
	}
	now = now.Add(time.Second)
	err := tg.checkWrite("vault")
	if err == nil || errors.Is(err, replication.ErrLocked) {
		t.Fatalf("lease not renewed for 51 s: %v, want a transient error", err)
	}
	tg.lock.renewed = now
	if err := tg.checkWrite("vault"); err != nil {
		t.Fatalf("after a renewal: %v", err)
	}

	// The configuration server writes a machine it has not leased (it
	// prunes and deletes); one it has leased only under that lease.
	if err := tg.checkWrite("machines/m1/segments/x"); err != nil {
		t.Fatalf("a machine not leased, with the container's lease: %v", err)
	}
	m1 := &blobLease{what: "machine m1's lease", secs: 15, now: clock, renewed: now, lost: func(error) error { return replication.ErrMachineLeased }}
	tg.machines["m1"] = &machineLease{id: "m1", bl: m1}
	if err := tg.checkWrite("machines/m1/disks/0"); err != nil {
		t.Fatal(err)
	}
	now = now.Add(13 * time.Second) // past 5/6 of 15 s
	if err := tg.checkWrite("machines/m1/disks/0"); err == nil {
		t.Fatal("a machine lease not renewed for 13 s of 15 trusted")
	}
	if err := tg.checkWrite("machines/m2/machine"); err != nil {
		t.Fatalf("another machine: %v", err)
	}

	// A process server sharing the container: only its leased machines.
	shared := &Target{name: "azure://acct/vault", now: clock, machines: map[string]*machineLease{}}
	shared.machines["m1"] = &machineLease{id: "m1", bl: &blobLease{what: "machine m1's lease", secs: 60, now: clock, renewed: now}}
	shared.machines["m3"] = &machineLease{id: "m3"} // being acquired
	if err := shared.checkWrite("machines/m1/points/p"); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"machines/m2/machine", "machines/m3/machine"} {
		if err := shared.checkWrite(k); !errors.Is(err, replication.ErrMachineLeased) {
			t.Fatalf("shared, %s not leased: %v, want ErrMachineLeased", k, err)
		}
	}
	for _, k := range []string{"vault", "groups/g/points/1", "machines/m1", "machines"} {
		if err := shared.checkWrite(k); !errors.Is(err, replication.ErrLocked) {
			t.Fatalf("shared, %s: %v, want ErrLocked", k, err)
		}
	}
	m1s := shared.machines["m1"].bl
	m1s.err = fmt.Errorf("lost: %w", replication.ErrMachineLeased)
	if err := shared.checkWrite("machines/m1/points/p"); !errors.Is(err, replication.ErrMachineLeased) {
		t.Fatalf("lease lost: %v", err)
	}

	// Write requests are bounded by the earliest expiry of their leases:
	// m1's, renewed 13 s ago for 15, before the container's.
	ctx, cancel := tg.leaseBound(t.Context(), "machines/m1/disks/0")
	if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > 2*time.Second {
		t.Fatalf("m1's write bounded by %v, %v, want m1's lease's expiry, 2 s away", dl, ok)
	}
	cancel()
	ctx, cancel = tg.leaseBound(t.Context(), "vault")
	if dl, ok := ctx.Deadline(); !ok || time.Until(dl) <= 2*time.Second {
		t.Fatalf("the vault's write bounded by %v, %v, want the container lease's expiry", dl, ok)
	}
	cancel()
	now = now.Add(3 * time.Second) // m1's lease may have lapsed
	ctx, cancel = tg.leaseBound(t.Context(), "machines/m1/disks/0")
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatalf("a write past its lease's expiry: %v, want it abandoned", ctx.Err())
	}
	cancel()
	ctx, cancel = shared.leaseBound(t.Context(), "machines/m9/machine")
	if _, ok := ctx.Deadline(); ok {
		t.Fatal("a write depending on no lease is bounded")
	}
	cancel()

	tg.lock.err = lost(nil)
	if err := tg.checkWrite("machines/m2/machine"); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("container lease lost: %v", err)
	}
}

func responseError(status int, code, body string) error {
	req, _ := http.NewRequest(http.MethodGet, "https://acct.blob.core.windows.net/vault/objects/k?sv=1&sig=secretsig", nil)
	resp := &http.Response{
		StatusCode: status,
		Status:     http.StatusText(status),
		Header:     http.Header{"X-Ms-Error-Code": {code}},
		Body:       io.NopCloser(strings.NewReader(body)),
		Request:    req,
	}
	return runtime.NewResponseError(resp)
}

func TestAzError(t *testing.T) {
	auth := azError(responseError(403, "AuthenticationFailed", `<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code><Message>Server failed to authenticate the request.
RequestId:1
Time:2026</Message></Error>`))
	if !errors.Is(auth, ErrAuth) || errors.Is(auth, replication.ErrNotFound) {
		t.Errorf("403: %v", auth)
	}
	if want := "storage account rejected the credentials (HTTP 403 AuthenticationFailed: Server failed to authenticate the request.)"; !strings.HasPrefix(auth.Error(), want) {
		t.Errorf("403 says %q, want it to start %q", auth, want)
	}
	if nf := azError(responseError(404, "BlobNotFound", "")); !errors.Is(nf, replication.ErrNotFound) || nf.Error() != "HTTP 404 BlobNotFound" {
		t.Errorf("404 BlobNotFound: %v", nf)
	}
	if cnf := azError(responseError(404, "ContainerNotFound", "")); errors.Is(cnf, replication.ErrNotFound) {
		t.Errorf("404 ContainerNotFound wraps ErrNotFound: %v", cnf)
	}
	if e := azError(responseError(500, "InternalError", "")); errors.Is(e, ErrAuth) || errors.Is(e, replication.ErrNotFound) || strings.Contains(e.Error(), "\n") {
		t.Errorf("500: %q", e)
	}
	ue := azError(&url.Error{Op: "Get", URL: "https://acct.blob.core.windows.net/vault/x?sv=1&sig=secretsig", Err: io.ErrUnexpectedEOF})
	if strings.Contains(ue.Error(), "secretsig") || !errors.Is(ue, io.ErrUnexpectedEOF) {
		t.Errorf("transport error: %v", ue)
	}
	for _, e := range []error{auth, azError(responseError(404, "BlobNotFound", ""))} {
		if strings.Contains(e.Error(), "secretsig") {
			t.Errorf("error quotes the SAS: %v", e)
		}
	}
}
