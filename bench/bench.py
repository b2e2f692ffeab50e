#!/usr/bin/env python3
"""Benchmarks for invites_api: `make bench` and `make bench-compare`.

bench.py run      throughput and latency at 1/8/64 connections, growth after
                  1,000,000 stored invites, CLI start-up, server RSS
bench.py compare  the same load against Debian's Prosody 0.12 with
                  mod_invites_api (SQLite storage, then file storage), in
                  alternating rounds, as ratios
bench.py against FILE
                  built-in creates/s of this invites_api.py against another
                  copy of it (an earlier revision: make bench-against REV=...),
                  in alternating rounds, as a ratio

Load comes from wrk when installed (1 thread, keep-alive, one invite per
request), else from a small standard-library load generator. Every figure is
printed with how it was measured. Not part of `make test`: machines are
noisy, so compare ratios from one run, not absolute numbers across runs.
"""

import argparse
import base64
import os
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "invites_api.py")
sys.path.insert(0, os.path.dirname(HERE))
import invites_api as ia  # noqa: E402

# The interpreter a Debian server runs it with; the shebang's is `python3` on PATH.
SERVER_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
DURATION = int(os.environ.get("BENCH_SECONDS", "5"))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


# -- load generation -----------------------------------------------------------

def load(url, connections, seconds, script=None):
    """Return (requests/s, p50 ms, p99 ms, non-2xx/3xx count, tool) for GETs of url (a wrk script:
    other requests)."""
    wrk = shutil.which("wrk")
    if wrk:
        result = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
                                + (["-s", script] if script else []),
                                capture_output=True, text=True, timeout=seconds + 60)
        out = result.stdout
        if "Requests/sec" not in out:
            raise SystemExit(f"wrk failed: {result.stderr or out}")
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

        def ms(label):
            value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out).groups()
            return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
        errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        return rate, ms("50%"), ms("99%"), int(errors.group(1)) if errors else 0, "wrk"
    return stdlib_load(url, connections, seconds) + ("stdlib load generator",)


def stdlib_load(url, connections, seconds):
    """A keep-alive load generator in threads (used when wrk is missing)."""
    match = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    host, port, path = match.group(1), int(match.group(2)), match.group(3)
    latencies, errors, stop = [], [0], time.monotonic() + seconds

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while time.monotonic() < stop:
            started = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            latencies.append(time.perf_counter() - started)
            if response.status >= 400:
                errors[0] += 1
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return (len(latencies) / seconds, latencies[len(latencies) // 2] * 1000,
            latencies[int(len(latencies) * 0.99)] * 1000, errors[0])


def count_requests(url, total, connections=8):
    """Send total GETs of url over keep-alive connections (for RSS after N requests)."""
    match = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    host, port, path = match.group(1), int(match.group(2)), match.group(3)
    left = [total]
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            conn.request("GET", path)
            conn.getresponse().read()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- our server ------------------------------------------------------------------

class OurServer:
    """invites_api serve on a free port with a throwaway database."""

    def __init__(self, directory, db=None, module_dir=None, extra=(), script=SCRIPT, cli=False):
        self.db = db or os.path.join(directory, "bench.db")
        if script == SCRIPT and not cli:
            store = ia.Store(self.db)
            self.key = ia.create_key(store, "example.com", "bench")
            store.close()
        else:  # (cli: its database and key made by its own command line, as another version's are)
            self.key = subprocess.run([SERVER_PYTHON, script, "--db", self.db, "create", "example.com"],
                                      capture_output=True, text=True, check=True).stdout.strip()
        self.port = free_port()
        # module_dir: run it as `python3 -m invites_api` from compiled bytecode there, not as a script.
        argv, env = [SERVER_PYTHON, script], None
        if module_dir:  # (run from there: -m looks in the working directory first)
            argv, env = [SERVER_PYTHON, "-m", "invites_api"], dict(os.environ, PYTHONPATH=module_dir)
        self.proc = subprocess.Popen(argv + ["--db", self.db, "serve", "--quiet", "--port", str(self.port), *extra],
                                     stdout=subprocess.DEVNULL, env=env, cwd=module_dir)
        wait_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}/invites_api?key={self.key}"

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def pipeline(port, total, batch):
    """Send total OPTIONS requests on one connection, batch at a time, reading each batch's answers."""
    request = b"OPTIONS /invites_api HTTP/1.1\r\nHost: bench\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for start in range(0, total, batch):
            count = min(batch, total - start)
            sender = threading.Thread(target=sock.sendall, args=(request * count,))
            sender.start()
            seen, data = 0, b""
            while seen < count:
                data += sock.recv(1 << 20)
                seen += data.count(b"HTTP/1.1 204 ")
                data = data[data.rfind(b"HTTP/1.1 204 ") + 1:] if b"HTTP/1.1 204 " in data else data
            sender.join()


