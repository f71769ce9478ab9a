package replication

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestPolicyRules(t *testing.T) {
	ok := DefaultPolicy()
	if err := ok.Validate(TierStandard); err != nil {
		t.Fatalf("default policy: %v", err)
	}
	if err := ok.Validate(TierPremium); err != nil {
		t.Fatalf("default policy on premium: %v", err)
	}
	h := time.Hour
	cases := []struct {
		name  string
		tier  string
		edit  func(p *Policy)
		field string // "" = valid
	}{
		{"retention 72h standard", TierStandard, func(p *Policy) { p.Retention = 72 * h }, ""},
		{"retention 73h standard", TierStandard, func(p *Policy) { p.Retention = 73 * h }, "retention"},
		{"retention 25h premium", TierPremium, func(p *Policy) { p.Retention = 25 * h }, "retention"},
		{"retention 0", TierStandard, func(p *Policy) { p.Retention = 0 }, "retention"},
		{"app off", TierStandard, func(p *Policy) { p.AppFrequency = 0 }, ""},
		{"app 30m", TierStandard, func(p *Policy) { p.AppFrequency = 30 * time.Minute }, "app-consistent frequency"},
		{"app 13h", TierStandard, func(p *Policy) { p.AppFrequency = 13 * h }, "app-consistent frequency"},
		{"app not shorter than retention", TierStandard, func(p *Policy) { p.Retention = 4 * h; p.AppFrequency = 4 * h; p.PITWindow = h }, "app-consistent frequency"},
		{"crash 5s", TierStandard, func(p *Policy) { p.CrashInterval = 5 * time.Second }, ""},
		{"crash 4s", TierStandard, func(p *Policy) { p.CrashInterval = 4 * time.Second }, "crash-consistent interval"},
		{"crash 6m", TierStandard, func(p *Policy) { p.CrashInterval = 6 * time.Minute }, "crash-consistent interval"},
		{"pit over retention", TierStandard, func(p *Policy) { p.PITWindow = 25 * h }, "any-point-in-time window"},
		{"rpo 0", TierStandard, func(p *Policy) { p.RPOThreshold = 0 }, "rpo threshold"},
		{"bad name", TierStandard, func(p *Policy) { p.Name = "../x" }, "name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := DefaultPolicy()
			c.edit(&p)
			err := p.Validate(c.tier)
			if c.field == "" {
				if err != nil {
					t.Fatalf("valid policy rejected: %v", err)
				}
				return
			}
			var pe *PolicyError
			if !errors.As(err, &pe) || pe.Field != c.field || !errors.Is(err, ErrInvalidPolicy) {
				t.Fatalf("got %v, want a %s error", err, c.field)
			}
			if !strings.Contains(err.Error(), c.field) {
				t.Fatalf("error %q does not name the rule's field", err)
			}
		})
	}
}

// A failback policy has ASR's failback defaults whatever its replication
// policy's settings, and they are valid on either tier.
func TestDefaultFailbackPolicy(t *testing.T) {
	p := DefaultFailbackPolicy("gold")
	if p.Name != "gold-failback" || p.FailbackOf != "gold" || p.RPOThreshold != 15*time.Minute || p.Retention != 24*time.Hour ||
		p.AppFrequency != time.Hour || p.CrashInterval != 5*time.Minute || p.PITWindow != time.Hour {
		t.Fatalf("failback defaults %+v", p)
	}
	for _, tier := range []string{TierStandard, TierPremium} {
		if err := p.Validate(tier); err != nil {
			t.Fatalf("failback defaults on %s: %v", tier, err)
		}
	}
	if err := DefaultFailbackPolicy(strings.Repeat("x", 60)).Validate(TierStandard); err == nil {
		t.Fatal("a failback name over 64 characters accepted")
	}
	if n := FailbackNotes(); len(n) != 5 {
		t.Fatalf("notes %q: want one per setting", n)
	}
}
