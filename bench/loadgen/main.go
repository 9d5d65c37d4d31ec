// Command kapbench is the upstream server and the load generator of bench/run.py.
//
// Standard library only (Debian's golang-go is Go 1.19), built at bench time
// into bench/bin/. Every client subcommand runs for a bounded time and prints
// one JSON object on stdout.
//
//	kapbench upstream -ports 3 -cert c.pem -key k.pem
//	    Listens on 127.0.0.1 (kernel-chosen ports) and prints "ports p1 p2 ...".
//	    Per connection it peeks at the first byte: 0x16 is a TLS ClientHello,
//	    served as HTTPS (GET /readyz -> 200 "ok"; each probe is reported on
//	    stdout as "probe <port> <unix ns> <path>"); anything else is a raw test
//	    stream whose first byte says what to do:
//	      'E' echo every byte back;
//	      'S' sink: read to EOF, then answer the 8-byte count and close;
//	      'D' + 8-byte big-endian n: send n bytes, then close.
//	kapbench bulk -addr A -dir up|down -bytes N
//	kapbench rps -addr A -conns 50 -seconds 3 -size 64
//	kapbench churn -addr A -workers 32 -seconds 3 -size 64
//	kapbench lat -addr A -count 2000 -gap 1ms -size 64
//	kapbench hold -addr A -conns 1000 -seconds 60
//	    Opens conns connections, one echo on each, prints {"held": n}, then
//	    keeps them until stdin closes or the time is up.
//	kapbench busy -seconds 30
//	    Spins one goroutine per CPU (run it with nice 19) so cores never idle.
package main

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kapbench upstream|bulk|rps|churn|lat|hold|busy [flags]")
		os.Exit(2)
	}
	cmd, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "address to connect to")
	ports := fs.Int("ports", 3, "upstream: how many ports to listen on")
	cert := fs.String("cert", "", "upstream: TLS certificate (PEM)")
	key := fs.String("key", "", "upstream: TLS key (PEM)")
	dir := fs.String("dir", "up", "bulk: up (client sends) or down")
	nbytes := fs.Int64("bytes", 1<<30, "bulk: bytes to move")
	conns := fs.Int("conns", 50, "rps/hold: connections")
	workers := fs.Int("workers", 32, "churn: workers")
	seconds := fs.Float64("seconds", 3, "how long to run")
	size := fs.Int("size", 64, "request size")
	count := fs.Int("count", 2000, "lat: round trips")
	gap := fs.Duration("gap", time.Millisecond, "lat: pause between round trips")
	if err := fs.Parse(args); err != nil {
		os.Exit(2)
	}
	dur := time.Duration(*seconds * float64(time.Second))
	var out map[string]any
	switch cmd {
	case "upstream":
		upstream(*ports, *cert, *key)
		return
	case "busy":
		busy(dur)
		return
	case "bulk":
		out = bulk(*addr, *dir, *nbytes)
	case "rps":
		out = rps(*addr, *conns, *size, dur)
	case "churn":
		out = churn(*addr, *workers, *size, dur)
	case "lat":
		out = lat(*addr, *count, *size, *gap)
	case "hold":
		out = hold(*addr, *conns, dur)
	default:
		fmt.Fprintln(os.Stderr, "unknown subcommand", cmd)
		os.Exit(2)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "kapbench: "+format+"\n", a...)
	os.Exit(1)
}

// ---- upstream -----------------------------------------------------------------

// peeked is a connection whose first byte was read by the sniffer.
type peeked struct {
	net.Conn
	r *bufio.Reader
}

func (p peeked) Read(b []byte) (int, error) { return p.r.Read(b) }

// chanListener feeds sniffed TLS connections to net/http.
type chanListener struct {
	ch   chan net.Conn
	addr net.Addr
}

func (l *chanListener) Accept() (net.Conn, error) {
	c, ok := <-l.ch
	if !ok {
		return nil, io.EOF
	}
	return c, nil
}
func (l *chanListener) Close() error   { return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }

var stdoutMu sync.Mutex

