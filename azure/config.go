package azure

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
)

// Environment variables ParseURL reads, named as the Azure CLI names them.
const (
	EnvConnectionString = "AZURE_STORAGE_CONNECTION_STRING"
	EnvAccount          = "AZURE_STORAGE_ACCOUNT"
	EnvKey              = "AZURE_STORAGE_KEY"
	EnvSAS              = "AZURE_STORAGE_SAS_TOKEN"
)

// Azurite's well-known development account, which a connection string of
// "UseDevelopmentStorage=true" names.
const (
	devAccount  = "devstoreaccount1"
	devKey      = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
	devEndpoint = "http://127.0.0.1:10000/devstoreaccount1"
)

// Config says which container a Target uses and how to reach it. It holds
// secrets (Key, SAS, ConnectionString): String prints only the target's URL,
// and no error of this package quotes them.
type Config struct {
	// Account is the storage account name.
	Account string
	// Container is the blob container that holds the vault.
	Container string
	// ConnectionString, if set, supplies what the fields below leave empty:
	// AccountKey, SharedAccessSignature and the blob endpoint (BlobEndpoint,
	// or DefaultEndpointsProtocol and EndpointSuffix).
	ConnectionString string
	// Key is the account's shared key (base64); SAS a shared access
	// signature token. Key wins when both are set.
	Key string
	SAS string
	// Endpoint is the blob service URL, https://ACCOUNT.blob.core.windows.net
	// by default. Plain http is accepted only to a loopback host (Azurite).
	Endpoint string
	// LeaseID is the ID proposed for the container's write lease, a UUID.
	// A server that keeps it across restarts takes its own lease back at
	// once instead of waiting for it to expire. Empty: a random one.
	LeaseID string
	// NoCreate makes Open create nothing: the container must hold a vault
	// already (its format blob), else Open fails with an error wrapping
	// replication.ErrNotFound. Readers of a target open it so, and a
	// mistyped container name does not become an empty vault.
	NoCreate bool
	// Shared opens a container the configuration server holds, for a
	// scale-out process server: it takes no lease on the container and
	// creates nothing (as NoCreate), and writes only the blobs of the
	// machines whose lease it holds (Target.LeaseMachine).
	Shared bool
	// MachineLease is the duration of a machine's lease, 15 to 60 s
	// (whole seconds, the service's bounds); 0 is DefaultMachineLease.
	MachineLease time.Duration
}

// String returns "azure://ACCOUNT/CONTAINER", without secrets.
func (c Config) String() string { return "azure://" + c.Account + "/" + c.Container }

// GoString keeps %#v from printing the secrets too.
func (c Config) GoString() string { return "azure.Config(" + strconv.Quote(c.String()) + ")" }

// ParseURL parses "azure://ACCOUNT/CONTAINER" and takes the credentials from
// the environment through getenv: AZURE_STORAGE_CONNECTION_STRING, or
// AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN, with AZURE_STORAGE_ACCOUNT,
// if set, naming the same account as the URL. The Config it returns is
// complete (endpoint and credentials resolved) and checked.
func ParseURL(raw string, getenv func(string) string) (Config, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "azure" {
		return Config{}, errors.New("azure target: want a URL of the form azure://ACCOUNT/CONTAINER")
	}
	if u.User != nil {
		// Do not quote raw: it holds what looks like a secret.
		return Config{}, fmt.Errorf("azure target: the URL must not hold credentials; set %s, or %s or %s, instead", EnvConnectionString, EnvKey, EnvSAS)
	}
	if u.Port() != "" || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		// Not quoted either: a query may be a SAS token pasted with the URL.
		return Config{}, fmt.Errorf("azure target: want azure://ACCOUNT/CONTAINER, with no port, query or fragment (another endpoint comes from %s)", EnvConnectionString)
	}
	cfg := Config{Account: u.Host, Container: strings.TrimSuffix(strings.TrimPrefix(u.Path, "/"), "/")}
	if strings.Contains(cfg.Container, "/") {
		return Config{}, fmt.Errorf("azure target %q: want azure://ACCOUNT/CONTAINER, with nothing after the container", raw)
	}
	if err := checkAccount(cfg.Account); err != nil {
		return Config{}, fmt.Errorf("azure target %s: %w", cfg, err)
	}
	if cs := getenv(EnvConnectionString); cs != "" {
		cfg.ConnectionString = cs
	} else {
		if a := getenv(EnvAccount); a != "" && a != cfg.Account {
			return Config{}, fmt.Errorf("azure target %s: %s names account %q, the URL %q; the credentials in the environment are for another account", cfg, EnvAccount, a, cfg.Account)
		}
		cfg.Key, cfg.SAS = getenv(EnvKey), getenv(EnvSAS)
	}
	return cfg.resolve()
}

