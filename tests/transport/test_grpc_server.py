#!/usr/bin/python3
"""test_grpc_server.py -- transport/grpc_server.c against real peers over loopback.

    /usr/bin/python3 test_grpc_server.py PATH/TO/t_grpc_server

Starts t_grpc_server (h2c, then TLS with client certificates) and calls it with Debian's
python3-grpcio: echoes of 0 B, 1 B and 1 MiB, every error status with its (non-ASCII)
message, an over-limit message, an unknown method, many concurrent calls, a deadline
shorter than a slow answer, mutual TLS (the names of the client certificate reach the
handler) and a client without a certificate or without ALPN h2. Then abuse, with raw
sockets and nghttp (nghttp2-client) as peers: a wrong preface, truncated and malformed
frames, wrong gRPC length prefixes, a wrong content-type, an over-long header list, a
slow-loris client, 200 idle connections, streams opened and reset by the thousand, and
an h2load burst. Between and after, the server must answer a normal call, and its RSS
(/proc/PID/status) must stay bounded. At the end SIGTERM: exit 0, no sanitizer report.
"""
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import grpc

SERVER = sys.argv[1] if len(sys.argv) > 1 else None
REQUEST_TIMEOUT_MS = 1000
IDLE_TIMEOUT_MS = 3000
MAX_MESSAGE = 4 * 1024 * 1024
RSS_LIMIT_KB = 200 * 1024
ASAN = os.environ.get("ASAN_OPTIONS") is not None

failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


# ---- the server process ------------------------------------------------------------------

