package azure

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"

	"github.com/asrdr/asr/azure/fakearm"
	"github.com/asrdr/asr/replication"
)

func TestCloudARMOptions(t *testing.T) {
	if o, err := (Cloud{}).ARMOptions(); o != nil || err != nil {
		t.Fatalf("the public cloud: %v %v, want the SDK's defaults (nil)", o, err)
	}
	if o, err := (Cloud{Name: "public"}).ARMOptions(); o != nil || err != nil {
		t.Fatalf("public by name: %v %v", o, err)
	}
	gov, err := Cloud{Name: "usgovernment"}.ARMOptions()
	if err != nil || gov.Cloud.ActiveDirectoryAuthorityHost != cloud.AzureGovernment.ActiveDirectoryAuthorityHost ||
		gov.Cloud.Services[cloud.ResourceManager].Endpoint != "https://management.usgovcloudapi.net" {
		t.Fatalf("Azure Government: %+v %v", gov, err)
	}
	custom, err := Cloud{Name: "china", ARMEndpoint: "https://arm.example.test/", AuthorityHost: "https://login.example.test"}.ARMOptions()
	if err != nil || custom.Cloud.Services[cloud.ResourceManager] != (cloud.ServiceConfiguration{Endpoint: "https://arm.example.test", Audience: "https://arm.example.test"}) ||
		custom.Cloud.ActiveDirectoryAuthorityHost != "https://login.example.test/" {
		t.Fatalf("another endpoint: %+v %v", custom, err)
	}
	// The shared cloud configurations are not changed.
	if cloud.AzureChina.Services[cloud.ResourceManager].Endpoint != "https://management.chinacloudapi.cn" {
		t.Fatalf("azcore's AzureChina changed: %+v", cloud.AzureChina.Services)
	}
	dir := t.TempDir()
	noPEM := filepath.Join(dir, "no.pem")
	os.WriteFile(noPEM, []byte("not a certificate\n"), 0o600)
	for _, c := range []Cloud{
		{Name: "mars"},
		{ARMEndpoint: "http://arm.example.test"},
		{ARMEndpoint: "https://arm.example.test/?x=1"},
		{ARMEndpoint: "arm.example.test"},
		{AuthorityHost: "ftp://login.example.test"},
		{CAFile: filepath.Join(dir, "missing.pem")},
		{CAFile: noPEM},
	} {
		if o, err := c.ARMOptions(); err == nil {
			t.Errorf("%+v: accepted as %+v", c, o)
		}
	}
}

// The production credential path against the fake ARM served over
// HTTPS: DefaultAzureCredential from the environment gets a token from
// the fake tenant's endpoint (no instance discovery: its host is not
// Microsoft's), over the CA file's trust, and the ARM calls (a failover,
// long-running operations polled, a test failover's deletion) go with it.
func TestCloudServedFakeARM(t *testing.T) {
	f := fakearm.New(t)
	s := fakearm.Serve(t, f)
	for _, kv := range s.Env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	opts, err := Cloud{ARMEndpoint: s.URL, AuthorityHost: s.URL, CAFile: s.CAFile}.ARMOptions()
	if err != nil {
		t.Fatal(err)
	}
	cred, err := NewCredential(opts)
	if err != nil {
		t.Fatal(err)
	}
	spec := testSpec()
	spec.Test = true
	res, err := FailoverToAzure(t.Context(), cred, opts, spec, testDisks(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := f.Resources(); !slices.Contains(got, "vm dr-rg/web01") || len(got) != 5 {
		t.Fatalf("after the failover over HTTPS: %v", got)
	}
	if err := DeleteFailover(t.Context(), cred, opts, res); err != nil {
		t.Fatal(err)
	}
	if got := f.Resources(); len(got) != 0 {
		t.Fatalf("after its deletion: %v", got)
	}
	vm, err := OpenRecoveredVM(cred, opts, FailoverResult{Subscription: testSub, ResourceGroup: testRG, VMName: "gone", VMID: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Disks(t.Context()); !errors.Is(err, replication.ErrNotFound) {
		t.Fatalf("a missing VM: %v, want ErrNotFound", err)
	}
	if issued, refused := s.Tokens(); issued == 0 || refused != 0 {
		t.Fatalf("%d tokens issued, %d requests refused", issued, refused)
	}

	// Without the CA file the server is not trusted; with another
	// client's secret no token is issued: nothing reaches the fake.
	calls := f.Calls()
	plain, _ := Cloud{ARMEndpoint: s.URL, AuthorityHost: s.URL}.ARMOptions()
	plain.Retry.MaxRetries = -1 // a certificate error is not retried by the test's patience
	c2, err := NewCredential(plain)
	if err == nil {
		_, err = FailoverToAzure(t.Context(), c2, plain, testSpec(), testDisks(), nil)
	}
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("an untrusted server: %v", err)
	}
	t.Setenv("AZURE_CLIENT_SECRET", "wrong")
	c3, err := NewCredential(opts)
	if err == nil {
		_, err = FailoverToAzure(t.Context(), c3, opts, testSpec(), testDisks(), nil)
	}
	if err == nil || !strings.Contains(err.Error(), "invalid_client") {
		t.Fatalf("a wrong secret: %v", err)
	}
	if f.Calls() != calls {
		t.Fatalf("%d calls reached the fake without a trusted server and a token", f.Calls()-calls)
	}
}
