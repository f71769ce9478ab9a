package web

import (
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/server/api"
)

func TestLineChartCoordinates(t *testing.T) {
	start := testNow.Add(-4 * time.Hour)
	c := lineChart{Title: "t", Start: start, End: testNow, Points: []chartPoint{
		{T: start, V: 0},                    // left, bottom
		{T: start.Add(2 * time.Hour), V: 5}, // middle, half way up (the axis tops at 10)
		{T: testNow, V: 10},                 // right, top
	}}
	if got := c.yMax(); got != 10 {
		t.Fatalf("yMax %v, want 10", got)
	}
	svg := c.svg()
	bottom, mid, topY := chartTop+chartPlotH, chartTop+chartPlotH/2, chartTop
	left, middle, right := chartLeft, chartLeft+chartPlotW/2, chartLeft+chartPlotW
	want := "M" + f1(float64(left)) + "," + f1(float64(bottom)) + " L" + f1(float64(middle)) + "," + f1(float64(mid)) +
		" L" + f1(float64(right)) + "," + f1(float64(topY))
	line := regexp.MustCompile(`class="chart-line" d="([^"]*)"`).FindStringSubmatch(svg)
	if line == nil || line[1] != want {
		t.Fatalf("line path %q, want %q\n%s", line, want, svg)
	}
	if !strings.Contains(svg, `class="chart-area" d="M48.0,100.0 L48.0,100.0`) || !strings.Contains(svg, "Z") {
		t.Errorf("no closed area under the line:\n%s", svg)
	}
	// Time ticks every hour, labelled with the clock time; value labels.
	for _, s := range []string{">08:00<", ">10:00<", ">12:00<", ">10<", ">5<", ">0<", `role="img"`, "<title>t</title>"} {
		if !strings.Contains(svg, s) {
			t.Errorf("no %s in\n%s", s, svg)
		}
	}
	if strings.Contains(svg, "No data") {
		t.Error("a chart with data says No data")
	}
}

func TestLineChartGapsAndThreshold(t *testing.T) {
	start := testNow.Add(-time.Hour)
	c := lineChart{Start: start, End: testNow, MaxGap: 2 * time.Minute, Threshold: 300, Points: []chartPoint{
		{T: start, V: 1}, {T: start.Add(time.Minute), V: 2},
		{T: start.Add(30 * time.Minute), V: 3}, // after a gap: a new run
		{T: testNow.Add(time.Hour), V: 1e9},    // outside the window: not drawn, not scaled
	}}
	svg := c.svg()
	line := regexp.MustCompile(`class="chart-line" d="([^"]*)"`).FindStringSubmatch(svg)
	if line == nil || strings.Count(line[1], "M") != 2 || strings.Count(line[1], "L") != 1 {
		t.Errorf("line %q: want two runs (M L, M)", line)
	}
	if c.yMax() != 500 {
		t.Errorf("yMax %v: want the threshold rounded up (500)", c.yMax())
	}
	if !strings.Contains(svg, `class="chart-threshold"`) {
		t.Error("no threshold line")
	}
}

func TestLineChartEmpty(t *testing.T) {
	svg := lineChart{Title: "empty", Start: testNow.Add(-24 * time.Hour), End: testNow}.svg()
	for _, s := range []string{"chart-empty", ">No data<", `class="chart-axis"`} {
		if !strings.Contains(svg, s) {
			t.Errorf("no %s in an empty chart:\n%s", s, svg)
		}
	}
	if strings.Contains(svg, "chart-line") {
		t.Error("an empty chart has a line")
	}
}

func TestRPOAndChurnCharts(t *testing.T) {
	h := []api.HistorySample{
		{Time: testNow.Add(-2 * time.Minute), RPO: time.Second, RPOKnown: true, Bytes: 100},
		{Time: testNow.Add(-time.Minute), RPOKnown: false, Bytes: 300, Churn: 200},
		{Time: testNow, RPO: 3 * time.Second, RPOKnown: true, Bytes: 400, Churn: 100},
	}
	rc := rpoChart("r", "m", h, testNow, 15*time.Minute)
	if len(rc.Points) != 2 || rc.Points[1].V != 3 || rc.Threshold != 900 {
		t.Errorf("rpo chart %+v: want the two known RPOs in seconds, threshold 900", rc)
	}
	cc := churnChart("c", "m", h, testNow)
	if len(cc.Points) != 2 || cc.Points[0].V != 200 || cc.Points[1].V != 100 {
		t.Errorf("churn chart %+v: want the churn of the intervals", cc.Points)
	}
}

func TestPointsTimeline(t *testing.T) {
	start := testNow.Add(-time.Hour)
	ps := []api.PointJSON{
		{ID: "a", Time: start.Add(30 * time.Minute).Format(time.RFC3339Nano), Kind: api.PointApp},
		{ID: "c", Time: testNow.Format(time.RFC3339Nano), Kind: api.PointCrash},
		{ID: "old", Time: start.Add(-time.Minute).Format(time.RFC3339Nano), Kind: api.PointCrash},
	}
	var b strings.Builder
	if err := pointsTimeline("tl", ps, start, testNow).Render(t.Context(), &b); err != nil {
		t.Fatal(err)
	}
	svg := b.String()
	if n := strings.Count(svg, "<circle"); n != 2 {
		t.Errorf("%d points drawn, want 2 (one out of the window)", n)
	}
	mid := f1(chartLeft + chartPlotW/2.0)
	if !strings.Contains(svg, `class="pt pt-app" cx="`+mid+`"`) || !strings.Contains(svg, `class="pt pt-crash" cx="`+f1(chartLeft+chartPlotW)+`"`) {
		t.Errorf("points not where their times are:\n%s", svg)
	}
	b.Reset()
	pointsTimeline("tl", nil, start, testNow).Render(t.Context(), &b)
	if !strings.Contains(b.String(), "No recovery point") {
		t.Error("an empty timeline does not say so")
	}
}

func TestNiceCeil(t *testing.T) {
	for in, want := range map[float64]float64{0: 1, 0.3: 0.5, 1: 1, 1.1: 2, 3: 5, 7: 10, 42: 50, 999: 1000} {
		if got := niceCeil(in); got != want {
			t.Errorf("niceCeil(%v) = %v, want %v", in, got, want)
		}
	}
}
