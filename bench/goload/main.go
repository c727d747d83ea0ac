// Command goload drives a Trousseau socket with KMS v2 Decrypt (or Encrypt) calls from
// Go, as kube-apiserver does (google.golang.org/grpc and the k8s.io/kms API types), so
// the load generator costs the machine what a real apiserver client would, not what a
// Node gRPC client costs. Used by `npm run bench` (closed loop) and by
// `npm run bench -- --scenario overload` (burst).
//
//	goload -socket PATH -op decrypt -concurrency 16 -seconds 5 [-warmup N] [-per-second]
//	goload -socket PATH -op encrypt -burst 5000 [-deadline-ms 3000]
//	goload -socket PATH -op decrypt -burst 5000 -envelopes FILE
//
// Burst: N calls started at once on one connection (the apiserver's one connection),
// each with its own deadline; counts OK, UNAVAILABLE "overloaded", DEADLINE_EXCEEDED
// and other errors, and the answer times. For decrypt, FILE holds one JSON envelope a
// line ({"ciphertext": base64, "key_id": string, "annotations": {name: base64}}), used
// in turn, so that each call needs its own unwrap.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
)

func main() {
	socket := flag.String("socket", "", "plugin unix socket")
	op := flag.String("op", "decrypt", "decrypt or encrypt")
	concurrency := flag.Int("concurrency", 16, "concurrent callers")
	seconds := flag.Float64("seconds", 5, "measured duration")
	burst := flag.Int("burst", 0, "burst mode: this many calls at once instead of a closed loop")
	deadlineMs := flag.Int("deadline-ms", 3000, "deadline of each call")
	envelopes := flag.String("envelopes", "", "decrypt: file of envelopes, one JSON object a line (burst: one per call; closed loop: cycled through)")
	warmup := flag.Int("warmup", -1, "closed loop: calls before measuring (default 4 per caller)")
	perSecond := flag.Bool("per-second", false, "closed loop: also report OK, errors and p99 for each second")
	flag.Parse()
	deadline := time.Duration(*deadlineMs) * time.Millisecond

	conn, err := grpc.NewClient("unix://"+*socket, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("localhost"))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	client := kmsapi.NewKeyManagementServiceClient(conn)
	ctx := context.Background()
	if *burst > 0 {
		runBurst(ctx, client, *op, *burst, deadline, *envelopes)
		return
	}
	seed := make([]byte, 32)
	enc, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "goload"})
	if err != nil {
		fail(err)
	}
	// -envelopes in a closed loop: Decrypt cycles through them, as a burst of distinct
	// envelopes does, instead of repeating one.
	var envs []envelope
	if *op == "decrypt" && *envelopes != "" {
		envs = readEnvelopes(*envelopes)
	}
	var next atomic.Uint64
	call := func() error {
		cctx, cancel := context.WithTimeout(ctx, deadline)
		defer cancel()
		if *op == "encrypt" {
			_, err := client.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "goload"})
			return err
		}
		if len(envs) > 0 {
			e := envs[(next.Add(1)-1)%uint64(len(envs))]
			_, err := client.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: e.Ciphertext, KeyId: e.KeyID, Annotations: e.Annotations, Uid: "goload"})
			return err
		}
		_, err := client.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "goload"})
		return err
	}
	// Warm up.
	if *warmup < 0 {
		*warmup = *concurrency * 4
	}
	for i := 0; i < *warmup; i++ {
		_ = call()
	}
	var mu sync.Mutex
	var latencies []float64
	errors := 0
	// -per-second: answers bucketed by the second (since the start) in which they came.
	type second struct {
		latencies []float64
		errors    int
	}
	var buckets []second
	note := func(at time.Duration, ms float64, failed bool) {
		i := int(at / time.Second)
		mu.Lock()
		for len(buckets) <= i {
			buckets = append(buckets, second{})
		}
		if failed {
			buckets[i].errors++
		} else {
			buckets[i].latencies = append(buckets[i].latencies, ms)
		}
		mu.Unlock()
	}
	firstErrors := []string{}
	cpuBefore := cpuSeconds()
	stop := time.Now().Add(time.Duration(*seconds * float64(time.Second)))
	started := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]float64, 0, 4096)
			localErrors := 0
			for time.Now().Before(stop) {
				t0 := time.Now()
				err := call()
				ms := float64(time.Since(t0).Microseconds()) / 1000
				if *perSecond {
					note(time.Since(started), ms, err != nil)
				}
				if err != nil {
					localErrors++
					mu.Lock()
					if len(firstErrors) < 3 {
						firstErrors = append(firstErrors, err.Error())
					}
					mu.Unlock()
					continue
				}
				local = append(local, ms)
			}
			mu.Lock()
			latencies = append(latencies, local...)
			errors += localErrors
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(started).Seconds()
	sort.Float64s(latencies)
	pct := func(p float64) float64 { return percentile(latencies, p) }
	result := map[string]any{
		"op": *op, "concurrency": *concurrency, "ops": len(latencies), "errors": errors,
		"opsPerSec": int(float64(len(latencies)) / elapsed), "p50": pct(50), "p99": pct(99), "p999": pct(99.9),
		"warmup": *warmup, "errorExamples": firstErrors,
		"clientCpuSeconds": cpuSeconds() - cpuBefore,
	}
	if *perSecond {
		perSec := []map[string]any{}
		for _, s := range buckets {
			sort.Float64s(s.latencies)
			p99 := any(nil)
			if len(s.latencies) > 0 {
				p99 = percentile(s.latencies, 99)
			}
			perSec = append(perSec, map[string]any{"ok": len(s.latencies), "errors": s.errors, "p99": p99})
		}
		result["seconds"] = perSec
	}
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
}

