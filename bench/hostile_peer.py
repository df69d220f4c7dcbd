#!/usr/bin/env python3
"""Hostile-peer replay against live `secondary` daemons on loopback (issue 17).

Starts secondary daemons on 127.0.0.1 (never any other address), replays the
attacks of issue 17 against their control plane (HTTP) and data plane (ring
frames), and after every attack checks the node: process alive, GET /status
answers, its latency, its RSS (VmRSS; VmHWM where a peak matters). Prints a
fixed-width table; exits 1 when a node died or stopped answering /status.

  python3 bench/hostile_peer.py [--bin DIR] [--keep] [--cases 1,3,6]

Stdlib only. Every socket operation has a timeout, so no single step can hang
for more than ~10 s; every daemon is killed at the end (also on Ctrl-C).
"""
import argparse
import hashlib
import hmac
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import shutil

HOST = "127.0.0.1"  # the only address this script ever talks to
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------- frames (docs/PROTOCOL.md section 3)
MAGIC = 0x4649444D
VERSION = 3
T_HELLO, T_ACTIVATIONS = 1, 2
DT_F32, DT_U8 = 0, 5
HEADER = struct.Struct("<IHHHBBIIII4IIQQ")  # 64 bytes
assert HEADER.size == 64


def frame_header(ftype, dtype, shape, payload_bytes, n_tokens=0, start_pos=0, sample_id=0, step=0):
    dims = list(shape) + [0] * (4 - len(shape))
    return HEADER.pack(MAGIC, VERSION, ftype, 0, dtype, len(shape), sample_id, start_pos, n_tokens, 0, *dims, 0, step,
                       payload_bytes)


HELLO_BYTES = 64  # ring_index u32 | n_nodes u32 | run_id u64 | nonce 16 B | proof 32 B
HELLO_FRAME_BYTES = HEADER.size + HELLO_BYTES
CONNECTOR, ACCEPTOR = 1, 2


def hello_frame(ring_index, n_nodes, run_id, nonce=bytes(16), proof=bytes(32)):
    return frame_header(T_HELLO, DT_U8, [HELLO_BYTES], HELLO_BYTES) + struct.pack("<IIQ", ring_index, n_nodes, run_id) + nonce + proof


def hello_proof(token, role, run_id, sender, receiver, sender_nonce, receiver_nonce):
    """docs/PROTOCOL.md section 3: what a Hello proves (no token here: the key is empty)."""
    message = b"mdi ring hello v3\0" + struct.pack("<BQII", role, run_id, sender, receiver) + sender_nonce + receiver_nonce
    return hmac.new(token.encode(), message, hashlib.sha256).digest()


def hello_nonce(frame_bytes):
    return frame_bytes[HEADER.size + 16:HEADER.size + 32]


# ---------------------------------------------------------------- small helpers
def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def short(text, n=60):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def tail(text, n=64):
    text = " ".join(str(text).split())
    return text if len(text) <= n else "…" + text[-(n - 1):]


def recv_exact(sock, n, timeout):
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def connect_retry(port, timeout=10.0):
    """Connects from an ephemeral port, retrying while the node is not listening yet (ring setup
    starts right after /init answers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((HOST, port), timeout=2.0)
        except (ConnectionRefusedError, socket.timeout):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def socket_fate(sock, timeout):
    """What the peer does with an open socket within `timeout`: 'closed (EOF)', 'reset', 'open'.
    Data it sends meanwhile (heartbeats, an HTTP answer) is read and counted."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return "reset" + (f" after {got} B in" if got else "")
        except OSError as e:
            return f"error {e.strerror}"
        if not chunk:
            return "closed (EOF)" + (f" after {got} B in" if got else "")
        got += len(chunk)
    return f"still open after {timeout:.0f}s" + (f" ({got} B in)" if got else "")


