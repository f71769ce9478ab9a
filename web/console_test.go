package web

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/asrdr/asr/server/api"
)

// fakeConsole is the alerts, events, history, tag, policy and group part of
// fakeBackend. Its policies are checked like the server checks them (a
// malformed duration, a crash interval out of 5s..5m, a name taken, a
// rename) and a refused one changes nothing.
type fakeConsole struct {
	history     map[string][]api.HistorySample // machine -> samples
	tags        []string                       // "machine crash|app" of each Tag
	tagErr      error
	assigned    []string // "machine=policy" of each AssignPolicy
	groupsSet   []string // "machine=group" of each SetGroup
	groupPoints map[string][]api.GroupPointJSON
	groupTags   []string
}

func (b *fakeBackend) machine(name string) (api.Machine, error) {
	for _, m := range b.machines {
		if m.Name == name {
			return m, nil
		}
	}
	return api.Machine{}, fmt.Errorf("machine %s: %w", name, ErrNotFound)
}

func (b *fakeBackend) MachineEvents(_ context.Context, machine string, limit int) ([]api.EventJSON, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, err := b.machine(machine); err != nil {
		return nil, err
	}
	var out []api.EventJSON
	for _, e := range b.events {
		if e.Machine == machine && len(out) < limit {
			out = append(out, e)
		}
	}
	return out, nil
}

func (b *fakeBackend) History(_ context.Context, machine string, since time.Time) ([]api.HistorySample, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, err := b.machine(machine); err != nil {
		return nil, err
	}
	var out []api.HistorySample
	for _, s := range b.history[machine] {
		if !s.Time.Before(since) {
			out = append(out, s)
		}
	}
	return out, nil
}

func (b *fakeBackend) Tag(_ context.Context, machine string, app bool) (api.PointJSON, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, err := b.machine(machine); err != nil {
		return api.PointJSON{}, err
	}
	if b.tagErr != nil {
		return api.PointJSON{}, b.tagErr
	}
	kind := api.PointCrash
	if app {
		kind = api.PointApp
	}
	b.tags = append(b.tags, machine+" "+kind)
	p := api.PointJSON{ID: fmt.Sprintf("%016x", 0xbeef+len(b.tags)), Time: testNow.Format(time.RFC3339Nano), Kind: kind}
	if b.points == nil {
		b.points = map[string][]api.PointJSON{}
	}
	b.points[machine] = append(b.points[machine], p)
	return p, nil
}

// checkPolicy overlays the fields set in j on p as the server does.
func checkPolicy(j api.PolicyJSON, p *api.PolicyJSON) error {
	for _, f := range []struct {
		name string
		v    string
		dst  *string
	}{
		{"rpo_threshold", j.RPOThreshold, &p.RPOThreshold},
		{"retention", j.Retention, &p.Retention},
		{"app_frequency", j.AppFrequency, &p.AppFrequency},
		{"crash_interval", j.CrashInterval, &p.CrashInterval},
		{"pit_window", j.PITWindow, &p.PITWindow},
	} {
		if f.v == "" {
			continue
		}
		d, err := time.ParseDuration(f.v)
		if err != nil {
			return fmt.Errorf("%s %q: not a duration (e.g. 15m, 4h, 0 for off)", f.name, f.v)
		}
		*f.dst = d.String()
	}
	if d, _ := time.ParseDuration(p.CrashInterval); d < 5*time.Second || d > 5*time.Minute {
		return fmt.Errorf("policy crash-consistent interval %s: must be from 5s to 5m; nothing was changed", d)
	}
	return nil
}

func (b *fakeBackend) CreatePolicy(_ context.Context, j api.PolicyJSON) (api.PolicyJSON, error) {
	b.vmMu.Lock()
	defer b.vmMu.Unlock()
	if j.Name == "" || strings.ContainsAny(j.Name, " /") {
		return api.PolicyJSON{}, fmt.Errorf("policy name %q: 1 to 64 letters, digits, '.', '_' or '-'", j.Name)
	}
	for _, p := range b.policies {
		if p.Name == j.Name {
			return api.PolicyJSON{}, errors.New("policy " + j.Name + " already exists")
		}
	}
	p := api.PolicyJSON{Name: j.Name, RPOThreshold: "15m0s", Retention: "24h0m0s", AppFrequency: "0s", CrashInterval: "5m0s", PITWindow: "24h0m0s"}
	if err := checkPolicy(j, &p); err != nil {
		return api.PolicyJSON{}, err
	}
	b.policies = append(b.policies, p, api.PolicyJSON{Name: p.Name + "-failback", RPOThreshold: p.RPOThreshold, Retention: p.Retention,
		AppFrequency: p.AppFrequency, CrashInterval: p.CrashInterval, PITWindow: p.PITWindow, FailbackOf: p.Name})
	return p, nil
}

func (b *fakeBackend) UpdatePolicy(_ context.Context, name string, j api.PolicyJSON) (api.PolicyJSON, error) {
	b.vmMu.Lock()
	defer b.vmMu.Unlock()
	for i, p := range b.policies {
		if p.Name != name {
			continue
		}
		if j.Name != "" && j.Name != name {
			return api.PolicyJSON{}, errors.New("a policy cannot be renamed")
		}
		if err := checkPolicy(j, &p); err != nil {
			return api.PolicyJSON{}, err
		}
		b.policies[i] = p
		return p, nil
	}
	return api.PolicyJSON{}, fmt.Errorf("policy %s: %w", name, ErrNotFound)
}

func (b *fakeBackend) AssignPolicy(_ context.Context, machine, policy string) error {
	b.vmMu.Lock()
	known := false
	for _, p := range b.policies {
		known = known || (p.Name == policy && p.FailbackOf == "")
	}
	b.vmMu.Unlock()
	if !known {
		return fmt.Errorf("no policy named %q; nothing was changed", policy)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.machines {
		if b.machines[i].Name == machine {
			b.machines[i].Policy = policy
			b.assigned = append(b.assigned, machine+"="+policy)
			return nil
		}
	}
	return fmt.Errorf("machine %s: %w", machine, ErrNotFound)
}

func (b *fakeBackend) SetGroup(_ context.Context, machine, group string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if strings.ContainsAny(group, " /") {
		return fmt.Errorf("group name %q: 1 to 64 letters, digits, '.', '_' or '-'; nothing was changed", group)
	}
	for i := range b.machines {
		if b.machines[i].Name == machine {
			b.machines[i].Group = group
			b.groupsSet = append(b.groupsSet, machine+"="+group)
			return nil
		}
	}
	return fmt.Errorf("machine %s: %w", machine, ErrNotFound)
}

func (b *fakeBackend) GroupPoints(_ context.Context, group string) ([]api.GroupPointJSON, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.groupPoints[group], nil
}

func (b *fakeBackend) GroupTag(_ context.Context, group string, app bool) (api.GroupPointJSON, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	members := map[string]string{}
	for _, m := range b.machines {
		if m.Group == group {
			members[m.Name] = "p" + strconv.Itoa(len(b.groupTags))
		}
	}
	if len(members) == 0 {
		return api.GroupPointJSON{}, fmt.Errorf("group %s has no members", group)
	}
	b.groupTags = append(b.groupTags, group)
	gp := api.GroupPointJSON{ID: "g" + strconv.Itoa(len(b.groupTags)), Time: testNow.Format(time.RFC3339Nano), Kind: api.PointCrash, Members: members}
	if b.groupPoints == nil {
		b.groupPoints = map[string][]api.GroupPointJSON{}
	}
	b.groupPoints[group] = append(b.groupPoints[group], gp)
	return gp, nil
}
