package k8s

// The deployment files under deploy/: every Kubernetes object decodes strictly with the
// Kubernetes API types (an unknown or misspelt field is an error, as with
// `kubectl apply --validate=strict`), the Helm chart lints and renders with each example
// values file, every plugin configuration passes `trousseau validate`, and the
// properties that keep a control plane alive hold (see checkPluginPod).

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/klog/v2"
	kindv1alpha4 "sigs.k8s.io/kind/pkg/apis/config/v1alpha4"
	"sigs.k8s.io/yaml"
)

const (
	socketDir    = "/var/run/trousseau"
	compileCache = "/var/lib/trousseau/compile-cache"
	chartDir     = "deploy/helm/trousseau"
	pluginUID    = 10001
	nodeCritical = "system-node-critical"
	// helm built with `go install` assumes Kubernetes 1.20 unless told otherwise, which
	// the chart's kubeVersion (>=1.29, KMS v2 GA) refuses.
	helmKubeVersion = "v1.33.0"
)

// The taints a control-plane node can carry while kube-apiserver needs the plugin:
// kubeadm's role taints (current and pre-1.24), a first node before its CNI, and a node
// before its cloud controller manager has initialised it.
var controlPlaneTaints = []corev1.Taint{
	{Key: "node-role.kubernetes.io/control-plane", Effect: corev1.TaintEffectNoSchedule},
	{Key: "node-role.kubernetes.io/master", Effect: corev1.TaintEffectNoSchedule},
	{Key: "node.cloudprovider.kubernetes.io/uninitialized", Value: "true", Effect: corev1.TaintEffectNoSchedule},
	{Key: "node.kubernetes.io/not-ready", Effect: corev1.TaintEffectNoSchedule},
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

var k8sDecoder = func() runtime.Decoder {
	scheme := runtime.NewScheme()
	utilruntime.Must(corev1.AddToScheme(scheme))
	utilruntime.Must(appsv1.AddToScheme(scheme))
	// No defaulting or conversion: what is decoded is what the file says.
	return serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
}()

type manifest struct {
	where string
	obj   runtime.Object
	raw   []byte
}

// splitYAML cuts a multi-document stream at "---" lines and drops empty documents.
func splitYAML(data []byte) [][]byte {
	var docs [][]byte
	for _, doc := range yamlDocSeparator.Split(string(data), -1) {
		trimmed := strings.TrimSpace(doc)
		empty := true
		for _, line := range strings.Split(trimmed, "\n") {
			if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
				empty = false
				break
			}
		}
		if !empty {
			docs = append(docs, []byte(doc))
		}
	}
	return docs
}

// decodeManifests decodes every document strictly. Custom resources (ServiceMonitor)
// have no Go type here: they must at least be well-formed objects of an expected kind.
func decodeManifests(where string, data []byte) ([]manifest, error) {
	var out []manifest
	for i, doc := range splitYAML(data) {
		w := fmt.Sprintf("%s#%d", where, i+1)
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return nil, fmt.Errorf("%s: not YAML: %v", w, err)
		}
		if meta.APIVersion == "monitoring.coreos.com/v1" {
			u := &unstructured.Unstructured{}
			if err := yaml.UnmarshalStrict(doc, &u.Object); err != nil {
				return nil, fmt.Errorf("%s: %v", w, err)
			}
			if (u.GetKind() != "ServiceMonitor" && u.GetKind() != "PrometheusRule") || u.GetName() == "" {
				return nil, fmt.Errorf("%s: unexpected custom resource %s %q", w, u.GetKind(), u.GetName())
			}
			out = append(out, manifest{w, u, doc})
			continue
		}
		obj, _, err := k8sDecoder.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("%s (%s %s): strict decoding: %v", w, meta.APIVersion, meta.Kind, err)
		}
		out = append(out, manifest{w, obj, doc})
	}
	return out, nil
}

func decodeFile(t *testing.T, rel string) []manifest {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, rel))
	if err != nil {
		t.Fatal(err)
	}
	ms, err := decodeManifests(rel, data)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 {
		t.Fatalf("%s: no Kubernetes object", rel)
	}
	return ms
}

func yamlFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	for _, pattern := range []string{"*.yaml", "*.yml"} {
		matches, err := filepath.Glob(filepath.Join(repoRoot, dir, pattern))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range matches {
			rel, _ := filepath.Rel(repoRoot, m)
			out = append(out, rel)
		}
	}
	sort.Strings(out)
	if len(out) == 0 {
		t.Fatalf("no YAML file in %s", dir)
	}
	return out
}

// ---------------------------------------------------------------------------
// The invariants of a plugin pod
// ---------------------------------------------------------------------------

// pluginSettings is what the pod must agree with in the plugin's configuration.
type pluginSettings struct {
	socketPath string // socket.path
	listen     string // http.listen
}

func readPluginSettings(configYAML []byte) (pluginSettings, error) {
	var c struct {
		Socket struct {
			Path string `json:"path"`
		} `json:"socket"`
		HTTP struct {
			Listen string `json:"listen"`
		} `json:"http"`
	}
	if err := yaml.Unmarshal(configYAML, &c); err != nil {
		return pluginSettings{}, err
	}
	s := pluginSettings{socketPath: c.Socket.Path, listen: c.HTTP.Listen}
	if s.socketPath == "" {
		s.socketPath = socketDir + "/kms.sock"
	}
	if s.listen == "" {
		return s, fmt.Errorf("http.listen is not set: the probes would have nothing to call")
	}
	return s, nil
}

