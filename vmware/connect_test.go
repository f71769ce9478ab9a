package vmware

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/vmware/govmomi/vim25/soap"
)

func TestThumbprint(t *testing.T) {
	s := mustSim(t)
	got, err := Thumbprint(ctxT(t), s.ep.URL)
	if err != nil {
		t.Fatal(err)
	}
	// govmomi's own formatter is the independent reference.
	if want := soap.ThumbprintSHA256(s.server.Certificate()); got != want {
		t.Fatalf("Thumbprint %s, want %s", got, want)
	}
	if len(got) != 64+31 || strings.ToUpper(got) != got {
		t.Fatalf("Thumbprint %q: not 32 upper-case pairs", got)
	}
	if _, err := Thumbprint(ctxT(t), "http://example.invalid/sdk"); err == nil {
		t.Fatal("Thumbprint accepted an http URL")
	}
}

func TestNormalizeThumbprint(t *testing.T) {
	const want = "0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9:0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9"
	plain := strings.ReplaceAll(want, ":", "")
	tests := []struct {
		name, in string
		ok       bool
	}{
		{"as vCenter shows it", want, true},
		{"lower case", strings.ToLower(want), true},
		{"no colons", plain, true},
		{"no colons, lower", strings.ToLower(plain), true},
		{"SHA256 prefix", "SHA256:" + want, true},
		{"sha256 prefix, spaces", "  sha256: " + strings.ToLower(plain) + " ", true},
		{"spaces between pairs", strings.ReplaceAll(want, ":", " "), true},
		{"base64 after the prefix", "SHA256:ChssPU5fYHGCk6S1xtfo+QobLD1OX2BxgpOktcbX6Pk", true},
		{"padded base64", "SHA256:ChssPU5fYHGCk6S1xtfo+QobLD1OX2BxgpOktcbX6Pk=", true},
		{"empty", "", false},
		{"prefix only", "SHA256:", false},
		{"SHA-1", "0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9:0A:1B:2C:3D", false},
		{"one byte short", want[:len(want)-3], false},
		{"one byte long", want + ":00", false},
		{"odd digits", plain + "0", false},
		{"not hex", strings.Replace(want, "0A", "0G", 1), false},
		{"base64 without the prefix", "ChssPU5fYHGCk6S1xtfo+QobLD1OX2BxgpOktcbX6Pk", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := NormalizeThumbprint(tt.in)
			if !tt.ok {
				if err == nil {
					t.Fatalf("NormalizeThumbprint(%q) = %q, want an error", tt.in, got)
				}
				return
			}
			if err != nil || got != want {
				t.Fatalf("NormalizeThumbprint(%q) = %q, %v; want %s", tt.in, got, err, want)
			}
		})
	}
	if _, err := NormalizeThumbprint(want[:59]); err == nil || !strings.Contains(err.Error(), "SHA-1") {
		t.Fatalf("a SHA-1 thumbprint is not named as one: %v", err)
	}
}

// FuzzNormalizeThumbprint: whatever the input, a result is in vCenter's
// form and normalizing it again changes nothing.
func FuzzNormalizeThumbprint(f *testing.F) {
	f.Add("0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9")
	f.Add("SHA256:ChssPU5fYHGCk6S1xtfo+QobLD1OX2BxgpOktcbX6Pk")
	f.Add("AB:CD")
	f.Fuzz(func(t *testing.T, in string) {
		got, err := NormalizeThumbprint(in)
		if err != nil {
			return
		}
		if len(got) != 95 || strings.ToUpper(got) != got {
			t.Fatalf("%q -> %q", in, got)
		}
		if again, err := NormalizeThumbprint(got); err != nil || again != got {
			t.Fatalf("%q -> %q -> %q, %v", in, got, again, err)
		}
	})
}

