package k8s

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	kmsservice "k8s.io/kms/pkg/service"
)

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func healthyStatus(st *kmsservice.StatusResponse, err error) bool {
	return err == nil && st.Healthz == "ok" && st.Version == "v2" && st.KeyID != ""
}

// 1. Secret-sized values round-trip through the apiserver's KMS v2 transformer.
func TestS1_V2RoundTrip(t *testing.T) {
	t.Parallel()
	p := newPlugin(t, "s1")
	p.start()
	obs := newStatusClient(t, p.endpoint())
	st := mustStatus(t, obs)
	if !healthyStatus(st, nil) {
		t.Fatalf("Status of a fresh plugin: %s", describeStatus(st, nil))
	}
	if len(st.KeyID) > 1024 {
		t.Fatalf("key_id is %d bytes; the apiserver accepts at most 1024", len(st.KeyID))
	}

	cfg := writeEncryptionConfig(t, p.dir, "enc.yaml", encryptionConfigYAML(p.socket, "v2"))
	a := startAPIServer(t, cfg, "s1-apiserver", false)
	if len(a.checks) != 1 || a.checks[0].Name() != "kms-providers" {
		t.Errorf("expected the single kms-providers health check of a v2-only config, got %d", len(a.checks))
	}
	a.waitHealthy(10 * time.Second)

	type written struct {
		name          string
		plain, stored []byte
	}
	var all []written
	var seed []byte
	// 1 MiB is the largest Secret the apiserver accepts.
	for _, n := range []int{1, 100, 4 << 10, 64 << 10, 1 << 20} {
		name := fmt.Sprintf("secret-%d", n)
		plain := randomBytes(t, n)
		stored := a.mustWrite(name, plain)
		o := decodeV2(t, stored)
		if o.KeyID != st.KeyID {
			t.Errorf("%s: stored key_id %q, Status key_id %q", name, o.KeyID, st.KeyID)
		}
		if o.EncryptedDEKSourceType != kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED {
			t.Errorf("%s: DEK source type %v, want the KDF seed", name, o.EncryptedDEKSourceType)
		}
		if n := len(o.EncryptedDEKSource); n == 0 || n > 1024 {
			t.Errorf("%s: wrapped seed is %d bytes (apiserver limit 1..1024)", name, n)
		}
		if n >= 16 && bytes.Contains(stored, plain) {
			t.Errorf("%s: plaintext visible in the stored value", name)
		}
		// One Encrypt per key_id: every write shares the seed made at start-up.
		if seed == nil {
			seed = o.EncryptedDEKSource
			t.Logf("wrapped seed %d bytes, %d annotation(s), key_id %d bytes", len(seed), len(o.Annotations), len(o.KeyID))
		} else if !bytes.Equal(seed, o.EncryptedDEKSource) {
			t.Errorf("%s: the apiserver made a new seed without a key_id change", name)
		}
		if a.mustRead(name, stored, plain) {
			t.Errorf("%s: freshly written value reported stale", name)
		}
		all = append(all, written{name, plain, stored})
	}

	if env, present := inspectEnvelope(t, decodeV2(t, all[0].stored)); len(present) != len(backendNames) || env.Quorum != 2 {
		t.Errorf("healthy write: wrapped by %v with quorum %d, want all of %v with quorum 2", present, env.Quorum, backendNames)
	}

	// An apiserver with a cold cache must get the seed back from the plugin (Decrypt).
	b := startAPIServer(t, cfg, "s1-apiserver-b", false)
	b.waitHealthy(10 * time.Second)
	for _, w := range all {
		if b.mustRead(w.name, w.stored, w.plain) {
			t.Errorf("%s: reported stale by a second apiserver on the same plugin", w.name)
		}
	}

	// The etcd key is authenticated: a value moved to another key must not read.
	if _, _, err := b.read("another-name", all[0].stored); err == nil {
		t.Errorf("a value moved to another etcd key was accepted")
	}

	// A wrapped seed altered in etcd must be rejected by the plugin's Decrypt.
	o := decodeV2(t, all[1].stored)
	o.EncryptedDEKSource = bytes.Clone(o.EncryptedDEKSource)
	o.EncryptedDEKSource[len(o.EncryptedDEKSource)/2] ^= 0x01
	body, err := proto.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	tampered := append([]byte(v2Prefix), body...)
	if _, _, err := b.read(all[1].name, tampered); err == nil {
		t.Errorf("a tampered wrapped seed was decrypted")
	} else {
		t.Logf("tampered seed rejected: %v", err)
	}
}