def hard_close(sock):
    """Close with RST (SO_LINGER 0): no TIME_WAIT left on a fixed port_out."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# ---------------------------------------------------------------- HTTP over a raw socket
class Answer:
    def __init__(self, status=None, body="", note="", ms=0.0):
        self.status, self.body, self.note, self.ms = status, body, note, ms

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return {}

    def error(self):
        j = self.json()
        if isinstance(j, dict) and "error" in j:
            return str(j["error"])
        return self.body

    def summary(self, n=60):
        if self.status is None:
            return self.note
        return f"{self.status} {short(self.error(), n)}"


def parse_response(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return None, raw.decode("latin-1")
    return status, body.decode("utf-8", "replace")


def read_response(sock, timeout):
    """Reads one HTTP response (Content-Length framed, or until EOF)."""
    sock.settimeout(timeout)
    raw = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return raw, "timeout"
        except ConnectionResetError:
            return raw, "reset"
        if not chunk:
            return raw, "eof"
        raw += chunk
        if b"\r\n\r\n" in raw:
            head, _, body = raw.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    if len(body) >= int(v.strip() or 0):
                        return raw, "complete"


def http_raw(port, data, timeout=5.0, read=True):
    """Sends `data` (bytes) as is on a fresh connection; returns an Answer."""
    t0 = time.monotonic()
    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
    except OSError as e:
        return Answer(None, note=f"connect: {e.strerror or e}", ms=(time.monotonic() - t0) * 1000)
    note = ""
    try:
        sock.settimeout(timeout)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            note = f"send cut: {e.strerror}; "
        except socket.timeout:
            note = "send timeout; "
        if not read:
            return Answer(None, note=note, ms=(time.monotonic() - t0) * 1000)
        raw, how = read_response(sock, timeout)
        ms = (time.monotonic() - t0) * 1000
        if not raw:
            return Answer(None, note=note + f"no answer ({how})", ms=ms)
        status, body = parse_response(raw)
        return Answer(status, body, note=note + how, ms=ms)
    finally:
        sock.close()


def request_bytes(method, target, body=None, headers=None):
    body = b"" if body is None else (body if isinstance(body, bytes) else body.encode())
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
        if body:
            lines.append("Content-Type: application/json")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def http(port, method, target, body=None, timeout=5.0, headers=None):
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return http_raw(port, request_bytes(method, target, body, headers), timeout)


# ---------------------------------------------------------------- daemons
class Secondary:
    def __init__(self, bench, name, config, launcher=()):
        self.bench, self.name, self.config = bench, name, config
        self.port = config["nodes"]["secondary"][0]["communication"]["port"]
        self.port_in = config["nodes"]["secondary"][0]["inference"]["port_in"]
        self.cfg_path = os.path.join(bench.dir, f"{name}.json")
        with open(self.cfg_path, "w") as f:
            json.dump(config, f, indent=1)
        self.err_path = os.path.join(bench.dir, f"{name}.err")
        self.out_path = os.path.join(bench.dir, f"{name}.out")
        argv = list(launcher) + [os.path.join(bench.bin, "secondary"), "--nodes-config", self.cfg_path, "0", "--threads", "1",
                                 "--chunk-cache", os.path.join(bench.dir, f"cache-{name}"), "--chunk-dir", bench.chunk_dir]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.out_path, "wb"),
                                     stderr=open(self.err_path, "wb"), cwd=bench.dir)
        self.stopped = False  # set once this script ends it
        bench.daemons.append(self)

    def wait_up(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} at start: {self.stderr_tail()}")
            a = http(self.port, "GET", "/status", timeout=1.0)
            if a.status == 200:
                return a.json()
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: /status did not answer within {timeout}s: {self.stderr_tail()}")

    def proc_status(self, field):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024.0  # kB -> MiB
        except OSError:
            return None
        return None

    def rss(self):
        return self.proc_status("VmRSS")

    def hwm(self):
        return self.proc_status("VmHWM")

    def alive(self):
        return self.proc.poll() is None

    def state(self, timeout=3.0):
        return http(self.port, "GET", "/status", timeout=timeout).json()

    def wait_state(self, want, timeout=15.0, need_error=False):
        deadline = time.monotonic() + timeout
        s = {}
        while time.monotonic() < deadline:
            s = self.state()
            if s.get("state") == want and (not need_error or "last_error" in s):
                return s
            time.sleep(0.05)
        return s

    def stderr_size(self):
        try:
            return os.path.getsize(self.err_path)
        except OSError:
            return -1

    def stderr_lines(self):
        try:
            with open(self.err_path, "rb") as f:
                return f.read().count(b"\n")
        except OSError:
            return -1

    def stderr_tail(self, n=600):
        try:
            with open(self.err_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self):
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            try:
                http(self.port, "PUT", "/stop", timeout=2.0)
                self.proc.wait(timeout=5)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def spray_random(s):
    """Sends 1 MiB of random bytes on `s`; says how the send went and what the peer then did."""
    note = ""
    try:
        s.settimeout(5.0)
        s.sendall(os.urandom(1 << 20))
    except (BrokenPipeError, ConnectionResetError) as e:
        note = f"send cut ({e.strerror}); "
    except socket.timeout:
        note = "send stalled; "
    return f"{note}socket {socket_fate(s, 3.0)}"


class FakeStarter:
    """Plays ring index 0 of a 2-node ring, as tests/test_daemon.cpp's HandRing: listens on the starter's
    port_in (the secondary connects there and says Hello first; we answer) and connects from the
    starter's port_out to the secondary's port_in with raw sockets, so it can send anything."""

    def __init__(self, config, run_id):
        st = config["nodes"]["starter"]["inference"]
        self.port_in, self.port_out = st["port_in"], st["port_out"]
        self.sec_port_in = config["nodes"]["secondary"][0]["inference"]["port_in"]
        self.run_id = run_id
        self.accepted = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, self.port_in))
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        self.sock = None

    def _accept(self):
        deadline = time.monotonic() + 30
        while not self.stop and time.monotonic() < deadline:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                opening = recv_exact(conn, HELLO_FRAME_BYTES, 5.0)
                if len(opening) == HELLO_FRAME_BYTES:
                    nonce = os.urandom(16)
                    conn.sendall(hello_frame(0, 2, self.run_id, nonce,
                                             hello_proof("", ACCEPTOR, self.run_id, 0, 1, nonce, hello_nonce(opening))))
                    recv_exact(conn, HELLO_FRAME_BYTES, 5.0)  # its proving Hello
            except OSError:
                pass
            self.accepted.append(conn)

    def connect(self, timeout=10.0):
        """Connects from port_out (retrying while the node loads); returns the socket."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(2.0)
            try:
                s.bind((HOST, self.port_out))
                s.connect((HOST, self.sec_port_in))
                self.sock = s
                return s
            except OSError as e:
                last = e
                s.close()
                time.sleep(0.05)
        raise RuntimeError(f"could not connect from port_out {self.port_out} to {self.sec_port_in}: {last}")

    def hello(self):
        nonce = os.urandom(16)
        self.sock.sendall(hello_frame(0, 2, self.run_id, nonce))
        reply = recv_exact(self.sock, HELLO_FRAME_BYTES, 5.0)
        if len(reply) != HELLO_FRAME_BYTES:
            return False
        self.sock.sendall(hello_frame(0, 2, self.run_id, nonce,
                                      hello_proof("", CONNECTOR, self.run_id, 0, 1, nonce, hello_nonce(reply))))
        return True

    def close(self):
        self.stop = True
        if self.sock is not None:
            hard_close(self.sock)
        for c in self.accepted:
            hard_close(c)
        try:
            self.listener.close()
        except OSError:
            pass
        self.thread.join(timeout=2)


