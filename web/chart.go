package web

import (
	"context"
	"fmt"
	"html"
	"io"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/a-h/templ"

	"github.com/asrdr/asr/server/api"
)

// Charts are drawn here, on the server, as inline SVG: no script, no
// library, nothing fetched, and the Content-Security-Policy allows them
// (presentation attributes and classes, no style attributes). The
// stylesheet colours them by class.

// chartPoint is one value of a series at a time.
type chartPoint struct {
	T time.Time
	V float64
}

// lineChart is a time series drawn as a line over a filled area, on a time
// axis from Start to End and a value axis from 0.
type lineChart struct {
	ID         string // the svg element's id ("" for none)
	Title      string // what it shows, for the accessible name
	Class      string // extra class of the svg (its colour)
	Start, End time.Time
	Points     []chartPoint // in time order
	// Format writes a value for the value axis's labels.
	Format func(float64) string
	// Threshold draws a dashed line at that value (0: none).
	Threshold float64
	// MaxGap is the longest interval between two points drawn as joined;
	// a longer one (no samples: the server was down) breaks the line.
	// 0 joins every point.
	MaxGap time.Duration
}

// Geometry of every chart, in SVG user units (the viewBox; the stylesheet
// scales the svg to its box).
const (
	chartW      = 320
	chartH      = 120
	chartLeft   = 48 // room for the value labels
	chartRight  = 8
	chartTop    = 8
	chartBottom = 20 // room for the time labels
	chartPlotW  = chartW - chartLeft - chartRight
	chartPlotH  = chartH - chartTop - chartBottom
)

