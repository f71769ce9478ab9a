package push

import (
	"errors"
	"fmt"
	"strings"
)

// The conditions a caller branches on. Errors from Install and Uninstall wrap
// one of them with a message that names the guest and says what to do.
var (
	// ErrConnect: the guest's SSH server could not be reached or the
	// connection broke.
	ErrConnect = errors.New("ssh connection failed")
	// ErrAuth: the guest refused the key.
	ErrAuth = errors.New("ssh authentication failed")
	// ErrHostKeyUnknown: the guest is not in the known hosts and its key was
	// not confirmed; the error is an *UnknownHostKeyError.
	ErrHostKeyUnknown = errors.New("ssh host key unknown")
	// ErrHostKeyMismatch: the guest presented a key other than the one known
	// for it. Never proceed: it may be a man-in-the-middle.
	ErrHostKeyMismatch = errors.New("ssh host key mismatch")
	// ErrNotRoot: the login user is not root and has no passwordless sudo.
	ErrNotRoot = errors.New("not root and no passwordless sudo")
	// ErrArch: the guest's architecture is not the binary's.
	ErrArch = errors.New("architecture mismatch")
	// ErrNoSpace: the install directory's file system has too little room.
	ErrNoSpace = errors.New("not enough free space")
	// ErrDiskMissing: a disk to protect is absent, or neither a block device
	// nor a regular file.
	ErrDiskMissing = errors.New("disk missing")
	// ErrUUIDMismatch: the guest's BIOS UUID is not the VM's: the SSH
	// address leads to another machine.
	ErrUUIDMismatch = errors.New("BIOS UUID mismatch")
	// ErrUUIDUnreadable: the guest's BIOS UUID could not be read.
	ErrUUIDUnreadable = errors.New("BIOS UUID unreadable")
	// ErrUnreachable: the guest cannot open a TCP connection to an address
	// the agent needs (the server's control or data listener).
	ErrUnreachable = errors.New("server unreachable from the guest")
	// ErrNotInstalled: Uninstall found a directory that holds no agent.
	ErrNotInstalled = errors.New("not an asr install directory")
)

// UnknownHostKeyError is returned when the guest's host key is neither in the
// known hosts nor the one the operator confirmed (Target.AcceptHostKey). A
// caller shows Fingerprint to the operator, who compares it with the guest's
// own (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on its console) and,
// if they match, tries again with AcceptHostKey set to it.
type UnknownHostKeyError struct {
	Host        string // Target.Addr
	Fingerprint string // "SHA256:...", as ssh-keygen -l shows it
	KeyType     string // the key's type, "ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"
	Offered     string // the AcceptHostKey given, if any (it did not match)
}

func (e *UnknownHostKeyError) Error() string {
	if e.Offered != "" {
		return fmt.Sprintf("push %s: %v: the guest presented %s, not the confirmed %s; check the guest's key on its console (%s)",
			e.Host, ErrHostKeyUnknown, e.Fingerprint, e.Offered, e.keygenHint())
	}
	return fmt.Sprintf("push %s: %v: the guest presented %s; compare it with the guest's own key "+
		"(%s on its console) and confirm it to proceed",
		e.Host, ErrHostKeyUnknown, e.Fingerprint, e.keygenHint())
}

// keygenHint is the command that shows the guest's key of e.KeyType.
func (e *UnknownHostKeyError) keygenHint() string {
	name := "ed25519"
	switch {
	case strings.HasPrefix(e.KeyType, "ecdsa-"):
		name = "ecdsa"
	case strings.HasPrefix(e.KeyType, "ssh-rsa"), strings.HasPrefix(e.KeyType, "rsa-"):
		name = "rsa"
	}
	return "ssh-keygen -lf /etc/ssh/ssh_host_" + name + "_key.pub"
}

// Unwrap makes errors.Is(err, ErrHostKeyUnknown) true.
func (e *UnknownHostKeyError) Unwrap() error { return ErrHostKeyUnknown }
