package k8s

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apiserver/pkg/apis/apiserver"
	apiserverv1 "k8s.io/apiserver/pkg/apis/apiserver/v1"
	"k8s.io/apiserver/pkg/apis/apiserver/validation"
)

var (
	kindEncryptionConfig = regexp.MustCompile(`(?m)^kind:\s*EncryptionConfiguration\s*$`)
	mdYAMLFence          = regexp.MustCompile("(?ms)^([ \\t]*)```ya?ml[^\\n]*\\n(.*?)^[ \\t]*```")
	kmsEndpoint          = regexp.MustCompile(`(?m)^(\s*endpoint:\s*)["']?unix://[^\s"']+["']?\s*$`)
	yamlDocSeparator     = regexp.MustCompile(`(?m)^---\s*$`)
)

type example struct {
	where string // path relative to the repository root, plus "#block N" for Markdown
	yaml  string
}

// findExamples collects every EncryptionConfiguration under deploy/ and docs/: YAML
// files and the ```yaml blocks of Markdown pages (what users copy).
func findExamples(t *testing.T) []example {
	t.Helper()
	var out []example
	for _, top := range []string{"deploy", "docs"} {
		root := filepath.Join(repoRoot, top)
		if _, err := os.Stat(root); err != nil {
			continue
		}
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			rel, _ := filepath.Rel(repoRoot, path)
			ext := strings.ToLower(filepath.Ext(path))
			if ext != ".yaml" && ext != ".yml" && ext != ".md" {
				return nil
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			var blocks []string
			if ext == ".md" {
				for _, m := range mdYAMLFence.FindAllStringSubmatch(string(data), -1) {
					// A block indented inside a list item: remove the fence's indentation.
					lines := strings.Split(m[2], "\n")
					for k, line := range lines {
						lines[k] = strings.TrimPrefix(line, m[1])
					}
					blocks = append(blocks, strings.Join(lines, "\n"))
				}
			} else {
				blocks = []string{string(data)}
			}
			for i, block := range blocks {
				for j, doc := range yamlDocSeparator.Split(block, -1) {
					if !kindEncryptionConfig.MatchString(doc) {
						continue
					}
					where := rel
					if ext == ".md" {
						where += "#yaml-block-" + strconv.Itoa(i+1)
					}
					if j > 0 {
						where += "#doc-" + strconv.Itoa(j+1)
					}
					out = append(out, example{where: where, yaml: doc})
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// A decoder built like the encryptionconfig package's own (same scheme, strict), so
// unknown or misspelt fields fail here as they fail in kube-apiserver.
func strictDecoder() runtime.Decoder {
	scheme := runtime.NewScheme()
	utilruntime.Must(apiserver.AddToScheme(scheme))
	utilruntime.Must(apiserverv1.AddToScheme(scheme))
	return serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDecoder()
}

// 9. Every EncryptionConfiguration example loads through the apiserver's parser and
// validation, and then, pointed at a live plugin, through LoadEncryptionConfig itself.
func TestS9_EncryptionConfigExamples(t *testing.T) {
	t.Parallel()
	examples := findExamples(t)
	if len(examples) < 3 {
		t.Fatalf("found %d EncryptionConfiguration examples under deploy/ and docs/, expected at least the 3 in deploy/encryption-config/", len(examples))
	}
	decoder := strictDecoder()

	type parsed struct {
		example
		cfg *apiserver.EncryptionConfiguration
	}
	var valid []parsed
	for _, ex := range examples {
		t.Run("validate/"+strings.ReplaceAll(ex.where, "/", "_"), func(t *testing.T) {
			obj, gvk, err := decoder.Decode([]byte(ex.yaml), nil, nil)
			if err != nil {
				t.Fatalf("%s: the apiserver's decoder rejects it: %v", ex.where, err)
			}
			cfg, ok := obj.(*apiserver.EncryptionConfiguration)
			if !ok {
				t.Fatalf("%s: decoded to %v", ex.where, gvk)
			}
			for _, reload := range []bool{false, true} {
				if errs := validation.ValidateEncryptionConfiguration(cfg, reload); len(errs) > 0 {
					t.Fatalf("%s: validation (automatic reload %v): %v", ex.where, reload, errs.ToAggregate())
				}
			}
			valid = append(valid, parsed{ex, cfg})
		})
	}
	if len(valid) == 0 {
		return
	}

	// Live: each file with every endpoint pointed at one running plugin.
	p := newPlugin(t, "s9")
	p.start()
	for i, ex := range valid {
		t.Run("load/"+strings.ReplaceAll(ex.where, "/", "_"), func(t *testing.T) {
			kms, v1Used, hasIdentity := 0, false, false
			var firstPrefix string
			for _, rc := range ex.cfg.Resources {
				for j, pr := range rc.Providers {
					if pr.KMS != nil {
						kms++
						v1Used = v1Used || pr.KMS.APIVersion == "v1"
						if j == 0 && firstPrefix == "" {
							firstPrefix = "k8s:enc:kms:" + pr.KMS.APIVersion + ":" + pr.KMS.Name + ":"
						}
					}
					if pr.Identity != nil {
						hasIdentity = true
					}
				}
			}
			t.Logf("%s: %d KMS provider(s), v1 used: %v, identity fallback: %v", ex.where, kms, v1Used, hasIdentity)
			if kms == 0 {
				t.Skip("no KMS provider")
			}
			live := kmsEndpoint.ReplaceAllString(ex.yaml, "${1}unix://"+p.socket)
			path := writeEncryptionConfig(t, t.TempDir(), "enc.yaml", live)
			a := startAPIServer(t, path, "s9-example-"+strconv.Itoa(i), false)
			a.waitHealthy(15 * time.Second)
			plain := randomBytes(t, 256)
			stored := a.mustWrite("example", plain)
			if firstPrefix != "" && !bytes.HasPrefix(stored, []byte(firstPrefix)) {
				t.Errorf("%s: stored value does not start with %q: %q", ex.where, firstPrefix, truncate(stored, 40))
			}
			if a.mustRead("example", stored, plain) {
				t.Errorf("%s: fresh value stale", ex.where)
			}
			if hasIdentity {
				// Data written before encryption was enabled is read as-is and marked stale,
				// which is what makes a storage migration rewrite it encrypted.
				raw := []byte("k8s\x00plain protobuf written before encryption")
				if !a.mustRead("legacy", raw, raw) {
					t.Errorf("%s: unencrypted legacy data not reported stale", ex.where)
				}
			}
		})
	}
}

// The checks above are only worth something if they reject what kube-apiserver rejects.
func TestS9_ValidatorRejectsBadExamples(t *testing.T) {
	t.Parallel()
	decoder := strictDecoder()
	const head = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms:\n"
	cases := map[string]string{
		"v2 with cachesize":       "          apiVersion: v2\n          name: trousseau\n          endpoint: unix:///run/kms.sock\n          cachesize: 10\n",
		"v2 name with a colon":    "          apiVersion: v2\n          name: trousseau:v2\n          endpoint: unix:///run/kms.sock\n",
		"tcp endpoint":            "          apiVersion: v2\n          name: trousseau\n          endpoint: tcp://127.0.0.1:9000\n",
		"misspelt field (strict)": "          apiVersion: v2\n          name: trousseau\n          endpoint: unix:///run/kms.sock\n          timeOut: 3s\n",
		"unknown kms api version": "          apiVersion: v3\n          name: trousseau\n          endpoint: unix:///run/kms.sock\n",
		"missing endpoint":        "          apiVersion: v2\n          name: trousseau\n",
	}
	for name, body := range cases {
		obj, _, err := decoder.Decode([]byte(head+body), nil, nil)
		if err == nil {
			cfg := obj.(*apiserver.EncryptionConfiguration)
			err = validation.ValidateEncryptionConfiguration(cfg, false).ToAggregate()
		}
		if err == nil {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: rejected: %v", name, err)
		}
	}

	// An omitted kms apiVersion defaults to v1 (deprecated, gated), not v2.
	obj, _, err := decoder.Decode([]byte(head+"          name: trousseau\n          endpoint: unix:///run/kms.sock\n"), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if v := obj.(*apiserver.EncryptionConfiguration).Resources[0].Providers[0].KMS.APIVersion; v != "v1" {
		t.Errorf("omitted apiVersion defaulted to %q", v)
	}
}