# ---------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args):
        self.bin = os.path.abspath(args.bin)
        self.keep = args.keep
        self.dir = tempfile.mkdtemp(prefix="hostile-peer-")
        self.chunk_dir = os.path.join(self.dir, "models")
        os.makedirs(self.chunk_dir)
        self.daemons = []
        self.rows = []
        self.failures = []  # (case, what)
        self.small = None
        self.big = None
        self.run_id = 1000

    def next_run(self):
        self.run_id += 1
        return self.run_id

    # -- models
    def prepare(self, name, source, extra=()):
        out = os.path.join(self.chunk_dir, name)
        argv = [os.path.join(self.bin, "prepare_model"), source, "--out", out, "--n-nodes", "2", *extra]
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"prepare_model {source} failed: {r.stdout.decode()[-800:]}")
        with open(os.path.join(out, "chunks", "2nodes", "manifest.json")) as f:
            manifest = json.load(f)
        return {"dir": out, "manifest": manifest}

    def small_model(self):
        if self.small is None:
            self.small = self.prepare("small", "random:stories260K")
        return self.small

    def big_model(self):
        if self.big is None:
            cfg = os.path.join(self.dir, "big-config.json")
            with open(cfg, "w") as f:
                json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 1024, "intermediate_size": 4096,
                           "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 512,
                           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}, f)
            self.big = self.prepare("big", "random:" + cfg, ["--layers", "1", "7"])
        return self.big

    # -- configs, /init bodies
    @staticmethod
    def config(**timeouts):
        def node(secondary):
            n = {"addr": HOST, "communication": {"port": free_port()},
                 "inference": {"port_in": free_port(), "port_out": free_port()}}
            if secondary:
                n["communication"]["starter_addr"] = HOST
            return n

        t = {"connect_s": 5, "accept_s": 5, "receive_s": 3, "http_init_s": 20, "heartbeat_s": 0.5}
        t.update(timeouts)
        return {"nodes": {"starter": node(False), "secondary": [node(True)]}, "timeouts": t}

    @staticmethod
    def init_body(config, model, run_id):
        """As tests/test_daemon.cpp's init_body / InitRequest::to_json, for secondary 0."""
        m = model["manifest"]
        entry = next(n for n in m["nodes"] if n["role"] == "secondary" and n["index"] == 0)
        return {"run_id": run_id, "ring_index": 1, "nodes_config": config, "model": m["model"],
                "layers": entry["layers"], "dtype": "float32", "device": "",
                "max_seq_len": m["model"]["max_position_embeddings"], "max_frame_bytes": 0,
                "chunk": {"sha256": entry["sha256"], "path": os.path.join(model["dir"], "chunks", "2nodes", entry["file"]),
                          "bytes": entry["bytes"]}}

    def secondary(self, name, launcher=(), **timeouts):
        config = self.config(**timeouts)
        d = Secondary(self, name, config, launcher)
        d.wait_up()
        return d

    # -- recording
    def row(self, case, sent, answer, node, expect_ok=None, rss_note=None):
        """Checks `node` after an attack and records one table row."""
        alive = node.alive()
        a = http(node.port, "GET", "/status", timeout=5.0) if alive else Answer(None, note="dead")
        answers = a.status == 200
        rss = node.rss()
        rss_text = "-" if rss is None else f"{rss:.1f}"
        if rss_note:
            rss_text += rss_note
        self.rows.append((case, sent, answer, ("yes" if alive else "DEAD") if answers or not alive else "NO-ST",
                          f"{a.ms:.1f}" if answers else "-", rss_text))
        if not alive:
            self.failures.append((case, f"{node.name} died (exit {node.proc.returncode}) after: {sent}; stderr tail: "
                                        f"{node.stderr_tail()}"))
        elif not answers:
            self.failures.append((case, f"{node.name} did not answer /status after: {sent} ({a.summary()})"))
        if expect_ok is False:
            self.failures.append((case, f"unexpected answer to {sent}: {answer}"))
        return a

    def note(self, case, sent, answer):
        """A row for an observation without a node check of its own."""
        self.rows.append((case, sent, answer, "", "", ""))

    def cleanup(self):
        for d in self.daemons:
            try:
                d.kill()
            except Exception:
                pass
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def mark(ok, text):
    return text if ok else "UNEXPECTED " + text