// checkPluginPod returns every way in which a plugin pod spec could take the control
// plane down or weaken it. daemonSet adds what only a scheduled pod needs (tolerations;
// static pods ignore taints).
func checkPluginPod(spec *corev1.PodSpec, cfg pluginSettings, daemonSet bool) []string {
	var bad []string
	fail := func(format string, args ...any) { bad = append(bad, fmt.Sprintf(format, args...)) }

	if !spec.HostNetwork {
		fail("hostNetwork must be true (backends reachable before the CNI; probes on the node's loopback)")
	}
	if spec.PriorityClassName != nodeCritical {
		fail("priorityClassName is %q, want %s", spec.PriorityClassName, nodeCritical)
	}
	podSC := spec.SecurityContext
	if podSC == nil {
		podSC = &corev1.PodSecurityContext{}
	}

	// The socket folder is a host folder (shared with kube-apiserver's static pod),
	// mounted where the configuration puts the socket.
	wantDir := path.Dir(cfg.socketPath)
	socketVolume := ""
	for _, v := range spec.Volumes {
		if v.HostPath != nil && v.HostPath.Path == wantDir {
			socketVolume = v.Name
			if v.HostPath.Type == nil || (*v.HostPath.Type != corev1.HostPathDirectoryOrCreate && *v.HostPath.Type != corev1.HostPathDirectory) {
				fail("socket hostPath %s must be of type DirectoryOrCreate or Directory", wantDir)
			}
		}
		if v.Secret != nil {
			fail("volume %q is a Secret: kube-apiserver cannot read Secrets until the plugin runs", v.Name)
		}
		if v.Projected != nil {
			for _, src := range v.Projected.Sources {
				if src.Secret != nil {
					fail("volume %q projects a Secret: kube-apiserver cannot read Secrets until the plugin runs", v.Name)
				}
			}
		}
	}
	if socketVolume == "" {
		fail("no hostPath volume for the socket folder %s", wantDir)
	}

	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	for _, c := range all {
		sc := c.SecurityContext
		if sc == nil {
			fail("%s: no securityContext", c.Name)
			continue
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			fail("%s: readOnlyRootFilesystem must be true", c.Name)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			fail("%s: allowPrivilegeEscalation must be false", c.Name)
		}
		if sc.Privileged != nil && *sc.Privileged {
			fail("%s: privileged", c.Name)
		}
		if sc.Capabilities == nil || !containsCap(sc.Capabilities.Drop, "ALL") {
			fail("%s: capabilities must drop ALL", c.Name)
		}
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
			fail("%s: cpu and memory requests must be set", c.Name)
		}
	}

	var plugin *corev1.Container
	for i := range spec.Containers {
		if spec.Containers[i].Name == "trousseau" {
			plugin = &spec.Containers[i]
		}
	}
	if plugin == nil {
		return append(bad, "no container named trousseau")
	}
	if len(spec.Containers) != 1 {
		fail("%d containers; the plugin pod should hold only the plugin", len(spec.Containers))
	}
	nonRoot, uid := podSC.RunAsNonRoot, podSC.RunAsUser
	if sc := plugin.SecurityContext; sc != nil {
		if sc.RunAsNonRoot != nil {
			nonRoot = sc.RunAsNonRoot
		}
		if sc.RunAsUser != nil {
			uid = sc.RunAsUser
		}
	}
	if nonRoot == nil || !*nonRoot || uid == nil || *uid == 0 {
		fail("trousseau must run as a non-root uid with runAsNonRoot")
	}
	if !mountsAt(plugin, socketVolume, wantDir) {
		fail("trousseau does not mount the socket folder at %s", wantDir)
	}
	for _, ic := range spec.InitContainers {
		if len(ic.SecurityContext.Capabilities.Add) > 0 && !reflect.DeepEqual(ic.SecurityContext.Capabilities.Add, []corev1.Capability{"CHOWN"}) {
			fail("%s: adds capabilities %v (only CHOWN is needed)", ic.Name, ic.SecurityContext.Capabilities.Add)
		}
	}

	// Probes: the kubelet must reach the listener; liveness is process health only.
	host, port, err := net.SplitHostPort(cfg.listen)
	if err != nil {
		return append(bad, fmt.Sprintf("http.listen %q: %v", cfg.listen, err))
	}
	probeHost := host
	if host == "0.0.0.0" || strings.HasPrefix(host, "127.") || host == "localhost" {
		probeHost = "127.0.0.1"
	}
	checkProbe := func(name string, p *corev1.Probe, wantPath string) {
		if p == nil {
			fail("no %s probe", name)
			return
		}
		if p.HTTPGet == nil {
			fail("%s probe is not httpGet", name)
			return
		}
		if p.HTTPGet.Path != wantPath {
			fail("%s probe calls %q, want %s", name, p.HTTPGet.Path, wantPath)
		}
		if p.HTTPGet.Host != probeHost {
			// Empty means the pod IP, which with hostNetwork is the node IP.
			fail("%s probe host is %q; the plugin listens on %s, so it must be %s", name, p.HTTPGet.Host, cfg.listen, probeHost)
		}
		if p.HTTPGet.Port.String() != port {
			fail("%s probe port %s, but the plugin listens on %s", name, p.HTTPGet.Port.String(), cfg.listen)
		}
	}
	checkProbe("liveness", plugin.LivenessProbe, "/healthz")
	checkProbe("readiness", plugin.ReadinessProbe, "/readyz")
	if plugin.StartupProbe != nil {
		checkProbe("startup", plugin.StartupProbe, "/healthz")
	}

	if daemonSet {
		for _, taint := range controlPlaneTaints {
			tolerated := false
			for i := range spec.Tolerations {
				if spec.Tolerations[i].ToleratesTaint(klog.Background(), &taint, false) {
					tolerated = true
				}
			}
			if !tolerated {
				fail("does not tolerate the taint %s:%s", taint.Key, taint.Effect)
			}
		}
	}
	return bad
}

