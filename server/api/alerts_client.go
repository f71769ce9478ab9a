package api

import (
	"context"
	"fmt"
	"net/http"
)

// Alerts lists the active alerts, or with all the resolved ones too.
func (c *Client) Alerts(ctx context.Context, all bool) ([]Alert, error) {
	state := AlertActive
	if all {
		state = "all"
	}
	var out []Alert
	err := c.Do(ctx, http.MethodGet, "/api/v1/alerts?state="+state, nil, &out)
	return out, err
}

// AckAlert acknowledges an alert.
func (c *Client) AckAlert(ctx context.Context, id int64) error {
	return c.Do(ctx, http.MethodPost, fmt.Sprintf("/api/v1/alerts/%d/ack", id), nil, nil)
}

// Notifications returns the notification settings.
func (c *Client) Notifications(ctx context.Context) (NotificationSettings, error) {
	var out NotificationSettings
	err := c.Do(ctx, http.MethodGet, "/api/v1/settings/notifications", nil, &out)
	return out, err
}

// SetEmail sets the e-mail settings; nil turns e-mail off.
func (c *Client) SetEmail(ctx context.Context, e *EmailSettings) error {
	if e == nil {
		return c.Do(ctx, http.MethodDelete, "/api/v1/settings/notifications/email", nil, nil)
	}
	return c.Do(ctx, http.MethodPut, "/api/v1/settings/notifications/email", e, nil)
}

// SetWebhook sets the webhook; nil turns it off.
func (c *Client) SetWebhook(ctx context.Context, w *WebhookSettings) error {
	if w == nil {
		return c.Do(ctx, http.MethodDelete, "/api/v1/settings/notifications/webhook", nil, nil)
	}
	return c.Do(ctx, http.MethodPut, "/api/v1/settings/notifications/webhook", w, nil)
}

// TestNotification sends a test notice through every configured channel;
// an error says what refused it.
func (c *Client) TestNotification(ctx context.Context) (TestNotificationResult, error) {
	var out TestNotificationResult
	err := c.Do(ctx, http.MethodPost, "/api/v1/alerts/test", nil, &out)
	return out, err
}
