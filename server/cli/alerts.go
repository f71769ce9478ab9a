package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/server/notify"
)

// readLimited reads a small file, refusing one over max bytes.
func readLimited(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, max)
	}
	return b, nil
}

// runAlerts lists and acknowledges alerts and sets how they are sent:
// asr alerts [list] [--all] [--json] | ack ID | email ... | webhook ... | test.
func runAlerts(ctx context.Context, e *env, args []string) error {
	sub := "list"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, args = args[0], args[1:]
	}
	switch sub {
	case "list":
		return alertsList(ctx, e, args)
	case "ack":
		return alertsAck(ctx, e, args)
	case "email":
		return alertsEmail(ctx, e, args)
	case "webhook":
		return alertsWebhook(ctx, e, args)
	case "test":
		return alertsTest(ctx, e, args)
	}
	return fmt.Errorf("asr alerts: unknown subcommand %q (want list, ack, email, webhook or test)", sub)
}

func alertsList(ctx context.Context, e *env, args []string) error {
	fs, o := e.opCommand("asr alerts list", false)
	all := fs.Bool("all", false, "the resolved alerts too")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	as, err := c.Alerts(ctx, *all)
	if err != nil {
		return err
	}
	if !*asJSON && len(as) == 0 {
		fmt.Fprintln(e.out, "no active alert")
		return nil
	}
	return output(e.out, *asJSON, as, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "ID\tSEVERITY\tSTATE\tKIND\tSUBJECT\tRAISED\tMESSAGE\tACTION")
		for _, a := range as {
			state := a.State
			if !a.Acked.IsZero() && a.State == api.AlertActive {
				state += " (acked)"
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", a.ID, a.Severity, state, a.Kind, alertSubject(a),
				a.Raised.UTC().Format(time.RFC3339), a.Message, a.Action)
		}
	})
}

func alertSubject(a api.Alert) string {
	switch {
	case a.Machine != "" && a.Disk != "":
		return a.Machine + "/" + a.Disk
	case a.Machine != "":
		return a.Machine
	}
	return a.Subject
}

func alertsAck(ctx context.Context, e *env, args []string) error {
	fs, o := e.opCommand("asr alerts ack", false)
	var id int64
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		n, err := strconv.ParseInt(args[0], 10, 64)
		if err != nil || n <= 0 {
			return fmt.Errorf("alert id %q: not a number (asr alerts lists them)", args[0])
		}
		id, args = n, args[1:]
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if id == 0 {
		return errors.New("usage: asr alerts ack ID")
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if err := c.AckAlert(ctx, id); err != nil {
		return err
	}
	fmt.Fprintf(e.out, "alert %d acknowledged\n", id)
	return nil
}

func alertsEmail(ctx context.Context, e *env, args []string) error {
	fs, o := e.opCommand("asr alerts email", false)
	smtp := fs.String("smtp", "", "SMTP server, HOST:PORT")
	from := fs.String("from", "", "sender address")
	to := fs.String("to", "", "recipients, ADDR[,ADDR...]")
	starttls := fs.Bool("starttls", true, "refuse to send unless the server offers STARTTLS (--starttls=false: send in clear)")
	user := fs.String("user", "", "SMTP user (AUTH PLAIN or LOGIN)")
	passFile := fs.String("password-file", "", "file holding the SMTP password (stored sealed with the vault's key; kept, if not given, only for the same --smtp and --user)")
	caFile := fs.String("smtp-ca-file", "", "PEM file of the CA that signs the SMTP server's certificate (STARTTLS), instead of the system's roots; kept, if not given, for the same --smtp")
	noCA := fs.Bool("no-smtp-ca", false, "drop the stored CA: check the SMTP server's certificate against the system's roots")
	minSev := fs.String("min-severity", "warning", "send alerts of this severity and above: warning or critical")
	digest := fs.String("digest", "5m", "batch the alerts after the first of a storm for this long (0: send each at once)")
	off := fs.Bool("off", false, "turn alert e-mail off")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if *off {
		if err := c.SetEmail(ctx, nil); err != nil {
			return err
		}
		fmt.Fprintln(e.out, "alert e-mail off")
		return nil
	}
	if *smtp == "" || *from == "" || *to == "" {
		return errors.New("--smtp, --from and --to are required (or --off)")
	}
	req := &api.EmailSettings{SMTP: *smtp, From: *from, To: strings.Split(*to, ","), StartTLS: *starttls,
		User: *user, MinSeverity: *minSev, Digest: *digest}
	if *passFile != "" {
		if *user == "" {
			return errors.New("--password-file needs --user")
		}
		pw, err := api.ReadSecretFile(*passFile)
		if err != nil {
			return err
		}
		req.Password = string(pw)
	}
	if *caFile != "" {
		if *noCA {
			return errors.New("--smtp-ca-file and --no-smtp-ca: choose one")
		}
		b, err := readLimited(*caFile, notify.MaxCABytes)
		if err != nil {
			return err
		}
		if _, err := notify.ParseCA(b); err != nil {
			return fmt.Errorf("%s: %w", *caFile, err)
		}
		req.CAPEM = string(b)
	}
	req.NoCA = *noCA
	if err := c.SetEmail(ctx, req); err != nil {
		return err
	}
	fmt.Fprintf(e.out, "alerts of severity %s and above are mailed to %s through %s (digest %s); try it: asr alerts test\n", *minSev, *to, *smtp, *digest)
	return nil
}

func alertsWebhook(ctx context.Context, e *env, args []string) error {
	fs, o := e.opCommand("asr alerts webhook", false)
	u := fs.String("url", "", "http(s) URL that receives a JSON POST per alert change")
	minSev := fs.String("min-severity", "warning", "send alerts of this severity and above: warning or critical")
	off := fs.Bool("off", false, "turn the webhook off")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	if *off {
		if err := c.SetWebhook(ctx, nil); err != nil {
			return err
		}
		fmt.Fprintln(e.out, "alert webhook off")
		return nil
	}
	if *u == "" {
		return errors.New("--url is required (or --off)")
	}
	if err := c.SetWebhook(ctx, &api.WebhookSettings{URL: *u, MinSeverity: *minSev}); err != nil {
		return err
	}
	fmt.Fprintf(e.out, "alerts of severity %s and above are posted to the webhook; try it: asr alerts test\n", *minSev)
	return nil
}

func alertsTest(ctx context.Context, e *env, args []string) error {
	fs, o := e.opCommand("asr alerts test", false)
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	res, err := c.TestNotification(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.out, "test notification sent: %s\n", strings.Join(res.Sent, ", "))
	return nil
}
