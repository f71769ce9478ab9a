package azure

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
)

// Cloud says which Azure a failover to Azure (and its failback) talks
// to: Azure Resource Manager's endpoint and Microsoft Entra ID's
// authority. The zero value is the public cloud, as the SDK's defaults.
//
// The national clouds (Azure Government, Azure China 21Vianet) have
// their own ARM endpoint, token audience and authority: Name selects
// them. ARMEndpoint and AuthorityHost point either somewhere else, with
// CAFile for a certificate no system CA signed: a disconnected cloud, or
// the tests, which run the real binary against the Azure SDK's fake ARM
// servers behind a loopback HTTPS server (azure/fakearm) that also
// serves the token endpoint.
//
// Only the SDK's fake ARM has been reached this way: no national cloud,
// and no real Azure at all (see failover.go).
type Cloud struct {
	// Name is "public" (or ""), "usgovernment" or "china": azcore's
	// cloud.AzurePublic, AzureGovernment or AzureChina.
	Name string
	// ARMEndpoint, if set, is ARM's base URL (https) instead of the
	// cloud's; the tokens asked for it have the URL as their audience.
	ARMEndpoint string
	// AuthorityHost, if set, is Microsoft Entra ID's base URL (https)
	// instead of the cloud's. Its tokens come without Microsoft's
	// instance discovery (which knows only Microsoft's hosts), as for a
	// disconnected cloud.
	AuthorityHost string
	// CAFile, if set, is a PEM file of CA certificates trusted, besides
	// the system's, by the connections to ARM and the authority.
	CAFile string
}

// knownAuthorities are the authority hosts Microsoft's instance
// discovery knows.
var knownAuthorities = []string{cloud.AzurePublic.ActiveDirectoryAuthorityHost, cloud.AzureGovernment.ActiveDirectoryAuthorityHost, cloud.AzureChina.ActiveDirectoryAuthorityHost}

// ARMOptions checks c and returns the ARM client options that reach its
// cloud (nil for the public cloud with the system's CAs: the SDK's
// defaults). A bad URL, an unknown name or a CA file with no
// certificate is an error.
func (c Cloud) ARMOptions() (*arm.ClientOptions, error) {
	var cfg cloud.Configuration
	switch strings.ToLower(c.Name) {
	case "", "public", "azurepublic":
		if c.ARMEndpoint == "" && c.AuthorityHost == "" && c.CAFile == "" {
			return nil, nil
		}
		cfg = cloud.AzurePublic
	case "usgovernment", "azuregovernment", "usgov":
		cfg = cloud.AzureGovernment
	case "china", "azurechina":
		cfg = cloud.AzureChina
	default:
		return nil, fmt.Errorf("Azure cloud %q: want public, usgovernment or china", c.Name)
	}
	// The clouds' Services maps are shared: change a copy.
	cfg.Services = maps.Clone(cfg.Services)
	if c.ARMEndpoint != "" {
		u, err := httpsURL("ARM endpoint", c.ARMEndpoint)
		if err != nil {
			return nil, err
		}
		cfg.Services[cloud.ResourceManager] = cloud.ServiceConfiguration{Endpoint: u, Audience: u}
	}
	if c.AuthorityHost != "" {
		u, err := httpsURL("authority host", c.AuthorityHost)
		if err != nil {
			return nil, err
		}
		cfg.ActiveDirectoryAuthorityHost = u + "/"
	}
	opts := &arm.ClientOptions{ClientOptions: azcore.ClientOptions{Cloud: cfg}}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("Azure CA file: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("Azure CA file %s: no PEM certificate in it", c.CAFile)
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		opts.Transport = &http.Client{Transport: tr}
	}
	return opts, nil
}

// httpsURL checks an https base URL (no query, no fragment) and returns
// it without its trailing slash.
func httpsURL(what, s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", fmt.Errorf("Azure %s %q: want an https URL such as https://management.usgovcloudapi.net", what, s)
	}
	return strings.TrimSuffix(u.String(), "/"), nil
}

// NewCredential returns the credential of the production path:
// azidentity's DefaultAzureCredential, which tries the environment
// (AZURE_TENANT_ID, AZURE_CLIENT_ID and a secret or certificate), workload
// identity, a managed identity, then the Azure CLI's and azd's logins. It
// asks for tokens from the authority and over the transport of opts
// (ARMOptions; nil: the public cloud).
func NewCredential(opts *arm.ClientOptions) (azcore.TokenCredential, error) {
	o := &azidentity.DefaultAzureCredentialOptions{}
	if opts != nil {
		o.ClientOptions = opts.ClientOptions
		host := opts.Cloud.ActiveDirectoryAuthorityHost
		o.DisableInstanceDiscovery = host != "" && !containsFold(knownAuthorities, host)
	}
	cred, err := azidentity.NewDefaultAzureCredential(o)
	if err != nil {
		return nil, fmt.Errorf("azure credential: %w", err)
	}
	return cred, nil
}

func containsFold(list []string, s string) bool {
	for _, x := range list {
		if strings.EqualFold(x, s) {
			return true
		}
	}
	return false
}
