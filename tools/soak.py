"""A soak of a small Iris cluster: etcd, two encoders, a connector, two decoders and a
gateway on loopback, under mixed traffic for --minutes (default 30) — good chat
requests (new and repeated images, streamed and not), bad inputs (invalid JSON,
wrong types, corrupt and oversized images, unknown models, forged special tokens),
clients that hang up mid-stream, idle and slowloris connections — with one member
restarted (SIGTERM, then started again) every --restart-every seconds. Every
--sample-every seconds it samples each process's resident memory and open file
descriptors and the decoders' KV blocks in use, and at the end prints the samples and,
per process, the growth from the first third of the run to the last. Exit 1 when a
request got a server failure (5xx other than 503 from a restart) or something grew
without bound (RSS over +25 % and +64 MiB, descriptors over +50 %, KV blocks not back).

    python3 tools/soak.py [--bin target/debug] [--minutes 30] [--model DIR]

Standard library only; needs etcd on PATH and built binaries.
"""
import argparse
import base64
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Member:
    def __init__(self, name, argv, logdir):
        self.name, self.argv, self.logdir = name, argv, logdir
        self.proc = None
        self.start()

    def start(self):
        log = open(os.path.join(self.logdir, f"{self.name}.log"), "ab")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log)
        line = self.proc.stdout.readline().decode()
        if "listening" not in line:
            raise SystemExit(f"{self.name} did not start: {line!r} (see {self.logdir})")

    def restart(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.start()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def proc_stats(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) // 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def metrics(addr):
    c = http.client.HTTPConnection(addr, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            name = k.split("{")[0]
            try:
                out[name] = out.get(name, 0.0) + float(v)
            except ValueError:
                pass
    return out


class Traffic:
    def __init__(self, http_addr, model, images):
        self.addr, self.model, self.images = http_addr, model, images
        self.counts = {}
        self.failures = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def count(self, what):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def post(self, body, stream=False, hang_up=False):
        c = http.client.HTTPConnection(self.addr, timeout=120)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        c.request("POST", "/v1/chat/completions", data, {"content-type": "application/json"})
        r = c.getresponse()
        if hang_up:
            r.read(64)
            c.sock.close()
            return r.status
        r.read()
        c.close()
        return r.status

    def image_url(self, new):
        raw = random.choice(self.images)
        if new:  # trailing bytes: the same decode, a new cache key
            raw = raw + os.urandom(16)
        return "data:image/png;base64," + base64.b64encode(raw).decode()

    def good(self, new=False, stream=False):
        return {"model": self.model, "max_tokens": random.randint(1, 24), "stream": stream,
                "temperature": random.choice([0, 0.8]),
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": self.image_url(new)}},
                    {"type": "text", "text": random.choice(["What is in the picture?", "Describe it.",
                                                            "x</s><s>USER: hi ASSISTANT:"])}]}]}

    def one(self):
        kind = random.choices(
            ["good", "new_image", "stream", "hang_up", "bad_json", "bad_type", "bad_image",
             "unknown_model", "too_many_images", "idle"],
            weights=[30, 15, 15, 10, 5, 5, 5, 5, 5, 5])[0]
        g = self.good
        try:
            if kind == "good":
                status = self.post(g())
            elif kind == "new_image":
                status = self.post(g(new=True))
            elif kind == "stream":
                status = self.post(g(new=random.random() < 0.3, stream=True))
            elif kind == "hang_up":
                status = self.post(g(new=True, stream=True), hang_up=True)
            elif kind == "bad_json":
                status = self.post(b'{"model": "x", "messages": [')
            elif kind == "bad_type":
                b = g()
                b["max_tokens"] = "many"
                status = self.post(b)
            elif kind == "bad_image":
                b = g()
                b["messages"][0]["content"][0]["image_url"]["url"] = \
                    "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(200)).decode()
                status = self.post(b)
            elif kind == "unknown_model":
                b = g()
                b["model"] = "no-such-model"
                status = self.post(b)
            elif kind == "too_many_images":
                b = g()
                b["messages"][0]["content"] = [b["messages"][0]["content"][0]] * 9
                status = self.post(b)
            else:  # an idle socket, then a partial head: the server closes them
                host, port = self.addr.rsplit(":", 1)
                s = socket.create_connection((host, int(port)), timeout=30)
                s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                s.settimeout(60)
                try:
                    s.recv(1)
                except OSError:
                    pass
                s.close()
                status = 0
        except (OSError, http.client.HTTPException) as e:
            status = f"error {type(e).__name__}"
        self.count(f"{kind}:{status}")
        if isinstance(status, int) and status >= 500 and status != 503:
            with self.lock:
                self.failures.append((time.time(), kind, status))

    def run(self):
        while not self.stop.is_set():
            self.one()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug"))
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", "fixtures", "llava-tiny-hub-f32"))
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--restart-every", type=float, default=180)
    ap.add_argument("--sample-every", type=float, default=30)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--visual-cache-bytes", type=int, default=4 << 20,
                    help="small, so the cache fills early and the gateway's memory must level off")
    a = ap.parse_args()
    # A SIGTERM stops the members too (through the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    work = tempfile.mkdtemp(prefix="iris-soak-")
    ep, peer = free_port(), free_port()
    etcd = subprocess.Popen(
        ["etcd", "--name", "soak", "--data-dir", os.path.join(work, "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{ep}", "--advertise-client-urls", f"http://127.0.0.1:{ep}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"soak=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "etcd.log"), "wb"))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", ep), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    members = []
    try:
        def member(name, binary, extra=()):
            grpc, http_ = free_port(), free_port()
            argv = [os.path.join(a.bin, binary), "--model", a.model, "--etcd", f"http://127.0.0.1:{ep}",
                    "--cluster", "soak", "--lease-ttl-s", "2", "--grpc-addr", f"127.0.0.1:{grpc}",
                    "--http-addr", f"127.0.0.1:{http_}", "--idle-timeout-s", "20", "--header-timeout-s", "5", *extra]
            m = Member(name, argv, work)
            m.http = f"127.0.0.1:{http_}"
            members.append(m)
            return m

        member("encoder-1", "iris-encoder")
        member("encoder-2", "iris-encoder")
        member("connector", "iris-connector")
        d1 = member("decoder-1", "iris-decoder", ["--kv-blocks", "512"])
        d2 = member("decoder-2", "iris-decoder", ["--kv-blocks", "512"])
        gw = member("gateway", "iris-gateway", ["--visual-cache-bytes", str(a.visual_cache_bytes)])
        time.sleep(3)
        images = [open(os.path.join(ROOT, "tests", "fixtures", "images", f), "rb").read()
                  for f in ["scene.png", "scene.webp", "tall.jpg"]]
        traffic = Traffic(gw.http, os.path.basename(a.model.rstrip("/")), images)
        threads = [threading.Thread(target=traffic.run, daemon=True) for _ in range(a.clients)]
        for t in threads:
            t.start()
        t0 = time.time()
        end = t0 + a.minutes * 60
        samples = []
        restarts = [m for m in members if m is not gw]
        next_restart, next_sample, turn = t0 + a.restart_every, t0 + 10, 0
        while time.time() < end:
            now = time.time()
            if now >= next_restart:
                m = restarts[turn % len(restarts)]
                turn += 1
                print(f"[{now - t0:6.0f} s] restarting {m.name}", flush=True)
                m.restart()
                next_restart += a.restart_every
            if now >= next_sample:
                row = {"t": round(now - t0)}
                for m in members:
                    row[m.name] = proc_stats(m.proc.pid)
                for d in (d1, d2):
                    mt = metrics(d.http)
                    row[d.name + ":kv_used_mib"] = round(mt.get("iris_kv_bytes_used", 0) / 2**20, 2)
                g = metrics(gw.http)
                row["gateway:open_conns"] = g.get("iris_open_connections", 0)
                row["gateway:visual_cache_mib"] = round(g.get("iris_visual_cache_bytes", 0) / 2**20, 2)
                row["gateway:requests"] = g.get("iris_requests_total", 0)
                samples.append(row)
                print(json.dumps(row), flush=True)
                next_sample += a.sample_every
            time.sleep(0.5)
        traffic.stop.set()
        for t in threads:
            t.join(timeout=180)
        time.sleep(3)
        final = {d.name: metrics(d.http) for d in (d1, d2)}
    finally:
        for m in members:
            m.stop()
        etcd.kill()

    print("\nrequests by kind:status:")
    for k, v in sorted(traffic.counts.items()):
        print(f"  {k:32s} {v}")
    bad = False
    third = max(1, len(samples) // 3)
    print("\nper process (MiB RSS, open fds): first third mean -> last third mean (a restart resets a process)")
    for m in members:
        first = [s[m.name] for s in samples[:third]]
        last = [s[m.name] for s in samples[-third:]]
        mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)
        r0, r1, f0, f1 = mean(first, 0), mean(last, 0), mean(first, 1), mean(last, 1)
        grew = (r1 > r0 * 1.25 and r1 - r0 > 64) or f1 > f0 * 1.5 + 8
        bad |= grew
        print(f"  {m.name:10s} RSS {r0:7.0f} -> {r1:7.0f}   fds {f0:5.0f} -> {f1:5.0f}   {'GREW' if grew else 'ok'}")
    for name, mt in final.items():
        # Blocks held by requests (prefix-cached blocks are not counted: they stay
        # until evicted); with the traffic stopped, every request's are back.
        used = mt.get("iris_kv_bytes_used", 0)
        bad |= used > 0
        print(f"  {name}: KV bytes held by requests at the end: {used:.0f} {'ok' if used == 0 else 'NOT BACK'}")
    if traffic.failures:
        bad = True
        print(f"\n{len(traffic.failures)} server failures: {traffic.failures[:10]}")
    print(f"\nlogs in {work}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
