// Command goload drives a Trousseau socket with KMS v2 Decrypt (or Encrypt) calls from
// Go, as kube-apiserver does (google.golang.org/grpc and the k8s.io/kms API types), so
// the load generator costs the machine what a real apiserver client would, not what a
// Node gRPC client costs. Used by `npm run bench -- --go-client`.
//
//	goload -socket PATH -op decrypt -concurrency 16 -seconds 5
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

func main() {
	socket := flag.String("socket", "", "plugin unix socket")
	op := flag.String("op", "decrypt", "decrypt or encrypt")
	concurrency := flag.Int("concurrency", 16, "concurrent callers")
	seconds := flag.Float64("seconds", 5, "measured duration")
	flag.Parse()

	conn, err := grpc.NewClient("unix://"+*socket, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("localhost"))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	client := kmsapi.NewKeyManagementServiceClient(conn)
	ctx := context.Background()
	seed := make([]byte, 32)
	enc, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "goload"})
	if err != nil {
		fail(err)
	}
	call := func() error {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		if *op == "encrypt" {
			_, err := client.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "goload"})
			return err
		}
		_, err := client.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "goload"})
		return err
	}
	// Warm up.
	for i := 0; i < *concurrency*4; i++ {
		_ = call()
	}
	var mu sync.Mutex
	var latencies []float64
	errors := 0
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
				if err := call(); err != nil {
					localErrors++
					continue
				}
				local = append(local, float64(time.Since(t0).Microseconds())/1000)
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
	pct := func(p float64) float64 {
		if len(latencies) == 0 {
			return 0
		}
		i := int(p/100*float64(len(latencies))+0.5) - 1
		if i < 0 {
			i = 0
		}
		if i >= len(latencies) {
			i = len(latencies) - 1
		}
		return latencies[i]
	}
	out, _ := json.Marshal(map[string]any{
		"op": *op, "concurrency": *concurrency, "ops": len(latencies), "errors": errors,
		"opsPerSec": int(float64(len(latencies)) / elapsed), "p50": pct(50), "p99": pct(99), "p999": pct(99.9),
	})
	fmt.Println(string(out))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "goload:", err)
	os.Exit(1)
}