func TestConnectPinned(t *testing.T) {
	s := mustSim(t)
	ctx := ctxT(t)

	// The right thumbprint, in the operator's lower-case form.
	ep := s.ep
	ep.Thumbprint = strings.ToLower(strings.ReplaceAll(ep.Thumbprint, ":", ""))
	c, err := Connect(ctx, ep)
	if err != nil {
		t.Fatalf("Connect with the right thumbprint: %v", err)
	}
	if about := c.ServiceContent.About.FullName; !strings.Contains(about, "vCenter") {
		t.Fatalf("About %q", about)
	}
	if err := c.Logout(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestConnectThumbprintMismatch(t *testing.T) {
	s := mustSim(t)
	ep := s.ep
	const wrong = "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF"
	ep.Thumbprint = wrong
	_, err := Connect(ctxT(t), ep)
	if !errors.Is(err, ErrThumbprintMismatch) {
		t.Fatalf("Connect with a wrong thumbprint: %v, want ErrThumbprintMismatch", err)
	}
	var me *ThumbprintMismatchError
	if !errors.As(err, &me) || me.Got != s.ep.Thumbprint || me.Want != wrong {
		t.Fatalf("mismatch error %#v", me)
	}
	host := s.server.URL.Host
	want := "the certificate of " + host + " changed: expected " + wrong + ", got " + s.ep.Thumbprint +
		"; verify and re-register with --thumbprint " + s.ep.Thumbprint
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("message %q\nwant it to contain %q", err, want)
	}
}

func TestConnectRefusesUnpinned(t *testing.T) {
	s := mustSim(t)
	for _, tp := range []string{"", "  "} {
		ep := s.ep
		ep.Thumbprint = tp
		if _, err := Connect(ctxT(t), ep); !errors.Is(err, ErrNoThumbprint) {
			t.Fatalf("Connect with thumbprint %q: %v, want ErrNoThumbprint", tp, err)
		}
	}
	ep := s.ep
	ep.Thumbprint = "12:34"
	if _, err := Connect(ctxT(t), ep); err == nil {
		t.Fatal("Connect with a malformed thumbprint succeeded")
	}
}

func TestConnectBadLogin(t *testing.T) {
	s := mustSim(t)
	ep := s.ep
	const wrong = "Wr0ng-Secret-Passw0rd"
	ep.Password = wrong
	_, err := Connect(ctxT(t), ep)
	if !errors.Is(err, ErrLogin) {
		t.Fatalf("Connect with a wrong password: %v, want ErrLogin", err)
	}
	if strings.Contains(err.Error(), wrong) {
		t.Fatalf("the error shows the password: %v", err)
	}
	if !strings.Contains(err.Error(), `"admin"`) {
		t.Fatalf("the error does not name the user: %v", err)
	}
}

func TestConnectURL(t *testing.T) {
	s := mustSim(t)
	tests := []struct{ name, url string }{
		{"user information", strings.Replace(s.ep.URL, "https://", "https://admin:"+testPassword+"@", 1)},
		{"http", strings.Replace(s.ep.URL, "https://", "http://", 1)},
		{"no host", "https:///sdk"},
		{"not a URL", "https://[::1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ep := s.ep
			ep.URL = tt.url
			_, err := Connect(ctxT(t), ep)
			if err == nil {
				t.Fatalf("Connect(%q) succeeded", tt.url)
			}
			if strings.Contains(err.Error(), testPassword) {
				t.Fatalf("the error shows the password: %v", err)
			}
		})
	}
	// No path: /sdk is implied.
	ep := s.ep
	ep.URL = strings.TrimSuffix(ep.URL, "/sdk")
	c, err := Connect(ctxT(t), ep)
	if err != nil {
		t.Fatalf("Connect without /sdk: %v", err)
	}
	_ = c.Logout(ctxT(t))
}

func TestEndpointNeverShowsThePassword(t *testing.T) {
	ep := Endpoint{Name: "vc1", URL: "https://vc.example/sdk", User: "admin", Password: testPassword}
	var buf syncBuffer
	testLogger(&buf).Info("endpoint", "ep", ep)
	for _, out := range []string{buf.String(), fmt.Sprint(ep), fmt.Sprintf("%+v", ep), fmt.Sprintf("%s", ep)} {
		if strings.Contains(out, testPassword) || !strings.Contains(out, "vc1") {
			t.Errorf("%q", out)
		}
	}
}