def compiled_copy(directory):
    """Return a directory holding a copy of invites_api.py and its compiled bytecode (`python3 -m` runs that)."""
    target = os.path.join(directory, "module")
    os.makedirs(target)
    shutil.copy(SCRIPT, target)
    subprocess.run([SERVER_PYTHON, "-m", "compileall", "-q", target], check=True)
    return target


def seed_invites(db, count):
    """Store count invites straight through sqlite (fast), as if minted over months."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    now = int(time.time())
    batch = []
    for i in range(count):
        created = now - count + i  # tokens as invites_api makes them: 4 bytes of time, 14 random
        token = base64.urlsafe_b64encode((created % 2**31).to_bytes(4, "big") + os.urandom(14)).decode()
        row = dict.fromkeys(ia._INVITE_COLUMN_NAMES)  # (only its id and hash are kept)
        row.update(id=ia.invite_id(token), token_hash=ia.hash_secret(token), host="example.com", type="register",
                   created_at=created, expires_at=now + 7 * 86400, uses=1, uses_left=1, backend="builtin")
        batch.append([row[c] for c in ia._INVITE_COLUMN_NAMES])
        if len(batch) == 50_000:
            conn.executemany(f"INSERT INTO invites ({ia._INVITE_COLUMNS}) VALUES ({','.join('?' * len(ia._INVITE_COLUMN_NAMES))})", batch)
            batch = []
    if batch:
        conn.executemany(f"INSERT INTO invites ({ia._INVITE_COLUMNS}) VALUES ({','.join('?' * len(ia._INVITE_COLUMN_NAMES))})", batch)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def median_ms(argv, runs=30, env=None):
    """Median wall time of running argv, in ms (from PYTHONPATH's directory if env sets one)."""
    times = []
    cwd = (env or {}).get("PYTHONPATH")  # -m looks in the working directory first
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd, check=True)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def row(what, value, how):
    print(f"| {what} | {value} | {how} |", flush=True)


# -- make bench ------------------------------------------------------------------

