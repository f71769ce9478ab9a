package replication

import (
	"fmt"
	"strings"
)

// BIOSUUIDFile is where a Linux guest exposes its BIOS (SMBIOS system)
// UUID: the UUID vSphere shows as the VM's config.uuid.
const BIOSUUIDFile = "/sys/class/dmi/id/product_uuid"

// ParseBIOSUUID checks a BIOS UUID (8-4-4-4-12 hex digits, any case,
// surrounding space ignored) and returns it in lower case, as asr stores
// and compares it.
func ParseBIOSUUID(s string) (string, error) {
	u := strings.ToLower(strings.TrimSpace(s))
	if len(u) != 36 {
		return "", fmt.Errorf("BIOS UUID %q: want 8-4-4-4-12 hex digits", s)
	}
	for i, c := range u {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return "", fmt.Errorf("BIOS UUID %q: want 8-4-4-4-12 hex digits", s)
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return "", fmt.Errorf("BIOS UUID %q: want 8-4-4-4-12 hex digits", s)
			}
		}
	}
	return u, nil
}
