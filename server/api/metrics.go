package api

// MetricsToken is the read-only token of GET /metrics (GET and POST
// /api/v1/metrics/token, admin token only): Token, and File, the file in
// the server's data directory that holds it (a Prometheus scrape config's
// authorization.credentials_file).
type MetricsToken struct {
	Token string `json:"token"`
	File  string `json:"file"`
}

// MetricsTokenRequest is the body of POST /api/v1/metrics/token: Rotate
// replaces the token (the old one stops working at once).
type MetricsTokenRequest struct {
	Rotate bool `json:"rotate"`
}