// yMax is the top of the value axis: a round number at or above every
// value and the threshold, 1 if they are all zero.
func (c lineChart) yMax() float64 {
	m := c.Threshold
	for _, seg := range c.segments() {
		for _, p := range seg {
			m = max(m, p.V)
		}
	}
	return niceCeil(m)
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten (1 for v <= 0).
func niceCeil(v float64) float64 {
	if v <= 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, f := range []float64{1, 2, 5, 10} {
		if f*p >= v {
			return f * p
		}
	}
	return 10 * p
}

// x is the horizontal coordinate of t.
func (c lineChart) x(t time.Time) float64 {
	span := c.End.Sub(c.Start)
	if span <= 0 {
		return chartLeft
	}
	f := float64(t.Sub(c.Start)) / float64(span)
	return chartLeft + clamp01(f)*chartPlotW
}

// y is the vertical coordinate of v on an axis from 0 to top.
func (c lineChart) y(v, top float64) float64 {
	return chartTop + chartPlotH - clamp01(v/top)*chartPlotH
}

// segments splits the points in the window into runs drawn joined: a run
// breaks where two points lie further apart than MaxGap and than three
// times the median interval (points sampled less often than MaxGap stay
// joined).
func (c lineChart) segments() [][]chartPoint {
	var in []chartPoint
	for _, p := range c.Points {
		if !p.T.Before(c.Start) && !p.T.After(c.End) {
			in = append(in, p)
		}
	}
	gap := c.MaxGap
	if gap > 0 && len(in) > 5 {
		ds := make([]time.Duration, 0, len(in)-1)
		for i := 1; i < len(in); i++ {
			ds = append(ds, in[i].T.Sub(in[i-1].T))
		}
		slices.Sort(ds)
		gap = max(gap, 3*ds[len(ds)/2])
	}
	var out [][]chartPoint
	var cur []chartPoint
	for _, p := range in {
		if len(cur) > 0 && gap > 0 && p.T.Sub(cur[len(cur)-1].T) > gap {
			out = append(out, cur)
			cur = nil
		}
		cur = append(cur, p)
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}

// timeTicks are the times to label on an axis from start to end: round
// clock times, at most about six of them.
func timeTicks(start, end time.Time) []time.Time {
	span := end.Sub(start)
	if span <= 0 {
		return nil
	}
	step := 24 * time.Hour
	for _, s := range []time.Duration{time.Minute, 5 * time.Minute, 15 * time.Minute, time.Hour, 3 * time.Hour, 6 * time.Hour, 12 * time.Hour} {
		if span/s <= 6 {
			step = s
			break
		}
	}
	var out []time.Time
	for t := start.UTC().Truncate(step); !t.After(end); t = t.Add(step) {
		if !t.Before(start) {
			out = append(out, t)
		}
	}
	return out
}

// tickLabel writes a tick's time: the clock time, with the date at
// midnight.
func tickLabel(t time.Time) string {
	t = t.UTC()
	if t.Hour() == 0 && t.Minute() == 0 {
		return t.Format("Jan 2")
	}
	return t.Format("15:04")
}

// f1 writes a coordinate with one decimal.
func f1(v float64) string { return fmt.Sprintf("%.1f", v) }

// svg draws the chart.
func (c lineChart) svg() string {
	var b strings.Builder
	top := c.yMax()
	segs := c.segments()
	class := "chart"
	if c.Class != "" {
		class += " " + c.Class
	}
	if len(segs) == 0 {
		class += " chart-empty"
	}
	fmt.Fprintf(&b, `<svg`)
	if c.ID != "" {
		fmt.Fprintf(&b, ` id="%s"`, html.EscapeString(c.ID))
	}
	fmt.Fprintf(&b, ` class="%s" viewBox="0 0 %d %d" role="img" aria-label="%s">`,
		class, chartW, chartH, html.EscapeString(c.Title))
	fmt.Fprintf(&b, `<title>%s</title>`, html.EscapeString(c.Title))
	// The frame: the value axis with three labels and grid lines, the
	// time axis with its ticks.
	b.WriteString(`<g class="chart-axis">`)
	for _, v := range []float64{0, top / 2, top} {
		y := c.y(v, top)
		fmt.Fprintf(&b, `<line class="chart-grid" x1="%d" y1="%s" x2="%d" y2="%s"/>`, chartLeft, f1(y), chartW-chartRight, f1(y))
		fmt.Fprintf(&b, `<text class="chart-ylabel" x="%d" y="%s" text-anchor="end">%s</text>`, chartLeft-4, f1(y+3), html.EscapeString(c.format(v)))
	}
	for _, t := range timeTicks(c.Start, c.End) {
		x := c.x(t)
		fmt.Fprintf(&b, `<line class="chart-tick" x1="%s" y1="%d" x2="%s" y2="%d"/>`, f1(x), chartTop+chartPlotH, f1(x), chartTop+chartPlotH+3)
		fmt.Fprintf(&b, `<text class="chart-xlabel" x="%s" y="%d" text-anchor="middle">%s</text>`, f1(x), chartH-5, tickLabel(t))
	}
	b.WriteString(`</g>`)
	if len(segs) == 0 {
		fmt.Fprintf(&b, `<text class="chart-nodata" x="%d" y="%d" text-anchor="middle">No data</text>`, chartLeft+chartPlotW/2, chartTop+chartPlotH/2+4)
		b.WriteString(`</svg>`)
		return b.String()
	}
	base := f1(c.y(0, top))
	var area, line strings.Builder
	for _, seg := range segs {
		for i, p := range seg {
			cmd := "L"
			if i == 0 {
				cmd = "M"
				fmt.Fprintf(&area, "M%s,%s ", f1(c.x(p.T)), base)
			}
			fmt.Fprintf(&line, "%s%s,%s ", cmd, f1(c.x(p.T)), f1(c.y(p.V, top)))
			fmt.Fprintf(&area, "L%s,%s ", f1(c.x(p.T)), f1(c.y(p.V, top)))
		}
		fmt.Fprintf(&area, "L%s,%sZ ", f1(c.x(seg[len(seg)-1].T)), base)
	}
	fmt.Fprintf(&b, `<path class="chart-area" d="%s"/>`, strings.TrimSpace(area.String()))
	fmt.Fprintf(&b, `<path class="chart-line" d="%s"/>`, strings.TrimSpace(line.String()))
	if c.Threshold > 0 {
		y := f1(c.y(c.Threshold, top))
		fmt.Fprintf(&b, `<line class="chart-threshold" x1="%d" y1="%s" x2="%d" y2="%s"><title>threshold %s</title></line>`,
			chartLeft, y, chartW-chartRight, y, html.EscapeString(c.format(c.Threshold)))
	}
	b.WriteString(`</svg>`)
	return b.String()
}

func (c lineChart) format(v float64) string {
	if c.Format != nil {
		return c.Format(v)
	}
	return fmt.Sprintf("%g", v)
}

// svgComponent renders SVG markup this file wrote (its text escaped).
func svgComponent(svg string) templ.Component {
	return templ.ComponentFunc(func(_ context.Context, w io.Writer) error {
		_, err := io.WriteString(w, svg)
		return err
	})
}

// chartSVG is the chart as a component.
func chartSVG(c lineChart) templ.Component { return svgComponent(c.svg()) }

// historyWindow is what the dashboard's and a machine's charts span.
const historyWindow = 24 * time.Hour

// rpoChart is the chart of a machine's RPO over the window ending at now;
// threshold is its policy's RPO threshold (0: unknown).
func rpoChart(id, machine string, h []api.HistorySample, now time.Time, threshold time.Duration) lineChart {
	c := lineChart{ID: id, Title: "RPO of " + machine + ", last 24 h", Class: "chart-rpo",
		Start: now.Add(-historyWindow), End: now, Threshold: threshold.Seconds(), MaxGap: 5 * time.Minute,
		Format: func(v float64) string { return shortDuration(time.Duration(v * float64(time.Second))) }}
	for _, s := range h {
		if s.RPOKnown {
			c.Points = append(c.Points, chartPoint{T: s.Time, V: s.RPO.Seconds()})
		}
	}
	return c
}

// churnChart is the chart of the bytes received from a machine each
// sampling interval over the window ending at now.
func churnChart(id, machine string, h []api.HistorySample, now time.Time) lineChart {
	c := lineChart{ID: id, Title: "Churn of " + machine + " (bytes received per sample), last 24 h", Class: "chart-churn",
		Start: now.Add(-historyWindow), End: now, MaxGap: 5 * time.Minute,
		Format: func(v float64) string { return humanBytes(int64(v)) }}
	for i, s := range h {
		if i == 0 {
			continue // no interval before the first sample
		}
		c.Points = append(c.Points, chartPoint{T: s.Time, V: float64(s.Churn)})
	}
	return c
}

// shortDuration writes an axis label: "0", "30s", "5m", "2h".
func shortDuration(d time.Duration) string {
	switch {
	case d <= 0:
		return "0"
	case d < time.Minute:
		return fmt.Sprintf("%gs", math.Round(d.Seconds()*10)/10)
	case d < time.Hour:
		return fmt.Sprintf("%gm", math.Round(d.Minutes()*10)/10)
	default:
		return fmt.Sprintf("%gh", math.Round(d.Hours()*10)/10)
	}
}

// pointsTimeline draws a machine's recovery points on a time axis from
// start to end, a row per kind (application-consistent, crash-consistent,
// not crash-consistent), each point a dot with its id and time as a
// tooltip.
func pointsTimeline(id string, points []api.PointJSON, start, end time.Time) templ.Component {
	c := lineChart{Start: start, End: end}
	rows := []struct{ kind, label string }{{api.PointApp, "app"}, {api.PointCrash, "crash"}, {api.PointInconsistent, "other"}}
	const rowH = 18
	h := chartTop + len(rows)*rowH + chartBottom
	var b strings.Builder
	fmt.Fprintf(&b, `<svg id="%s" class="timeline" viewBox="0 0 %d %d" role="img" aria-label="Recovery points by kind over time">`,
		html.EscapeString(id), chartW, h)
	b.WriteString(`<title>Recovery points by kind over time</title><g class="chart-axis">`)
	for i, r := range rows {
		y := chartTop + i*rowH + rowH/2
		fmt.Fprintf(&b, `<line class="chart-grid" x1="%d" y1="%d" x2="%d" y2="%d"/>`, chartLeft, y, chartW-chartRight, y)
		fmt.Fprintf(&b, `<text class="chart-ylabel" x="%d" y="%d" text-anchor="end">%s</text>`, chartLeft-4, y+3, r.label)
	}
	axisY := chartTop + len(rows)*rowH
	for _, t := range timeTicks(start, end) {
		x := c.x(t)
		fmt.Fprintf(&b, `<line class="chart-tick" x1="%s" y1="%d" x2="%s" y2="%d"/>`, f1(x), axisY, f1(x), axisY+3)
		fmt.Fprintf(&b, `<text class="chart-xlabel" x="%s" y="%d" text-anchor="middle">%s</text>`, f1(x), h-5, tickLabel(t))
	}
	b.WriteString(`</g>`)
	n := 0
	for _, p := range points {
		t, err := time.Parse(time.RFC3339Nano, p.Time)
		if err != nil || t.Before(start) || t.After(end) {
			continue
		}
		row := 2
		for i, r := range rows {
			if r.kind == p.Kind {
				row = i
			}
		}
		fmt.Fprintf(&b, `<circle class="pt pt-%s" cx="%s" cy="%d" r="4"><title>%s · %s · %s</title></circle>`,
			html.EscapeString(p.Kind), f1(c.x(t)), chartTop+row*rowH+rowH/2, html.EscapeString(p.ID), html.EscapeString(p.Kind), clockTime(t))
		n++
	}
	if n == 0 {
		fmt.Fprintf(&b, `<text class="chart-nodata" x="%d" y="%d" text-anchor="middle">No recovery point</text>`, chartLeft+chartPlotW/2, axisY/2+4)
	}
	b.WriteString(`</svg>`)
	return svgComponent(b.String())
}