class Server:
    def __init__(self, *args, preexec=None):
        env = dict(os.environ)
        if ASAN:
            # ASan's quarantine keeps freed memory on purpose (256 MiB by default); keep
            # it small so that RSS says what the server holds.
            env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"] + ":quarantine_size_mb=16"
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(
            [SERVER, "--request-timeout", str(REQUEST_TIMEOUT_MS),
             "--idle-timeout", str(IDLE_TIMEOUT_MS), "--max-message", str(MAX_MESSAGE)]
            + list(args), stdout=subprocess.PIPE, stderr=self.err, env=env, preexec_fn=preexec)
        line = self.p.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError("server did not start: %r" % line)
        self.port = int(line.split()[1])

    def rss_kb(self):
        with open("/proc/%d/status" % self.p.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return -1

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            out, _ = self.p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, _ = self.p.communicate()
        self.err.seek(0)
        err = self.err.read().decode(errors="replace")
        stats = [l for l in out.decode().splitlines() if l.startswith("STATS")]
        return self.p.returncode, stats[0] if stats else "", err


def stats_dict(line):
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


# ---- gRPC, through python3-grpcio ------------------------------------------------------

def ident(b):
    return b


def method(ch, name):
    return ch.unary_unary("/test.Echo/" + name, request_serializer=ident,
                          response_deserializer=ident)


def call_code(fn, req, **kw):
    try:
        fn(req, **kw)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def server_stats(port):
    with grpc.insecure_channel("127.0.0.1:%d" % port) as ch:
        return stats_dict("S " + method(ch, "Stats")(b"", timeout=5).decode())


def healthy(port, what):
    t0 = time.monotonic()
    try:
        with grpc.insecure_channel("127.0.0.1:%d" % port) as ch:
            got = method(ch, "Echo")(b"still there", timeout=5)
        dt = time.monotonic() - t0
        check(got == b"still there" and dt < 2, "%s: a normal call works (%.0f ms)" % (what, dt * 1000))
    except grpc.RpcError as e:
        check(False, "%s: a normal call works (%s)" % (what, e))


def test_grpc_basics(port):
    with grpc.insecure_channel("127.0.0.1:%d" % port) as ch:
        echo = method(ch, "Echo")
        for n in (0, 1, 1 << 20):
            body = bytes((i * 7 + 3) & 0xFF for i in range(n)) if n < 100 else os.urandom(n)
            got = echo(body, timeout=10)
            check(got == body, "echo of %d bytes" % n)
        fail = method(ch, "Fail")
        wrong = []
        for code in grpc.StatusCode:
            if code == grpc.StatusCode.OK:
                continue
            text = "%s: é ü 漢字 100%% \x01 done" % code.name
            c, d = call_code(fail, ("%d:%s" % (code.value[0], text)).encode(), timeout=5)
            if c != code or d != text:
                wrong.append((code, c, d))
        check(not wrong, "every error status arrives with its message %s" % (wrong[:2] or ""))
        c, d = call_code(echo, b"x" * (MAX_MESSAGE + 1), timeout=10)
        check(c == grpc.StatusCode.RESOURCE_EXHAUSTED, "over-limit message: %s (%s)" % (c, d))
        c, d = call_code(ch.unary_unary("/test.Nope/Nothing", request_serializer=ident,
                                        response_deserializer=ident), b"", timeout=5)
        check(c == grpc.StatusCode.UNIMPLEMENTED, "unknown method: %s (%s)" % (c, d))
        # many at once on one channel
        futs = [echo.future(b"call %d" % i, timeout=20) for i in range(300)]
        bad = [i for i, f in enumerate(futs) if f.result() != b"call %d" % i]
        check(not bad, "300 concurrent calls on one channel")
        # a deadline shorter than the answer
        slow = method(ch, "Slow")
        t0 = time.monotonic()
        c, d = call_code(slow, b"1000", timeout=0.2)
        check(c == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 0.9,
              "slow answer, 200 ms deadline: %s" % c)
        check(slow(b"50", timeout=5) == b"50", "a slow answer within its deadline")
        got = method(ch, "Auth")(b"", timeout=7, metadata=[("authorization", "Bearer t0k3n")])
        check(b"auth=Bearer t0k3n" in got and b"names=;" in got, "headers reach the handler: %r" % got)
        check(b"timeout=" in got and not got.split(b"timeout=")[1].startswith(b"0;"),
              "grpc-timeout reaches the handler")
        # metadata bigger than the header list limit (16 KiB)
        c, d = call_code(echo, b"x", timeout=5, metadata=[("x-big", "a" * 20000)])
        check(c != grpc.StatusCode.OK, "a 20 KB header list is refused: %s (%s)" % (c, d))
        check(echo(b"after", timeout=5) == b"after", "the channel still works after refusals")
    time.sleep(1.2)  # the slow call's answer comes after its client left
    st = server_stats(port)
    check(st["bytes_held"] < 4096, "no request bytes held after the calls: %d" % st["bytes_held"])


# ---- raw HTTP/2 --------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST, SETTINGS, PING, GOAWAY, WINUP, CONT = 0, 1, 2, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def hpack_int(v, prefix_bits, first=0):
    lim = (1 << prefix_bits) - 1
    if v < lim:
        return bytes([first | v])
    out = [first | lim]
    v -= lim
    while v >= 128:
        out.append((v & 127) | 128)
        v >>= 7
    out.append(v)
    return bytes(out)


def hpack(headers):
    """Literal header fields without indexing, new names, no Huffman: easy by hand."""
    out = b""
    for n, v in headers:
        n, v = n.encode(), v.encode()
        out += b"\x00" + hpack_int(len(n), 7) + n + hpack_int(len(v), 7) + v
    return out


def grpc_headers(path="/test.Echo/Echo", ctype="application/grpc", extra=()):
    return hpack([(":method", "POST"), (":scheme", "http"), (":path", path),
                  (":authority", "localhost"), ("content-type", ctype), ("te", "trailers")]
                 + list(extra))


def msg(body, declared=None, flag=0):
    return bytes([flag]) + struct.pack(">I", len(body) if declared is None else declared) + body


def connect(port, preface=True):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if preface:
        s.sendall(PREFACE + frame(SETTINGS, 0, 0))
    return s


def read_frames(s, until=None, timeout=3.0):
    """Frames the server sends, as (type, flags, stream, payload), until `until(frames)`
    says enough, the connection closes (then 'EOF' is appended) or the time is up."""
    frames, buf = [], b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        except (ConnectionResetError, BrokenPipeError):
            frames.append("EOF")
            return frames
        if not chunk:
            frames.append("EOF")
            return frames
        buf += chunk
        while len(buf) >= 9:
            ln = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + ln:
                break
            frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF,
                           buf[9:9 + ln]))
            buf = buf[9 + ln:]
            if frames[-1][0] == SETTINGS and not frames[-1][1] & 1:
                try:
                    s.sendall(frame(SETTINGS, 1, 0))
                except OSError:
                    pass
        if until is not None and until(frames):
            break
    return frames


def goaway_code(frames):
    for f in frames:
        if f != "EOF" and f[0] == GOAWAY:
            return int.from_bytes(f[3][4:8], "big")
    return None


