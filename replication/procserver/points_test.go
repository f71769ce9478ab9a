package procserver

import (
	"errors"
	"testing"

	"github.com/asrdr/asr/replication"
)

// A request gets its own point (or why none was made), once; answers for
// requests no one waits for (scheduled points, forgotten requests) are
// dropped without blocking the applier; a group cut's HELD reaches it.
func TestPoints(t *testing.T) {
	ps := newPoints()
	ch := ps.want(7)
	ps.resolve(0, pointResult{err: errors.New("scheduled")})
	ps.resolve(8, pointResult{err: errors.New("nobody asked")})
	ps.resolve(7, pointResult{p: replication.Point{ID: "p7"}})
	ps.resolve(7, pointResult{p: replication.Point{ID: "again"}}) // answered already
	if r := <-ch; r.err != nil || r.p.ID != "p7" {
		t.Fatalf("answer %+v", r)
	}
	select {
	case r := <-ch:
		t.Fatalf("a second answer %+v", r)
	default:
	}
	held, point, ok := ps.wantCut(9)
	if !ok {
		t.Fatal("cut 9 refused")
	}
	if _, _, ok := ps.wantCut(9); ok {
		t.Fatal("cut 9 registered twice")
	}
	if _, _, ok := ps.wantCut(10); !ok {
		t.Fatal("cut 10 refused")
	}
	ps.forget(10)
	ps.held(9)
	ps.held(9) // repeated: never blocks
	<-held
	ps.resolve(9, pointResult{p: replication.Point{ID: "p9", Cut: 9}})
	if r := <-point; r.p.Cut != 9 {
		t.Fatalf("cut 9's point %+v", r)
	}
	ps.forget(9)
	ps.held(9)
	if _, _, ok := ps.wantCut(9); !ok {
		t.Fatal("cut 9 refused once forgotten")
	}
	ps.forget(9)
	ps.want(11)
	if _, _, ok := ps.wantCut(11); ok {
		t.Fatal("a cut over a waiting point request's id")
	}
	ps.forget(11)
	ch = ps.want(10)
	ps.forget(10)
	ps.resolve(10, pointResult{})
	select {
	case r := <-ch:
		t.Fatalf("a forgotten request answered %+v", r)
	default:
	}
}