func upstream(n int, certFile, keyFile string) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		fail("%v", err)
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}}
	var listeners []net.Listener
	var portList []string
	for i := 0; i < n; i++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fail("%v", err)
		}
		listeners = append(listeners, ln)
		portList = append(portList, fmt.Sprint(ln.Addr().(*net.TCPAddr).Port))
	}
	for _, ln := range listeners {
		port := ln.Addr().(*net.TCPAddr).Port
		https := &chanListener{ch: make(chan net.Conn, 64), addr: ln.Addr()}
		mux := http.NewServeMux()
		mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/readyz" || r.URL.Path == "/livez" || r.URL.Path == "/healthz" {
				stdoutMu.Lock()
				fmt.Printf("probe %d %d %s\n", port, time.Now().UnixNano(), r.URL.Path)
				stdoutMu.Unlock()
				w.Header().Set("Content-Type", "text/plain")
				_, _ = w.Write([]byte("ok"))
				return
			}
			http.NotFound(w, r)
		})
		srv := &http.Server{Handler: mux, TLSConfig: tlsConf}
		go func() { _ = srv.ServeTLS(https, "", "") }()
		go func(ln net.Listener) {
			for {
				c, err := ln.Accept()
				if err != nil {
					if ne, ok := err.(net.Error); ok && ne.Timeout() {
						continue
					}
					if strings.Contains(err.Error(), "too many open files") {
						time.Sleep(100 * time.Millisecond)
						continue
					}
					fail("accept: %v", err)
				}
				go serveRaw(c, https)
			}
		}(ln)
	}
	fmt.Printf("ports %s\n", strings.Join(portList, " "))
	// Exit when the bench closes stdin (or dies).
	_, _ = io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

func serveRaw(c net.Conn, https *chanListener) {
	r := bufio.NewReaderSize(c, 16) // small: 9,000 idle connections must stay cheap
	first, err := r.Peek(1)
	if err != nil {
		c.Close()
		return
	}
	if first[0] == 0x16 {
		https.ch <- peeked{c, r}
		return
	}
	defer c.Close()
	mode, _ := r.ReadByte()
	switch mode {
	case 'E':
		// 4 KiB: echo traffic is 64-byte messages, and 9,000 held connections
		// must not cost the upstream a gigabyte.
		buf := make([]byte, 4096)
		n := r.Buffered()
		if n > 0 {
			_, _ = r.Read(buf[:n])
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				// Half-close: answer EOF with EOF.
				if tc, ok := c.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
				return
			}
		}
	case 'S':
		buf := make([]byte, 1<<20)
		n := int64(r.Buffered())
		_, _ = r.Discard(int(n))
		for {
			m, err := c.Read(buf)
			n += int64(m)
			if err != nil {
				break
			}
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		_, _ = c.Write(b[:])
	case 'D':
		var b [8]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return
		}
		sendN(c, int64(binary.BigEndian.Uint64(b[:])))
	}
}

var zeros = make([]byte, 1<<20)

func sendN(w io.Writer, n int64) error {
	for n > 0 {
		chunk := int64(len(zeros))
		if n < chunk {
			chunk = n
		}
		m, err := w.Write(zeros[:chunk])
		n -= int64(m)
		if err != nil {
			return err
		}
	}
	return nil
}

// ---- clients ------------------------------------------------------------------

func dial(addr string) net.Conn {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		fail("dial %s: %v", addr, err)
	}
	return c
}

func bulk(addr, dir string, n int64) map[string]any {
	c := dial(addr)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(120 * time.Second))
	start := time.Now()
	var got int64
	if dir == "up" {
		if _, err := c.Write([]byte{'S'}); err != nil {
			fail("%v", err)
		}
		if err := sendN(c, n); err != nil {
			fail("send: %v", err)
		}
		_ = c.(*net.TCPConn).CloseWrite()
		var b [8]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			fail("ack: %v", err)
		}
		got = int64(binary.BigEndian.Uint64(b[:]))
	} else {
		var b [9]byte
		b[0] = 'D'
		binary.BigEndian.PutUint64(b[1:], uint64(n))
		if _, err := c.Write(b[:]); err != nil {
			fail("%v", err)
		}
		buf := make([]byte, 1<<20)
		for {
			m, err := c.Read(buf)
			got += int64(m)
			if err != nil {
				break
			}
		}
	}
	el := time.Since(start).Seconds()
	if got != n {
		fail("bulk %s: moved %d of %d bytes", dir, got, n)
	}
	return map[string]any{"bytes": got, "seconds": el, "gbps": float64(got) * 8 / el / 1e9}
}