# ---------------------------------------------------------------- cases
def case1(b):
    """Deeply nested run_id."""
    model = b.small_model()
    d = b.secondary("c1")
    for depth in (100000, 20000):
        body = '{"run_id": ' + "[" * depth + "]" * depth + "}"
        a = http(d.port, "POST", "/init", body=body, timeout=10.0)
        ok = a.status == 400 and len(a.body) < 400
        b.row("1", f"/init run_id nested {depth} deep ({len(body) // 1024} KiB)",
              mark(ok, f"{a.summary(48)} [{len(a.body)} B]"), d, ok)
    # a well-formed /init still works after it
    body = b.init_body(d.config, model, b.next_run())
    a = http(d.port, "POST", "/init", body=body, timeout=20.0)
    b.row("1", "valid /init after the nested bodies", mark(a.status == 200, a.summary()), d, a.status == 200)
    http(d.port, "POST", "/reset", timeout=10.0)


def case2(b):
    """Slow load: status/stop/reset/init during it."""
    model = b.big_model()
    d = b.secondary("c2")
    rss0 = d.rss()
    run_a, run_other = b.next_run(), b.next_run()
    body = b.init_body(d.config, model, run_a)
    first = {}

    def first_init():
        first["a"] = http(d.port, "POST", "/init", body=body, timeout=60.0)

    t = threading.Thread(target=first_init, daemon=True)
    t0 = time.monotonic()
    t.start()
    s = d.wait_state("loading", timeout=30.0)
    caught = s.get("state") == "loading"
    b.row("2", "POST /init run A of a 448 MiB chunk", f"state {s.get('state')} after {time.monotonic() - t0:.2f}s", d)
    if not caught:
        b.failures.append(("2", f"never saw state loading (got {s})"))
    a = http(d.port, "POST", "/init", body=b.init_body(d.config, model, run_other), timeout=5.0)
    b.row("2", "during load: POST /init of run B", mark(a.status == 409, a.summary()), d, a.status == 409 or not caught)
    a = http(d.port, "PUT", f"/stop?reset=1&run_id={run_other}", timeout=5.0)
    b.row("2", "during load: PUT /stop?reset=1&run_id=B", mark(a.status == 409, a.summary()), d, a.status == 409 or not caught)
    a = http(d.port, "POST", "/reset?run_id=not-a-number", timeout=5.0)
    b.row("2", "during load: POST /reset?run_id=not-a-number", mark(a.status == 400, a.summary()), d,
          a.status == 400 or not caught)
    state_before = d.state().get("state")
    a = http(d.port, "POST", "/reset", timeout=15.0)
    b.row("2", f"POST /reset (node {state_before})", mark(a.status == 200, f"{a.summary(40)} in {a.ms:.0f} ms"), d,
          a.status == 200)
    t.join(timeout=60)
    fa = first.get("a", Answer(None, note="no answer in 60 s"))
    after = d.state().get("state")
    ok = (fa.status == 409 or not caught) and after == "idle"
    b.note("2", "  -> the first /init (run A) answered", mark(ok, f"{fa.summary(44)}; now {after}"))
    if not ok:
        b.failures.append(("2", f"first /init answered {fa.summary()} / state {after}"))
    run_c = b.next_run()
    t0 = time.monotonic()
    a = http(d.port, "POST", "/init", body=b.init_body(d.config, model, run_c), timeout=60.0)
    b.row("2", "second POST /init (run C), after the reset",
          mark(a.status == 200, f"{a.summary(30)} in {(time.monotonic() - t0):.1f}s, {a.json().get('state', '')}"),
          d, a.status == 200, rss_note=f" (idle {rss0:.0f})" if rss0 else None)
    a = http(d.port, "PUT", f"/stop?reset=1&run_id={run_c}", timeout=15.0)
    b.row("2", "PUT /stop?reset=1&run_id=C", mark(a.status == 200, a.summary()), d, a.status == 200)