// 2. KMS v1beta1 through the apiserver's v1 envelope code.
func TestS2_V1Beta1Envelope(t *testing.T) {
	t.Parallel()
	if kmsV1GateOffErr == nil || !strings.Contains(kmsV1GateOffErr.Error(), "KMSv1=true") {
		t.Errorf("expected a v1 provider to be refused while the KMSv1 gate is off, got: %v", kmsV1GateOffErr)
	}

	p := newPlugin(t, "s2")
	p.start()
	cfg := writeEncryptionConfig(t, p.dir, "enc-v1.yaml", encryptionConfigYAML(p.socket, "v1"))
	a := startAPIServer(t, cfg, "s2-apiserver", false)
	if len(a.checks) != 1 || a.checks[0].Name() != "kms-provider-0" {
		t.Errorf("expected the per-provider kms-provider-0 check of a v1 config, got %d check(s)", len(a.checks))
	}
	a.waitHealthy(10 * time.Second)

	plain := randomBytes(t, 2048)
	s1 := a.mustWrite("v1-one", plain)
	s2 := a.mustWrite("v1-two", plain)
	deks := make([][]byte, 0, 2)
	for _, s := range [][]byte{s1, s2} {
		if !bytes.HasPrefix(s, []byte(v1Prefix)) {
			t.Fatalf("v1 value does not start with %q: %q", v1Prefix, truncate(s, 40))
		}
		rest := s[len(v1Prefix):]
		n := int(binary.BigEndian.Uint16(rest))
		if n == 0 || 2+n >= len(rest) {
			t.Fatalf("v1 value has an impossible DEK length %d", n)
		}
		deks = append(deks, rest[2:2+n])
	}
	if bytes.Equal(deks[0], deks[1]) {
		t.Errorf("v1 calls Encrypt on every write; two writes share one encrypted DEK")
	}
	t.Logf("v1 encrypted DEK: %d bytes", len(deks[0]))
	if a.mustRead("v1-one", s1, plain) {
		t.Errorf("v1 value reported stale")
	}
	cold := startAPIServer(t, cfg, "s2-apiserver-cold", false)
	cold.waitHealthy(10 * time.Second)
	if cold.mustRead("v1-two", s2, plain) {
		t.Errorf("v1 value reported stale by a cold apiserver")
	}

	// Migration v1 -> v2 on one socket: v2 first (writes), v1 second (reads old data).
	mixed := fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms:
          apiVersion: v2
          name: %[1]s-v2
          endpoint: unix://%[2]s
          timeout: 3s
      - kms:
          apiVersion: v1
          name: %[1]s
          endpoint: unix://%[2]s
          cachesize: 100
          timeout: 3s
`, providerName, p.socket)
	m := startAPIServer(t, writeEncryptionConfig(t, p.dir, "enc-mixed.yaml", mixed), "s2-apiserver-mixed", false)
	if len(m.checks) != 2 {
		t.Errorf("v1+v2 config: expected 2 health checks, got %d", len(m.checks))
	}
	m.waitHealthy(10 * time.Second)
	if !m.mustRead("v1-one", s1, plain) {
		t.Errorf("v1 data read through a v2-first config must be reported stale (to be migrated)")
	}
	migrated := m.mustWrite("v1-one", plain)
	if !bytes.HasPrefix(migrated, []byte("k8s:enc:kms:v2:"+providerName+"-v2:")) {
		t.Errorf("rewrite did not go to the v2 provider: %q", truncate(migrated, 40))
	}
	if m.mustRead("v1-one", migrated, plain) {
		t.Errorf("migrated value still stale")
	}
}

// 3. Key rotation: keygen --rotate on one local key -> new key_id -> new DEK; old data
// still decrypts and is stale.
func TestS3_KeyRotation(t *testing.T) {
	t.Parallel()
	p := newPlugin(t, "s3")
	p.start()
	obs := newStatusClient(t, p.endpoint())
	st0 := mustStatus(t, obs)

	cfg := writeEncryptionConfig(t, p.dir, "enc.yaml", encryptionConfigYAML(p.socket, "v2"))
	// reload=true is --encryption-provider-config-automatic-reload: the controller
	// rebuilds the transformers when the file changes, which is how an operator makes
	// the apiserver notice a rotation before its one-minute Status poll.
	a := startAPIServer(t, cfg, "s3-apiserver", true)
	a.waitHealthy(10 * time.Second)
	oldPlain := randomBytes(t, 512)
	oldStored := a.mustWrite("before-rotation", oldPlain)
	oldObj := decodeV2(t, oldStored)
	if oldObj.KeyID != st0.KeyID {
		t.Fatalf("stored key_id %q != Status key_id %q", oldObj.KeyID, st0.KeyID)
	}

	out := runCLI(t, "keygen", "--rotate", p.keyFile("local-a"))
	if strings.Contains(out, string(oldPlain)) {
		t.Fatalf("keygen printed secret material")
	}
	st1, _, took := waitStatus(t, obs, 10*time.Second, "the key_id to change after keygen --rotate",
		func(st *kmsservice.StatusResponse, err error) bool {
			return healthyStatus(st, err) && st.KeyID != st0.KeyID
		})
	t.Logf("key_id changed %v after keygen --rotate returned (probe interval %d ms)", took.Round(time.Millisecond), probeIntervalMs)
	if took > 5*time.Second {
		t.Errorf("rotation took %v to show in Status", took)
	}
	// KEP-3299: the key_id must be stable, no flip-flopping.
	for range 8 {
		time.Sleep(probeIntervalMs * time.Millisecond / 2)
		if st := mustStatus(t, obs); st.KeyID != st1.KeyID {
			t.Fatalf("key_id flip-flopped after rotation: %q then %q", st1.KeyID, st.KeyID)
		}
	}

	// Touch the EncryptionConfiguration: the apiserver's reload controller rebuilds the
	// transformers, whose first Status probe sees the new key_id and makes a new seed.
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString("# rotated local-a\n")
	_ = f.Close()
	newPlain := randomBytes(t, 512)
	var newStored []byte
	reloadBegan := time.Now()
	for {
		newStored = a.mustWrite("after-rotation", newPlain)
		if decodeV2(t, newStored).KeyID == st1.KeyID {
			break
		}
		if time.Since(reloadBegan) > 15*time.Second {
			t.Fatalf("the reloaded apiserver still writes with the old key_id after 15s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("apiserver reload picked up the new key_id in %v", time.Since(reloadBegan).Round(time.Millisecond))
	newObj := decodeV2(t, newStored)
	if bytes.Equal(newObj.EncryptedDEKSource, oldObj.EncryptedDEKSource) {
		t.Errorf("new writes still use the old seed")
	}
	if a.mustRead("after-rotation", newStored, newPlain) {
		t.Errorf("value written after rotation reported stale")
	}
	if !a.mustRead("before-rotation", oldStored, oldPlain) {
		t.Errorf("value written before rotation not reported stale")
	}

	// A cold apiserver must unwrap the old seed through the retired key version.
	cold := startAPIServer(t, cfg, "s3-apiserver-cold", false)
	cold.waitHealthy(10 * time.Second)
	if !cold.mustRead("before-rotation", oldStored, oldPlain) {
		t.Errorf("cold apiserver: pre-rotation value not stale")
	}
	if cold.mustRead("after-rotation", newStored, newPlain) {
		t.Errorf("cold apiserver: post-rotation value stale")
	}
}

// 4 and 5. One backend down when the apiserver starts; then it recovers.
func TestS4S5_BackendDownThenRecovered(t *testing.T) {
	t.Parallel()
	p := newPlugin(t, "s4")
	p.start()
	obs := newStatusClient(t, p.endpoint())
	full := mustStatus(t, obs).KeyID
	cfg := writeEncryptionConfig(t, p.dir, "enc.yaml", encryptionConfigYAML(p.socket, "v2"))

	a0 := startAPIServer(t, cfg, "s4-before", false)
	a0.waitHealthy(10 * time.Second)
	plain0 := randomBytes(t, 300)
	stored0 := a0.mustWrite("written-healthy", plain0)
	a0.stop()
	t.Logf("SIGTERM to exit: %v", p.stop(true).Round(time.Millisecond))

	away := filepath.Join(p.dir, "away", "local-c.key")
	moveFile(t, p.keyFile("local-c"), away)
	p.start()
	partial, err := status(t, obs)

	var stored1, plain1 []byte
	t.Run("4_backend_down_at_apiserver_start", func(t *testing.T) {
		if !healthyStatus(partial, err) {
			t.Fatalf("2 of 3 backends meet quorum 2, Status should be healthy; got %s", describeStatus(partial, err))
		}
		if partial.KeyID == full {
			t.Errorf("the key_id did not change while local-c is unavailable (%q)", full)
		}
		a := startAPIServer(t, cfg, "s4-apiserver", false)
		a.waitHealthy(10 * time.Second)
		if !a.mustRead("written-healthy", stored0, plain0) {
			t.Errorf("value written with all backends not reported stale under the partial key_id")
		}
		plain1 = randomBytes(t, 300)
		stored1 = a.mustWrite("written-degraded", plain1)
		o := decodeV2(t, stored1)
		if o.KeyID != partial.KeyID {
			t.Errorf("degraded write carries key_id %q, Status says %q", o.KeyID, partial.KeyID)
		}
		// The new seed is wrapped by the two reachable backends: exactly a quorum.
		if env, present := inspectEnvelope(t, o); len(present) != 2 || !present["local-a"] || !present["local-b"] || env.Quorum != 2 {
			t.Errorf("degraded write: copies present %v, quorum %d; want local-a and local-b, quorum 2", present, env.Quorum)
		}
		if a.mustRead("written-degraded", stored1, plain1) {
			t.Errorf("fresh degraded write reported stale")
		}
	})

	t.Run("5_degraded_envelope_stale_after_recovery", func(t *testing.T) {
		if stored1 == nil {
			t.Skip("scenario 4 wrote nothing")
		}
		moveFile(t, away, p.keyFile("local-c"))
		restored := time.Now()
		seen := []string{partial.KeyID}
		for {
			st, err := status(t, obs)
			if err == nil && st.KeyID != seen[len(seen)-1] {
				seen = append(seen, st.KeyID)
			}
			if err == nil && st.KeyID == full && st.Healthz == "ok" {
				break
			}
			if time.Since(restored) > 15*time.Second {
				t.Fatalf("key_id did not return to the full one within 15s of restoring local-c; last %s", describeStatus(st, err))
			}
			time.Sleep(50 * time.Millisecond)
		}
		took := time.Since(restored)
		t.Logf("full key_id back %v after the key file returned (recoverAfterMs %d)", took.Round(time.Millisecond), recoverAfterMs)
		if took < recoverAfterMs*time.Millisecond*9/10 {
			t.Errorf("key_id returned after %v, before the %d ms recovery hold-off", took, recoverAfterMs)
		}
		if len(seen) != 2 {
			t.Errorf("key_id went through %d values during recovery, want partial -> full", len(seen))
		}
		b := startAPIServer(t, cfg, "s5-apiserver", false)
		b.waitHealthy(10 * time.Second)
		if !b.mustRead("written-degraded", stored1, plain1) {
			t.Errorf("envelope written while local-c was down is not stale after recovery")
		}
		if b.mustRead("written-healthy", stored0, plain0) {
			t.Errorf("envelope written with all backends is stale after recovery")
		}
		if o := decodeV2(t, b.mustWrite("written-recovered", plain1)); o.KeyID != full {
			t.Errorf("write after recovery carries key_id %q, want the full %q", o.KeyID, full)
		}
	})
}

// 6. All backends down: health fails clearly, cached DEKs still read, recovery by itself.
func TestS6_AllBackendsDown(t *testing.T) {
	t.Parallel()
	p := newPlugin(t, "s6")
	p.start()
	obs := newStatusClient(t, p.endpoint())
	full := mustStatus(t, obs).KeyID
	cfg := writeEncryptionConfig(t, p.dir, "enc.yaml", encryptionConfigYAML(p.socket, "v2"))

	a := startAPIServer(t, cfg, "s6-apiserver", false)
	a.waitHealthy(10 * time.Second)
	other := startAPIServer(t, cfg, "s6-other", false)
	other.waitHealthy(10 * time.Second)
	plainA, plainB := randomBytes(t, 200), randomBytes(t, 200)
	storedA := a.mustWrite("cached", plainA)
	storedB := other.mustWrite("uncached", plainB) // a different seed that a has never seen
	other.stop()

	for _, n := range backendNames {
		moveFile(t, p.keyFile(n), filepath.Join(p.dir, "away", n+".key"))
	}
	downAt := time.Now()
	st, err, took := waitStatus(t, obs, 10*time.Second, "Status to report that no backend is available",
		func(st *kmsservice.StatusResponse, err error) bool { return err != nil || st.Healthz != "ok" })
	t.Logf("Status %v after the last key file went: %s", took.Round(time.Millisecond), describeStatus(st, err))
	if err == nil {
		t.Logf("note: Status answered healthz=%q without a gRPC error; per kubernetes#138950 the apiserver keeps its rotation logic running in that case", st.Healthz)
	}

	// The apiserver caches a successful check for 20 s.
	var checkErr error
	for {
		if checkErr = a.check(); checkErr != nil {
			break
		}
		if time.Since(downAt) > 30*time.Second {
			t.Fatalf("apiserver health check still passes 30s into a total outage")
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("apiserver health check fails %v into the outage: %v", time.Since(downAt).Round(time.Millisecond), checkErr)
	msg := strings.ToLower(checkErr.Error())
	if !strings.Contains(msg, providerName) {
		t.Errorf("health error does not name the provider: %v", checkErr)
	}
	if !strings.Contains(msg, "backend") && !strings.Contains(msg, "quorum") && !strings.Contains(msg, "unavailable") {
		t.Errorf("health error does not say what is wrong (no backend/quorum/unavailable): %v", checkErr)
	}

	if a.mustRead("cached", storedA, plainA) {
		t.Errorf("cached read during the outage reported stale")
	}
	if _, _, err := a.read("uncached", storedB); err == nil {
		t.Errorf("a seed that was never cached decrypted with every backend down")
	} else {
		t.Logf("uncached read during the outage fails as expected: %v", err)
	}
	// kube-apiserver coasts on its current seed for up to 3 minutes.
	if _, err := a.write("during-outage", plainA); err != nil {
		t.Errorf("write on the cached seed during the outage: %v", err)
	}
	// An apiserver that starts during the outage has no seed at all: reads fail too.
	cold := startAPIServer(t, cfg, "s6-cold", false)
	if _, _, err := cold.read("cached", storedA); err == nil {
		t.Logf("note: a cold apiserver could read during the outage")
	} else {
		t.Logf("cold apiserver cannot read during the outage (apiserver needs a primed DEK even for reads): %v", err)
	}

	for _, n := range backendNames {
		moveFile(t, filepath.Join(p.dir, "away", n+".key"), p.keyFile(n))
	}
	backAt := time.Now()
	_, _, took = waitStatus(t, obs, 15*time.Second, "the full key_id after every key file returned",
		func(st *kmsservice.StatusResponse, err error) bool { return healthyStatus(st, err) && st.KeyID == full })
	t.Logf("Status healthy with the full key_id %v after the key files returned", took.Round(time.Millisecond))
	took = a.waitHealthy(15 * time.Second)
	t.Logf("apiserver health check recovered by itself %v later", took.Round(time.Millisecond))
	if o := decodeV2(t, a.mustWrite("after-outage", plainA)); o.KeyID != full {
		t.Errorf("write after recovery carries key_id %q, want %q", o.KeyID, full)
	}
	if a.mustRead("uncached", storedB, plainB) {
		t.Errorf("value reported stale after recovery")
	}
	cold.waitHealthy(15 * time.Second)
	cold.mustRead("cached", storedA, plainA)
	t.Logf("total outage-to-recovery test span %v", time.Since(backAt).Round(time.Millisecond))
}

// 7. The plugin restarts under a running apiserver; its transformers carry on.
func TestS7_PluginRestart(t *testing.T) {
	t.Parallel()
	p := newPlugin(t, "s7")
	p.start()
	obs := newStatusClient(t, p.endpoint())
	keyID := mustStatus(t, obs).KeyID
	cfg := writeEncryptionConfig(t, p.dir, "enc.yaml", encryptionConfigYAML(p.socket, "v2"))

	other := startAPIServer(t, cfg, "s7-other", false)
	plainO := randomBytes(t, 100)
	storedO := other.mustWrite("from-other", plainO)
	other.stop()

	a := startAPIServer(t, cfg, "s7-apiserver", false)
	a.waitHealthy(10 * time.Second)
	plainA := randomBytes(t, 100)
	storedA := a.mustWrite("before-restart", plainA)

	took := p.stop(true)
	t.Logf("SIGTERM to exit: %v", took.Round(time.Millisecond))
	a.mustRead("before-restart", storedA, plainA)
	if _, err := a.write("while-down", plainA); err != nil {
		t.Errorf("write on the cached seed while the plugin is down: %v", err)
	}

	p.start()
	// An uncached seed needs Decrypt over the same client connection, which must redial.
	if a.mustRead("from-other", storedO, plainO) {
		t.Errorf("value reported stale after a plugin restart")
	}
	// The next real Status call (after the 20 s success cache) must go to the new process.
	if wait := time.Until(a.loadedAt.Add(21 * time.Second)); wait > 0 {
		time.Sleep(wait)
	}
	if err := a.check(); err != nil {
		t.Errorf("health check after plugin restart: %v", err)
	}
	if st := mustStatus(t, obs); st.KeyID != keyID {
		t.Errorf("key_id changed across a plugin restart: %q -> %q (every restart would force a storage migration)", keyID, st.KeyID)
	}
	if o := decodeV2(t, a.mustWrite("after-restart", plainA)); o.KeyID != keyID {
		t.Errorf("write after restart carries key_id %q, want %q", o.KeyID, keyID)
	}
}

// 8. Two apiservers, each with its own plugin on copies of the same key files.
func TestS8_TwoAPIServers(t *testing.T) {
	t.Parallel()
	p1 := newPlugin(t, "s8-node1")
	p1.start()
	p2 := newPlugin(t, "s8-node2")
	for _, n := range backendNames {
		copyFile(t, p1.keyFile(n), p2.keyFile(n))
	}
	p2.start()
	st1 := mustStatus(t, newStatusClient(t, p1.endpoint()))
	st2 := mustStatus(t, newStatusClient(t, p2.endpoint()))
	if st1.KeyID != st2.KeyID {
		t.Errorf("two plugins on the same keys disagree on key_id: %q vs %q", st1.KeyID, st2.KeyID)
	}

	a := startAPIServer(t, writeEncryptionConfig(t, p1.dir, "enc.yaml", encryptionConfigYAML(p1.socket, "v2")), "kube-apiserver-node1", false)
	b := startAPIServer(t, writeEncryptionConfig(t, p2.dir, "enc.yaml", encryptionConfigYAML(p2.socket, "v2")), "kube-apiserver-node2", false)
	a.waitHealthy(10 * time.Second)
	b.waitHealthy(10 * time.Second)
	plainA, plainB := randomBytes(t, 700), randomBytes(t, 700)
	sa := a.mustWrite("from-node1", plainA)
	sb := b.mustWrite("from-node2", plainB)
	if ka, kb := decodeV2(t, sa).KeyID, decodeV2(t, sb).KeyID; ka != kb {
		t.Errorf("stored key_ids differ between the apiservers: %q vs %q", ka, kb)
	}
	if b.mustRead("from-node1", sa, plainA) {
		t.Errorf("node2 reports node1's write stale")
	}
	if a.mustRead("from-node2", sb, plainB) {
		t.Errorf("node1 reports node2's write stale")
	}
}