def run_bench(args):
    print(f"# invites_api benchmark: {os.cpu_count()} cores, server on {SERVER_PYTHON} "
          f"({sys.version.split()[0] if SERVER_PYTHON == sys.executable else 'Debian'}), "
          f"{DURATION:g} s per measure, durable commits (synchronous=FULL)\n")
    print("| measure | result | how |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as directory:
        server = OurServer(directory)
        tool = "wrk" if shutil.which("wrk") else "stdlib load generator"
        for connections in (1, 8, 64):
            rate, p50, p99, errors, tool = load(server.url, connections, DURATION)
            row(f"create, {connections} connection{'s' if connections > 1 else ''}",
                f"{rate:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms" + (f", {errors} errors" if errors else ""),
                f"{tool}, GET /invites_api?key=, keep-alive, built-in backend")
        server.stop()

        # Pipelining: server CPU per request for a flood (all requests sent at once, on one
        # connection) against the same requests sent in batches of 16 (each batch read back).
        cpu = {}
        for mode in ("batches", "flood"):
            server = OurServer(directory, db=os.path.join(directory, f"pipe-{mode}.db"))
            before = server.cpu_seconds()
            pipeline(server.port, args.pipelined, 16 if mode == "batches" else args.pipelined)
            cpu[mode] = (server.cpu_seconds() - before) / args.pipelined * 1e6
            server.stop()
        row("pipelined OPTIONS, server CPU per request", f"flood {cpu['flood']:.0f} us, batches of 16 "
            f"{cpu['batches']:.0f} us: {cpu['flood'] / cpu['batches']:.2f}x",
            f"{args.pipelined:,} requests on one connection; utime+stime of the server process")

        # Growth: a server on a database holding 1,000,000 invites against one on an
        # empty database, in alternating rounds (the machine's noise hits both alike).
        big = os.path.join(directory, "big.db")
        store = ia.Store(big)
        store.close()
        started = time.monotonic()
        seed_invites(big, args.seed)
        seeded = time.monotonic() - started
        empty, full = OurServer(directory, db=os.path.join(directory, "empty.db")), OurServer(directory, db=big)
        rounds = []
        for _ in range(3):
            empty_rate = load(empty.url, 8, DURATION)[0]
            big_rate, p50, p99, errors, tool = load(full.url, 8, DURATION)
            rounds.append((big_rate, empty_rate, p99))
        empty.stop()
        full.stop()
        ratio = statistics.median(b / e for b, e, _ in rounds)
        row(f"growth: create at 8 connections, {args.seed:,} stored vs empty",
            f"{ratio:.2f}x (rounds: " + ", ".join(f"{b:,.0f} vs {e:,.0f}" for b, e, _ in rounds) +
            f" req/s; p99 with {args.seed:,}: {statistics.median(p for _, _, p in rounds):.2f} ms)",
            f"{tool}, 3 alternating rounds of {DURATION:g} s, median ratio; invites seeded through sqlite "
            f"in {seeded:.0f} s")

        # The first page of `invites list` on a host with 100,000 invites (of the database above).
        hundred = os.path.join(directory, "hundred.db")
        ia.Store(hundred).close()
        seed_invites(hundred, 100_000)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        listing = median_ms([python, SCRIPT, "--db", hundred, "invites", "list", "example.com"], runs=10)
        row("invites list, first page of 100,000 invites", f"{listing:.0f} ms",
            f"median of 10 runs, wall time, {python}; 50 rows and the count")

        # CLI start-up.
        db = os.path.join(directory, "cli.db")
        env = dict(os.environ, INVITES_API_DB=db)
        subprocess.run([sys.executable, SCRIPT, "create", "example.com"], env=env, stdout=subprocess.DEVNULL)
        shebang = shutil.which("python3")
        for label, python in (("shebang's python3 " + shebang, shebang), ("Debian /usr/bin/python3", "/usr/bin/python3")):
            if not os.path.exists(python):
                continue
            figures = [f"{name} {median_ms([python, SCRIPT, *argv], env=env):.1f} ms"
                       for name, argv in (("create", ["create", "example.com"]), ("list", ["list", "example.com"]),
                                          ("--help", ["--help"]))]
            row(f"CLI start-up, {label}", ", ".join(figures), "median of 30 runs, wall time")
        module_dir = compiled_copy(directory)
        module_env = dict(env, PYTHONPATH=module_dir)
        figures = [f"{name} {median_ms([SERVER_PYTHON, '-m', 'invites_api', *argv], env=module_env):.1f} ms"
                   for name, argv in (("create", ["create", "example.com"]), ("list", ["list", "example.com"]),
                                      ("--help", ["--help"]))]
        row(f"CLI start-up, {SERVER_PYTHON} -m invites_api", ", ".join(figures),
            "median of 30 runs; from compiled bytecode (a script is compiled on every run, a module is not)")
        if os.path.exists("/usr/bin/python3"):
            floor = median_ms(["/usr/bin/python3", "-c", "pass"])
            row("for scale: /usr/bin/python3 -c pass", f"{floor:.1f} ms", "median of 30 runs")

        # Memory: run as a script, and as a module from compiled bytecode.
        for label, mode in (("server RSS, as a script", None), ("server RSS, python3 -m invites_api", module_dir)):
            server = OurServer(directory, db=os.path.join(directory, f"rss{bool(mode)}.db"), module_dir=mode)
            rss_start = server.rss_mb()
            count_requests(server.url, args.requests)
            rss_100k = server.rss_mb()
            count_requests(server.url, args.requests)
            rss_200k = server.rss_mb()
            server.stop()
            row(label, f"{rss_start:.1f} MB at start, {rss_100k:.1f} MB after {args.requests:,} requests, "
                       f"{rss_200k:.1f} MB after {2 * args.requests:,}", "VmRSS, 8 keep-alive connections")


# -- make bench-compare ----------------------------------------------------------

PROSODY_CONFIG = """
pidfile = "{home}/prosody.pid"
data_path = "{home}/data"
certificates = "{home}/certs"
admin_socket = "{home}/prosody.sock"
daemonize = false
log = {{ warn = "{home}/prosody.log" }}
modules_enabled = {{ "http", "invites", "invites_api", "admin_shell" }}
{storage}
c2s_ports = {{}}
s2s_ports = {{}}
component_ports = {{}}
http_ports = {{ {port} }}
http_interfaces = {{ "127.0.0.1" }}
https_ports = {{}}
http_default_host = "example.com"
VirtualHost "example.com"
"""


class Prosody:
    """Debian's Prosody with mod_invites_api from prosody-modules, on loopback."""

    def __init__(self, directory, storage):
        self.home = os.path.join(directory, f"prosody-{storage}")
        for sub in ("data", "certs"):
            os.makedirs(os.path.join(self.home, sub))
        self.port = free_port()
        self.config = os.path.join(self.home, "prosody.cfg.lua")
        sql = 'storage = "sql"\nsql = { driver = "SQLite3", database = "prosody.sqlite" }' if storage == "sql" else ""
        with open(self.config, "w") as f:
            f.write(PROSODY_CONFIG.format(home=self.home, port=self.port, storage=sql))
        self.run_as = []
        if os.geteuid() == 0:
            os.chmod(directory, 0o755)
            subprocess.run(["chown", "-R", "prosody:prosody", self.home], check=True)
            self.run_as = ["runuser", "-u", "prosody", "--"]
        self.proc = subprocess.Popen(self.run_as + ["prosody", "--config", self.config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        out = subprocess.run(self.run_as + ["prosodyctl", "--config", self.config, "mod_invites_api", "create",
                                            "example.com", "bench"], capture_output=True, text=True).stdout
        self.key = out.strip().splitlines()[-1]
        self.url = f"http://127.0.0.1:{self.port}/invites_api?key={self.key}"

    def rss_mb(self):
        with open(os.path.join(self.home, "prosody.pid")) as f:  # not runuser's pid
            pid = f.read().strip()
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


EJABBERD_CONFIG = """hosts: ["example.com"]
loglevel: warning
listen:
  - {{port: {http}, ip: "127.0.0.1", module: ejabberd_http, request_handlers: {{"/api": mod_http_api, "/invites": mod_invites}}}}
auth_method: internal
acl: {{local: {{user_regexp: ""}}}}
access_rules: {{local: {{allow: local}}, register: {{allow: all}}}}
api_permissions: {{"loopback": {{who: {{ip: ["127.0.0.0/8"]}}, what: "*", from: [mod_http_api]}}}}
modules: {{mod_admin_extra: {{}}, mod_register: {{access: register, allow_modules: [mod_invites]}}, mod_invites: {{landing_page: auto}}}}
"""


class Ejabberd:
    """ejabberd 26 (mod_invites, mod_http_api) on loopback, as root (ejabberdctl runs it as ejabberd)."""

    def __init__(self, directory):
        home = os.path.join(directory, "ejabberd")
        dirs = [os.path.join(home, d) for d in ("conf", "spool", "logs")]
        for d in dirs:
            os.makedirs(d)
        os.chmod(directory, 0o755)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        with open(os.path.join(dirs[0], "ejabberd.yml"), "w") as f:
            f.write(EJABBERD_CONFIG.format(http=self.port))
        with open(os.path.join(dirs[0], "ejabberdctl.cfg"), "w") as f:
            f.write(f"ERLANG_NODE=bench{os.getpid()}@localhost\nERL_EPMD_ADDRESS=127.0.0.1\n"
                    "INET_DIST_INTERFACE=127.0.0.1\n")
        with open(os.path.join(dirs[0], "inetrc"), "w") as f:
            f.write("{lookup, [file, native]}.\n")
        subprocess.run(["chown", "-R", "ejabberd:ejabberd", home], check=True)
        self.ctl = os.path.join(directory, "ejabberdctl")
        with open(self.ctl, "w") as f:
            f.write(f"#!/bin/sh\nexec ejabberdctl --config-dir {dirs[0]} --spool {dirs[1]} --logs {dirs[2]} \"$@\"\n")
        os.chmod(self.ctl, 0o755)
        subprocess.run([self.ctl, "start"], check=True, capture_output=True, timeout=60)
        subprocess.run([self.ctl, "started"], check=True, capture_output=True, timeout=60)
        self.client = ia.EjabberdApi(self.api)
        self.script = os.path.join(directory, "generate_invite.lua")
        with open(self.script, "w") as f:
            f.write('wrk.method = "POST"\nwrk.body = \'{"host": "example.com"}\'\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')

    def clear(self):
        """Drop every invite of the host (mod_invites keeps at most 1,000 open or used ones)."""
        self.client.call("expire_invite_tokens", username="", host="example.com")
        self.client.call("cleanup_expired_invite_tokens")

    def stop(self):
        subprocess.run([self.ctl, "stop"], capture_output=True, timeout=60)
        subprocess.run([self.ctl, "stopped"], capture_output=True, timeout=60)


def compare_ejabberd(directory, rounds):
    """Rows: real invites through --backend ejabberd (its API, then ejabberdctl) against calling
    ejabberd's own POST /api/generate_invite, same load, the cap cleared before each run."""
    found = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "ejabberd"], capture_output=True, text=True)
    if not found.stdout[:2].isdigit() or int(found.stdout.split(".")[0]) < 26:
        row("--backend ejabberd", "not measured: needs ejabberd 26 (Debian 13, trixie-backports)",
            f"ejabberd here: {found.stdout or 'none'}")
        return
    # Runs of 1 s: at ejabberd's ~800 invites/s, under mod_invites' cap of 1,000 (cleared between runs).
    # (ejabberd 26.07 itself answers a few percent of concurrent generate_invite calls with 500
    # internal_error: the non-2xx of both sides.)
    seconds = 1
    ejabberd = Ejabberd(directory)
    try:
        api = OurServer(directory, db=os.path.join(directory, "ejabberd-api.db"),
                        extra=("--backend", "ejabberd", "--ejabberd-api", ejabberd.api))
        results = []
        for _ in range(rounds):
            ejabberd.clear()
            direct = load(f"{ejabberd.api}/generate_invite", 8, seconds, ejabberd.script)
            ejabberd.clear()
            ours = load(api.url, 8, seconds)
            results.append((ours, direct))
        api.stop()
        ratio = statistics.median(o[0] / d[0] for o, d in results)
        median = lambda i, which: statistics.median(r[which][i] for r in results)  # noqa: E731
        errors = f"{sum(o[3] for o, _ in results)} and {sum(d[3] for _, d in results)}"
        row(f"--backend ejabberd ({found.stdout}, HTTP API) vs ejabberd's own POST /api/generate_invite",
            f"{median(0, 0):,.0f} vs {median(0, 1):,.0f} invites/s: **{ratio:.2f}x**; p99 {median(2, 0):.1f} vs "
            f"{median(2, 1):.1f} ms ({median(2, 0) / median(2, 1):.1f}x); non-2xx: {errors}",
            f"wrk -t1 -c8 -d{seconds}s, {rounds} alternating rounds, median; the cap cleared before each")
        ctl = OurServer(directory, db=os.path.join(directory, "ejabberd-ctl.db"),
                        extra=("--backend", "ejabberd", "--ejabberdctl", ejabberd.ctl))
        ejabberd.clear()
        rate, _, p99, errors, _ = load(ctl.url, 8, 5)
        ctl.stop()
        row("--backend ejabberd through ejabberdctl (an Erlang VM per invite)",
            f"{rate:,.1f} invites/s, p99 {p99:,.0f} ms" + (f"; {errors} non-2xx" if errors else ""),
            "wrk -t1 -c8 -d5s, one round")
    finally:
        ejabberd.stop()


def run_compare(args):
    for program in ("prosody", "prosodyctl"):
        if not shutil.which(program):
            raise SystemExit(f"{program} is not installed: apt-get install prosody prosody-modules lua-dbi-sqlite3")
    rounds = 5
    print(f"# invites_api vs Prosody 0.12 + mod_invites_api: {os.cpu_count()} cores, {rounds} alternating rounds "
          f"of {DURATION:g} s at 8 connections, one invite per request\n")
    print("| measure | result | how |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as directory:
        ours, prosody = OurServer(directory), Prosody(directory, "sql")
        results = {"ours": [], "prosody": []}
        tool = "wrk"
        for _ in range(rounds):
            for name, server in (("prosody", prosody), ("ours", ours)):
                rate, p50, p99, errors, tool = load(server.url, 8, DURATION)
                results[name].append((rate, p99))
        ratio = statistics.median(o[0] / p[0] for o, p in zip(results["ours"], results["prosody"]))
        for name, label in (("ours", "invites_api (sqlite, durable)"), ("prosody", "Prosody + SQLite storage")):
            rates = [r for r, _ in results[name]]
            p99s = [p for _, p in results[name]]
            row(label, f"{statistics.median(rates):,.0f} req/s median (rounds: "
                       f"{', '.join(f'{r:,.0f}' for r in rates)}), p99 {statistics.median(p99s):.2f} ms",
                f"{tool} -t1 -c8 -d{DURATION:g}s")
        row("throughput ratio, invites_api / Prosody+SQLite", f"{ratio:.1f}x", "median of the per-round ratios")
        row("RSS after the rounds", f"invites_api {ours.rss_mb():.1f} MB, Prosody {prosody.rss_mb():.1f} MB", "VmRSS")
        ours.stop()

        # Real invites minted in that Prosody through our --backend prosody (its admin socket),
        # against the seed (mod_invites_api inside the same Prosody), alternating.
        backed = OurServer(directory, db=os.path.join(directory, "backed.db"),
                           extra=("--backend", "prosody", "--prosody-config", prosody.config))
        backed_rounds = []
        for _ in range(rounds):
            seed_rate, _, seed_p99, _, tool = load(prosody.url, 8, DURATION)
            rate, _, p99, errors, tool = load(backed.url, 8, DURATION)
            backed_rounds.append((rate, p99, seed_rate, seed_p99, errors))
        backed.stop()
        prosody.stop()
        backed_ratio = statistics.median(r / s for r, _, s, _, _ in backed_rounds)
        row("--backend prosody (admin socket) vs the seed, same Prosody + SQLite",
            f"{statistics.median(r for r, *_ in backed_rounds):,.0f} vs "
            f"{statistics.median(r[2] for r in backed_rounds):,.0f} req/s: **{backed_ratio:.2f}x**; p99 "
            f"{statistics.median(r[1] for r in backed_rounds):.2f} vs {statistics.median(r[3] for r in backed_rounds):.2f} ms"
            + (f"; {sum(r[4] for r in backed_rounds)} non-2xx" if any(r[4] for r in backed_rounds) else ""),
            f"{tool} -t1 -c8 -d{DURATION:g}s, {rounds} alternating rounds, median")

        # Prosody's default file storage: every invite rewrites the whole store.
        prosody = Prosody(directory, "file")
        count_requests(prosody.url, 1000)
        rate, p50, p99, errors, tool = load(prosody.url, 8, DURATION)
        prosody.stop()
        row("Prosody + file storage, after 1,000 stored invites", f"{rate:,.0f} req/s, p99 {p99:.1f} ms",
            f"{tool} -t1 -c8 -d{DURATION:g}s")
        compare_ejabberd(directory, rounds)

        # CLI: ours vs prosodyctl, in the same run.
        db = os.path.join(directory, "cli.db")
        env = dict(os.environ, INVITES_API_DB=db)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        module_env = dict(env, PYTHONPATH=compiled_copy(directory))
        home = os.path.join(directory, "prosody-sql")
        ours_ms, module_ms, theirs_ms = [], [], []
        for _ in range(3):  # alternating, 10 runs each time
            ours_ms.append(median_ms([python, SCRIPT, "create", "example.com"], runs=10, env=env))
            module_ms.append(median_ms([python, "-m", "invites_api", "create", "example.com"], runs=10,
                                       env=module_env))
            theirs_ms.append(median_ms(prosody.run_as + ["prosodyctl", "--config",
                                                         os.path.join(home, "prosody.cfg.lua"),
                                                         "mod_invites_api", "create", "example.com"], runs=10))
        ours_ms, module_ms, theirs_ms = (statistics.median(x) for x in (ours_ms, module_ms, theirs_ms))
        row("CLI create", f"invites_api.py {ours_ms:.1f} ms ({ours_ms / theirs_ms:.2f}x), "
                          f"python3 -m invites_api {module_ms:.1f} ms ({module_ms / theirs_ms:.2f}x); "
                          f"prosodyctl mod_invites_api {theirs_ms:.1f} ms",
            f"3 alternating rounds of 10 runs, median; {python}; -m runs from compiled bytecode")


def run_against(args):
    """Built-in creates/s of this invites_api.py and of another copy, alternating rounds."""
    rounds = args.rounds
    print(f"# this invites_api.py vs {args.file}: {os.cpu_count()} cores, {rounds} alternating rounds of "
          f"{DURATION:g} s at 8 connections, one invite per request (built-in store)\n")
    print("| measure | result | how |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as directory:
        # (Both set up alike, by their own command lines: only the code differs.)
        servers = {"this": OurServer(directory, db=os.path.join(directory, "this.db"), cli=True),
                   "that": OurServer(directory, db=os.path.join(directory, "that.db"), script=args.file)}
        results = {name: [] for name in servers}
        tool = "wrk"
        for number in range(rounds):
            order = list(servers.items()) if number % 2 == 0 else list(servers.items())[::-1]
            for name, server in order:
                rate, p50, p99, errors, tool = load(server.url, 8, DURATION)
                results[name].append((rate, p99, errors))
        for server in servers.values():
            server.stop()
    for name, label in (("this", "this invites_api.py"), ("that", args.file)):
        rates = [r for r, _, _ in results[name]]
        errors = sum(e for _, _, e in results[name])
        row(label, f"{statistics.median(rates):,.0f} creates/s median (rounds: "
                   f"{', '.join(f'{r:,.0f}' for r in rates)}), p99 "
                   f"{statistics.median(p for _, p, _ in results[name]):.2f} ms"
            + (f"; {errors} non-2xx" if errors else ""), f"{tool} -t1 -c8 -d{DURATION:g}s")
    ratio = statistics.median(a[0] / b[0] for a, b in zip(results["this"], results["that"]))
    row("ratio, this / that", f"**{ratio:.3f}x**", "median of the per-round ratios")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run")
    run.add_argument("--seed", type=int, default=1_000_000, help="stored invites for the growth measure")
    run.add_argument("--requests", type=int, default=100_000, help="requests before the RSS reading")
    run.add_argument("--pipelined", type=int, default=20_000, help="requests for the pipelining measure")
    sub.add_parser("compare")
    against = sub.add_parser("against")
    against.add_argument("file", help="another invites_api.py (e.g. an earlier revision's)")
    against.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    {"run": run_bench, "compare": run_compare, "against": run_against}[args.what](args)


if __name__ == "__main__":
    main()
