package k8s

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
)

// 10. Bursts on the apiserver's one connection never cost the connection.
//
// kube-apiserver's own KMS v2 client (one gRPC connection) sends bursts of Encrypts
// beyond the plugin's stream bound. grpc-go opens a stream the moment the server
// closes one; Node's HTTP/2 layer drops a closed stream from its table only once the
// stream's close event has run, and refuses a new stream meanwhile (RST_STREAM
// ENHANCE_YOUR_CALM: ResourceExhausted for that call alone). The client answers a
// refusal with the next stream at once, so on a busy event loop they come in runs, and
// after more than 100 in a row (the count restarts when a stream is accepted) Node's
// default ends the whole connection (GOAWAY INTERNAL_ERROR): every call on it fails
// with it. Each call here must be served, refused ("overloaded"), refused by Node's
// HTTP/2 layer or past its deadline; none may fail with the connection.
//
// Whether a run of 100 happens in these bursts depends on the machine (it did in 4 of
// 6 runs without the fix on a slow one, never on a faster one): the regression test
// that provokes it every time is test/reliability/rejected-streams.test.ts. This one
// checks the same with the apiserver's own client and a realistic load.
func TestS10_BurstsKeepTheConnection(t *testing.T) {
	p := newPlugin(t, "burst")
	p.start()
	svc := newStatusClient(t, p.endpoint())

	kinds := map[string]int{}
	examples := map[string]string{}
	var mu sync.Mutex
	const bursts, size = 4, 5000
	for burst := 0; burst < bursts; burst++ {
		var wg sync.WaitGroup
		for i := 0; i < size; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				defer cancel()
				_, err := svc.Encrypt(ctx, fmt.Sprintf("burst-%d-%d", burst, i), []byte("a 32-byte DEK seed, not a secret"))
				kind := classifyBurstAnswer(err)
				mu.Lock()
				kinds[kind]++
				if err != nil && examples[kind] == "" {
					examples[kind] = err.Error()
				}
				mu.Unlock()
			}(i)
		}
		wg.Wait()
	}
	t.Logf("%d Encrypts in %d bursts on one connection: %v", bursts*size, bursts, kinds)
	if n := kinds["failed with the connection"]; n > 0 {
		t.Errorf("%d calls failed with the connection, e.g. %s", n, examples["failed with the connection"])
	}
	if kinds["ok"] < bursts*size/2 {
		t.Errorf("only %d of %d Encrypts were served", kinds["ok"], bursts*size)
	}
}

const refusedByNode = "refused by Node's HTTP/2 layer"

func classifyBurstAnswer(err error) string {
	if err == nil {
		return "ok"
	}
	st, _ := grpcstatus.FromError(err)
	switch {
	case st.Code() == codes.Unavailable && strings.Contains(st.Message(), "overloaded"):
		return "overloaded"
	case st.Code() == codes.ResourceExhausted && strings.Contains(st.Message(), "ENHANCE_YOUR_CALM"):
		return refusedByNode
	case st.Code() == codes.DeadlineExceeded:
		return "deadline"
	default:
		return "failed with the connection"
	}
}
