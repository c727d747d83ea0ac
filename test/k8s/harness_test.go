// Package k8s drives the Trousseau plugin with kube-apiserver's own KMS client code
// (k8s.io/apiserver), so that what is verified here is what a real control plane does:
// the same config parser and validation, the same gRPC dialer, the same Status probe,
// DEK rotation logic, staleness rule and healthz checks.
package k8s

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/features"
	"k8s.io/apiserver/pkg/server/healthz"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	encryptionconfigcontroller "k8s.io/apiserver/pkg/server/options/encryptionconfig/controller"
	storagevalue "k8s.io/apiserver/pkg/storage/value"
	envelopekmsv2 "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/klog/v2"
	kmsservice "k8s.io/kms/pkg/service"
)

const (
	providerName = "trousseau"
	v2Prefix     = "k8s:enc:kms:v2:" + providerName + ":"
	v1Prefix     = "k8s:enc:kms:v1:" + providerName + ":"

	// Small on purpose: every wait in this suite is bounded by a few of these.
	probeIntervalMs = 200
	recoverAfterMs  = 1000
)

var (
	repoRoot string
	// The error LoadEncryptionConfig gives for a v1 provider before the KMSv1 gate is
	// switched on; captured once in TestMain because feature gates are process-global.
	kmsV1GateOffErr error
)

func TestMain(m *testing.M) {
	root, err := findRepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	repoRoot = root

	// klog is the apiserver's logger; its messages (probe failures while a test takes
	// the plugin down on purpose) are noise unless someone is debugging.
	if os.Getenv("TROUSSEAU_K8S_KLOG") == "" {
		fs := flag.NewFlagSet("klog", flag.ContinueOnError)
		klog.InitFlags(fs)
		_ = fs.Set("logtostderr", "false")
		_ = fs.Set("alsologtostderr", "false")
		_ = fs.Set("stderrthreshold", "FATAL")
		klog.SetOutput(io.Discard)
	}

	kmsV1GateOffErr = loadV1WithGateOff()

	// KMSv1 is Deprecated and off by default since 1.29; kube-apiserver needs
	// --feature-gates=KMSv1=true, which in-process is this.
	if err := utilfeature.DefaultMutableFeatureGate.SetFromMap(map[string]bool{string(features.KMSv1): true}); err != nil {
		fmt.Fprintln(os.Stderr, "enable KMSv1:", err)
		os.Exit(2)
	}
	// kube-apiserver re-reads its EncryptionConfiguration every minute when automatic
	// reload is on; the upstream integration tests shorten it through this variable too.
	encryptionconfigcontroller.EncryptionConfigFileChangePollDuration = 200 * time.Millisecond

	code := m.Run()
	if templateKeysDir != "" {
		_ = os.RemoveAll(templateKeysDir)
	}
	os.Exit(code)
}

func findRepoRoot() (string, error) {
	if r := os.Getenv("TROUSSEAU_REPO_ROOT"); r != "" {
		return filepath.Abs(r)
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "package.json")); err == nil {
			if _, err := os.Stat(filepath.Join(dir, "test", "k8s", "go.mod")); err == nil {
				return dir, nil
			}
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("repository root not found above %s", wd)
		}
	}
}