def case3(b):
    """chunk.path outside the chunk dirs, and a 1 TiB upload."""
    model = b.small_model()
    d = b.secondary("c3")
    try:
        with open("/etc/passwd", "rb") as f:
            passwd_sha = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        passwd_sha = "x" * 64
    link = os.path.join(b.chunk_dir, "passwd.safetensors")
    try:
        os.symlink("/etc/passwd", link)
    except OSError:
        link = None
    for path in ["/etc/passwd", "/etc", "/dev/zero"] + ([link] if link else []):
        body = b.init_body(d.config, model, b.next_run())
        body["chunk"]["path"] = path
        a = http(d.port, "POST", "/init", body=body, timeout=8.0)
        leaked = passwd_sha in a.body
        state = d.state().get("state")
        ok = a.status in (404, 400) and not leaked and state == "idle"
        label = path if path != link else "<chunk-dir>/passwd.safetensors -> /etc/passwd"
        b.row("3", f"/init chunk.path={short(label, 30)}",
              mark(ok, f"{a.summary(38)}{' LEAKS SHA' if leaked else ''}; {state}"), d, ok)
    sha = model["manifest"]["nodes"][1]["sha256"]
    # The last /init got 404 need_upload for `sha`, so the node expects exactly that upload.
    for label, digest in (("the asked-for sha", sha), ("an unasked sha", "ab" * 32)):
        head = (f"POST /chunk?sha256={digest} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {1 << 40}\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + os.urandom(4096)
        a = http_raw(d.port, head, timeout=8.0)
        ok = a.status in (409, 413, 507)
        b.row("3", f"POST /chunk 1 TiB Content-Length, {label}", mark(ok, f"{a.summary(40)} in {a.ms:.0f} ms"), d, ok)
    cache = os.path.join(b.dir, "cache-c3")
    stored = sum(len(f) for _, _, f in os.walk(cache)) if os.path.isdir(cache) else 0
    b.note("3", "  files left in the chunk cache", mark(stored == 0, str(stored)))


def idle_connections(port, n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(3.0)
        try:
            s.connect((HOST, port))
            socks.append(s)
        except OSError:
            s.close()
    return socks


def count_closed(socks):
    closed = 0
    for s in socks:
        s.settimeout(0.0)
        try:
            if s.recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def case4(b):
    """64 file descriptors, 80 idle connections."""
    b.small_model()
    d = b.secondary("c4", launcher=["prlimit", "--nofile=64:64", "--"])
    socks = idle_connections(d.port, 80)
    time.sleep(0.3)
    closed = count_closed(socks)
    a = http(d.port, "GET", "/status", timeout=5.0)
    ok = a.status == 200 and a.ms < 500
    b.row("4", f"nofile=64: {len(socks)} idle conns ({closed} closed), GET /status",
          mark(ok, f"{a.summary(20)} in {a.ms:.1f} ms"), d, ok)
    time.sleep(10)
    closed = count_closed(socks)
    size = d.stderr_size()
    b.row("4", "10 s later, the idle conns still held by us", mark(size < 4000, f"{closed}/{len(socks)} closed by node; "
                                                                               f"stderr {size} B"), d, size < 4000)
    for s in socks:
        s.close()
    # and again with 80 connections that each start a request head and stall
    socks = idle_connections(d.port, 80)
    for s in socks:
        try:
            s.sendall(b"GET /sta")
        except OSError:
            pass
    time.sleep(0.3)
    a = http(d.port, "GET", "/status", timeout=5.0)
    b.row("4", "nofile=64: 80 conns stalled mid-head, GET /status", f"{a.summary(30)} in {a.ms:.1f} ms", d)
    for s in socks:
        s.close()
    time.sleep(0.2)
    b.row("4", "after closing them", f"stderr {d.stderr_size()} B, {d.stderr_lines()} lines", d)


def case5(b):
    """A second starter aimed at a busy node."""
    model = b.small_model()
    d = b.secondary("c5", connect_s=120, accept_s=120)
    run_a, run_b = b.next_run(), b.next_run()
    a = http(d.port, "POST", "/init", body=b.init_body(d.config, model, run_a), timeout=20.0)
    b.row("5", "valid POST /init of run A", mark(a.status == 200, a.summary()), d, a.status == 200)
    for method, target in (("PUT", f"/stop?reset=1&run_id={run_b}"), ("POST", f"/reset?run_id={run_b}"),
                           ("PUT", f"/stop?run_id={run_b}"), ("PUT", f"/lease?run_id={run_b}")):
        a = http(d.port, method, target, timeout=5.0)
        s = d.state()
        ok = a.status == 409 and s.get("state") == "ready" and s.get("run_id") == run_a
        b.row("5", f"{method} {target.replace(str(run_b), 'B')}",
              mark(ok, f"{a.summary(30)}; {s.get('state')} run {'A' if s.get('run_id') == run_a else s.get('run_id')}"), d, ok)
    a = http(d.port, "POST", "/init", body=b.init_body(d.config, model, run_b), timeout=10.0)
    s = d.state()
    ok = a.status == 409 and s.get("run_id") == run_a
    b.row("5", "POST /init of run B", mark(ok, f"{a.summary(30)}; {s.get('state')} run "
                                               f"{'A' if s.get('run_id') == run_a else s.get('run_id')}"), d, ok)
    a = http(d.port, "POST", f"/reset?run_id={run_a}", timeout=10.0)
    b.row("5", "POST /reset?run_id=A (cleanup)", mark(a.status == 200, a.summary()), d, a.status == 200)


def case6(b):
    """Data plane: a stranger on port_in, then an enormous frame header from the real previous node."""
    model = b.small_model()
    d = b.secondary("c6", connect_s=20, accept_s=20)
    run = b.next_run()
    fake = FakeStarter(d.config, run)
    try:
        a = http(d.port, "POST", "/init", body=b.init_body(d.config, model, run), timeout=20.0)
        b.row("6", "valid POST /init (run A)", mark(a.status == 200, a.summary()), d, a.status == 200)
        s = connect_retry(d.port_in)
        src = s.getsockname()[1]
        try:
            s.sendall(hello_frame(0, 2, run))
        except OSError:
            pass
        fate = socket_fate(s, 5.0)
        s.close()
        ok = fate.startswith("closed") or fate.startswith("reset")
        b.row("6", f"right Hello to port_in from port {src} (not port_out)",
              mark(ok, f"socket {fate}; node {d.state().get('state')}"), d, ok)
        fake.connect()
        helloed = fake.hello()
        st = d.wait_state("running", timeout=5.0)
        b.row("6", "Hello from the starter's port_out, right run", mark(helloed and st.get("state") == "running",
                                                                         f"Hello back: {helloed}; node {st.get('state')}"),
              d, helloed)
        rss0, hwm0 = d.rss(), d.hwm()
        fake.sock.sendall(frame_header(T_ACTIVATIONS, DT_F32, [1 << 20, 255], (1 << 20) * 255 * 4, n_tokens=1))
        fate = socket_fate(fake.sock, 6.0)
        st = d.wait_state("idle", timeout=10.0, need_error=True)
        rss1, hwm1 = d.rss(), d.hwm()
        jump = (hwm1 or 0) - (hwm0 or 0)
        ok = (fate.startswith("closed") or fate.startswith("reset")) and jump < 100
        b.row("6", "header Activations [2^20,255] f32 (1 GiB), no payload",
              mark(ok, f"link {fate.split(' after')[0]}; {short(st.get('last_error', '-'), 36)}"), d, ok,
              rss_note=f" (peak {jump:+.0f})")
        b.note("6", "  node's last_error ends", tail(st.get("last_error", "-")))
    finally:
        fake.close()
    # again with n_tokens = 2^20 (the header's own rows), a fresh run
    run = b.next_run()
    fake = FakeStarter(d.config, run)
    try:
        a = http(d.port, "POST", "/init", body=b.init_body(d.config, model, run), timeout=20.0)
        fake.connect()
        helloed = fake.hello()
        d.wait_state("running", timeout=5.0)
        hwm0 = d.hwm()
        fake.sock.sendall(frame_header(T_ACTIVATIONS, DT_F32, [1 << 20, 255], (1 << 20) * 255 * 4, n_tokens=1 << 20))
        fate = socket_fate(fake.sock, 6.0)
        st = d.wait_state("idle", timeout=10.0, need_error=True)
        jump = (d.hwm() or 0) - (hwm0 or 0)
        ok = a.status == 200 and helloed and (fate.startswith("closed") or fate.startswith("reset")) and jump < 100
        b.row("6", "same, n_tokens=2^20 (new run)", mark(ok, f"link {fate.split(' after')[0]}; "
                                                             f"{short(st.get('last_error', '-'), 36)}"), d, ok,
              rss_note=f" (peak {jump:+.0f})")
        b.note("6", "  node's last_error ends", tail(st.get("last_error", "-")))
    finally:
        fake.close()


def case7(b):
    """Garbage on both ports, a 100 KB header line, slowloris."""
    model = b.small_model()
    d = b.secondary("c7", connect_s=20, accept_s=20)
    a = http_raw(d.port, os.urandom(1 << 20), timeout=8.0)
    b.row("7", "1 MiB of random bytes to the control port", a.summary(), d)
    a = http_raw(d.port, b"GET /status HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100000 + b"\r\n\r\n", timeout=8.0)
    b.row("7", "GET /status with a 100 KB header line", mark(a.status is not None and a.status >= 400, a.summary()), d,
          a.status is not None and a.status >= 400)
    a = http_raw(d.port, b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 12000 + b"\r\n", timeout=8.0)
    b.row("7", "GET /status with 12000 header lines (94 KiB)", a.summary(), d)
    a = http_raw(d.port, b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 130000 + b"\r\n", timeout=8.0)
    b.row("7", "GET /status with 130000 header lines (1 MiB)", a.summary(), d)
    # slowloris: a POST /init that stops mid-body; the node keeps answering meanwhile
    slow = socket.create_connection((HOST, d.port), timeout=5.0)
    slow.sendall(b"POST /init HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                 b'{"run_id": 1, "ring_')
    worst, answered = 0.0, 0
    for _ in range(12):
        a = http(d.port, "GET", "/status", timeout=5.0)
        answered += a.status == 200
        worst = max(worst, a.ms)
        time.sleep(0.5)
    fate = socket_fate(slow, 1.0)
    slow.close()
    ok = answered == 12
    b.row("7", "POST /init stopped mid-body; 12x /status over 6 s",
          mark(ok, f"{answered}/12 answered, worst {worst:.1f} ms; slow conn {fate}"), d, ok)
    # 70 slowloris connections (over the 64-connection cap)
    flood_began = time.monotonic()
    socks = idle_connections(d.port, 70)
    for s in socks:
        try:
            s.sendall(b"POST /init HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        except OSError:
            pass
    time.sleep(0.3)
    # docs/PROTOCOL.md section 7: with every connection mid-request, a new one gets 503
    tally = {}
    for _ in range(6):
        a = http(d.port, "GET", "/status", timeout=3.0)
        key = str(a.status) if a.status is not None else a.note
        tally[key] = tally.get(key, 0) + 1
        time.sleep(0.5)
    got_503 = 0
    for s in socks:
        s.settimeout(0.05)
        try:
            got_503 += b" 503 " in s.recv(4096, socket.MSG_PEEK)
        except OSError:
            pass
    # docs/PROTOCOL.md: at most 4 refusals at once, each given 1 s to read its 503; past
    # them a connection is closed unanswered. So: 503s, some closes, never a hang.
    ok = tally.get("503", 0) + tally.get("200", 0) >= 1 and set(tally) <= {"200", "503", "no answer (eof)", "no answer (reset)"}
    b.note("7", f"{len(socks)} conns stalled mid-body; 6x GET /status in 3 s",
           mark(ok, ", ".join(f"{v}x {k}" for k, v in tally.items()) + f"; {got_503} flood conns got 503"))
    if not ok:
        b.failures.append(("7", f"GET /status during a {len(socks)}-connection mid-body flood: {tally} (no answer at "
                                "all, or a hang)"))
    # how long the flood (never closed by us) keeps a starter out: the node drops stalled requests after 30 s
    a = Answer(None)
    while time.monotonic() - flood_began < 40:
        a = http(d.port, "GET", "/status", timeout=2.0)
        if a.status == 200:
            break
        time.sleep(1.0)
    closed = count_closed(socks)
    b.row("7", "  flood held open: first /status 200 after", f"{time.monotonic() - flood_began:.1f} s after the flood "
          f"began ({a.summary(12)}); node closed {closed}/{len(socks)}", d)
    for s in socks:
        s.close()
    time.sleep(0.3)
    b.row("7", "  after closing the 70", "(closed by us)", d)
    # data port: needs a run in ready state (the node listens on port_in only then)
    run = b.next_run()
    fake = FakeStarter(d.config, run)
    try:
        a = http(d.port, "POST", "/init", body=b.init_body(d.config, model, run), timeout=20.0)
        b.row("7", "valid POST /init (run A)", mark(a.status == 200, a.summary()), d, a.status == 200)
        s = connect_retry(d.port_in)
        what = spray_random(s)
        s.close()
        b.row("7", "1 MiB random to port_in, ephemeral port", f"{what}; node {d.state().get('state')}", d)
        s = fake.connect()
        what = spray_random(s)
        hard_close(s)
        fake.sock = None
        b.row("7", "1 MiB random to port_in from port_out", f"{what}; node {d.state().get('state')}", d)
        # the real previous node is still taken afterwards
        fake.connect()
        helloed = fake.hello()
        st = d.wait_state("running", timeout=5.0)
        ok = helloed and st.get("state") == "running"
        b.row("7", "then a right Hello from port_out", mark(ok, f"Hello back: {helloed}; node {st.get('state')}"), d, ok)
    finally:
        fake.close()
    st = d.wait_state("idle", timeout=15.0)
    b.row("7", "ring peer gone", f"node {st.get('state')}: {short(st.get('last_error', ''), 40)}", d)


def case8(b):
    """Odd query strings and paths."""
    b.small_model()
    d = b.secondary("c8")
    for method, target, label in (("PUT", "/lease?run_id=not-a-number", None),
                                  ("PUT", "/lease?run_id=99999999999999999999999", None),
                                  ("PUT", "/lease?run_id=-1", None),
                                  ("GET", "/status?run_id=%ff%fe", None),
                                  ("PUT", "/stop?reset=1&run_id=%ff%fe", None),
                                  ("POST", "/reset?run_id=%00", None),
                                  ("GET", "/" + "a" * 10240, "GET /aaaa… (10 KB path)"),
                                  ("GET", "/status?" + "x=1&" * 3000, "GET /status?x=1&… (12 KB query)"),
                                  ("GET", "status", None),
                                  ("BREW", "/status", None)):
        a = http(d.port, method, target, timeout=5.0)
        # docs/PROTOCOL.md section 7: an error quotes at most 80 characters of a bad value
        big = len(a.body) >= 400
        answer = f"{a.summary(40)}{' [%d B body]' % len(a.body) if big else ''}"
        b.row("8", label or f"{method} {target}", mark(a.status is not None and not big, answer), d,
              a.status is not None and not big)
    s = d.state()
    b.note("8", "  state after", s.get("state", "?"))


CASES = {"1": case1, "2": case2, "3": case3, "4": case4, "5": case5, "6": case6, "7": case7, "8": case8}


def print_table(rows):
    heads = ("case", "what was sent", "answer", "alive", "/status ms", "RSS MiB")
    widths = (4, 52, 66, 5, 10, 16)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*heads))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt.format(*(short(c, w) if len(str(c)) > w else str(c) for c, w in zip(r, widths))))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=os.path.join(REPO, "build", "bin"), help="directory with secondary and prepare_model")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs, models)")
    p.add_argument("--cases", default=",".join(CASES), help="comma list of cases to run, e.g. 1,3,6 (default: all)")
    args = p.parse_args()
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in wanted:
        if c not in CASES:
            p.error(f"unknown case {c}; cases are {','.join(CASES)}")
    for tool in ("secondary", "prepare_model"):
        if not os.access(os.path.join(args.bin, tool), os.X_OK):
            p.error(f"{os.path.join(args.bin, tool)} is not an executable; pass --bin")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    t0 = time.monotonic()
    crashed = []
    try:
        for c in wanted:
            tc = time.monotonic()
            try:
                CASES[c](bench)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a case that could not run to its end still leaves its rows
                crashed.append((c, f"{type(e).__name__}: {e}"))
                bench.failures.append((c, f"case aborted: {type(e).__name__}: {e}"))
            print(f"[case {c}: {time.monotonic() - tc:.1f} s]", flush=True)
            for dmn in bench.daemons:
                if not dmn.stopped and not dmn.alive():
                    bench.failures.append((c, f"{dmn.name} is dead (exit {dmn.proc.returncode}); stderr tail: "
                                              f"{dmn.stderr_tail()}"))
            # one daemon per case: stop it before the next, so ports and memory do not pile up
            for dmn in bench.daemons:
                dmn.kill()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        bench.failures.append(("-", "interrupted"))
        crashed.append(("-", "interrupted"))
    finally:
        bench.cleanup()
    print_table(bench.rows)
    print()
    print(f"total {time.monotonic() - t0:.1f} s; scratch {bench.dir}{' (kept)' if args.keep else ' (removed)'}")
    dead = [f for f in bench.failures if "died" in f[1] or "dead" in f[1] or "did not answer" in f[1]]
    for case, what in bench.failures:
        print(f"FAIL case {case}: {what}")
    if not bench.failures:
        print("every node stayed alive and answered /status after every attack; every answer as expected")
    # exit 1 only when a node died or stopped answering (or the bench itself could not run a case)
    code = 1 if dead or crashed else 0
    print(f"exit {code}: " + ("a node died or stopped answering, or a case could not run" if code else
                              "no node died or stopped answering /status"))
    return code


if __name__ == "__main__":
    sys.exit(main())