// percentiles of durations in microseconds.
func pcts(d []time.Duration) (float64, float64) {
	if len(d) == 0 {
		return 0, 0
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	at := func(q float64) float64 {
		i := int(q * float64(len(d)-1))
		return float64(d[i].Nanoseconds()) / 1e3
	}
	return at(0.50), at(0.99)
}

// A bounded sample of latencies: every request is counted, at most max kept.
type sampler struct {
	d     []time.Duration
	seen  int
	every int
}

func (s *sampler) add(x time.Duration) {
	s.seen++
	if s.seen%s.every == 0 && len(s.d) < cap(s.d) {
		s.d = append(s.d, x)
	}
}

func rps(addr string, nconns, size int, dur time.Duration) map[string]any {
	req := make([]byte, size)
	var wg sync.WaitGroup
	var total int64
	samples := make([][]time.Duration, nconns)
	cs := make([]net.Conn, nconns)
	for i := range cs {
		cs[i] = dial(addr)
		if _, err := cs[i].Write([]byte{'E'}); err != nil {
			fail("%v", err)
		}
	}
	var startWg sync.WaitGroup
	startWg.Add(1)
	var errs int64
	for i, c := range cs {
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			defer c.Close()
			s := sampler{d: make([]time.Duration, 0, 200000), every: 1}
			buf := make([]byte, size)
			startWg.Wait()
			_ = c.SetDeadline(time.Now().Add(dur + 10*time.Second))
			end := time.Now().Add(dur)
			for {
				t0 := time.Now()
				if t0.After(end) {
					break
				}
				if _, err := c.Write(req); err != nil {
					atomic.AddInt64(&errs, 1)
					return
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					atomic.AddInt64(&errs, 1)
					return
				}
				s.add(time.Since(t0))
			}
			atomic.AddInt64(&total, int64(s.seen))
			samples[i] = s.d
		}(i, c)
	}
	start := time.Now()
	startWg.Done()
	wg.Wait()
	el := time.Since(start).Seconds()
	var all []time.Duration
	for _, s := range samples {
		all = append(all, s...)
	}
	p50, p99 := pcts(all)
	return map[string]any{"requests": total, "seconds": el, "rps": float64(total) / el,
		"p50_us": p50, "p99_us": p99, "errors": errs}
}

func churn(addr string, workers, size int, dur time.Duration) map[string]any {
	req := make([]byte, size+1)
	req[0] = 'E'
	var wg sync.WaitGroup
	var total, errs int64
	samples := make([][]time.Duration, workers)
	start := time.Now()
	end := start.Add(dur)
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			s := sampler{d: make([]time.Duration, 0, 100000), every: 1}
			buf := make([]byte, size)
			for {
				t0 := time.Now()
				if t0.After(end) {
					break
				}
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err != nil {
					atomic.AddInt64(&errs, 1)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				_ = c.SetDeadline(t0.Add(5 * time.Second))
				_, err = c.Write(req)
				if err == nil {
					_, err = io.ReadFull(c, buf)
				}
				c.Close()
				if err != nil {
					atomic.AddInt64(&errs, 1)
					continue
				}
				s.add(time.Since(t0))
			}
			atomic.AddInt64(&total, int64(s.seen))
			samples[i] = s.d
		}(i)
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	var all []time.Duration
	for _, s := range samples {
		all = append(all, s...)
	}
	p50, p99 := pcts(all)
	return map[string]any{"connections": total, "seconds": el, "conn_per_s": float64(total) / el,
		"p50_us": p50, "p99_us": p99, "errors": errs}
}

func lat(addr string, count, size int, gap time.Duration) map[string]any {
	c := dial(addr)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Duration(count)*(gap+10*time.Millisecond) + 10*time.Second))
	if _, err := c.Write([]byte{'E'}); err != nil {
		fail("%v", err)
	}
	req := make([]byte, size)
	buf := make([]byte, size)
	d := make([]time.Duration, 0, count)
	for i := 0; i < count+50; i++ {
		t0 := time.Now()
		if _, err := c.Write(req); err != nil {
			fail("%v", err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			fail("%v", err)
		}
		if i >= 50 { // warm-up
			d = append(d, time.Since(t0))
		}
		time.Sleep(gap)
	}
	p50, p99 := pcts(d)
	return map[string]any{"count": len(d), "p50_us": p50, "p99_us": p99}
}

func hold(addr string, n int, dur time.Duration) map[string]any {
	cs := make([]net.Conn, 0, n)
	buf := make([]byte, 64)
	req := make([]byte, 65)
	req[0] = 'E'
	deadline := time.Now().Add(60 * time.Second)
	for i := 0; i < n; i++ {
		if time.Now().After(deadline) {
			fail("hold: only %d of %d connections in 60 s", i, n)
		}
		c := dial(addr)
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(req); err != nil {
			fail("hold %d: %v", i, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			fail("hold %d: %v", i, err)
		}
		_ = c.SetDeadline(time.Time{})
		cs = append(cs, c)
	}
	out, _ := json.Marshal(map[string]any{"held": len(cs)})
	fmt.Println(string(out))
	done := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(done) }()
	select {
	case <-done:
	case <-time.After(dur):
	}
	for _, c := range cs {
		c.Close()
	}
	return map[string]any{"released": len(cs)}
}

func busy(dur time.Duration) {
	end := time.Now().Add(dur)
	var wg sync.WaitGroup
	for i := 0; i < runtime.NumCPU(); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x := 0
			for time.Now().Before(end) {
				for j := 0; j < 100000; j++ {
					x += j
				}
			}
			_ = x
		}()
	}
	wg.Wait()
}