def stream_answer(frames, sid):
    """'headers-only' (a Trailers-Only answer), 'rst', 'full' or None for a stream."""
    kinds = [f for f in frames if f != "EOF" and f[2] == sid]
    if any(f[0] == HEADERS and f[1] & END_STREAM for f in kinds[:1]):
        return "headers-only"
    if any(f[0] == HEADERS and f[1] & END_STREAM for f in kinds):
        return "full"
    if any(f[0] == RST for f in kinds):
        return "rst"
    return None


def nghttp_status(port, body, path="/test.Echo/Echo", headers=()):
    """A request with an arbitrary body through nghttp; returns (:status, grpc-status)."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(body)
        f.flush()
        cmd = ["nghttp", "-v", "-n", "-t", "5", "-d", f.name,
               "-H", "te: trailers"] + [a for h in headers for a in ("-H", h)]
        if not any(h.startswith("content-type") for h in headers):
            cmd += ["-H", "content-type: application/grpc"]
        out = subprocess.run(cmd + ["http://127.0.0.1:%d%s" % (port, path)],
                             capture_output=True, timeout=15).stdout.decode(errors="replace")
    status = grpc_status = None
    for line in out.splitlines():
        if ") :status: " in line:
            status = line.split(":status: ")[1].strip()
        if ") grpc-status: " in line:
            grpc_status = int(line.split("grpc-status: ")[1])
    return status, grpc_status


def test_bad_messages(port):
    cases = [
        ("length prefix longer than the message", msg(b"abc", declared=10), 3),
        ("length prefix shorter than the message", msg(b"abcdef", declared=2), 3),
        ("a truncated prefix", b"\x00\x00\x00", 3),
        ("no message at all", b"", 3),
        ("two messages", msg(b"a") + msg(b"b"), 3),
        ("a compressed message", msg(b"abc", flag=1), 12),
        ("a message over the limit (prefix only)", msg(b"", declared=MAX_MESSAGE + 1), 8),
    ]
    for what, body, want in cases:
        st, gs = nghttp_status(port, body)
        check(st == "200" and gs == want, "%s: :status %s grpc-status %s" % (what, st, gs))
    st, gs = nghttp_status(port, msg(b"x"), headers=["content-type: application/json"])
    check(st == "415", "wrong content-type: :status %s" % st)
    st, gs = nghttp_status(port, msg(b"x"), headers=["x-big: " + "b" * 20000])
    check(gs == 8, "header list over 16 KiB: grpc-status %s" % gs)
    st, gs = nghttp_status(port, msg(b"hello"))
    check(st == "200" and gs == 0, "nghttp's normal call: grpc-status %s" % gs)

    # The over-limit refusal comes at once, while the client is still sending.
    s = connect(port)
    s.sendall(frame(HEADERS, END_HEADERS, 1, grpc_headers()) +
              frame(DATA, 0, 1, msg(b"", declared=MAX_MESSAGE + 100)))
    fr = read_frames(s, until=lambda fr: stream_answer(fr, 1) is not None, timeout=3)
    rsts = [f for f in fr if f != "EOF" and f[0] == RST and f[2] == 1]
    check(stream_answer(fr, 1) == "headers-only" and rsts and
          int.from_bytes(rsts[0][3], "big") == 0,
          "over-limit prefix answered before the message: Trailers-Only, then RST_STREAM(NO_ERROR)")
    s.close()


def test_raw_abuse(port):
    # a wrong preface
    s = connect(port, preface=False)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    fr = read_frames(s, timeout=3)
    check("EOF" in fr, "wrong preface: connection closed")
    s.close()

    # a malformed frame: SETTINGS with a length that is not a multiple of 6
    s = connect(port)
    s.sendall(frame(SETTINGS, 0, 0, b"\x00\x03\x00"))
    fr = read_frames(s, timeout=3)
    check(goaway_code(fr) == 6 and "EOF" in fr,
          "SETTINGS of 3 bytes: GOAWAY(FRAME_SIZE_ERROR %s) and close" % goaway_code(fr))
    s.close()

    # DATA on stream 0, HEADERS on an even stream: protocol errors
    s = connect(port)
    s.sendall(frame(DATA, 0, 0, b"abc"))
    fr = read_frames(s, timeout=3)
    check(goaway_code(fr) == 1 and "EOF" in fr, "DATA on stream 0: GOAWAY(PROTOCOL_ERROR)")
    s.close()

    # a truncated frame: the header says 100 bytes, 10 come, then nothing
    t0 = time.monotonic()
    s = connect(port)
    s.sendall(frame(HEADERS, END_HEADERS, 1, grpc_headers())[:9] + b"\x00" * 0)
    s.sendall(struct.pack(">I", 100)[1:] + bytes([HEADERS, END_HEADERS]) + struct.pack(">I", 3) + b"\x00" * 10)
    fr = read_frames(s, timeout=REQUEST_TIMEOUT_MS / 1000 + 3)
    dt = time.monotonic() - t0
    check("EOF" in fr and dt < REQUEST_TIMEOUT_MS / 1000 + 2.5,
          "truncated HEADERS: closed after %.1f s" % dt)
    s.close()

    # a DATA frame with a wrong gRPC length prefix, raw: a Trailers-Only answer
    s = connect(port)
    s.sendall(frame(HEADERS, END_HEADERS, 1, grpc_headers()) +
              frame(DATA, END_STREAM, 1, msg(b"abc", declared=7)))
    fr = read_frames(s, until=lambda fr: stream_answer(fr, 1) is not None)
    check(stream_answer(fr, 1) == "headers-only", "wrong length prefix: Trailers-Only answer")
    # and the connection goes on serving
    s.sendall(frame(HEADERS, END_HEADERS, 3, grpc_headers()) +
              frame(DATA, END_STREAM, 3, msg(b"abc")))
    fr = read_frames(s, until=lambda fr: stream_answer(fr, 3) is not None)
    check(stream_answer(fr, 3) == "full", "same connection, a good call: a full answer")
    s.close()

    # a CONTINUATION flood: one header block in endless small frames
    s = connect(port)
    flood = frame(HEADERS, 0, 1, grpc_headers())
    for i in range(2000):
        flood += frame(CONT, 0, 1, hpack([("x-c%d" % i, "v")]))
    try:
        s.sendall(flood)
    except OSError:
        pass
    fr = read_frames(s, timeout=3)
    check("EOF" in fr, "CONTINUATION flood (2000 frames): connection closed (GOAWAY %s)" % goaway_code(fr))
    s.close()

    # an HPACK bomb: one 4000-byte header in the dynamic table, referenced 3000 times
    # (12 MB of header list from 7 KB on the wire)
    s = connect(port)
    block = grpc_headers() + b"\x40" + hpack_int(3, 7) + b"x-b" + hpack_int(4000, 7) + b"v" * 4000
    block += b"\xbe" * 3000
    s.sendall(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, msg(b"x")))
    fr = read_frames(s, until=lambda fr: stream_answer(fr, 1) is not None)
    check(stream_answer(fr, 1) == "headers-only", "HPACK bomb: refused with a Trailers-Only answer")
    s.close()

    # a client that never sends its preface
    t0 = time.monotonic()
    s = connect(port, preface=False)
    fr = read_frames(s, timeout=REQUEST_TIMEOUT_MS / 1000 + 3)
    dt = time.monotonic() - t0
    check("EOF" in fr and dt > REQUEST_TIMEOUT_MS / 1000 * 0.8,
          "no preface: closed after %.1f s" % dt)
    s.close()


def test_slow_loris(port):
    s = connect(port)
    req = frame(HEADERS, END_HEADERS, 1, grpc_headers()) + frame(DATA, END_STREAM, 1, msg(b"hi"))
    t0 = time.monotonic()
    closed_at = None
    for i in range(len(req)):
        try:
            s.sendall(req[i:i + 1])
        except OSError:
            closed_at = time.monotonic() - t0
            break
        s.settimeout(0.1)
        try:
            got = s.recv(65536)
            if got == b"" and closed_at is None:
                closed_at = time.monotonic() - t0
                break
            if got:
                i = i  # SETTINGS and acks; keep trickling
        except socket.timeout:
            pass
        except OSError:
            closed_at = time.monotonic() - t0
            break
        if time.monotonic() - t0 > REQUEST_TIMEOUT_MS / 1000 + 4:
            break
    s.close()
    check(closed_at is not None and closed_at < REQUEST_TIMEOUT_MS / 1000 + 2,
          "slow-loris (a request byte every 0.1 s, %d bytes): closed after %s s"
          % (len(req), "%.1f" % closed_at if closed_at else "never"))


def eof_now(s, wait=0.0):
    s.settimeout(wait)
    try:
        while True:
            d = s.recv(65536)
            if d == b"":
                return True
            if not wait:
                continue
    except (BlockingIOError, socket.timeout):
        return False
    except OSError:
        return True


def test_idle_connections(srv, max_conns):
    port = srv.port
    socks = [connect(port) for _ in range(200)]
    time.sleep(0.3)
    healthy(port, "200 idle connections open")
    rss = srv.rss_kb()
    print("     RSS with 200 idle connections: %d KiB" % rss)
    # Past max_connections, connections are closed at accept.
    time.sleep(0.2)
    extra = [connect(port) for _ in range(40)]
    time.sleep(0.5)
    refused = sum(1 for s in extra if eof_now(s, 0.01))
    check(refused >= 240 - max_conns, "over max_connections (%d): %d of 40 more closed at once"
          % (max_conns, refused))
    socks += extra
    # They go at the idle timeout.
    time.sleep(IDLE_TIMEOUT_MS / 1000 + 1.0)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            while True:
                d = s.recv(65536)
                if d == b"":
                    closed += 1
                    break
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    check(closed == 240, "idle connections closed after the idle timeout: %d of 240" % closed)


def test_peer_not_reading(srv, wrap=None, what="peer not reading"):
    """A client that grants all the window there is, asks for answers and reads none:
    the server's output buffer fills, it stops reading the client, holds at most its
    open streams' answers, and closes it once output stalls."""
    port = srv.port
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    lport = "%04X" % raw.getsockname()[1]
    s = wrap(raw) if wrap else raw
    s.sendall(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 0x7FFFFFFF)) +
              frame(WINUP, 0, 0, struct.pack(">I", 0x7FFFFFFF - 65535)))
    body = msg(os.urandom(256 * 1024))
    t0 = time.monotonic()
    s.settimeout(2)
    sent = 0
    try:
        for i in range(100):
            sid = 1 + 2 * i
            req = frame(HEADERS, END_HEADERS, sid, grpc_headers())
            for off in range(0, len(body), 16384):
                last = off + 16384 >= len(body)
                req += frame(DATA, END_STREAM if last else 0, sid, body[off:off + 16384])
            s.sendall(req)
            sent += 1
    except (socket.timeout, OSError):
        pass
    rss = srv.rss_kb()
    print("     %s: %d requests of 256 KiB sent in %.1f s, server RSS %d KiB"
          % (what, sent, time.monotonic() - t0, rss))
    check(rss < RSS_LIMIT_KB, "%s: RSS bounded (%d KiB)" % (what, rss))
    # never read: the server must give up on it
    deadline = time.monotonic() + REQUEST_TIMEOUT_MS / 1000 + 4
    closed = False
    while time.monotonic() < deadline and not closed:
        time.sleep(0.2)
        with open("/proc/net/tcp") as f:
            closed = not any(l.split()[1].endswith(":" + lport) and l.split()[3] == "01"
                             for l in f.readlines()[1:])
    check(closed, "%s: closed after its output stalled (%.1f s)" % (what, time.monotonic() - t0))
    s.close()