func containsCap(list []corev1.Capability, c corev1.Capability) bool {
	for _, x := range list {
		if x == c {
			return true
		}
	}
	return false
}

func mountsAt(c *corev1.Container, volume, at string) bool {
	for _, m := range c.VolumeMounts {
		if m.Name == volume && m.MountPath == at && !m.ReadOnly {
			return true
		}
	}
	return false
}

// ---------------------------------------------------------------------------
// trousseau validate
// ---------------------------------------------------------------------------

func validatePluginConfig(t *testing.T, where string, configYAML []byte) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(file, configYAML, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := runCLIErr("validate", "--no-files", "--config", file)
	if err != nil {
		t.Errorf("%s: trousseau validate: %v", where, err)
		return
	}
	if !strings.Contains(out, ": valid (") {
		t.Errorf("%s: unexpected validate output %q", where, out)
	}
}

// Every example configuration shipped in deploy/config passes the plugin's own validation.
func TestDeploy_PluginConfigsValidate(t *testing.T) {
	t.Parallel()
	for _, rel := range yamlFiles(t, "deploy/config") {
		t.Run(filepath.Base(rel), func(t *testing.T) {
			t.Parallel()
			data, err := os.ReadFile(filepath.Join(repoRoot, rel))
			if err != nil {
				t.Fatal(err)
			}
			validatePluginConfig(t, rel, data)
			cfg, err := readPluginSettings(data)
			if err != nil {
				t.Fatalf("%s: %v", rel, err)
			}
			// The static pod mounts this folder and probes this address; a config that
			// moved either would leave kube-apiserver or the kubelet knocking elsewhere.
			if cfg.socketPath != socketDir+"/kms.sock" || cfg.listen != "127.0.0.1:8787" {
				t.Errorf("%s: socket %s, listen %s; the manifests expect %s/kms.sock and 127.0.0.1:8787", rel, cfg.socketPath, cfg.listen, socketDir)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Static pod and DaemonSet
// ---------------------------------------------------------------------------

func TestDeploy_StaticPod(t *testing.T) {
	t.Parallel()
	cfgData, err := os.ReadFile(filepath.Join(repoRoot, "deploy/config/vault-aws-azure-escrow.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := readPluginSettings(cfgData)
	if err != nil {
		t.Fatal(err)
	}
	pods := 0
	for _, rel := range yamlFiles(t, "deploy/static-pod") {
		for _, m := range decodeFile(t, rel) {
			pod, ok := m.obj.(*corev1.Pod)
			if !ok {
				t.Errorf("%s: a static pod manifest holds only Pods, found %T", m.where, m.obj)
				continue
			}
			pods++
			if pod.Namespace != "kube-system" {
				t.Errorf("%s: namespace %q, want kube-system", m.where, pod.Namespace)
			}
			for _, v := range pod.Spec.Volumes {
				if v.HostPath == nil {
					t.Errorf("%s: volume %q is not a hostPath: static pods cannot use API objects", m.where, v.Name)
				}
			}
			if !strings.Contains(strings.Join(pod.Spec.Containers[0].Args, " "), "--config /etc/trousseau/config.yaml") {
				t.Errorf("%s: args %v do not name /etc/trousseau/config.yaml", m.where, pod.Spec.Containers[0].Args)
			}
			for _, problem := range checkPluginPod(&pod.Spec, cfg, false) {
				t.Errorf("%s: %s", m.where, problem)
			}
		}
	}
	if pods == 0 {
		t.Fatal("no Pod in deploy/static-pod")
	}
}

// checkDaemonSetObjects checks a set of objects holding one plugin DaemonSet and the
// ConfigMap it reads its configuration from, and validates that configuration.
func checkDaemonSetObjects(t *testing.T, where string, ms []manifest) *appsv1.DaemonSet {
	t.Helper()
	configMaps := map[string]*corev1.ConfigMap{}
	var dss []*appsv1.DaemonSet
	for _, m := range ms {
		switch o := m.obj.(type) {
		case *corev1.ConfigMap:
			configMaps[o.Name] = o
		case *appsv1.DaemonSet:
			dss = append(dss, o)
		}
	}
	if len(dss) != 1 {
		t.Fatalf("%s: %d DaemonSets, want 1", where, len(dss))
	}
	ds := dss[0]
	spec := &ds.Spec.Template.Spec

	// The configuration: the ConfigMap volume holding the file named by --config.
	var plugin *corev1.Container
	for i := range spec.Containers {
		if spec.Containers[i].Name == "trousseau" {
			plugin = &spec.Containers[i]
		}
	}
	if plugin == nil {
		t.Fatalf("%s: no trousseau container", where)
	}
	configPath := ""
	for i, a := range plugin.Args {
		if a == "--config" && i+1 < len(plugin.Args) {
			configPath = plugin.Args[i+1]
		}
	}
	var configYAML []byte
	for _, vm := range plugin.VolumeMounts {
		if path.Dir(configPath) != vm.MountPath {
			continue
		}
		for _, v := range spec.Volumes {
			if v.Name == vm.Name && v.ConfigMap != nil {
				cm := configMaps[v.ConfigMap.Name]
				if cm == nil {
					t.Fatalf("%s: ConfigMap %q is not part of the manifests", where, v.ConfigMap.Name)
				}
				configYAML = []byte(cm.Data[path.Base(configPath)])
			}
		}
	}
	if len(configYAML) == 0 {
		t.Fatalf("%s: --config %q does not name a key of a mounted ConfigMap", where, configPath)
	}
	validatePluginConfig(t, where+" (ConfigMap)", configYAML)
	cfg, err := readPluginSettings(configYAML)
	if err != nil {
		t.Fatalf("%s: %v", where, err)
	}

	for _, problem := range checkPluginPod(spec, cfg, true) {
		t.Errorf("%s: %s", where, problem)
	}
	if aff := spec.Affinity; aff == nil || aff.NodeAffinity == nil || aff.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		t.Errorf("%s: no required node affinity: the plugin would run on worker nodes", where)
	} else {
		keys := map[string]bool{}
		for _, term := range aff.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
			for _, e := range term.MatchExpressions {
				keys[e.Key] = true
			}
		}
		if !keys["node-role.kubernetes.io/control-plane"] {
			t.Errorf("%s: node affinity does not select node-role.kubernetes.io/control-plane", where)
		}
	}
	if u := ds.Spec.UpdateStrategy.RollingUpdate; ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || u == nil || u.MaxUnavailable == nil || u.MaxUnavailable.String() != "1" {
		t.Errorf("%s: update strategy must roll one node at a time", where)
	}
	return ds
}

func TestDeploy_DaemonSet(t *testing.T) {
	t.Parallel()
	for _, rel := range yamlFiles(t, "deploy/daemonset") {
		checkDaemonSetObjects(t, rel, decodeFile(t, rel))
	}
}

// The checks above must be able to fail: each broken variant of the shipped DaemonSet
// has to be caught.
func TestDeploy_InvariantsRejectBrokenPods(t *testing.T) {
	t.Parallel()
	ms := decodeFile(t, "deploy/daemonset/trousseau.yaml")
	var base *appsv1.DaemonSet
	for _, m := range ms {
		if ds, ok := m.obj.(*appsv1.DaemonSet); ok {
			base = ds
		}
	}
	if base == nil {
		t.Fatal("no DaemonSet")
	}
	cfg := pluginSettings{socketPath: socketDir + "/kms.sock", listen: "127.0.0.1:8787"}
	if problems := checkPluginPod(&base.Spec.Template.Spec, cfg, true); len(problems) > 0 {
		t.Fatalf("the shipped DaemonSet itself fails: %v", problems)
	}
	mutations := map[string]func(s *corev1.PodSpec){
		"liveness on /readyz": func(s *corev1.PodSpec) { s.Containers[0].LivenessProbe.HTTPGet.Path = "/readyz" },
		"probe on the pod IP": func(s *corev1.PodSpec) { s.Containers[0].LivenessProbe.HTTPGet.Host = "" },
		"no master toleration": func(s *corev1.PodSpec) {
			s.Tolerations = dropToleration(s.Tolerations, "node-role.kubernetes.io/master")
		},
		"no uninitialized toleration": func(s *corev1.PodSpec) {
			s.Tolerations = dropToleration(s.Tolerations, "node.cloudprovider.kubernetes.io/uninitialized")
		},
		"no not-ready toleration":  func(s *corev1.PodSpec) { s.Tolerations = dropToleration(s.Tolerations, "node.kubernetes.io/not-ready") },
		"writable root filesystem": func(s *corev1.PodSpec) { f := false; s.Containers[0].SecurityContext.ReadOnlyRootFilesystem = &f },
		"privilege escalation": func(s *corev1.PodSpec) {
			tr := true
			s.InitContainers[0].SecurityContext.AllowPrivilegeEscalation = &tr
		},
		"other priority class": func(s *corev1.PodSpec) { s.PriorityClassName = "system-cluster-critical" },
		"socket folder not hostPath": func(s *corev1.PodSpec) {
			s.Volumes[0].HostPath = nil
			s.Volumes[0].EmptyDir = &corev1.EmptyDirVolumeSource{}
		},
		"runs as root": func(s *corev1.PodSpec) { z := int64(0); s.SecurityContext.RunAsUser = &z },
		"pod network":  func(s *corev1.PodSpec) { s.HostNetwork = false },
		"credentials from a Secret": func(s *corev1.PodSpec) {
			s.Volumes = append(s.Volumes, corev1.Volume{Name: "creds", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "x"}}})
		},
	}
	for name, mutate := range mutations {
		ds := base.DeepCopy()
		mutate(&ds.Spec.Template.Spec)
		if problems := checkPluginPod(&ds.Spec.Template.Spec, cfg, true); len(problems) == 0 {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: rejected: %s", name, problems[0])
		}
	}

	// And the strict decoder rejects a misspelt field.
	bad := bytes.Replace(ms[len(ms)-1].raw, []byte("readOnlyRootFilesystem"), []byte("readOnlyRootFileSystem"), 1)
	if _, err := decodeManifests("misspelt", bad); err == nil {
		t.Error("a misspelt securityContext field decoded without error")
	}
}

func dropToleration(list []corev1.Toleration, key string) []corev1.Toleration {
	var out []corev1.Toleration
	for _, tol := range list {
		if tol.Key != key {
			out = append(out, tol)
		}
	}
	return out
}

// ---------------------------------------------------------------------------
// Helm chart
// ---------------------------------------------------------------------------

var (
	helmOnce sync.Once
	helmPath string
	helmErr  error
)

// helmBinary finds the helm that test/k8s/run.sh installed (test/k8s/install-helm.sh).
// Without one the chart tests fail in CI and skip loudly elsewhere.
func helmBinary(t *testing.T) string {
	t.Helper()
	helmOnce.Do(func() {
		for _, candidate := range []string{os.Getenv("TROUSSEAU_HELM"), filepath.Join(repoRoot, ".servers", "bin", "helm")} {
			if candidate == "" {
				continue
			}
			if _, err := os.Stat(candidate); err == nil {
				helmPath = candidate
				return
			}
		}
		helmErr = fmt.Errorf("helm not found: run test/k8s/install-helm.sh (test/k8s/run.sh does)")
	})
	if helmErr != nil {
		if os.Getenv("CI") != "" {
			t.Fatal(helmErr)
		}
		t.Skipf("SKIPPED LOUDLY: %v", helmErr)
	}
	return helmPath
}

func runHelm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(helmBinary(t), args...)
	cmd.Dir = repoRoot
	// A private home: helm must not read or write the user's repositories or cache.
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home+"/cache", "HELM_CONFIG_HOME="+home+"/config", "HELM_DATA_HOME="+home+"/data")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	t.Logf("helm %s: %v", strings.Join(args, " "), time.Since(start).Round(time.Millisecond))
	if err != nil {
		return stdout.String(), fmt.Errorf("helm %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

func TestDeploy_HelmChart(t *testing.T) {
	t.Parallel()
	helmBinary(t)
	valueFiles := yamlFiles(t, chartDir+"/ci")
	if len(valueFiles) < 5 {
		t.Fatalf("%d example values files in %s/ci; expected one per backend type and a combined one", len(valueFiles), chartDir)
	}
	types := map[string]bool{}
	rendered := map[string]int{}
	for _, rel := range valueFiles {
		t.Run(filepath.Base(rel), func(t *testing.T) {
			t.Parallel()
			if out, err := runHelm(t, "lint", "--strict", "--kube-version", helmKubeVersion, chartDir, "-f", rel); err != nil {
				t.Fatal(err)
			} else if !strings.Contains(out, "0 chart(s) failed") {
				t.Fatalf("helm lint: %s", out)
			}
			out, err := runHelm(t, "template", "trousseau", chartDir, "--kube-version", helmKubeVersion, "--namespace", "kube-system", "-f", rel)
			if err != nil {
				t.Fatal(err)
			}
			ms, err := decodeManifests(rel+" (rendered)", []byte(out))
			if err != nil {
				t.Fatal(err)
			}
			kinds := map[string]int{}
			for _, m := range ms {
				kind := reflect.TypeOf(m.obj).Elem().Name()
				if u, ok := m.obj.(*unstructured.Unstructured); ok {
					kind = u.GetKind()
					mu.Lock()
					rendered[kind]++
					mu.Unlock()
				}
				if cm, ok := m.obj.(*corev1.ConfigMap); ok && cm.Labels["grafana_dashboard"] == "1" {
					var dashboard struct {
						Panels []json.RawMessage `json:"panels"`
					}
					if err := json.Unmarshal([]byte(cm.Data["trousseau.json"]), &dashboard); err != nil || len(dashboard.Panels) == 0 {
						t.Errorf("%s: dashboard ConfigMap %s holds no dashboard: %v", rel, cm.Name, err)
					}
					mu.Lock()
					rendered["dashboard"]++
					mu.Unlock()
				}
				kinds[kind]++
			}
			t.Logf("rendered %v", kinds)
			ds := checkDaemonSetObjects(t, rel, ms)
			if ds.Namespace != "kube-system" {
				t.Errorf("%s: namespace %q", rel, ds.Namespace)
			}
			var values struct {
				Backends []struct {
					Type string `json:"type"`
				} `json:"backends"`
			}
			data, _ := os.ReadFile(filepath.Join(repoRoot, rel))
			if err := yaml.Unmarshal(data, &values); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			for _, b := range values.Backends {
				types[b.Type] = true
			}
			mu.Unlock()
		})
	}
	t.Cleanup(func() {
		for _, want := range []string{"local", "vault", "aws", "azure"} {
			if !types[want] {
				t.Errorf("no example values file uses a %s backend", want)
			}
		}
		for _, kind := range []string{"ServiceMonitor", "PrometheusRule", "dashboard"} {
			if rendered[kind] == 0 {
				t.Errorf("no example values file renders the %s", kind)
			}
		}
	})
}

var mu sync.Mutex

// What the chart must refuse, through its schema or its templates.
func TestDeploy_HelmChartRejects(t *testing.T) {
	t.Parallel()
	helmBinary(t)
	local := "backends:\n  - { name: local-a, type: local, keyFile: /k/a.key }\n  - { name: local-b, type: local, keyFile: /k/b.key }\n"
	cases := map[string]struct{ values, want string }{
		"no backends (the defaults)":                    {"", "backends"},
		"quorum above the backend count":                {"quorum: 3\n" + local, "quorum"},
		"misspelt backend field":                        {"quorum: 1\nbackends:\n  - { name: local-a, type: local, keyFiel: /k/a.key }\n", "keyFiel"},
		"unknown backend type":                          {"quorum: 1\nbackends:\n  - { name: gcp, type: gcp }\n", "backends"},
		"inline Vault token":                            {"quorum: 1\nbackends:\n  - { name: v, type: vault, address: https://v:8200, keyName: k, auth: { method: token, token: s.x } }\n", "token"},
		"socket open to others":                         {"socket: { dir: /var/run/trousseau, name: kms.sock, mode: \"0666\" }\n" + local, "mode"},
		"ServiceMonitor without the TLS listener":       {"metrics: { serviceMonitor: { enabled: true } }\n" + local, "metrics.scrape.enabled"},
		"TLS listener on loopback for a ServiceMonitor": {"metrics: { scrape: { enabled: true, host: 127.0.0.1 }, serviceMonitor: { enabled: true } }\n" + local, "loopback"},
		"relative runbook base":                         {"metrics: { runbookBaseUrl: docs/operations/ }\n" + local, "runbookBaseUrl"},
		"socket settings in settings":                   {"settings: { socket: { path: /tmp/x.sock } }\n" + local, "settings"},
		"unknown top-level value":                       {"replicas: 3\n" + local, "replicas"},
	}
	for name, c := range cases {
		t.Run(strings.ReplaceAll(name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			file := filepath.Join(t.TempDir(), "values.yaml")
			if err := os.WriteFile(file, []byte(c.values), 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := runHelm(t, "template", "trousseau", chartDir, "--kube-version", helmKubeVersion, "-f", file)
			if err == nil {
				t.Fatalf("rendered without error:\n%s", out)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error does not mention %q: %v", c.want, err)
			} else {
				t.Logf("refused: %s", lastLines(err.Error(), 3))
			}
		})
	}
}

// The chart's schema for backends and settings is the plugin configuration's own, so a
// values file the chart accepts is a configuration the plugin accepts, field by field.
func TestDeploy_HelmSchemaMatchesPluginSchema(t *testing.T) {
	t.Parallel()
	out, err := runCLIErr("schema")
	if err != nil {
		t.Fatal(err)
	}
	var plugin struct {
		Properties map[string]json.RawMessage `json:"properties"`
	}
	if err := json.Unmarshal([]byte(out), &plugin); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(repoRoot, chartDir, "values.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	var chart struct {
		Properties struct {
			Backends json.RawMessage `json:"backends"`
			Settings struct {
				Properties map[string]json.RawMessage `json:"properties"`
			} `json:"settings"`
		} `json:"properties"`
	}
	if err := json.Unmarshal(data, &chart); err != nil {
		t.Fatal(err)
	}
	same := func(what string, a, b json.RawMessage) {
		var x, y any
		if err := json.Unmarshal(a, &x); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if err := json.Unmarshal(b, &y); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if !reflect.DeepEqual(x, y) {
			t.Errorf("values.schema.json %s differs from `trousseau schema`; copy it over (see docs/deploy.md)", what)
		}
	}
	same("backends", chart.Properties.Backends, plugin.Properties["backends"])
	for key, raw := range plugin.Properties {
		switch key {
		case "socket", "quorum", "backends", "http":
			continue // set by the chart's own values
		}
		chartPart, ok := chart.Properties.Settings.Properties[key]
		if !ok {
			t.Errorf("values.schema.json settings lacks %q", key)
			continue
		}
		same("settings."+key, chartPart, raw)
	}
}

// ---------------------------------------------------------------------------
// kind
// ---------------------------------------------------------------------------

func TestDeploy_KindCluster(t *testing.T) {
	t.Parallel()
	for _, rel := range yamlFiles(t, "deploy/kind") {
		data, err := os.ReadFile(filepath.Join(repoRoot, rel))
		if err != nil {
			t.Fatal(err)
		}
		// kind's own types, decoded strictly as kind does.
		var cluster kindv1alpha4.Cluster
		if err := yaml.UnmarshalStrict(data, &cluster); err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		if cluster.Kind != "Cluster" || cluster.APIVersion != "kind.x-k8s.io/v1alpha4" {
			t.Fatalf("%s: %s %s", rel, cluster.APIVersion, cluster.Kind)
		}
		checkKindCluster(t, rel, &cluster)
	}
}

func checkKindCluster(t *testing.T, rel string, cluster *kindv1alpha4.Cluster) {
	t.Helper()
	var cp *kindv1alpha4.Node
	for i := range cluster.Nodes {
		if cluster.Nodes[i].Role == kindv1alpha4.ControlPlaneRole {
			cp = &cluster.Nodes[i]
		}
	}
	if cp == nil {
		t.Fatalf("%s: no control-plane node", rel)
	}
	mounts := map[string]kindv1alpha4.Mount{}
	for _, m := range cp.ExtraMounts {
		mounts[m.ContainerPath] = m
	}
	if _, ok := mounts[socketDir]; !ok {
		t.Errorf("%s: the socket folder %s is not mounted into the node", rel, socketDir)
	}

	patches := append(append([]string{}, cluster.KubeadmConfigPatches...), cp.KubeadmConfigPatches...)
	found := false
	for _, p := range patches {
		var cc struct {
			Kind      string `json:"kind"`
			APIServer struct {
				ExtraArgs    map[string]string `json:"extraArgs"`
				ExtraVolumes []struct {
					Name      string `json:"name"`
					HostPath  string `json:"hostPath"`
					MountPath string `json:"mountPath"`
					ReadOnly  bool   `json:"readOnly"`
					PathType  string `json:"pathType"`
				} `json:"extraVolumes"`
			} `json:"apiServer"`
		}
		if err := yaml.UnmarshalStrict([]byte(p), &cc); err != nil {
			t.Errorf("%s: kubeadm patch: %v", rel, err)
			continue
		}
		if cc.Kind != "ClusterConfiguration" {
			continue
		}
		found = true
		encPath := cc.APIServer.ExtraArgs["encryption-provider-config"]
		if encPath == "" {
			t.Fatalf("%s: no --encryption-provider-config", rel)
		}
		volumes := map[string]string{}
		for _, v := range cc.APIServer.ExtraVolumes {
			if v.HostPath != v.MountPath {
				t.Errorf("%s: apiserver volume %s maps %s to %s; keep node and apiserver paths equal", rel, v.Name, v.HostPath, v.MountPath)
			}
			volumes[v.MountPath] = v.HostPath
		}
		if _, ok := volumes[socketDir]; !ok {
			t.Errorf("%s: kube-apiserver does not mount %s", rel, socketDir)
		}
		if _, ok := volumes[path.Dir(encPath)]; !ok {
			t.Errorf("%s: kube-apiserver does not mount the folder of %s", rel, encPath)
		}
		// The EncryptionConfiguration the apiserver reads is a file of this repository,
		// through the node's bind mount; it must exist and name the mounted socket.
		m, ok := mounts[path.Dir(encPath)]
		if !ok {
			t.Fatalf("%s: %s is not mounted into the node", rel, path.Dir(encPath))
		}
		local := filepath.Join(repoRoot, m.HostPath, path.Base(encPath))
		enc, err := os.ReadFile(local)
		if err != nil {
			t.Fatalf("%s: the EncryptionConfiguration it mounts: %v", rel, err)
		}
		if !strings.Contains(string(enc), "unix://"+socketDir+"/kms.sock") || !kindEncryptionConfig.Match(enc) {
			t.Errorf("%s: %s is not an EncryptionConfiguration for unix://%s/kms.sock", rel, local, socketDir)
		}
		if v, ok := cc.APIServer.ExtraArgs["encryption-provider-config-automatic-reload"]; ok {
			if _, err := strconv.ParseBool(v); err != nil {
				t.Errorf("%s: automatic reload %q", rel, v)
			}
		}
	}
	if !found {
		t.Errorf("%s: no ClusterConfiguration patch for kube-apiserver", rel)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// ---------------------------------------------------------------------------
// The socket folder, as the pod would set it up
// ---------------------------------------------------------------------------

// initCommands returns the init containers' commands that touch the socket folder, per
// shipped manifest (static pod, DaemonSet, and the chart rendered with its defaults).
func initCommands(t *testing.T) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	collect := func(where string, spec *corev1.PodSpec) {
		for _, ic := range spec.InitContainers {
			out[where+"/"+ic.Name] = ic.Command
		}
	}
	for _, m := range decodeFile(t, "deploy/static-pod/trousseau.yaml") {
		if pod, ok := m.obj.(*corev1.Pod); ok {
			collect("static-pod", &pod.Spec)
		}
	}
	for _, m := range decodeFile(t, "deploy/daemonset/trousseau.yaml") {
		if ds, ok := m.obj.(*appsv1.DaemonSet); ok {
			collect("daemonset", &ds.Spec.Template.Spec)
		}
	}
	if _, err := os.Stat(filepath.Join(repoRoot, ".servers", "bin", "helm")); err == nil || os.Getenv("TROUSSEAU_HELM") != "" {
		rendered, err := runHelm(t, "template", "trousseau", chartDir, "--kube-version", helmKubeVersion, "-f", chartDir+"/ci/local-values.yaml")
		if err != nil {
			t.Fatal(err)
		}
		ms, err := decodeManifests("chart", []byte(rendered))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range ms {
			if ds, ok := m.obj.(*appsv1.DaemonSet); ok {
				collect("chart", &ds.Spec.Template.Spec)
			}
		}
	}
	return out
}

// The init container runs as root with CAP_CHOWN as its only capability and must leave
// the socket folder to the plugin (10001:10001, 0750) and the compile cache folder to
// the plugin alone (10001:10001, 0700) on a first start (the kubelet made them root
// 0755) and on every restart (already given away). Then the plugin, as uid 10001 with no
// supplementary group, serves a 0660 socket of group 10001 there, answers the probes on
// 127.0.0.1, and uses the compile cache (the folder passes its trust check). Needs root
// and setpriv (util-linux), as in CI.
func TestDeploy_SocketFolderAsInThePod(t *testing.T) {
	t.Parallel()
	setpriv, err := exec.LookPath("setpriv")
	if err != nil || os.Geteuid() != 0 {
		msg := "needs root and setpriv to run the init container and the plugin under other uids"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip("SKIPPED LOUDLY: " + msg)
	}
	node := filepath.Join(repoRoot, "node_modules", ".bin", "node")
	commands := initCommands(t)
	if len(commands) < 2 {
		t.Fatalf("found %d init containers", len(commands))
	}
	var hostDir, hostCache string
	for where, command := range commands {
		if len(command) != 3 || command[0] != "node" || command[1] != "-e" {
			t.Fatalf("%s: command %q is not node -e SCRIPT", where, command)
		}
		base, err := os.MkdirTemp("", "trk8s-sock-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(base) })
		if err := os.Chmod(base, 0o755); err != nil {
			t.Fatal(err)
		}
		dir := filepath.Join(base, "trousseau")
		cache := filepath.Join(base, "compile-cache")
		for _, d := range []string{dir, cache} {
			if err := os.Mkdir(d, 0o755); err != nil { // what the kubelet's DirectoryOrCreate makes
				t.Fatal(err)
			}
		}
		script := strings.ReplaceAll(strings.ReplaceAll(command[2], socketDir, dir), compileCache, cache)
		if !strings.Contains(command[2], socketDir) || !strings.Contains(command[2], compileCache) {
			t.Fatalf("%s: the script does not name both %s and %s", where, socketDir, compileCache)
		}
		for run := 1; run <= 2; run++ {
			cmd := exec.Command(setpriv, "--reuid=0", "--regid=0", "--clear-groups", "--bounding-set=-all,+chown", "--inh-caps=-all", "--no-new-privs", node, "-e", script)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s: run %d with CAP_CHOWN only: %v\n%s", where, run, err, out)
			}
			for d, mode := range map[string]os.FileMode{dir: 0o750, cache: 0o700} {
				info, err := os.Stat(d)
				if err != nil {
					t.Fatal(err)
				}
				st := info.Sys().(*syscall.Stat_t)
				if st.Uid != pluginUID || st.Gid != pluginUID || info.Mode().Perm() != mode {
					t.Fatalf("%s: run %d left %s %d:%d %o, want 10001:10001 %o", where, run, filepath.Base(d), st.Uid, st.Gid, info.Mode().Perm(), mode)
				}
			}
		}
		hostDir, hostCache = dir, cache
	}

	// The plugin itself, with deploy/config/local.yaml moved to temporary paths.
	keys, err := os.MkdirTemp("", "trk8s-creds-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(keys) })
	installKeys(t, keys)
	if err := os.Chmod(keys, 0o755); err != nil {
		t.Fatal(err)
	}
	port := freeTCPPort(t)
	cfg, err := os.ReadFile(filepath.Join(repoRoot, "deploy/config/local.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	text := strings.NewReplacer(
		"/etc/trousseau/credentials", keys,
		socketDir, hostDir,
		"127.0.0.1:8787", "127.0.0.1:"+strconv.Itoa(port),
	).Replace(string(cfg))
	configFile := filepath.Join(keys, "config.yaml")
	if err := os.WriteFile(configFile, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	err = filepath.WalkDir(keys, func(p string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Chown(p, pluginUID, pluginUID)
	})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(setpriv, "--reuid=10001", "--regid=10001", "--clear-groups", "--inh-caps=-all", "--no-new-privs",
		node, filepath.Join(repoRoot, "bin", "trousseau.js"), "serve", "--config", configFile)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "TROUSSEAU_COMPILE_CACHE="+hostCache)
	logs := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("plugin log:\n%s", logs.String())
		}
	})
	socket := filepath.Join(hostDir, "kms.sock")
	deadline := time.Now().Add(20 * time.Second)
	for {
		if code := httpStatus("http://127.0.0.1:" + strconv.Itoa(port) + "/readyz"); code == 200 {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("plugin exited: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz not 200 within 20 s\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if code := httpStatus("http://127.0.0.1:" + strconv.Itoa(port) + "/healthz"); code != 200 {
		t.Errorf("/healthz answered %d", code)
	}
	info, err := os.Lstat(socket)
	if err != nil {
		t.Fatal(err)
	}
	st := info.Sys().(*syscall.Stat_t)
	if info.Mode()&os.ModeSocket == 0 || st.Uid != pluginUID || st.Gid != pluginUID || info.Mode().Perm() != 0o660 {
		t.Errorf("socket is %v %d:%d, want a 0660 socket owned by 10001:10001", info.Mode(), st.Uid, st.Gid)
	}
	if !strings.Contains(logs.String(), `"msg":"compile cache in use"`) {
		t.Errorf("the plugin did not use the compile cache folder the init container made:\n%s", logs.String())
	}
	// And the apiserver's side: a Status over the socket, from this (root) process.
	svc := newStatusClient(t, "unix://"+socket)
	if st := mustStatus(t, svc); st.Healthz != "ok" {
		t.Errorf("Status healthz %q", st.Healthz)
	}
}

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func httpStatus(url string) int {
	client := http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return 0
	}
	_ = resp.Body.Close()
	return resp.StatusCode
}