// percentile of sorted values (nearest rank); 0 when there are none.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p/100*float64(len(sorted))+0.5) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

type envelope struct {
	Ciphertext  []byte            `json:"ciphertext"`
	KeyID       string            `json:"key_id"`
	Annotations map[string][]byte `json:"annotations"`
}

func readEnvelopes(file string) []envelope {
	f, err := os.Open(file)
	if err != nil {
		fail(err)
	}
	defer f.Close()
	var all []envelope
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	for scanner.Scan() {
		var e envelope
		if err := json.Unmarshal(scanner.Bytes(), &e); err != nil {
			fail(err)
		}
		all = append(all, e)
	}
	if err := scanner.Err(); err != nil {
		fail(err)
	}
	if len(all) == 0 {
		fail(fmt.Errorf("no envelopes in %s", file))
	}
	return all
}

type outcome struct {
	kind string // ok, overloaded, deadline, other
	ms   float64
	what string // other: code and message
}

// runBurst starts n calls at once on the one connection, each with its own deadline,
// and prints one JSON object with the counts and answer times.
func runBurst(ctx context.Context, client kmsapi.KeyManagementServiceClient, op string, n int, deadline time.Duration, envelopeFile string) {
	var envs []envelope
	if op == "decrypt" {
		if envelopeFile == "" {
			fail(fmt.Errorf("burst decrypt needs -envelopes"))
		}
		envs = readEnvelopes(envelopeFile)
	}
	plaintexts := make([][]byte, n)
	for i := range plaintexts {
		plaintexts[i] = make([]byte, 32)
		_, _ = rand.Read(plaintexts[i])
	}
	// The connection is up before the burst, as an apiserver's is.
	if _, err := client.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
		fail(err)
	}
	outcomes := make([]outcome, n)
	answeredAt := make([]time.Duration, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			t0 := time.Now()
			cctx, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			var err error
			if op == "encrypt" {
				_, err = client.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: plaintexts[i], Uid: fmt.Sprintf("burst-%d", i)})
			} else {
				e := envs[i%len(envs)]
				_, err = client.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: e.Ciphertext, KeyId: e.KeyID, Annotations: e.Annotations, Uid: fmt.Sprintf("burst-%d", i)})
			}
			ms := float64(time.Since(t0).Microseconds()) / 1000
			answeredAt[i] = time.Since(t0)
			switch s, _ := status.FromError(err); {
			case err == nil:
				outcomes[i] = outcome{kind: "ok", ms: ms}
			case s.Code() == codes.Unavailable && strings.Contains(s.Message(), "overloaded"):
				outcomes[i] = outcome{kind: "overloaded", ms: ms}
			case s.Code() == codes.DeadlineExceeded:
				outcomes[i] = outcome{kind: "deadline", ms: ms}
			default:
				msg := s.Message()
				if len(msg) > 400 {
					msg = msg[:400]
				}
				outcomes[i] = outcome{kind: "other", ms: ms, what: s.Code().String() + ": " + msg}
			}
		}(i)
	}
	cpuBefore := cpuSeconds()
	began := time.Now()
	close(start)
	wg.Wait()
	drain := time.Since(began)
	clientCPU := cpuSeconds() - cpuBefore

	var okMs, refusedMs, deadlineMs []float64
	var lastOK time.Duration
	others := map[string]bool{}
	otherCount := 0
	for i, o := range outcomes {
		switch o.kind {
		case "ok":
			okMs = append(okMs, o.ms)
			if answeredAt[i] > lastOK {
				lastOK = answeredAt[i]
			}
		case "overloaded":
			refusedMs = append(refusedMs, o.ms)
		case "deadline":
			deadlineMs = append(deadlineMs, o.ms)
		default:
			otherCount++
			others[o.what] = true
		}
	}
	sort.Float64s(okMs)
	sort.Float64s(refusedMs)
	examples := []string{}
	for what := range others {
		if len(examples) < 3 {
			examples = append(examples, what)
		}
	}
	goodput := 0
	if len(okMs) > 0 && lastOK > 0 {
		goodput = int(float64(len(okMs)) / lastOK.Seconds())
	}
	times := func(v []float64) map[string]any {
		if len(v) == 0 {
			return map[string]any{"p50": nil, "p99": nil, "max": nil}
		}
		return map[string]any{"p50": percentile(v, 50), "p99": percentile(v, 99), "max": v[len(v)-1]}
	}
	out, _ := json.Marshal(map[string]any{
		"op": op, "calls": n, "deadlineMs": deadline.Milliseconds(),
		"ok": len(okMs), "refusedOverloaded": len(refusedMs), "deadlineExceeded": len(deadlineMs),
		"otherErrors": otherCount, "otherExamples": examples,
		"goodputPerSecond": goodput, "okLatencyMs": times(okMs), "refusalLatencyMs": times(refusedMs),
		"drainMs": drain.Milliseconds(), "clientCpuSeconds": clientCPU,
	})
	fmt.Println(string(out))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "goload:", err)
	os.Exit(1)
}

// cpuSeconds is this process's user + system CPU time so far: the client's own cost,
// which shares the machine with the plugin (5,000 goroutines waiting for a stream on
// one connection are not free).
func cpuSeconds() float64 {
	var u syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &u); err != nil {
		return 0
	}
	return float64(u.Utime.Sec+u.Stime.Sec) + float64(u.Utime.Usec+u.Stime.Usec)/1e6
}