def test_zero_window(port):
    """A client that grants no flow-control window, and PINGs to look alive: the answer
    cannot move; closed."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 0)) +
              frame(HEADERS, END_HEADERS, 1, grpc_headers()) +
              frame(DATA, END_STREAM, 1, msg(b"z" * 1000)))
    t0 = time.monotonic()
    fr = []
    while time.monotonic() - t0 < REQUEST_TIMEOUT_MS / 1000 + 3 and "EOF" not in fr:
        try:
            s.sendall(frame(PING, 0, 0, b"12345678"))
        except OSError:
            fr.append("EOF")
            break
        fr += read_frames(s, timeout=0.25)
    dt = time.monotonic() - t0
    got_data = any(f != "EOF" and f[0] == DATA for f in fr)
    check("EOF" in fr and not got_data and dt > REQUEST_TIMEOUT_MS / 1000 * 0.8,
          "zero window: answer held, connection closed after %.1f s (GOAWAY %s)" % (dt, goaway_code(fr)))
    s.close()


def test_drain():
    srv = Server()
    with grpc.insecure_channel("127.0.0.1:%d" % srv.port) as ch:
        fut = method(ch, "Slow").future(b"600", timeout=5)
        time.sleep(0.2)
        srv.p.send_signal(signal.SIGUSR1)
        try:
            ok = fut.result() == b"600"
        except grpc.RpcError as e:
            ok = False
            print("     drain: %s" % e)
        check(ok, "drain: a call in flight is answered")
    try:
        out, _ = srv.p.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        srv.p.kill()
        out, _ = srv.p.communicate()
    srv.err.seek(0)
    err = srv.err.read().decode(errors="replace")
    check(srv.p.returncode == 0 and b"DRAINED" in out and "ERROR: AddressSanitizer" not in err,
          "drain: exits by itself once the connections are gone (rc %s)%s"
          % (srv.p.returncode, ("\n" + err[-2000:]) if srv.p.returncode else ""))


def test_out_of_fds():
    """At the open-files limit the server pauses accepting instead of spinning."""
    import resource
    srv = Server(preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)))
    try:
        def cpu():
            with open("/proc/%d/stat" % srv.p.pid) as f:
                v = f.read().rsplit(")", 1)[1].split()
            return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(80)]
        for s in socks:
            s.sendall(PREFACE + frame(SETTINGS, 0, 0))
        c0 = cpu()
        time.sleep(1.0)
        used = cpu() - c0
        check(used < 0.5, "out of descriptors with 80 clients: %.2f s of CPU in 1 s" % used)
        for s in socks:
            s.close()
        time.sleep(0.3)
        healthy(srv.port, "after running out of descriptors")
    finally:
        rc, stats, err = srv.stop()
    check(rc == 0 and "ERROR: AddressSanitizer" not in err, "out of descriptors: clean exit (rc %s)%s"
          % (rc, ("\n" + err[-2000:]) if rc else ""))


def test_rapid_reset(srv, rounds=6, per_round=2000):
    port = srv.port
    goaways = []
    sent_total = 0
    for r in range(rounds):
        s = connect(port)
        hdr = grpc_headers(path="/test.Echo/Slow")
        batch = b""
        sid = 1
        try:
            for i in range(per_round):
                if r % 2 == 0:
                    # opened and reset before the request ends
                    batch += frame(HEADERS, END_HEADERS, sid, hdr) + frame(RST, 0, sid, struct.pack(">I", 8))
                else:
                    # a whole request handed to the handler, then reset: an orphan call
                    batch += (frame(HEADERS, END_HEADERS, sid, hdr) +
                              frame(DATA, END_STREAM, sid, msg(b"300")) +
                              frame(RST, 0, sid, struct.pack(">I", 8)))
                sid += 2
                if len(batch) > 32768:
                    s.sendall(batch)
                    sent_total += 1
                    batch = b""
            s.sendall(batch)
        except OSError:
            pass  # the server hung up on us: that is the point
        fr = read_frames(s, until=lambda fr: goaway_code(fr) is not None, timeout=3)
        refused = sum(1 for f in fr if f != "EOF" and f[0] == RST and f[3] == struct.pack(">I", 7))
        goaways.append((goaway_code(fr), refused))
        s.close()
    print("     (GOAWAY code, streams refused) after %d x %d opened-and-reset streams: %s"
          % (rounds, per_round, goaways))
    # Opened and reset: nghttp2's reset rate limit sends GOAWAY. Whole requests reset
    # with their call at the handler: the orphan limit refuses streams (REFUSED_STREAM),
    # and whether nghttp2 also counts enough resets depends on timing (a reset for a
    # stream that is already closed is not counted).
    check(all(g[0] is not None for g in goaways[0::2]),
          "rapid reset, streams opened and reset: GOAWAY on every connection")
    check(all(g[0] is not None or g[1] > 0 for g in goaways[1::2]),
          "rapid reset, whole requests reset: GOAWAY or streams refused on every connection")
    healthy(port, "after rapid reset")


def test_h2load(port):
    if shutil.which("h2load") is None:
        print("skip h2load: not installed")
        return
    with tempfile.NamedTemporaryFile() as f:
        f.write(msg(b"x" * 256))
        f.flush()
        out = subprocess.run(["h2load", "-n", "3000", "-c", "10", "-m", "10", "-d", f.name,
                              "-H", "content-type: application/grpc", "-H", "te: trailers",
                              "http://127.0.0.1:%d/test.Echo/Echo" % port],
                             capture_output=True, timeout=60).stdout.decode()
    line = [l for l in out.splitlines() if l.startswith("requests:")]
    status = [l for l in out.splitlines() if l.startswith("status codes:")]
    rps = [l for l in out.splitlines() if l.startswith("finished in")]
    print("     h2load:", (rps or ["?"])[0], "|", (line or ["?"])[0])
    check(line and " 3000 succeeded" in line[0] and status and "3000 2xx" in status[0],
          "h2load burst of 3000 echo calls (h2load counts 2xx; grpc-status checked by nghttp above)")


# ---- TLS -----------------------------------------------------------------------------------

def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True)


def make_certs(d):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=spoke test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, subj, san in (
            ("server", "/CN=localhost", "DNS:localhost,IP:127.0.0.1"),
            ("client", "/CN=edge-us-west-1", "DNS:edge-us-west-1.example,URI:spiffe://spoke/edge/edge-us-west-1")):
        openssl("req", *ec, "-keyout", name + ".key", "-out", name + ".csr", "-subj", subj, cwd=d)
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\n" % san)
        openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", name + ".pem", "-days", "2", "-extfile", name + ".ext", cwd=d)


def read(d, name):
    with open(os.path.join(d, name), "rb") as f:
        return f.read()


def test_tls(d):
    make_certs(d)
    srv = Server("--tls", os.path.join(d, "server.pem"), os.path.join(d, "server.key"),
                 "--client-ca", os.path.join(d, "ca.pem"), "--require-cert")
    opts = [("grpc.ssl_target_name_override", "localhost")]
    target = "127.0.0.1:%d" % srv.port
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=read(d, "ca.pem"),
                                             private_key=read(d, "client.key"),
                                             certificate_chain=read(d, "client.pem"))
        with grpc.secure_channel(target, creds, options=opts) as ch:
            got = method(ch, "Auth")(b"", timeout=5, metadata=[("authorization", "Bearer abc")])
            check(got.startswith(b"names=edge-us-west-1,edge-us-west-1.example,"
                                 b"spiffe://spoke/edge/edge-us-west-1;auth=Bearer abc"),
                  "mTLS: the handler sees CN, DNS and URI SANs: %r" % got)
            body = os.urandom(1 << 20)
            check(method(ch, "Echo")(body, timeout=10) == body, "mTLS: echo of 1 MiB")
            futs = [method(ch, "Echo").future(b"%d" % i, timeout=20) for i in range(100)]
            check(all(f.result() == b"%d" % i for i, f in enumerate(futs)), "mTLS: 100 concurrent calls")
            c, _ = call_code(method(ch, "Fail"), b"7:nope", timeout=5)
            check(c == grpc.StatusCode.PERMISSION_DENIED, "mTLS: an error status: %s" % c)
            bodies = [os.urandom(1 << 20) for _ in range(8)]
            futs = [method(ch, "Echo").future(b, timeout=20) for b in bodies]
            check(all(f.result() == b for f, b in zip(futs, bodies)), "mTLS: 8 concurrent echoes of 1 MiB")
        import ssl

        def tls_wrap(raw):
            ctx = ssl.create_default_context(cafile=os.path.join(d, "ca.pem"))
            ctx.load_cert_chain(os.path.join(d, "client.pem"), os.path.join(d, "client.key"))
            ctx.set_alpn_protocols(["h2"])
            return ctx.wrap_socket(raw, server_hostname="localhost")
        test_peer_not_reading(srv, wrap=tls_wrap, what="TLS peer not reading")
        nocert = grpc.ssl_channel_credentials(root_certificates=read(d, "ca.pem"))
        with grpc.secure_channel(target, nocert, options=opts) as ch:
            c, det = call_code(method(ch, "Echo"), b"x", timeout=3)
            check(c == grpc.StatusCode.UNAVAILABLE, "TLS without a client certificate: %s" % c)
        # Without ALPN h2: refused in the handshake, or closed right after it.
        for alpn in (["http/1.1"], None):
            ctx = ssl.create_default_context(cafile=os.path.join(d, "ca.pem"))
            ctx.load_cert_chain(os.path.join(d, "client.pem"), os.path.join(d, "client.key"))
            if alpn:
                ctx.set_alpn_protocols(alpn)
            refused = False
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=3) as raw:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as t:
                        t.sendall(PREFACE + frame(SETTINGS, 0, 0))
                        refused = t.recv(100) == b""
            except (ssl.SSLError, OSError):
                refused = True
            check(refused, "TLS client offering ALPN %s is refused" % alpn)
        # a TLS client that never finishes its handshake
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello record
            fr = read_frames(raw, timeout=REQUEST_TIMEOUT_MS / 1000 + 3)
        dt = time.monotonic() - t0
        check("EOF" in fr and dt > REQUEST_TIMEOUT_MS / 1000 * 0.8 and dt < REQUEST_TIMEOUT_MS / 1000 + 2,
              "TLS handshake never finished: closed after %.1f s" % dt)
        rss = srv.rss_kb()
        print("     TLS server RSS: %d KiB" % rss)
    finally:
        rc, stats, err = srv.stop()
    print("     TLS server:", stats)
    check(rc == 0 and "ERROR: AddressSanitizer" not in err and "runtime error" not in err,
          "TLS server exits cleanly (rc %s)%s" % (rc, ("\n" + err[-3000:]) if rc else ""))
    st = stats_dict(stats) if stats else {}
    check(st.get("refused", 0) >= 2, "TLS refusals counted: %s" % st.get("refused"))

    # Client certificates optional: without one, a call works and carries no names.
    srv = Server("--tls", os.path.join(d, "server.pem"), os.path.join(d, "server.key"),
                 "--client-ca", os.path.join(d, "ca.pem"))
    try:
        with grpc.secure_channel("127.0.0.1:%d" % srv.port,
                                 grpc.ssl_channel_credentials(root_certificates=read(d, "ca.pem")),
                                 options=opts) as ch:
            got = method(ch, "Auth")(b"", timeout=5)
            check(got.startswith(b"names=;"), "optional client certificate, none sent: no names (%r)" % got)
        # a certificate from another CA is refused even when optional
        other = os.path.join(d, "other")
        os.mkdir(other)
        make_certs(other)
        creds = grpc.ssl_channel_credentials(root_certificates=read(d, "ca.pem"),
                                             private_key=read(other, "client.key"),
                                             certificate_chain=read(other, "client.pem"))
        with grpc.secure_channel("127.0.0.1:%d" % srv.port, creds, options=opts) as ch:
            c, _ = call_code(method(ch, "Auth"), b"", timeout=3)
            check(c == grpc.StatusCode.UNAVAILABLE, "a client certificate of another CA: %s" % c)
    finally:
        rc, stats, err = srv.stop()
    check(rc == 0 and "ERROR: AddressSanitizer" not in err, "optional-cert TLS server exits cleanly")


def main():
    if SERVER is None or not os.access(SERVER, os.X_OK):
        print("usage: test_grpc_server.py PATH/TO/t_grpc_server")
        return 2
    t_start = time.monotonic()
    max_conns = 230
    srv = Server("--max-connections", str(max_conns))
    try:
        rss0 = srv.rss_kb()
        print("     RSS at start: %d KiB" % rss0)
        test_grpc_basics(srv.port)
        rss_calls = srv.rss_kb()
        print("     RSS after the gRPC calls: %d KiB" % rss_calls)
        test_bad_messages(srv.port)
        test_raw_abuse(srv.port)
        healthy(srv.port, "after raw abuse")
        test_slow_loris(srv.port)
        test_idle_connections(srv, max_conns)
        test_peer_not_reading(srv)
        test_zero_window(srv.port)
        healthy(srv.port, "after peers that do not read")
        test_rapid_reset(srv)
        rss_reset = srv.rss_kb()
        print("     RSS after rapid reset: %d KiB" % rss_reset)
        test_h2load(srv.port)
        time.sleep(0.5)
        healthy(srv.port, "at the end")
        rss_end = srv.rss_kb()
        print("     RSS at the end: %d KiB (peak figures above)" % rss_end)
        check(rss_end < RSS_LIMIT_KB and rss_reset < RSS_LIMIT_KB,
              "RSS bounded: %d KiB < %d KiB" % (max(rss_end, rss_reset), RSS_LIMIT_KB))
        st = server_stats(srv.port)
        print("     stats:", st)
        check(st["timeouts"] >= 4, "timeouts counted: %d" % st["timeouts"])
        check(st["protocol_errors"] >= 3, "protocol errors counted: %d" % st["protocol_errors"])
    finally:
        alive = srv.alive()
        rc, stats, err = srv.stop()
    check(alive, "the server survived everything")
    print("     server:", stats)
    check(rc == 0 and "ERROR: AddressSanitizer" not in err and "runtime error" not in err,
          "server exits cleanly on SIGTERM (rc %s)%s" % (rc, ("\n" + err[-3000:]) if rc or err else ""))
    if stats:
        check(stats_dict(stats)["bytes_held"] == 0, "no request bytes held at exit")

    with tempfile.TemporaryDirectory() as d:
        test_tls(d)
    test_drain()
    test_out_of_fds()

    print("total %.1f s" % (time.monotonic() - t_start))
    if failures:
        print("%d FAILED:\n  %s" % (len(failures), "\n  ".join(failures)))
        return 1
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