// resolve fills the endpoint and credentials in from the connection string
// and defaults, and checks everything.
func (c Config) resolve() (Config, error) {
	var proto, suffix string
	if c.ConnectionString != "" {
		cs, err := parseConnectionString(c.ConnectionString)
		if err != nil {
			return Config{}, fmt.Errorf("azure target %s: %w", c, err)
		}
		if cs.account != "" {
			if c.Account == "" {
				c.Account = cs.account
			} else if c.Account != cs.account {
				return Config{}, fmt.Errorf("azure target %s: the connection string is for account %q, not %q", c, cs.account, c.Account)
			}
		}
		if c.Key == "" {
			c.Key = cs.key
		}
		if c.SAS == "" {
			c.SAS = cs.sas
		}
		if c.Endpoint == "" {
			c.Endpoint = cs.endpoint
		}
		proto, suffix = cs.proto, cs.suffix
	}
	if err := checkAccount(c.Account); err != nil {
		return Config{}, fmt.Errorf("azure target %s: %w", c, err)
	}
	if err := checkContainer(c.Container); err != nil {
		return Config{}, fmt.Errorf("azure target %s: %w", c, err)
	}
	if c.Endpoint == "" {
		if proto == "" {
			proto = "https"
		}
		if suffix == "" {
			suffix = "core.windows.net"
		}
		c.Endpoint = proto + "://" + c.Account + ".blob." + suffix
	}
	c.Endpoint = strings.TrimSuffix(c.Endpoint, "/")
	if err := checkEndpoint(c.Endpoint); err != nil {
		return Config{}, fmt.Errorf("azure target %s: %w", c, err)
	}
	c.SAS = strings.TrimPrefix(c.SAS, "?")
	switch {
	case c.Key != "":
		if _, err := base64.StdEncoding.DecodeString(c.Key); err != nil {
			return Config{}, fmt.Errorf("azure target %s: the account key is not base64 (is it the whole key, as the portal shows it?)", c)
		}
	case c.SAS != "":
		if q, err := url.ParseQuery(c.SAS); err != nil || q.Get("sig") == "" {
			return Config{}, fmt.Errorf("azure target %s: the SAS token is not one (no sig parameter)", c)
		}
	default:
		return Config{}, fmt.Errorf("azure target %s: no credentials: set %s, or %s or %s", c, EnvConnectionString, EnvKey, EnvSAS)
	}
	if c.MachineLease != 0 && c.MachineLease < 15*time.Second || c.MachineLease > 60*time.Second || c.MachineLease%time.Second != 0 {
		return Config{}, fmt.Errorf("azure target %s: machine lease %s: want whole seconds from 15 to 60", c, c.MachineLease)
	}
	if c.LeaseID != "" {
		if _, err := uuid.Parse(c.LeaseID); err != nil {
			return Config{}, fmt.Errorf("azure target %s: lease ID %q is not a UUID", c, c.LeaseID)
		}
	}
	return c, nil
}

// connString is what a storage connection string says about the blob service.
type connString struct {
	account, key, sas, endpoint, proto, suffix string
}

// parseConnectionString reads "Key=Value;..." pairs. Errors never quote the
// string, which holds the secrets.
func parseConnectionString(s string) (connString, error) {
	var cs connString
	for part := range strings.SplitSeq(s, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			return connString{}, errors.New("connection string: a part has no '='")
		}
		switch strings.ToLower(k) {
		case "accountname":
			cs.account = v
		case "accountkey":
			cs.key = v
		case "sharedaccesssignature":
			cs.sas = v
		case "blobendpoint":
			cs.endpoint = v
		case "defaultendpointsprotocol":
			cs.proto = strings.ToLower(v)
		case "endpointsuffix":
			cs.suffix = v
		case "usedevelopmentstorage":
			if strings.EqualFold(v, "true") {
				cs.account, cs.key, cs.endpoint = devAccount, devKey, devEndpoint
			}
		}
	}
	if cs.proto != "" && cs.proto != "https" && cs.proto != "http" {
		return connString{}, fmt.Errorf("connection string: DefaultEndpointsProtocol %q is neither https nor http", cs.proto)
	}
	return cs, nil
}

// checkAccount applies Azure's rule for storage account names: 3 to 24
// lowercase letters and digits.
func checkAccount(a string) error {
	if len(a) < 3 || len(a) > 24 {
		return fmt.Errorf("storage account name %q: want 3 to 24 lowercase letters and digits", a)
	}
	for i := 0; i < len(a); i++ {
		if c := a[i]; !('a' <= c && c <= 'z' || '0' <= c && c <= '9') {
			return fmt.Errorf("storage account name %q: want 3 to 24 lowercase letters and digits", a)
		}
	}
	return nil
}

// checkContainer applies Azure's rules for container names: 3 to 63
// lowercase letters, digits and hyphens, starting and ending with a letter or
// digit, with no two hyphens in a row.
func checkContainer(name string) error {
	bad := len(name) < 3 || len(name) > 63 || name[0] == '-' || name[len(name)-1] == '-' || strings.Contains(name, "--")
	for i := 0; i < len(name) && !bad; i++ {
		c := name[i]
		bad = !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-')
	}
	if bad {
		return fmt.Errorf("container name %q: want 3 to 63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit", name)
	}
	return nil
}

// checkEndpoint requires https, or http to a loopback host: the credentials
// and the data must not cross a network in clear.
func checkEndpoint(ep string) error {
	u, err := url.Parse(ep)
	if err != nil || u.User != nil || u.RawQuery != "" {
		// Not quoted: it may hold a secret.
		return errors.New("blob endpoint: want https://HOST[:PORT][/PATH], with no credentials or query")
	}
	if u.Host == "" || u.Fragment != "" {
		return fmt.Errorf("blob endpoint %q: want https://HOST[:PORT][/PATH]", ep)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopback(u.Hostname()) {
			return nil
		}
		return fmt.Errorf("blob endpoint %q: plain http is allowed only to a loopback host (127.0.0.0/8, ::1, localhost, as for Azurite); use https", ep)
	default:
		return fmt.Errorf("blob endpoint %q: want an https URL", ep)
	}
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
