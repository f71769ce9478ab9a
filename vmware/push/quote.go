package push

import "strings"

// shellQuote quotes s as one word for a POSIX shell: in single quotes, each
// embedded single quote closed, escaped and reopened. Every value this
// package puts into a remote command goes through it, so no path, name or
// argument can end the word, start a command substitution or expand a
// variable. Words of only safe characters stay as they are, for readable
// scripts.
func shellQuote(s string) string {
	if s == "" {
		return "''"
	}
	safe := true
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("/._-:,=+@%", c)) {
			safe = false
			break
		}
	}
	if safe {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// shellJoin quotes every word and joins them with spaces.
func shellJoin(words ...string) string {
	q := make([]string, len(words))
	for i, w := range words {
		q[i] = shellQuote(w)
	}
	return strings.Join(q, " ")
}
