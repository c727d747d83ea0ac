package k8s

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

var backendNames = []string{"local-a", "local-b", "local-c"}

// pluginConfigYAML is the embedded default of `serve --dev` (three local key backends,
// quorum 2) as a config file, so that the health timings can be made small.
func pluginConfigYAML(dataDir, socket string) string {
	return fmt.Sprintf(`socket:
  path: %[4]s
quorum: 2
backends:
  - name: local-a
    type: local
    keyFile: %[1]s/local-a.key
  - name: local-b
    type: local
    keyFile: %[1]s/local-b.key
  - name: local-c
    type: local
    keyFile: %[1]s/local-c.key
health:
  probeIntervalMs: %[2]d
  minBackoffMs: 100
  maxBackoffMs: 400
  recoverAfterMs: %[3]d
breaker:
  resetTimeoutMs: 1000
log:
  level: info
`, dataDir, probeIntervalMs, recoverAfterMs, socket)
}

var (
	templateKeysOnce sync.Once
	templateKeysDir  string
	templateKeysErr  error
)

// installKeys gives a plugin's data dir its three key files. They are made once per
// run with `keygen` and copied, which keeps node start-ups down; each test owns its
// copies (rotation and moves never touch the templates).
func installKeys(t *testing.T, dataDir string) {
	t.Helper()
	templateKeysOnce.Do(func() {
		templateKeysDir, templateKeysErr = os.MkdirTemp("", "trk8s-keys-")
		if templateKeysErr != nil {
			return
		}
		for _, n := range backendNames {
			if _, err := runCLIErr("keygen", filepath.Join(templateKeysDir, n+".key")); err != nil {
				templateKeysErr = err
				return
			}
		}
	})
	if templateKeysErr != nil {
		t.Fatalf("keygen: %v", templateKeysErr)
	}
	for _, n := range backendNames {
		copyFile(t, filepath.Join(templateKeysDir, n+".key"), filepath.Join(dataDir, n+".key"))
	}
}
