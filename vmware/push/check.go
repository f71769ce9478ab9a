package push

import "context"

// Check logs in to the guest and out again, so that a caller learns of an
// unknown or changed host key, or a refused key, before it starts a job
// (an accepted host key is recorded, as Install would).
func Check(ctx context.Context, t Target) error {
	if err := t.validate(); err != nil {
		return err
	}
	r, err := dial(ctx, t)
	if err != nil {
		return err
	}
	r.close()
	return nil
}
