// Package smtptest is a small SMTP server for tests: it accepts mail on a
// loopback port, offers STARTTLS (with a certificate it makes) and AUTH
// PLAIN and LOGIN when asked, refuses the recipients it is told to, and
// keeps what it received. It is no mail server: the end-to-end tests use
// mailpit.
package smtptest

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"strings"
	"sync"
	"time"
)

// Mail is one message received.
type Mail struct {
	From string
	To   []string
	Data string
	TLS  bool   // sent after STARTTLS
	Auth string // the user that authenticated, "" if none
}

// Server is a running test SMTP server.
type Server struct {
	Addr string
	// CAPool trusts the STARTTLS certificate; CAPEM is that certificate
	// (self-signed) as PEM.
	CAPool *x509.CertPool
	CAPEM  []byte

	mu       sync.Mutex
	mails    []Mail
	arrived  chan struct{}
	refuse   map[string]string // recipient → the 5xx answer
	users    map[string]string // user → password; nil: no AUTH offered
	startTLS bool
	mechs    string
	tlsCfg   *tls.Config
	l        net.Listener
	wg       sync.WaitGroup
}

// Options says what the server offers.
type Options struct {
	StartTLS bool
	Users    map[string]string // offer AUTH, for these users and passwords
	Mechs    string            // the AUTH mechanisms offered (default "PLAIN LOGIN")
	Refuse   map[string]string // recipient → the answer refusing it, e.g. "550 no such user"
}

// Start starts a server on a loopback port; Close stops it.
func Start(o Options) (*Server, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &Server{Addr: l.Addr().String(), l: l, refuse: o.Refuse, users: o.Users, startTLS: o.StartTLS, mechs: o.Mechs, arrived: make(chan struct{}, 1000)}
	if s.mechs == "" {
		s.mechs = "PLAIN LOGIN"
	}
	if o.StartTLS {
		cert, pool, err := selfSigned()
		if err != nil {
			l.Close()
			return nil, err
		}
		s.tlsCfg, s.CAPool = &tls.Config{Certificates: []tls.Certificate{cert}}, pool
		s.CAPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]})
	}
	s.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.wg.Go(func() { s.serve(c) })
		}
	})
	return s, nil
}

// Close stops the server.
func (s *Server) Close() {
	s.l.Close()
	s.wg.Wait()
}

// Mails returns what was received.
func (s *Server) Mails() []Mail {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Mail(nil), s.mails...)
}

// SetRefuse replaces the recipients refused (nil: none).
func (s *Server) SetRefuse(refuse map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refuse = refuse
}

// Arrived is signalled once per mail received.
func (s *Server) Arrived() <-chan struct{} { return s.arrived }

func (s *Server) serve(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	r, w := bufio.NewReader(c), bufio.NewWriter(c)
	say := func(format string, args ...any) {
		fmt.Fprintf(w, format+"\r\n", args...)
		w.Flush()
	}
	say("220 smtptest ready")
	var m Mail
	inTLS := false
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimRight(line, "\r\n")
		verb, arg, _ := strings.Cut(line, " ")
		switch strings.ToUpper(verb) {
		case "EHLO", "HELO":
			fmt.Fprintf(w, "250-smtptest\r\n")
			if s.startTLS && !inTLS {
				fmt.Fprintf(w, "250-STARTTLS\r\n")
			}
			if s.users != nil {
				fmt.Fprintf(w, "250-AUTH %s\r\n", s.mechs)
			}
			say("250 8BITMIME")
		case "STARTTLS":
			if !s.startTLS || inTLS {
				say("502 not offered")
				continue
			}
			say("220 go ahead")
			tc := tls.Server(c, s.tlsCfg)
			if err := tc.Handshake(); err != nil {
				return
			}
			c, inTLS = tc, true
			r, w = bufio.NewReader(tc), bufio.NewWriter(tc)
		case "AUTH":
			user, ok := s.auth(arg, r, say)
			if !ok {
				say("535 authentication failed")
				continue
			}
			m.Auth = user
			say("235 authenticated")
		case "MAIL":
			from, _, _ := strings.Cut(strings.TrimPrefix(arg, "FROM:"), " ")
			m.From, m.To, m.Data = strings.Trim(from, "<>"), nil, ""
			if s.users != nil && m.Auth == "" {
				say("530 authentication required")
				continue
			}
			say("250 ok")
		case "RCPT":
			to, _, _ := strings.Cut(strings.TrimPrefix(arg, "TO:"), " ")
			to = strings.Trim(to, "<>")
			s.mu.Lock()
			msg, ok := s.refuse[to]
			s.mu.Unlock()
			if ok {
				say("%s", msg)
				continue
			}
			m.To = append(m.To, to)
			say("250 ok")
		case "DATA":
			say("354 end with .")
			var b strings.Builder
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
				b.WriteString(strings.TrimPrefix(l, "."))
			}
			m.Data, m.TLS = b.String(), inTLS
			s.mu.Lock()
			s.mails = append(s.mails, m)
			s.mu.Unlock()
			select {
			case s.arrived <- struct{}{}:
			default:
			}
			say("250 queued")
		case "RSET", "NOOP":
			say("250 ok")
		case "QUIT":
			say("221 bye")
			return
		default:
			say("500 unknown command")
		}
	}
}

func (s *Server) auth(arg string, r *bufio.Reader, say func(string, ...any)) (string, bool) {
	mech, rest, _ := strings.Cut(arg, " ")
	readLine := func() string {
		l, _ := r.ReadString('\n')
		b, _ := base64.StdEncoding.DecodeString(strings.TrimSpace(l))
		return string(b)
	}
	var user, pass string
	switch strings.ToUpper(mech) {
	case "PLAIN":
		b, err := base64.StdEncoding.DecodeString(rest)
		if rest == "" {
			say("334 ")
			b, err = base64.StdEncoding.DecodeString(strings.TrimSpace(readLineRaw(r)))
		}
		if err != nil {
			return "", false
		}
		parts := strings.Split(string(b), "\x00")
		if len(parts) != 3 {
			return "", false
		}
		user, pass = parts[1], parts[2]
	case "LOGIN":
		say("334 %s", base64.StdEncoding.EncodeToString([]byte("Username:")))
		user = readLine()
		say("334 %s", base64.StdEncoding.EncodeToString([]byte("Password:")))
		pass = readLine()
	default:
		return "", false
	}
	want, ok := s.users[user]
	return user, ok && want == pass
}

func readLineRaw(r *bufio.Reader) string {
	l, _ := r.ReadString('\n')
	return l
}

func selfSigned() (tls.Certificate, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, IsCA: true, BasicConstraintsValid: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool, nil
}