func loadV1WithGateOff() error {
	dir, err := os.MkdirTemp("", "trk8s-gate-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "enc.yaml")
	if err := os.WriteFile(path, []byte(encryptionConfigYAML(filepath.Join(dir, "none.sock"), "v1")), 0o600); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err = encryptionconfig.LoadEncryptionConfig(ctx, path, false, "gate-check")
	if err == nil {
		return errors.New("<no error>")
	}
	return err
}

// ---------------------------------------------------------------------------
// The plugin process
// ---------------------------------------------------------------------------

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// plugin is one Trousseau process with its own socket, data directory and config.
// The socket lives in a short /tmp directory because unix socket paths are limited
// to 108 bytes and t.TempDir() paths embed the test name.
type plugin struct {
	t          *testing.T
	name       string
	dir        string
	dataDir    string
	socket     string
	configPath string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	logs   *lockedBuffer
	starts int
}

func newPlugin(t *testing.T, name string) *plugin {
	t.Helper()
	dir, err := os.MkdirTemp("", "trk8s-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	p := &plugin{
		t:       t,
		name:    name,
		dir:     dir,
		dataDir: filepath.Join(dir, "keys"),
		socket:  filepath.Join(dir, "kms.sock"),
		logs:    &lockedBuffer{},
	}
	if err := os.MkdirAll(p.dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	installKeys(t, p.dataDir)
	p.configPath = filepath.Join(dir, "trousseau.yaml")
	if err := os.WriteFile(p.configPath, []byte(pluginConfigYAML(p.dataDir, p.socket)), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.stop(false)
		if t.Failed() {
			logs := p.logs.String()
			if len(logs) > 12000 {
				logs = "...\n" + logs[len(logs)-12000:]
			}
			t.Logf("plugin %s output:\n%s", p.name, logs)
		}
	})
	return p
}

func (p *plugin) endpoint() string { return "unix://" + p.socket }

func (p *plugin) keyFile(backend string) string { return filepath.Join(p.dataDir, backend+".key") }

// start launches the plugin and waits until it answers a v2 Status call.
func (p *plugin) start() {
	p.t.Helper()
	p.mu.Lock()
	if p.cmd != nil {
		p.mu.Unlock()
		p.t.Fatalf("plugin %s already running", p.name)
	}
	p.starts++
	args := []string{"src/main.ts", "serve", "--config", p.configPath, "--socket", p.socket}
	cmd := exec.Command(filepath.Join(repoRoot, "node_modules", ".bin", "node"), args...)
	cmd.Dir = repoRoot
	fmt.Fprintf(p.logs, "=== start #%d: node %s\n", p.starts, strings.Join(args, " "))
	cmd.Stdout = p.logs
	cmd.Stderr = p.logs
	if err := cmd.Start(); err != nil {
		p.mu.Unlock()
		p.t.Fatalf("start plugin: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		err := cmd.Wait()
		fmt.Fprintf(p.logs, "=== exited: %v\n", err)
		close(exited)
	}()
	p.cmd, p.exited = cmd, exited
	p.mu.Unlock()

	startedAt := time.Now()
	client := newStatusClient(p.t, p.endpoint())
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-exited:
			p.t.Fatalf("plugin %s exited during start-up", p.name)
		default:
		}
		if _, err := os.Stat(p.socket); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := client.Status(ctx)
			cancel()
			if err == nil {
				p.t.Logf("plugin %s ready after %v", p.name, time.Since(startedAt).Round(time.Millisecond))
				return
			}
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("plugin %s did not answer Status within 30s", p.name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for the process to end; with check it also asserts a
// clean exit and that the socket was removed (the plugin's documented contract).
func (p *plugin) stop(check bool) time.Duration {
	p.t.Helper()
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return 0
	}
	began := time.Now()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(15 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		if check {
			p.t.Errorf("plugin %s ignored SIGTERM for 15s; killed", p.name)
		}
	}
	took := time.Since(began)
	if check {
		if code := cmd.ProcessState.ExitCode(); code != 0 {
			p.t.Errorf("plugin %s exited with code %d after SIGTERM (%s)", p.name, code, cmd.ProcessState)
		}
		if _, err := os.Stat(p.socket); !errors.Is(err, os.ErrNotExist) {
			p.t.Errorf("plugin %s left its socket behind after SIGTERM (stat: %v)", p.name, err)
		}
	}
	return took
}

// ---------------------------------------------------------------------------
// A direct KMS v2 client (the apiserver's own gRPC service), used to watch Status
// without the apiserver's 20 s health-result cache in between.
// ---------------------------------------------------------------------------

func newStatusClient(t *testing.T, endpoint string) kmsservice.Service {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	svc, err := envelopekmsv2.NewGRPCService(ctx, endpoint, providerName+"-observer", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

func status(t *testing.T, svc kmsservice.Service) (*kmsservice.StatusResponse, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return svc.Status(ctx)
}

func mustStatus(t *testing.T, svc kmsservice.Service) *kmsservice.StatusResponse {
	t.Helper()
	st, err := status(t, svc)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	return st
}

// waitStatus polls Status until cond holds and returns the matching response and how
// long it took.
func waitStatus(t *testing.T, svc kmsservice.Service, timeout time.Duration, what string,
	cond func(*kmsservice.StatusResponse, error) bool) (*kmsservice.StatusResponse, error, time.Duration) {
	t.Helper()
	began := time.Now()
	var (
		st  *kmsservice.StatusResponse
		err error
	)
	for {
		st, err = status(t, svc)
		if cond(st, err) {
			return st, err, time.Since(began)
		}
		if time.Since(began) > timeout {
			t.Fatalf("timed out after %v waiting for %s; last Status: %s", timeout, what, describeStatus(st, err))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func describeStatus(st *kmsservice.StatusResponse, err error) string {
	if err != nil {
		return "error: " + err.Error()
	}
	if st == nil {
		return "<nil>"
	}
	return fmt.Sprintf("version=%q healthz=%q key_id=%q", st.Version, st.Healthz, st.KeyID)
}

// ---------------------------------------------------------------------------
// The "apiserver": exactly what k8s.io/apiserver/pkg/server/options/etcd.go does
// with --encryption-provider-config (and, with reload, the automatic-reload controller).
// ---------------------------------------------------------------------------

type apiServer struct {
	t            *testing.T
	id           string
	configPath   string
	transformers storagevalue.ResourceTransformers
	checks       []healthz.HealthChecker
	cancel       context.CancelFunc
	loadedAt     time.Time
}

func startAPIServer(t *testing.T, configPath, id string, reload bool) *apiServer {
	t.Helper()
	a, err := tryStartAPIServer(t, configPath, id, reload)
	if err != nil {
		t.Fatalf("apiserver %s: LoadEncryptionConfig: %v", id, err)
	}
	return a
}

func tryStartAPIServer(t *testing.T, configPath, id string, reload bool) (*apiServer, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	began := time.Now()
	cfg, err := encryptionconfig.LoadEncryptionConfig(ctx, configPath, reload, id)
	if err != nil {
		cancel()
		return nil, err
	}
	t.Cleanup(cancel)
	a := &apiServer{t: t, id: id, configPath: configPath, cancel: cancel, loadedAt: time.Now()}
	t.Logf("apiserver %s loaded its EncryptionConfiguration in %v", id, time.Since(began).Round(time.Millisecond))
	if reload {
		if len(cfg.HealthChecks) != 1 {
			t.Fatalf("reload=true must give exactly one health check, got %d", len(cfg.HealthChecks))
		}
		dyn := encryptionconfig.NewDynamicTransformers(cfg.Transformers, cfg.HealthChecks[0], cancel, cfg.KMSCloseGracePeriod)
		ctrl := encryptionconfigcontroller.NewDynamicEncryptionConfiguration(
			"encryption-provider-config-automatic-reload-controller", configPath, dyn, cfg.EncryptionFileContentHash, id)
		go ctrl.Run(ctx)
		a.transformers = dyn
		a.checks = []healthz.HealthChecker{dyn}
	} else {
		a.transformers = encryptionconfig.StaticTransformers(cfg.Transformers)
		a.checks = cfg.HealthChecks
	}
	return a, nil
}

func (a *apiServer) stop() { a.cancel() }

func (a *apiServer) check() error {
	var errs []string
	for _, c := range a.checks {
		if err := c.Check(httptest.NewRequest("GET", "/healthz", nil)); err != nil {
			errs = append(errs, c.Name()+": "+err.Error())
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

func (a *apiServer) waitHealthy(timeout time.Duration) time.Duration {
	a.t.Helper()
	began := time.Now()
	for {
		err := a.check()
		if err == nil {
			return time.Since(began)
		}
		if time.Since(began) > timeout {
			a.t.Fatalf("apiserver %s health check still failing after %v: %v", a.id, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (a *apiServer) secrets() storagevalue.Transformer {
	return a.transformers.TransformerForResource(schema.GroupResource{Resource: "secrets"})
}

// The etcd3 store authenticates every value with its etcd key; so do we.
func etcdKey(name string) storagevalue.Context {
	return storagevalue.DefaultContext("/registry/secrets/default/" + name)
}

func (a *apiServer) write(name string, plaintext []byte) ([]byte, error) {
	return a.secrets().TransformToStorage(context.Background(), plaintext, etcdKey(name))
}

func (a *apiServer) mustWrite(name string, plaintext []byte) []byte {
	a.t.Helper()
	out, err := a.write(name, plaintext)
	if err != nil {
		a.t.Fatalf("apiserver %s: write %s: %v", a.id, name, err)
	}
	return out
}

func (a *apiServer) read(name string, stored []byte) ([]byte, bool, error) {
	return a.secrets().TransformFromStorage(context.Background(), stored, etcdKey(name))
}

// mustRead reads and checks the plaintext; it returns the stale flag.
func (a *apiServer) mustRead(name string, stored, want []byte) bool {
	a.t.Helper()
	got, stale, err := a.read(name, stored)
	if err != nil {
		a.t.Fatalf("apiserver %s: read %s: %v", a.id, name, err)
	}
	if !bytes.Equal(got, want) {
		a.t.Fatalf("apiserver %s: read %s: plaintext differs (%d bytes, want %d)", a.id, name, len(got), len(want))
	}
	return stale
}

// decodeV2 parses what the apiserver would put in etcd for a KMS v2 provider.
func decodeV2(t *testing.T, stored []byte) *kmstypes.EncryptedObject {
	t.Helper()
	if !bytes.HasPrefix(stored, []byte(v2Prefix)) {
		t.Fatalf("stored value does not start with %q: %q", v2Prefix, truncate(stored, 40))
	}
	o := &kmstypes.EncryptedObject{}
	if err := proto.Unmarshal(stored[len(v2Prefix):], o); err != nil {
		t.Fatalf("stored value is not an EncryptedObject: %v", err)
	}
	return o
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// ---------------------------------------------------------------------------
// Configuration files
// ---------------------------------------------------------------------------

func encryptionConfigYAML(socket, apiVersion string) string {
	extra := ""
	if apiVersion == "v1" {
		extra = "\n          cachesize: 100"
	}
	return fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms:
          apiVersion: %s
          name: %s
          endpoint: unix://%s
          timeout: 3s%s
      - identity: {}
`, apiVersion, providerName, socket, extra)
}

func writeEncryptionConfig(t *testing.T, dir, file, content string) string {
	t.Helper()
	path := filepath.Join(dir, file)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func moveFile(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(to), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(from, to); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// runCLI runs a one-shot plugin command (e.g. keygen) from the repository root.
func runCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, err := runCLIErr(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func runCLIErr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(repoRoot, "node_modules", ".bin", "node"), append([]string{"src/main.ts"}, args...)...)
	cmd.Dir = repoRoot
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("node src/main.ts %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

type inspectedCopy struct {
	Backend string `json:"backend"`
	Present bool   `json:"present"`
}

type inspected struct {
	Quorum int             `json:"quorum"`
	Copies []inspectedCopy `json:"copies"`
}

// inspectEnvelope runs `trousseau inspect` on the wrapped seed the apiserver stored,
// to see which backends actually hold a copy (it prints no secret).
func inspectEnvelope(t *testing.T, o *kmstypes.EncryptedObject) (inspected, map[string]bool) {
	t.Helper()
	doc := map[string]any{"ciphertext": base64.StdEncoding.EncodeToString(o.EncryptedDEKSource), "keyId": o.KeyID}
	if len(o.Annotations) > 0 {
		ann := map[string]string{}
		for k, v := range o.Annotations {
			ann[k] = base64.StdEncoding.EncodeToString(v)
		}
		doc["annotations"] = ann
	}
	data, _ := json.Marshal(doc)
	path := filepath.Join(t.TempDir(), "envelope.json")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	out := runCLI(t, "inspect", path)
	var got inspected
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("inspect output is not JSON: %v\n%s", err, out)
	}
	present := map[string]bool{}
	for _, c := range got.Copies {
		if c.Present {
			present[c.Backend] = true
		}
	}
	return got, present
}
