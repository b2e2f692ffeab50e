"""Tests for invites_api.py: `make test` (python3 -m unittest), standard library only.

Tests that need an outside program (Prosody, Chromium, zbarimg) skip where it
is missing, and fail instead when INVITES_API_REQUIRE_ALL=1 (as CI sets it).
"""

import ast
import base64
import atexit
import contextlib
import hashlib
import html
import http.client
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings
from concurrent.futures import ThreadPoolExecutor
from unittest import mock
from urllib.parse import quote

import invites_api as ia


# ---------------------------------------------------------------------------
# The harness: servers in a thread or a process, requests, waits, outside programs, XMPP clients
# ---------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "invites_api.py")
KEY_RE = re.compile(r"[A-Za-z0-9_-]{12}/[A-Za-z0-9_-]{32}\Z")


def run_main(*argv):
    """Run main(argv) in-process; return (exit code, stdout, stderr)."""
    import gc
    gc.collect()  # (an earlier command's unclosed Store warns now, not into this command's stderr)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = ia.main(list(argv))
        except SystemExit as e:  # argparse: --help, --version, usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def wait_for_line(stream, timeout=10):
    """Return the next line from a subprocess pipe, failing after timeout."""
    result = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise AssertionError("no line from the subprocess in time")
    return result[0]


def wait_until(condition, what, timeout=10, interval=0.02):
    """Return condition()'s first true value, polled until timeout; fail the test (what) if none."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not so within {timeout} s: {what}")
        time.sleep(interval)


def http_request(port, method, path, headers=None, body=None, conn=None, timeout=30):
    """Send one request to 127.0.0.1:port (on conn, if given, kept open); return (status, headers
    with lower-case names, body bytes)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        if own:
            conn.close()


class Requests:
    """request() and create() to self.port: a server in a thread, or a `serve` process."""

    port = key = None

    def request(self, method, path, headers=None, body=None, conn=None, timeout=30):
        """Send one request; return (status, headers dict with lower-case names, body bytes)."""
        return http_request(self.port, method, path, headers, body, conn, timeout)

    def create(self, key=None, extra="", headers=None):
        """Mint an invite with GET /invites_api?key=...; return what request() returns."""
        return self.request("GET", f"/invites_api?key={key or self.key}{extra}", headers=headers)

    def open_connections(self):
        """Return how many client connections the server has open, besides the one asking."""
        metrics = self.request("GET", "/metrics")[2].decode()
        return int(re.search(r"^invites_api_open_connections (\d+)", metrics, re.M).group(1)) - 1

    def mint(self, key=None, extra=""):
        """Mint an invite (201, else the test fails); return its token."""
        status, headers, body = self.create(key, extra)
        self.assertEqual(status, 201, body[:300])
        return headers["location"].rsplit("?", 1)[1]

    def post_form(self, form, path="/register", follow=False, timeout=30):
        """POST form (a dict) urlencoded, as a browser does; return (status, page text), after a
        303 (with follow) the page it leads to."""
        status, headers, page = self.request(
            "POST", path, {"Content-Type": "application/x-www-form-urlencoded"},
            "&".join(f"{k}={quote(v, safe='')}" for k, v in form.items()), timeout=timeout)
        if follow and status == 303:
            status, _, page = self.request("GET", headers["location"].split(str(self.port), 1)[1])
        return status, page.decode()


class TempDirTestCase(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.db = os.path.join(self.dir, "test.db")


class LiveServerTestCase(Requests, TempDirTestCase):
    """A real server on 127.0.0.1, port 0, in a thread, with a throwaway database."""

    backend = ia.BUILTIN  # who mints, and makes the accounts
    settings = {}  # serve's settings that differ from its defaults

    def setUp(self):
        super().setUp()
        self.store = ia.Store(self.db)
        self.log = io.StringIO()
        self.app = ia.App(self.store, self.backend, ia.Settings(log=self.log, **self.settings))
        for limiter in (self.app.auth_limiter, self.app.signup_limiter, self.app.check_limiter):
            limiter.clock = lambda: 30.0  # mid-minute for the whole test: no window ends during it
        self.addCleanup(self.store.close)
        self.addCleanup(self.store.stop_group_commit)
        self.server = ia.make_server(self.app, "127.0.0.1", 0)
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        self.addCleanup(self.stop_server, thread)
        self.port = self.server.server_address[1]
        self.key = ia.create_key(self.store, "example.com", "test key")
        self.key_id = self.key.split("/")[0]

    def stop_server(self, thread):
        self.server.shutdown()
        thread.join(5)
        self.server.server_close()

    def raw(self, data, read_timeout=5, shut=False):
        """Send raw bytes (shut: and nothing more); return everything the server answers before
        closing."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=read_timeout) as sock:
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def invite_count(self):
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return conn.execute("SELECT count(*) FROM invites").fetchone()[0]

    def token_of(self, location):
        return location.rsplit("?", 1)[1]


T0 = 1_800_000_000  # a fixed "now" for tests that move the clock


class PolicyTestCase(LiveServerTestCase):
    """A live server whose keys are made at T0 with a policy, and asked at a given time."""

    def policy_key(self, **policy):
        with mock.patch.object(ia, "now", return_value=T0):
            return ia.create_key(self.store, "example.com", "policy", **policy)

    def create_at(self, at, key, extra=""):
        with mock.patch.object(ia, "now", return_value=at):
            return self.create(key=key, extra=extra)


class CliTestCase(TempDirTestCase):
    """The command line run in-process on this test's database: (exit code, stdout, stderr)."""

    def cli(self, *argv):
        return run_main("--db", self.db, *argv)


# A server that makes accounts (the program does nothing): its pages lead to the sign-up form.
MAKES_ACCOUNTS = ia.Builtin(ia.Accounts(["true"]))


class ServerProcessMixin(Requests):
    """Runs the script's `serve` as a subprocess on a free port (self.port, for request())."""

    def start(self, *extra):
        env = dict(os.environ, INVITES_API_DB=self.db)
        proc = subprocess.Popen([sys.executable, SCRIPT, "serve", "--port", "0", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self.addCleanup(self.reap, proc)
        # (its start-up checks may run ejabberdctl VMs)
        line = self.banner = wait_for_line(proc.stdout, 60)
        match = re.search(r"https?://127\.0\.0\.1:(\d+)/invites_api", line)
        if match is None:
            proc.kill()
            self.fail(f"serve did not start: {line!r}, {proc.stderr.read()[-2000:]!r}")
        self.port = int(match.group(1))
        return proc, self.port

    def reap(self, proc):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    def make_key(self):
        code, out, err = run_main("--db", self.db, "create", "example.com")
        self.assertEqual(code, 0, err)
        return out.strip()


def write_program(directory, name, body):
    """Write an executable shell script and return its path."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


def require_program(name):
    """Return the path of an outside program, or skip (fail under INVITES_API_REQUIRE_ALL=1)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("INVITES_API_REQUIRE_ALL") == "1":
            raise AssertionError(message + " (INVITES_API_REQUIRE_ALL=1)")
        raise unittest.SkipTest(message)
    return path


def cmdline(pid):
    """Return a process's argv as /proc shows it (NUL-separated), or b"" if it is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
    return b""


class ArgvWatch:
    """Reads every process's /proc/PID/cmdline, over and over while a test runs, for secrets."""

    def __init__(self, *secrets):
        self.secrets, self.seen, self.samples = [x.encode() for x in secrets], [], 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self):
        while not self.stopped.wait(0.01):
            for name in os.listdir("/proc"):
                argv = cmdline(name)
                self.seen += [argv.replace(b"\0", b" ") for x in self.secrets if x in argv]
            self.samples += 1

    def close(self):
        self.stopped.set()
        self.thread.join()


# The ports of the servers the tests start (Prosody, ejabberd, nginx) come from below the ephemeral
# range (32768 and up), so that no outbound connection of the tests running beside them takes one
# while the server starts, and each goes to one test of the run (a file per port in a directory
# the test processes share), so that no two servers are given the same one.
if "INVITES_API_TEST_PORTS" not in os.environ:
    os.environ["INVITES_API_TEST_PORTS"] = tempfile.mkdtemp(prefix="invites-api-ports-")
    _ports_owner = os.getpid()
    atexit.register(lambda: os.getpid() == _ports_owner
                    and shutil.rmtree(os.environ["INVITES_API_TEST_PORTS"], ignore_errors=True))


def free_port():
    """Return a loopback port that is free now and that no other test of this run was given."""
    while True:
        port = random.randrange(20000, 32768)
        try:
            os.close(os.open(os.path.join(os.environ["INVITES_API_TEST_PORTS"], str(port)),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # (something else on the machine has it)
                continue
        return port


def listening_pids(port):
    """Return the pids holding a listening TCP socket on port (any address), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    return holders(inodes)


def holders(inodes):
    """Return the pids with an open descriptor on one of these sockets ("socket:[INODE]")."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd
                   in os.listdir(f"/proc/{pid}/fd")):
                pids.add(int(pid))
    return sorted(pids)


def listening_unix_pids(path):
    """Return the pids holding a listening Unix socket bound to path, from /proc."""
    with open("/proc/net/unix") as f:
        inodes = {f"socket:[{fields[6]}]" for fields in map(str.split, list(f)[1:])
                  if len(fields) > 7 and fields[7] == path and fields[3] == "00010000"}
    return holders(inodes)


def thread_states(pid):
    """Return the states of a process's threads ("S", "R", "T", ...) as one string, from /proc."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.append(f.read().rpartition(")")[2].split()[0])
    return "".join(sorted(states))


def stop_process(test, pid):
    """SIGSTOP pid and return once every one of its threads is stopped (kill() returns before they
    are: one thread takes the signal and then stops the others, which may run meanwhile); SIGCONT
    it when the test ends."""
    os.kill(pid, signal.SIGSTOP)
    test.addCleanup(os.kill, pid, signal.SIGCONT)
    wait_until(lambda: set(thread_states(pid)) == {"T"}, f"every thread of {pid} stopped")


class Xmpp:
    """A small stdlib XMPP client for the tests: a c2s stream, IQs, SASL SCRAM-SHA-1."""

    def __init__(self, port, host):
        self.host = host
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.open()

    def open(self):
        from xml.etree.ElementTree import XMLPullParser
        self.parser, self.depth, self.root = XMLPullParser(("start", "end")), 0, None
        self.sock.sendall(f"<?xml version='1.0'?><stream:stream to='{self.host}' "
                          "xmlns='jabber:client' "
                          "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>".encode())
        self.features = self.next()

    def next(self):
        """Return the stream's next element (a stanza, features, SASL answer)."""
        while True:
            for event, element in self.parser.read_events():
                self.depth += 1 if event == "start" else -1
                if event == "start" and self.root is None:
                    self.root = element
                elif event == "end" and self.depth == 1:
                    self.root.remove(element)
                    return element
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the stream")
            self.parser.feed(data)

    def iq(self, payload):
        """Send an IQ set; return (type, the answer)."""
        self.sock.sendall(f"<iq type='set' id='q1'>{payload}</iq>".encode())
        answer = self.next()
        return answer.get("type"), answer

    def register(self, token, username, password):
        """XEP-0401 preauth with the invite token, then XEP-0077 registration; return the IQ types.
        """
        from xml.sax.saxutils import escape
        preauth = self.iq(f"<preauth xmlns='urn:xmpp:pars:0' token='{escape(token)}'/>")[0]
        register = self.iq("<query "
                           f"xmlns='jabber:iq:register'><username>{escape(username)}</username>"
                           f"<password>{escape(password)}</password></query>")
        return preauth, register[0]

    def login(self, username, password):
        """SASL SCRAM-SHA-1; return True if the server accepted (and proved it knows the password).
        """
        import base64
        import hashlib
        import hmac
        nonce = base64.b64encode(os.urandom(18)).decode()
        first = f"n={username},r={nonce}"
        self.sock.sendall(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>"
                          f"{base64.b64encode(('n,,' + first).encode()).decode()}</auth>".encode())
        challenge = self.next()
        if not challenge.tag.endswith("challenge"):
            return False
        server_first = base64.b64decode(challenge.text).decode()
        fields = dict(item.split("=", 1) for item in server_first.split(","))
        salted = hashlib.pbkdf2_hmac("sha1", password.encode(), base64.b64decode(fields["s"]),
                                     int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", "sha1").digest()
        final = f"c=biws,r={fields['r']}"
        message = f"{first},{server_first},{final}".encode()
        signature = hmac.new(hashlib.sha1(client_key).digest(), message, "sha1").digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
        response = base64.b64encode(f"{final},p={proof}".encode()).decode()
        sasl = "urn:ietf:params:xml:ns:xmpp-sasl"
        self.sock.sendall(f"<response xmlns='{sasl}'>{response}</response>".encode())
        answer = self.next()
        if not answer.tag.endswith("success"):
            return False
        server_key = hmac.new(salted, b"Server Key", "sha1").digest()
        expected = base64.b64encode(hmac.new(server_key, message, "sha1").digest()).decode()
        return base64.b64decode(answer.text).decode() == f"v={expected}"

    def close(self):
        try:
            self.sock.sendall(b"</stream:stream>")
        except OSError:
            pass
        self.sock.close()


def logs_in(port, host, user, password):
    """Return whether a real XMPP client (c2s on port) logs in as user@host with this password."""
    client = Xmpp(port, host)
    try:
        return client.login(user, password)
    finally:
        client.close()


class XmppClient:
    """A real XMPP client (slixmpp) logged in over plain c2s on 127.0.0.1, in a thread of its own:
    its roster ({contact JID: subscription}) and the roster pushes it got while online."""

    def __init__(self, test, port, jid, password, plain=False):
        # plain: SASL PLAIN (ejabberd 26 refuses SCRAM without TLS: "Invalid channel binding")
        try:
            import slixmpp
        except ImportError:
            if os.environ.get("INVITES_API_REQUIRE_ALL") == "1":
                raise AssertionError(
                    "slixmpp is not installed (INVITES_API_REQUIRE_ALL=1)") from None
            raise unittest.SkipTest("slixmpp is not installed (pip install slixmpp)") from None
        import asyncio
        self.jid, self.pushes, self.failure = jid, [], None
        self.loop = asyncio.new_event_loop()
        mechanisms = ({"unencrypted_plain": True, "use_mech": "PLAIN"} if plain
                      else {"unencrypted_scram": True})
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.client = slixmpp.ClientXMPP(jid, password,
                                             plugin_config={"feature_mechanisms": mechanisms})
            self.client.enable_starttls = self.client.enable_direct_tls = False
            self.client.enable_plaintext = True

            async def started(_):
                try:
                    await self.client.get_roster()
                except slixmpp.exceptions.IqError as e:
                    return failed(f"the roster was refused: {e.iq['error']['condition']}")
                self.client.send_presence()
                ready.set()

            def failed(why):
                self.failure = why
                ready.set()
            self.client.add_event_handler("session_start", started)
            self.client.add_event_handler("failed_all_auth",
                                          lambda _: failed("authentication failed"))
            self.client.add_event_handler("roster_update", lambda iq: self.pushes.append(
                {str(jid): item["subscription"] for jid, item in iq["roster"]["items"].items()}))
            self.client.connect("127.0.0.1", port)
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        test.addCleanup(self.close)
        if not ready.wait(30) or self.failure:
            raise AssertionError(f"{jid} could not log in: "
                                 f"{self.failure or 'no session within 30 s'}")

    def roster(self):
        """Return the roster as {contact JID: subscription} (the account itself left out)."""
        def read():
            roster = self.client.client_roster
            return {str(j): roster[j]["subscription"] for j in roster if str(j) != self.jid}
        return asyncio_call(self.loop, read)

    def close(self):
        import asyncio
        if self.thread.is_alive():
            async def bye():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.client.disconnect(), 5)
                self.loop.stop()
            asyncio.run_coroutine_threadsafe(bye(), self.loop)
        self.thread.join(10)


def asyncio_call(loop, fn):
    """Return fn() run in loop's thread."""
    import concurrent.futures
    future = concurrent.futures.Future()
    loop.call_soon_threadsafe(lambda: future.set_result(fn()))
    return future.result(10)


def roster_of(test, port, jid, password, plain=False):
    """Log in as jid with a real XMPP client; return its roster ({contact: subscription})."""
    client = XmppClient(test, port, jid, password, plain)
    try:
        return client.roster()
    finally:
        client.close()


# ---------------------------------------------------------------------------
# Keys: how a request's key is checked, and the commands that make, list and delete keys
# ---------------------------------------------------------------------------

class KeysTest(LiveServerTestCase):
    """A request's key: where it may be given, what a wrong or spent one gets, never logged."""

    def test_url_encoded_key_is_accepted(self):
        status, _, _ = self.create(key=quote(self.key, safe=""))
        self.assertIn("%2F", quote(self.key, safe=""))
        self.assertEqual(status, 201)

    def test_bearer_header_creates_invites_with_get_and_post(self):
        for method in ("GET", "POST"):
            status, headers, _ = self.request(method, "/invites_api",
                                              {"Authorization": f"Bearer {self.key}"})
            self.assertEqual(status, 201, method)
            self.assertIn("/invite?", headers["location"])
        self.assertEqual(self.invite_count(), 2)

    def test_bearer_scheme_is_case_insensitive_and_may_be_url_encoded(self):
        status, _, _ = self.request("GET", "/invites_api",
                                    {"Authorization": f"bearer {quote(self.key, safe='')}"})
        self.assertEqual(status, 201)

    def test_header_wins_over_query_key(self):
        status, _, _ = self.create(key="nosuchkeyxxx/secret",
                                   headers={"Authorization": f"Bearer {self.key}"})
        self.assertEqual(status, 201)
        status, _, _ = self.create(headers={"Authorization": "Bearer nosuchkeyxxx/secret"})
        self.assertEqual(status, 403)

    def test_no_credentials_gives_401_with_www_authenticate(self):
        for path in ("/invites_api", "/invites_api?key=", "/invites_api?redirect=true"):
            status, headers, _ = self.request("GET", path)
            self.assertEqual(status, 401, path)
            self.assertEqual(headers["www-authenticate"], 'Bearer realm="invites_api"')
        status, headers, _ = self.request("POST", "/invites_api")
        self.assertEqual(status, 401)

    def test_bad_credentials_give_403(self):
        key_id, secret = self.key.split("/")
        other = ia.create_key(self.store, "example.com")
        ia.delete_key(self.store, "example.com", other.split("/")[0])
        cases = {
            "wrong secret": f"{key_id}/{'A' * 32}",
            "unknown id": f"AAAAAAAAAAAA/{secret}",
            "deleted key": other,
            "no slash": key_id + secret,
            "short id": f"abc/{secret}",
            "empty secret": f"{key_id}/",
        }
        for case, key in cases.items():
            status, headers, _ = self.create(key=quote(key, safe="/"))
            self.assertEqual(status, 403, case)
            self.assertNotIn("www-authenticate", headers)
        for header in ("Basic dXNlcjpwYXNz", "Bearer", "Token " + self.key):
            status, _, _ = self.request("GET", "/invites_api", {"Authorization": header})
            self.assertEqual(status, 403, header)
        self.assertEqual(self.invite_count(), 0)

    def test_deleted_key_is_refused_on_the_next_request(self):
        self.assertEqual(self.create()[0], 201)
        code, _, _ = run_main("--db", self.db, "delete", "example.com", self.key_id)
        self.assertEqual(code, 0)
        self.assertEqual(self.create()[0], 403)

    def test_access_log_has_one_line_per_request_and_never_the_secret(self):
        secret = self.key.split("/")[1]
        self.create()
        self.create(key=quote(self.key, safe=""))
        self.request("GET", f"/invites_api?%6Bey={self.key}")  # an encoded parameter name
        self.request("POST", "/invites_api", {"Authorization": f"Bearer {self.key}"})
        self.raw(f"GET /invites_api?key={self.key} HTTP/1.1 junk\r\n\r\n".encode())
        self.raw(f"GET /invites_api?key={self.key}\r\n\r\n".encode())
        log = self.log.getvalue()
        self.assertNotIn(secret, log)
        lines = log.strip().splitlines()
        self.assertEqual(len(lines), 6, log)
        self.assertRegex(lines[0],
                         r"^\S+Z 127\.0\.0\.1 GET /invites_api\?key=\[redacted\] 201 \d+\.\dms$")

    def test_a_key_is_redacted_from_the_log_under_any_name(self):
        secret = self.key.split("/")[1]
        for query in (f"api_key={self.key}", f"+key={self.key}", f"key%20={self.key}",
                      f"k%00ey={self.key}",
                      f"x={quote(self.key, safe='')}", f"key={self.key}&note=hi"):
            self.request("GET", f"/invites_api?{query}")
        self.request("GET", f"/invites_api/{self.key}")
        self.request("GET", f"/invites_api/invites/{self.key}")
        log = self.log.getvalue()
        self.assertEqual(log.count("\n"), 8, log)
        self.assertNotIn(secret, log)
        self.assertNotIn(secret[:16], log)
        self.assertIn("note=hi", log)

    def test_unknown_key_ids_and_wrong_secrets_do_the_same_work(self):
        statements = []
        conn = self.store.write(lambda conn: conn)
        conn.set_trace_callback(statements.append)
        self.addCleanup(conn.set_trace_callback, None)
        runs = []
        for presented in (self.key_id + "/" + "x" * 32, "A" * 12 + "/" + "x" * 32):
            del statements[:]
            self.assertEqual(self.create(key=presented)[0], 403)
            runs.append([re.sub(r"'[^']*'", "?", s) for s in statements])
        self.assertEqual(runs[0], runs[1])
        self.assertTrue(any("coalesce" in s for s in runs[0]), runs[0])

    def test_one_broken_client_does_not_lock_its_neighbours_keys_out(self):
        # An old, deleted key in a script behind the same address: its id is locked out after 20 a
        # minute...
        statuses = [self.create(key=f"AAAAAAAAAAAA/{i:032d}")[0] for i in range(25)]
        self.assertEqual(statuses, [403] * 20 + [429] * 5)
        status, headers, _ = self.create(key="AAAAAAAAAAAA/" + "x" * 32)
        self.assertEqual(status, 429)
        self.assertLessEqual(int(headers["retry-after"]), 60)
        # ... while the other keys of that address go on working, and so does a guess of another id.
        self.assertEqual(self.create()[0], 201)
        self.assertEqual(self.create(key=f"{self.key_id}/" + "x" * 32)[0], 403)
        # Malformed keys count per address, apart from the ids.
        statuses = [self.create(key=f"malformed{i}")[0] for i in range(21)]
        self.assertEqual(statuses, [403] * 20 + [429])
        self.assertEqual(self.create()[0], 201)
        self.assertEqual(self.log.getvalue().count("failed authentications allowed this minute"), 1)

    def test_spraying_key_ids_meets_a_ceiling_ten_times_higher(self):
        ceiling = ia.AUTH_FAILURES_PER_ADDRESS * ia.AUTH_FAILURES_PER_MINUTE
        statuses = [self.create(key=f"B{i:011d}/" + "x" * 32)[0] for i in range(ceiling + 1)]
        self.assertEqual(statuses, [403] * ceiling + [429])
        # a fresh id: the ceiling holds
        self.assertEqual(self.create(key=f"C{0:011d}/" + "x" * 32)[0], 429)
        status, _, _ = self.create()  # every key, from this address, until the minute ends
        self.assertEqual(status, 429)
        self.assertEqual(self.invite_count(), 0)


class KeyCommandsTest(CliTestCase):
    """create, list and delete: a key printed once, kept as a hash, its id unique."""

    def test_create_prints_exactly_one_key_line_and_stores_only_a_hash(self):
        code, out, err = self.cli("create", "example.com", "My test key")
        self.assertEqual((code, err), (0, f"a key for example.com, in database {self.db}\n"))
        self.assertRegex(out, r"^[A-Za-z0-9_-]{12}/[A-Za-z0-9_-]{32}\n$")
        key_id, secret = out.strip().split("/")
        with open(self.db, "rb") as f:
            raw = f.read()
        for suffix in ("-wal",):
            if os.path.exists(self.db + suffix):
                with open(self.db + suffix, "rb") as f:
                    raw += f.read()
        self.assertIn(key_id.encode(), raw)
        self.assertNotIn(secret.encode(), raw)
        row = ia.Store(self.db).key(key_id)
        self.assertEqual(row["secret_hash"], ia.hash_secret(secret))

    def test_random_ids_never_start_with_a_dash(self):
        self.assertFalse(any(ia._random_id(9).startswith("-") for _ in range(2000)))

    def test_key_ids_are_unique_across_hosts(self):
        first = self.cli("create", "a.example")[1].strip()
        taken, fresh = first.split("/")[0], ia._random_id(ia.KEY_ID_BYTES)
        # The random source gives b.example the id a.example's key has: it gets another one.
        real = ia._random_id
        ids = iter([taken, real(ia.SECRET_BYTES), fresh])
        with mock.patch.object(ia, "_random_id", side_effect=lambda n: next(ids)):
            second = ia.create_key(ia.Store(self.db), "b.example")
        self.assertEqual(second.split("/")[0], fresh)
        self.assertEqual([k["id"] for k in json.loads(self.cli("list", "a.example", "--json")[1])],
                         [taken])
        self.assertEqual([k["id"] for k in json.loads(self.cli("list", "b.example", "--json")[1])],
                         [fresh])
        # An id names one key of one host: b.example's commands cannot reach a.example's key.
        self.assertEqual(self.cli("delete", "b.example", taken)[0], 1)
        self.assertEqual(self.cli("update", "b.example", taken, "--name", "mine")[0], 1)
        self.assertEqual(ia.authenticate(ia.Store(self.db), first)["host"], "a.example")

    def test_list_prints_id_tab_name_per_key_and_never_the_secret(self):
        k1 = self.cli("create", "example.com", "My test key")[1].strip()
        k2 = self.cli("create", "example.com")[1].strip()
        self.cli("create", "other.example", "not listed")
        code, out, err = self.cli("list", "example.com")
        self.assertEqual(code, 0)
        self.assertEqual(out, f"{k1.split('/')[0]}\tMy test key\n{k2.split('/')[0]}\t\n")
        self.assertNotIn(k1.split("/")[1], out)

    def test_list_json_gives_the_documented_fields(self):
        key = self.cli("create", "example.com", "json key")[1].strip()
        store = ia.Store(self.db)
        ia.create_invite(store, key)
        code, out, _ = self.cli("list", "example.com", "--json")
        data = json.loads(out)
        self.assertEqual(len(data), 1)
        self.assertLessEqual({"id", "name", "host", "created_at", "last_used_at",
                              "invites_created"}, set(data[0]))
        self.assertEqual(data[0]["id"], key.split("/")[0])
        self.assertEqual(data[0]["invites_created"], 1)
        self.assertRegex(data[0]["last_used_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertNotIn(key.split("/")[1], out)

    def test_list_of_a_host_without_keys_prints_nothing_and_says_so_on_stderr(self):
        self.assertEqual(self.cli("list", "example.com"),
                         (0, "", f"example.com: no keys in database {self.db}\n"))
        self.assertEqual(json.loads(self.cli("list", "example.com", "--json")[1]), [])

    def test_delete_revokes_and_unknown_ids_are_an_error(self):
        key_id = self.cli("create", "example.com")[1].split("/")[0]
        self.assertEqual(self.cli("delete", "other.example", key_id),
                         (1, "", f"error: key {key_id!r} not found for host 'other.example'\n"))
        self.assertEqual(self.cli("delete", "example.com", key_id), (0, "", ""))
        self.assertEqual(self.cli("list", "example.com")[1], "")
        self.assertEqual(self.cli("delete", "example.com", "X"),
                         (1, "", "error: key 'X' not found for host 'example.com'\n"))

    def test_hosts_are_validated_and_lower_cased(self):
        for bad in ("exa mple.com", "example.com/x", "", "-bad.example", "a" * 254, "a..b",
                    "a_b.example", ("a" * 63 + ".") * 4 + "com"):
            code, out, err = self.cli("create", bad)
            self.assertEqual(code, 2, bad)
            self.assertEqual(out, "")
            self.assertIn("required: HOST" if bad.startswith("-") else "invalid host", err)
        code, out, _ = self.cli("create", "Example.COM.")
        self.assertEqual(code, 0)
        self.assertEqual(self.cli("list", "example.com")[1].count("\n"), 1)
        self.assertEqual(self.cli("create", "Bücher.example")[0], 0)
        self.assertEqual(self.cli("list", "xn--bcher-kva.example")[1].count("\n"), 1)

    def test_key_names_with_control_characters_are_refused(self):
        for bad in ("tab\there", "new\nline", "x" * 101):
            code, _, err = self.cli("create", "example.com", bad)
            self.assertEqual(code, 2, bad)
            self.assertIn("key name", err)

    def test_key_commands_do_not_import_the_http_machinery(self):
        code = ("import sys\nbefore = set(sys.modules)\nimport invites_api as ia\n"
                f"ia.main(['--db', {self.db!r}, 'create', 'example.com'])\n"
                f"ia.main(['--db', {self.db!r}, 'list', 'example.com'])\n"
                f"ia.main(['--db', {self.db!r}, 'update', 'example.com', 'k' * 12, '--name', "
                "'x'])\n"
                f"ia.main(['--db', {self.db!r}, 'delete', 'example.com', 'k' * 12])\n"
                "heavy = [m for m in ('http.server', 'socketserver', 'ssl', 'html', 'email', "
                "'json',\n"
                "                     'shutil', 'encodings.idna') if m in set(sys.modules) - "
                "before]\n"
                "print(heavy, file=sys.stderr)")
        result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True,
                                text=True, timeout=30)
        self.assertEqual(result.stderr.strip().splitlines()[-1], "[]", result.stderr)


# ---------------------------------------------------------------------------
# Minting: an invite made over HTTP or by the CLI, and what is done with it after
# ---------------------------------------------------------------------------

class MintingTest(LiveServerTestCase):
    """An invite minted over HTTP: stored, answered as asked (201, 303 or JSON), never logged."""

    def test_query_key_creates_invite_with_201_location_and_empty_body(self):
        status, headers, body = self.create()
        self.assertEqual(status, 201)
        self.assertEqual(body, b"")
        self.assertEqual(headers["content-length"], "0")
        self.assertRegex(headers["location"],
                         rf"^http://127\.0\.0\.1:{self.port}/invite\?[A-Za-z0-9_-]{{24}}$")
        self.assertEqual(self.invite_count(), 1)

    def test_created_invite_is_stored_with_host_uri_expiry_and_key(self):
        with mock.patch.object(ia, "now", return_value=1_700_000_000):
            status, headers, _ = self.create()
        token = self.token_of(headers["location"])
        invite = ia.invite_by_token(self.store, token)
        self.assertEqual(invite["host"], "example.com")
        self.assertEqual(invite["type"], "register")
        self.assertEqual(invite["uri"], f"xmpp:example.com?register;preauth={token}")
        self.assertEqual(invite["key_id"], self.key_id)
        self.assertEqual(invite["created_at"], 1_700_000_000)
        self.assertEqual(invite["expires_at"], 1_700_000_000 + 7 * 86400)
        self.assertEqual(invite["uses_left"], 1)
        key = self.store.key(self.key_id)
        self.assertEqual((key["invites_created"], key["last_used_at"]), (1, 1_700_000_000))

    def test_redirect_true_answers_303_with_the_same_location(self):
        for value in ("true", "1", "yes", "TRUE"):
            status, headers, _ = self.create(extra=f"&redirect={value}")
            self.assertEqual(status, 303, value)
            self.assertIn("/invite?", headers["location"])

    def test_redirect_false_or_absent_answers_201(self):
        for extra in ("&redirect=false", "&redirect=0", "&redirect=no", ""):
            status, headers, _ = self.create(extra=extra)
            self.assertEqual(status, 201, extra)
            self.assertIn("location", headers)

    def test_redirect_with_a_bad_value_is_400_and_creates_nothing(self):
        status, _, body = self.create(extra="&redirect=maybe")
        self.assertEqual(status, 400)
        self.assertIn(b"redirect", body)
        self.assertEqual(self.invite_count(), 0)

    def test_accept_json_gives_the_invite_as_json_and_location(self):
        status, headers, body = self.create(headers={"Accept": "application/json"})
        self.assertEqual(status, 201)
        self.assertTrue(headers["content-type"].startswith("application/json"))
        data = json.loads(body)
        self.assertLessEqual({"url", "uri", "token", "host", "created_at", "expires_at"}, set(data))
        self.assertEqual(data["url"], headers["location"])
        self.assertEqual(data["uri"], f"xmpp:example.com?register;preauth={data['token']}")
        self.assertEqual(data["host"], "example.com")
        self.assertRegex(data["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertRegex(data["expires_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    def test_200_parallel_creates_give_200_distinct_stored_invites(self):
        def create(_):
            status, headers, _ = self.create()
            return status, self.token_of(headers["location"])
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(create, range(200)))
        self.assertEqual([s for s, _ in results], [201] * 200)
        tokens = {t for _, t in results}
        self.assertEqual(len(tokens), 200)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            stored = {row[0] for row in conn.execute("SELECT id FROM invites")}
        self.assertEqual(stored, {ia.invite_id(t) for t in tokens})
        self.assertEqual(self.store.key(self.key_id)["invites_created"], 200)

    def test_access_log_never_shows_invite_tokens(self):
        _, headers, _ = self.create()
        token = self.token_of(headers["location"])
        self.request("GET", f"/invite?{token}")
        self.request("GET", f"/invite/{token}")
        self.assertNotIn(token, self.log.getvalue())


class InviteApiTest(PolicyTestCase):
    """An invite once minted: used up, redeemed, listed, shown, revoked, checked by anyone."""

    settings = {"checks_per_minute": 5}

    def test_a_multi_use_invite_stays_valid_until_used_up(self):
        key = self.policy_key(max_uses=3)
        token = self.token_of(self.create(key=key, extra="&uses=3")[1]["location"])
        auth = {"Authorization": f"Bearer {key}"}
        for left in (2, 1, 0):
            self.assertEqual(self.request("GET", f"/invite?{token}")[0], 200)
            status, _, body = self.request("POST", f"/invites_api/invites/{token}/redeem", auth)
            self.assertEqual((status, json.loads(body)["uses_left"]), (200, left))
        status, _, body = self.request("POST", f"/invites_api/invites/{token}/redeem", auth)
        self.assertEqual((status, body), (410, b"this invite is used\n"))
        self.assertEqual(self.request("GET", f"/invite?{token}")[0], 410)

    def test_50_parallel_redeems_of_a_single_use_invite_give_exactly_one_success(self):
        token = self.token_of(self.create()[1]["location"])

        def redeem(_):
            return self.request("POST", f"/invites_api/invites/{token}/redeem",
                                {"Authorization": f"Bearer {self.key}"})[0]
        with ThreadPoolExecutor(50) as pool:
            statuses = sorted(pool.map(redeem, range(50)))
        self.assertEqual(statuses, [200] + [410] * 49)
        self.assertEqual(ia.invite_by_token(self.store, token)["uses_left"], 0)

    def test_redeem_checks_a_bound_username(self):
        key = self.policy_key()
        token = self.token_of(self.create(key=key, extra="&username=alice")[1]["location"])
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        status, _, _ = self.request("POST", f"/invites_api/invites/{token}/redeem", auth,
                                    b'{"username": "mallory"}')
        self.assertEqual(status, 409)
        status, _, body = self.request("POST", f"/invites_api/invites/{token}/redeem", auth,
                                       b'{"username": "Alice"}')
        self.assertEqual((status, json.loads(body)["username"]), (200, "alice"))

    def test_listing_showing_and_revoking_are_scoped_to_the_key(self):
        mine, other = self.key, self.policy_key()
        t1 = self.token_of(self.create(key=mine)[1]["location"])
        t2 = self.token_of(self.create(key=mine, extra="&note=used")[1]["location"])
        t3 = self.token_of(self.create(key=other)[1]["location"])
        self.request("POST", f"/invites_api/invites/{t2}/redeem",
                     {"Authorization": f"Bearer {mine}"})
        auth = {"Authorization": f"Bearer {mine}"}
        id1, id2, id3 = (ia.invite_id(t) for t in (t1, t2, t3))
        status, _, body = self.request("GET", "/invites_api/invites", auth)
        self.assertEqual((status,
                          [(i["id"], i["token"], i["uri"], i["url"]) for i in json.loads(body)]),
                         (200, [(id1, None, None, None)]))  # (its token is not kept)
        status, _, body = self.request("GET", "/invites_api/invites?all=true", auth)
        listed = {i["id"]: i["status"] for i in json.loads(body)}
        self.assertEqual(listed, {id1: "valid", id2: "used"})
        for reference in (t1, id1):  # its whole token or its id
            status, _, body = self.request("GET", f"/invites_api/invites/{reference}", auth)
            self.assertEqual((status, json.loads(body)["key_id"], json.loads(body)["id"]),
                             (200, self.key_id, id1))
        self.assertEqual(json.loads(self.request("GET", f"/invites_api/invites/{t1}",
                                                 auth)[2])["token"], t1)
        self.assertIsNone(json.loads(self.request("GET", f"/invites_api/invites/{id1}",
                                                  auth)[2])["token"])
        for reference in (t3, id3):
            self.assertEqual(self.request("GET", f"/invites_api/invites/{reference}", auth)[0], 404)
            self.assertEqual(self.request("DELETE", f"/invites_api/invites/{reference}", auth)[0],
                             404)
        # An id opens nothing for the invitee: no page, no check, no sign-up, no redeeming.
        self.assertEqual(self.request("GET", f"/invite?{id1}")[0], 404)
        self.assertEqual(self.request("GET", f"/invite/{id1}")[0], 404)
        self.assertFalse(json.loads(self.request("GET", f"/invite/{id1}.json")[2])["valid"])
        self.assertEqual(self.request("POST", f"/invites_api/invites/{id1}/redeem", auth)[0], 404)
        self.assertEqual(ia.invite_by_token(self.store, t3)["revoked_at"], None)
        status, _, body = self.request("DELETE", f"/invites_api/invites/{id1}", auth)
        self.assertEqual((status, body), (204, b""))
        self.assertEqual(self.request("GET", f"/invite?{t1}")[0], 410)
        self.assertEqual(json.loads(self.request("GET", f"/invites_api/invites/{t1}",
                                                 auth)[2])["status"], "revoked")
        self.assertEqual(self.request("GET", "/invites_api/invites")[0], 401)
        status, headers, _ = self.request("OPTIONS", f"/invites_api/invites/{t1}")
        self.assertEqual((status, headers["access-control-allow-methods"]),
                         (204, "GET, DELETE, OPTIONS"))

    def test_public_validity_check_reveals_nothing_secret_and_is_limited_per_address(self):
        key = self.policy_key()
        created = self.create(key=key, extra="&username=carol&note=secret%20note")
        token = self.token_of(created[1]["location"])
        status, headers, body = self.request("GET", f"/invite/{token}.json")
        data = json.loads(body)
        self.assertEqual(status, 200)
        self.assertEqual(set(data), {"valid", "type", "host", "expires_at", "username"})
        self.assertEqual((data["valid"], data["host"], data["username"]),
                         (True, "example.com", "carol"))
        self.assertNotIn(key.split("/")[0].encode(), body)
        self.assertNotIn(b"secret note", body)
        status, _, body = self.request("GET", f"/invite/{'A' * 24}.json")
        self.assertEqual(json.loads(body),
                         {"valid": False, "type": None, "host": None, "expires_at": None,
                          "username": None})
        statuses = [self.request("GET", f"/invite/{token}.json")[0] for _ in range(4)]
        self.assertEqual(statuses, [200, 200, 200, 429])


class InviteCommandsTest(CliTestCase):
    """invites create, list, show, revoke and redeem, and what a deleted key leaves."""

    def test_invites_create_list_show_revoke_redeem(self):
        code, url, err = self.cli("invites", "create", "example.com", "--uses", "2", "--note",
                                  "choir", "--public-url", "https://{host}")
        self.assertEqual(code, 0, err)
        self.assertRegex(url, r"^https://example\.com/invite\?[A-Za-z0-9_-]{24}\n$")
        token = url.strip().rsplit("?", 1)[1]
        code, out, _ = self.cli("invites", "list", "example.com")
        self.assertEqual(out.splitlines()[0].split(),
                         ["ID", "EXPIRES", "USES", "STATUS", "KEY", "NOTE"])
        # A list shows the invite's public id, never its token (the database has only its hash).
        invite_id = out.splitlines()[1].split()[0]
        self.assertEqual(invite_id, ia.invite_id(token))
        self.assertNotIn(token, out)
        self.assertIn("2/2", out)
        self.assertIn("choir", out)
        # Shown by its whole token, its URL is rebuilt; by its id, there is no token to build it
        # from.
        code, out, _ = self.cli("invites", "show", "example.com", token, "--json")
        self.assertEqual(json.loads(out)["url"],
                         url.strip().replace("https://example.com", "http://127.0.0.1:5282"))
        code, out, _ = self.cli("invites", "show", "example.com", invite_id, "--json")
        self.assertEqual((json.loads(out)["id"], json.loads(out)["token"], json.loads(out)["uri"],
                          json.loads(out)["url"], json.loads(out)["note"]),
                         (invite_id, None, None, None, "choir"))
        code, out, _ = self.cli("invites", "show", "example.com", invite_id)
        self.assertIn(f"id: {invite_id}\ntoken: \n", out)
        self.assertNotIn(token, out)
        # Redeeming is the invitee's act: by the whole token only (an id is listed for anyone to
        # see).
        self.assertEqual(self.cli("invites", "redeem", "example.com", invite_id)[:2], (1, ""))
        self.assertEqual(self.cli("invites", "redeem", "example.com", token), (0, "", ""))
        code, out, _ = self.cli("invites", "redeem", "example.com", token, "--json")
        self.assertEqual(json.loads(out)["uses_left"], 0)
        self.assertEqual(self.cli("invites", "redeem", "example.com", token),
                         (1, "", "error: this invite is used\n"))
        # only the header
        self.assertEqual(self.cli("invites", "list", "example.com")[1].count("\n"), 1)
        self.assertEqual(self.cli("invites", "list", "example.com", "--all")[1].count("\n"), 2)
        token2 = self.cli("invites", "create", "example.com")[1].strip().rsplit("?", 1)[1]
        self.assertEqual(self.cli("invites", "revoke", "example.com", ia.invite_id(token2)),
                         (0, "", ""))
        self.assertEqual(self.cli("invites", "redeem", "example.com", token2)[2],
                         "error: this invite is revoked\n")
        self.assertEqual(self.cli("invites", "revoke", "other.example", token2)[0], 1)
        self.assertEqual(self.cli("invites", "show", "example.com", "nosuchtoken")[0], 1)
        self.assertEqual(self.cli("invites", "create", "example.com", "--uses", "zero")[0], 1)

    def test_delete_keeps_the_keys_invites_unless_asked_to_revoke_them(self):
        store = ia.Store(self.db)
        keep, drop = (ia.create_key(store, "example.com", name) for name in ("keep", "drop"))
        kept = ia.create_invite(store, keep)["token"]
        dropped = ia.create_invite(store, drop)["token"]
        self.assertEqual(self.cli("delete", "example.com", keep.split("/")[0])[0], 0)
        self.assertEqual(self.cli("delete", "example.com", drop.split("/")[0],
                                  "--revoke-invites")[0], 0)
        self.assertEqual(ia.invite_status(ia.invite_by_token(store, kept)), "valid")
        self.assertEqual(ia.invite_status(ia.invite_by_token(store, dropped)), "revoked")

    def test_tokens_made_in_one_second_share_a_prefix_and_differ_in_112_random_bits(self):
        with mock.patch.object(ia, "now", return_value=T0):
            tokens = {ia._new_token() for _ in range(1000)}
        self.assertEqual(len(tokens), 1000)
        self.assertEqual({len(t) for t in tokens}, {24})
        self.assertTrue(all(ia.TOKEN_RE.match(t) for t in tokens))
        self.assertEqual(len({t[:5] for t in tokens}), 1)  # 30 of the 32 time bits
        self.assertEqual(len({t[6:] for t in tokens}), 1000)  # the random part
        with mock.patch.object(ia, "now", return_value=T0 + 1):
            self.assertNotEqual(ia._new_token()[:6], next(iter(tokens))[:6])
        # never "-": it would read as an option
        for seconds in (0, 2**31 - 1, 2**31, 2**32 - 1, T0):
            with mock.patch.object(ia, "now", return_value=seconds):
                self.assertFalse(ia._new_token().startswith("-"), seconds)


class ListingTest(LiveServerTestCase):
    """Listings page through any number of invites, by status, and always say how many there are."""

    def test_five_thousand_invites_each_reachable_by_paging_the_cli_and_the_api(self):
        ia.update_key(self.store, "example.com", self.key_id, max_invites=None)
        created = [ia.create_invite(self.store, self.key) for _ in range(5003)]
        tokens = [invite["id"] for invite in created]  # (a listing shows ids)
        for invite in created[:7]:
            ia.revoke_invite(self.store, invite["id"])
        for invite in created[7:10]:
            ia.redeem_invite(self.store, invite["token"], "example.com")
        # the operator's: in the CLI's listing, not the key's
        ia.create_invite(self.store, host="example.com")
        newest_first = tokens[::-1]
        valid = [t for t in newest_first if t not in tokens[:10]]
        # The command line, 1,000 a page, then the last page.
        seen, after, notes = [], [], []
        while True:
            code, out, err = run_main("--db", self.db, "invites", "list", "example.com", "--json",
                                      "--limit", "1000", "--key", self.key_id, *after)
            self.assertEqual(code, 0, err)
            page = [i["id"] for i in json.loads(out)]
            seen += page
            notes.append(err)
            if "next page" not in err:
                break
            after = ["--after", re.search(r"--after (\S+)", err).group(1)]
            self.assertEqual(after[1], page[-1])
        self.assertEqual(seen, valid)
        self.assertEqual(notes[0],
                         "example.com: 4,993 valid invites, 1,000 shown; next page: --after "
                         f"{seen[999]}\n")
        self.assertEqual(notes[-1], "example.com: 4,993 valid invites, 993 shown\n")
        for status, expected in (("revoked", tokens[:7][::-1]), ("used", tokens[7:10][::-1])):
            code, out, err = run_main("--db", self.db, "invites", "list", "example.com", "--status",
                                      status, "--json")
            self.assertEqual([i["id"] for i in json.loads(out)], expected)
        code, out, err = run_main("--db", self.db, "invites", "list", "example.com", "--all")
        self.assertEqual(err, "example.com: 5,004 invites, 50 shown; next page: --after "
                              f"{out.splitlines()[-1].split()[0]}\n")
        self.assertEqual(len(out.splitlines()), 51)
        self.assertLessEqual(max(map(len, out.splitlines())), 80)
        # The API: Link rel="next" until the end, X-Total-Count throughout.
        seen, path = [], f"/invites_api/invites?key={self.key}&status=all&limit=700"
        while path:
            status, headers, body = self.request("GET", path)
            self.assertEqual(status, 200, body)
            self.assertEqual(headers["x-total-count"], "5003")
            seen += [i["id"] for i in json.loads(body)]
            link = re.fullmatch(r'<http://127\.0\.0\.1:\d+(/invites_api/invites\?[^>]+)>; '
                                r'rel="next"', headers.get("link", ""))
            path = link and link.group(1) + f"&key={self.key}"
        self.assertEqual(seen, newest_first)
        status, headers, body = self.request("GET", f"/invites_api/invites?key={self.key}")
        self.assertEqual((len(json.loads(body)), headers["x-total-count"]), (50, "4993"))
        for query, words in (("limit=0", b"expected a whole number"),
                             ("limit=1001", b"at most 1,000"), ("status=gone", b"status 'gone'"),
                             ("after=nope", b"not an invite of this listing")):
            status, _, body = self.request("GET", f"/invites_api/invites?key={self.key}&{query}")
            self.assertEqual(status, 400, query)
            self.assertIn(words, body)


class PurgeTest(TempDirTestCase):

    def test_invites_are_purged_only_after_the_grace_period(self):
        store = ia.Store(self.db)
        day = 86400
        key = ia.create_key(store, "example.com", max_ttl=100 * day)
        with mock.patch.object(ia, "now", return_value=T0):
            fresh = ia.create_invite(store, key, options={"ttl": 40 * day})["token"]
            expired_long_ago = ia.create_invite(store, key, options={"ttl": day})["token"]
            used_long_ago = ia.create_invite(store, key, options={"ttl": 40 * day})["token"]
            ia.redeem_invite(store, used_long_ago, "example.com")
            revoked_long_ago = ia.create_invite(store, key, options={"ttl": 40 * day})["token"]
            ia.revoke_invite(store, revoked_long_ago)
        with mock.patch.object(ia, "now", return_value=T0 + 20 * day):
            used_recently = ia.create_invite(store, key, options={"ttl": 40 * day})["token"]
            ia.redeem_invite(store, used_recently, "example.com")
        with mock.patch.object(ia, "now", return_value=T0 + 32 * day):
            self.assertEqual(ia.purge_invites(store, grace=30 * day), 3)
        left = {row["id"] for row in store.read("SELECT id FROM invites")}
        self.assertEqual(left, {ia.invite_id(fresh), ia.invite_id(used_recently)})
        self.assertNotIn(ia.invite_id(expired_long_ago), left)
        # quotas still count them
        self.assertEqual(store.key(key.split("/")[0])["invites_created"], 5)


# ---------------------------------------------------------------------------
# Policy: what a key allows (expiry, quota, rate, lifetimes, uses, resets)
# ---------------------------------------------------------------------------

class KeyPolicyTest(PolicyTestCase):
    """A key's expiry, quota, rate and limits on what its invites may ask, over HTTP."""

    def test_expired_key_is_refused_at_the_boundary(self):
        key = self.policy_key(expires_at=T0 + 3600)
        self.assertEqual(self.create_at(T0 + 3599, key)[0], 201)
        status, _, body = self.create_at(T0 + 3600, key)
        self.assertEqual(status, 403)
        self.assertEqual(body, b"key expired\n")

    def test_quota_allows_n_invites_and_refuses_the_next(self):
        key = self.policy_key(max_invites=3)
        self.assertEqual([self.create(key=key)[0] for _ in range(3)], [201] * 3)
        status, _, body = self.create(key=key)
        self.assertEqual((status, body), (403, b"invite quota used up\n"))
        self.assertEqual(self.invite_count(), 3)

    def test_rate_limit_answers_429_with_retry_after_until_the_window_moves(self):
        key = self.policy_key(rate_count=3, rate_period=3600)
        self.assertEqual([self.create_at(T0 + i, key)[0] for i in range(3)], [201] * 3)
        status, headers, _ = self.create_at(T0 + 10, key)
        self.assertEqual(status, 429)
        self.assertEqual(headers["retry-after"], str(3600 - 10))
        status, headers, _ = self.create_at(T0 + 1800, key)
        self.assertEqual((status, headers["retry-after"]), (429, "1800"))
        self.assertEqual(self.create_at(T0 + 3600, key)[0], 201)  # the first one left the window
        self.assertEqual(self.create_at(T0 + 3600, key)[0], 429)
        self.assertEqual(self.invite_count(), 4)

    def test_limits_survive_a_server_restart(self):
        key = self.policy_key(rate_count=2, rate_period=86400, max_invites=5)
        self.assertEqual([self.create_at(T0, key)[0] for _ in range(2)], [201, 201])
        self.server.shutdown()
        self.server.server_close()
        store = ia.Store(self.db)
        server = ia.make_server(ia.App(store), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(lambda: (server.shutdown(), server.server_close()))
        self.port = server.server_address[1]
        self.assertEqual(self.create_at(T0 + 60, key)[0], 429)

    def test_per_invite_options_within_the_key_limits(self):
        key = self.policy_key(max_ttl=86400, max_uses=5)
        with mock.patch.object(ia, "now", return_value=T0):
            status, headers, body = self.create(
                key=key, extra="&ttl=12h&uses=5&username=Alice&note=for%20Alice",
                headers={"Accept": "application/json"})
        self.assertEqual(status, 201, body)
        data = json.loads(body)
        self.assertEqual(data["uri"], f"xmpp:alice@example.com?register;preauth={data['token']}")
        self.assertEqual((data["uses"], data["uses_left"], data["username"], data["note"]),
                         (5, 5, "alice", "for Alice"))
        self.assertEqual(data["expires_at"], ia.iso(T0 + 12 * 3600))
        # The key's default ttl is capped by its max-ttl.
        status, headers, _ = self.create_at(T0, key)
        self.assertEqual(ia.invite_by_token(self.store,
                                            self.token_of(headers["location"]))["expires_at"], T0
                         + 86400)

    def test_options_over_the_limit_or_malformed_are_400_with_the_reason(self):
        key = self.policy_key(max_ttl=86400, max_uses=5)
        cases = {"&ttl=2d": b"ttl", "&ttl=soon": b"duration", "&uses=6": b"uses",
                 "&uses=0": b"uses",
                 "&uses=two": b"uses", "&username=a%20b": b"username", "&username=a@b": b"username",
                 "&note=" + "x" * 201: b"note", "&note=a%0Ab": b"note", "&colour=red": b"colour"}
        for extra, word in cases.items():
            status, _, body = self.create(key=key, extra=extra)
            self.assertEqual(status, 400, extra)
            self.assertIn(word, body, extra)
        self.assertEqual(self.invite_count(), 0)
        self.assertEqual(self.create(key=key, extra="&note=" + "x" * 200)[0], 201)

    def test_post_takes_the_same_options_as_json(self):
        key = self.policy_key(max_uses=3)
        status, headers, body = self.request(
            "POST", "/invites_api",
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
             "Accept": "application/json"},
            json.dumps({"uses": 3, "ttl": "1d", "username": "bob", "note": "<b>hi</b>",
                        "redirect": False}))
        self.assertEqual(status, 201, body)
        data = json.loads(body)
        self.assertEqual((data["uses"], data["username"], data["note"]), (3, "bob", "<b>hi</b>"))
        for payload, expected in ((b"[1]", 400), (b"{bad json", 400), (b'{"uses": 4}', 400),
                                  (b'{"uses": "x"}', 400), (b'{"foo": 1}', 400)):
            status, _, _ = self.request("POST", "/invites_api", {
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"}, payload)
            self.assertEqual(status, expected, payload)
        status, _, _ = self.request("POST", "/invites_api", {
            "Authorization": f"Bearer {key}", "Content-Type": "application/x-www-form-urlencoded"},
            b"uses=2")
        self.assertEqual(status, 415)
        self.assertEqual(self.invite_count(), 1)


class KeyPolicyCommandsTest(CliTestCase):
    """create and update with a policy: shown, changed, cleared, refused when malformed."""

    def test_create_with_policy_and_list_json_shows_it(self):
        with mock.patch.object(ia, "now", return_value=T0):
            code, out, err = self.cli("create", "example.com", "limited", "--expires", "90d",
                                      "--max-invites", "10",
                                      "--rate", "10/hour", "--max-ttl", "2w", "--max-uses", "5")
        self.assertEqual(code, 0, err)
        data = json.loads(self.cli("list", "example.com", "--json")[1])[0]
        self.assertEqual((data["expires_at"], data["max_invites"], data["rate"], data["max_ttl"],
                          data["max_uses"]),
                         (ia.iso(T0 + 90 * 86400), 10, "10/3600s", 14 * 86400, 5))

    def test_update_changes_and_clears_the_policy(self):
        key_id = self.cli("create", "example.com", "--rate", "5/day", "--expires",
                          "2030-01-31")[1].split("/")[0]
        data = json.loads(self.cli("list", "example.com", "--json")[1])[0]
        self.assertEqual((data["rate"], data["expires_at"]), ("5/86400s", "2030-01-31T00:00:00Z"))
        self.assertEqual(self.cli("update", "example.com", key_id, "--rate", "none", "--expires",
                                  "never", "--name", "renamed", "--max-uses", "3"), (0, "", ""))
        data = json.loads(self.cli("list", "example.com", "--json")[1])[0]
        self.assertEqual((data["rate"], data["expires_at"], data["name"], data["max_uses"]),
                         (None, None, "renamed", 3))
        self.assertEqual(self.cli("update", "example.com", "nosuchkey", "--max-uses", "2"),
                         (1, "", "error: key 'nosuchkey' not found for host 'example.com'\n"))
        self.assertEqual(self.cli("update", "example.com", key_id)[0], 1)

    def test_resets_are_off_for_a_key_until_allowed_and_can_be_taken_back(self):
        plain = self.cli("create", "example.com")[1].split("/")[0]
        allowed = self.cli("create", "example.com", "--allow-resets")[1].split("/")[0]
        listed = {k["id"]: k["may_reset"] for k
                  in json.loads(self.cli("list", "example.com", "--json")[1])}
        self.assertEqual(listed, {plain: False, allowed: True})
        self.assertEqual(self.cli("update", "example.com", allowed, "--no-allow-resets"),
                         (0, "", ""))
        self.assertEqual(self.cli("update", "example.com", plain, "--allow-resets"), (0, "", ""))
        listed = {k["id"]: k["may_reset"] for k
                  in json.loads(self.cli("list", "example.com", "--json")[1])}
        self.assertEqual(listed, {plain: True, allowed: False})

    def test_keys_made_before_the_reset_permission_existed_do_not_have_it(self):
        with contextlib.closing(sqlite3.connect(self.db)) as conn:  # a database of schema 6
            for statements in ia.MIGRATIONS[:6]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute("PRAGMA user_version = 6")
            conn.execute("INSERT INTO keys (id, host, secret_hash, created_at) VALUES ('oldkey', "
                         "'example.com', x'00', 0)")
            conn.commit()
        self.assertEqual([k["may_reset"] for k
                          in json.loads(self.cli("list", "example.com", "--json")[1])], [False])

    def test_bad_policy_values_are_usage_errors(self):
        for option, value in (("--expires", "soon"), ("--rate", "10"), ("--rate", "ten/hour"),
                              ("--rate", "5/fortnight"),
                              ("--max-invites", "0"), ("--max-ttl", "1y"), ("--max-uses", "-1")):
            code, out, err = self.cli("create", "example.com", option, value)
            self.assertEqual(code, 2, (option, value))
            self.assertIn(option, err)
        self.assertEqual(ia.parse_rate("100/day"), (100, 86400))
        self.assertEqual(ia.parse_rate("5/15m"), (5, 900))
        self.assertEqual(ia.parse_rate("3/hours"), (3, 3600))


# ---------------------------------------------------------------------------
# Pages: what the invitee sees, read by a real browser and a real QR decoder
# ---------------------------------------------------------------------------

class ServerOptionsTest(LiveServerTestCase):
    settings = {"public_url": "https://{host}:5281/", "invite_ttl": 3600}

    def test_public_url_with_host_placeholder_and_ttl_are_used(self):
        with mock.patch.object(ia, "now", return_value=1_700_000_000):
            status, headers, _ = self.create()
        self.assertRegex(headers["location"],
                         r"^https://example\.com:5281/invite\?[A-Za-z0-9_-]{24}$")
        invite = ia.invite_by_token(self.store, self.token_of(headers["location"]))
        self.assertEqual(invite["expires_at"], 1_700_000_000 + 3600)


class InviteUrlTemplateTest(LiveServerTestCase):
    settings = {"invite_url_template": "https://{host}/join/{token}?uri={uri}"}

    def test_invite_url_template_points_location_at_an_external_page(self):
        status, headers, _ = self.create()
        self.assertEqual(status, 201)
        match = re.match(r"^https://example\.com/join/([A-Za-z0-9_-]{24})\?uri=(.*)$",
                         headers["location"])
        self.assertIsNotNone(match, headers["location"])
        self.assertEqual(match.group(2),
                         quote(f"xmpp:example.com?register;preauth={match.group(1)}", safe=""))


class InvitePageTest(LiveServerTestCase):
    backend = MAKES_ACCOUNTS

    def new_token(self, extra=""):
        return self.token_of(self.create(extra=extra)[1]["location"])

    def test_valid_invite_page_says_who_invites_where_and_until_when(self):
        with mock.patch.object(ia, "now", return_value=1_700_000_000):
            token = self.new_token("&note=%3Cb%3EWelcome%3C%2Fb%3E%20to%20the%20choir")
        for path in (f"/invite?{token}", f"/invite/{token}"):
            with mock.patch.object(ia, "now", return_value=1_700_000_100):
                status, headers, body = self.request("GET", path)
            page = body.decode()
            self.assertEqual(status, 200, path)
            self.assertTrue(headers["content-type"].startswith("text/html"))
            self.assertEqual(headers["link"],
                             f'<xmpp:example.com?register;preauth={token}>; rel="alternate"')
            # the site name defaults to the host
            self.assertIn("<header>example.com</header>", page)
            self.assertIn("You have been invited to join example.com", page)
            self.assertIn(f'href="http://127.0.0.1:{self.port}/register?t={token}">Create your '
                          'account</a>', page)
            self.assertIn("expires in 6 days (21 November 2023, 22:13 UTC)", page)
            self.assertIn("&lt;b&gt;Welcome&lt;/b&gt; to the choir", page)  # the note, escaped
            self.assertNotIn("<b>Welcome", page)
            self.assertIn('<input id="link" readonly '
                          f'value="http://127.0.0.1:{self.port}/invite?{token}">', page)
            self.assertIn("<h2>No app yet?</h2>", page)
            self.assertIn("Conversations", page)
            self.assertRegex(page, r'<svg [^>]*role="img" aria-label="QR code of the invite for '
                             r'example.com')
            self.assertIn('<html lang="en">', page)

    def test_page_security_headers_allow_nothing_from_other_origins(self):
        status, headers, body = self.request("GET", f"/invite?{self.new_token()}")
        csp = headers["content-security-policy"]
        nonce = re.search(r"'nonce-([A-Za-z0-9_-]+)'", csp).group(1)
        self.assertIn("default-src 'none'", csp)
        self.assertIn(f"script-src 'nonce-{nonce}'", csp)
        self.assertIn(f'<script nonce="{nonce}">'.encode(), body)
        self.assertIn(f'<style nonce="{nonce}">'.encode(), body)
        self.assertEqual(headers["referrer-policy"], "same-origin")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertNotRegex(body, rb'(src|href)="(https?:)?//[^"]*\.(js|css|png|svg|woff2?)"')
        other_nonce = re.search(r"'nonce-([A-Za-z0-9_-]+)'",
                                self.request("GET", f"/invite?{self.new_token()}")[1]
                                ["content-security-policy"]).group(1)
        self.assertNotEqual(nonce, other_nonce)

    def test_site_name_apps_username_and_uses_are_shown(self):
        self.app.settings.site_name = "Choir Chat"
        self.app.settings.apps = ({"platform": "Amiga", "name": "AmigaXMPP",
                                   "url": "https://amiga.example/xmpp"},)
        key = ia.create_key(self.store, "example.com", max_uses=5)
        token = self.token_of(self.create(key=key, extra="&uses=5&username=frank")[1]["location"])
        page = self.request("GET", f"/invite/{token}")[2].decode()
        self.assertIn("<header>Choir Chat</header>", page)
        self.assertIn('<strong>Amiga</strong>: <a href="https://amiga.example/xmpp" '
                      'rel="noreferrer">AmigaXMPP</a>', page)
        self.assertNotIn("Conversations", page)
        self.assertIn("It can create 5 accounts.", page)
        self.assertIn("<strong>frank@example.com</strong>", page)

    def test_head_on_the_page_sends_headers_only(self):
        token = self.new_token()
        status, headers, body = self.request("HEAD", f"/invite?{token}")
        self.assertEqual((status, body), (200, b""))
        self.assertGreater(int(headers["content-length"]), 1000)

    def test_used_revoked_and_expired_invites_get_410_and_unknown_404_saying_what_happened(self):
        with mock.patch.object(ia, "now", return_value=1_700_000_000):
            expired = self.new_token()
        used, revoked = self.new_token(), self.new_token()
        ia.redeem_invite(self.store, used, "example.com")
        ia.revoke_invite(self.store, revoked)
        cases = {used: (410, b"This invite has already been used"),
                 revoked: (410, b"This invite has been withdrawn"),
                 expired: (410, b"This invite has expired"),
                 "A" * 24: (404, b"We could not find this invite"),
                 "not a token": (404, b"We could not find this invite"),
                 "": (404, b"We could not find this invite")}
        for token, (expected, words) in cases.items():
            status, headers, body = self.request("GET", f"/invite?{quote(token)}")
            self.assertEqual(status, expected, token)
            self.assertIn(words, body)
            self.assertIn(b"ask the person who invited you for a new invite", body)
            self.assertIn("default-src 'none'", headers["content-security-policy"])

    def test_without_accounts_the_page_offers_no_path_that_cannot_work(self):
        self.app.backend = ia.BUILTIN  # (no one makes accounts)
        token = self.new_token()
        status, _, body = self.request("GET", f"/invite?{token}")
        page = body.decode()
        self.assertEqual(status, 200)
        # the server never saw this token: an app would be refused
        self.assertNotIn('href="xmpp:', page)
        self.assertNotIn("/register?t=", page)
        self.assertNotIn("<svg", page)
        self.assertIn("You cannot create your account on this page. Whoever invited you has a "
                      "sign-up page", page)
        # (no developer's words on an invitee's page)
        self.assertNotIn(f"/invite/{token}.json", page)
        self.assertNotIn("redeem", page)
        self.assertIn("Copy the link to this page", page)
        self.assertNotIn("Or copy", page)
        self.assertEqual(self.request("GET", f"/register?t={token}")[0], 404)

    def test_expiry_boundary(self):
        with mock.patch.object(ia, "now", return_value=1_000):
            token = self.new_token()
        with mock.patch.object(ia, "now", return_value=1_000 + 7 * 86400 - 1):
            self.assertEqual(self.request("GET", f"/invite?{token}")[0], 200)
        with mock.patch.object(ia, "now", return_value=1_000 + 7 * 86400):
            self.assertEqual(self.request("GET", f"/invite?{token}")[0], 410)

    def test_other_methods_on_the_page_are_405(self):
        status, headers, _ = self.request("POST", f"/invite?{self.new_token()}")
        self.assertEqual(status, 405)
        self.assertEqual(headers["allow"], "GET, HEAD")

    def test_the_app_list_file_is_checked(self):
        good = os.path.join(self.dir, "apps.json")
        with open(good, "w") as f:
            json.dump([{"platform": "Android", "name": "Cheogram", "url": "https://cheogram.com/"}],
                      f)
        self.assertEqual(ia.load_apps(good)[0]["name"], "Cheogram")
        for content in ("not json", "{}",
                        '[{"platform": "x", "name": "y", "url": "javascript:alert(1)"}]',
                        '[{"platform": "x", "name": "y"}]'):
            bad = os.path.join(self.dir, "bad.json")
            with open(bad, "w") as f:
                f.write(content)
            with self.assertRaises(ia.Error):
                ia.load_apps(bad)
        code, _, err = run_main("--db", self.db, "serve", "--port", "0", "--apps",
                                os.path.join(self.dir, "bad.json"))
        self.assertEqual(code, 1)
        self.assertIn("error: the app list", err)

    def test_expiry_in_words(self):
        self.assertEqual(ia.in_words(6 * 86400 + 5), "in 6 days")
        self.assertEqual(ia.in_words(86400), "in 1 day")
        self.assertEqual(ia.in_words(3 * 3600 + 59), "in 3 hours")
        self.assertEqual(ia.in_words(61), "in 1 minute")
        self.assertEqual(ia.in_words(30), "in less than a minute")


def write_png(path, matrix, scale=4, quiet=4):
    """Write a QR matrix (rows of booleans) as a greyscale PNG with the standard library."""
    import struct
    import zlib
    size = (len(matrix) + 2 * quiet) * scale
    rows = []
    for y in range(size):
        my = y // scale - quiet
        row = bytearray([0])  # filter type: none
        for x in range(size):
            mx = x // scale - quiet
            row.append(0 if 0 <= mx < len(matrix) and 0 <= my < len(matrix) and matrix[my][mx]
                       else 255)
        rows.append(bytes(row))

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def zbar(*paths):
    """Return what zbarimg decodes from each image, one string per image (None if nothing).

    One zbarimg run reads them all: it prints one line per symbol found, in order.
    """
    zbarimg = require_program("zbarimg")
    result = subprocess.run([zbarimg, "--raw", "-q", *paths], capture_output=True, timeout=300)
    lines = result.stdout.decode("utf-8").split("\n")[:-1]
    return lines + [None] * (len(paths) - len(lines))


class QrTest(TempDirTestCase):

    def payloads(self):
        """(payload, level, mask, version expected) covering lengths, versions 1-40, every mask,
        UTF-8."""
        cases = []
        url = "https://example.com/invite?" + "AbCdEfGhIjKlMnOpQrStUvWx-_0123456789" * 90
        for version in range(1, 11):  # exactly full, and one byte more than the version before
            cases.append((url[:ia.qr_capacity(version)], "M", None, version))
            if version > 1:
                cases.append((url[:ia.qr_capacity(version - 1) + 1], "M", None, version))
        for mask in range(8):
            cases.append((f"xmpp:example.com?register;preauth={'Tk' * 12}{mask}", "M", mask, None))
        for length in (1, 2, 3, 4, 5, 7, 8, 11, 13, 17, 21, 27, 34, 44, 55, 70, 89, 110, 144, 170,
                       200, 213):
            cases.append((("x" + url)[:length], "M", None, None))
        for text in ("é", "Grüße aus Köln", "日本語のテキスト", "emoji 🎉🎈",
                     "xmpp:jürgen@bücher.example?register", "Привет, хор! " * 5, "ünïcödé " * 20):
            cases.append((text, "M", None, None))
        for level in "LQH":
            cases.append((url[:ia.qr_capacity(10, level)], level, None, 10))
        # every other version we support, at the largest payload it holds
        for version in range(11, 41):
            # 40-L: the largest payload, 2,953 bytes
            level = "L" if version % 2 or version == 40 else "M"
            cases.append((url[:ia.qr_capacity(version, level)], level, None, version))
        return cases

    def test_a_real_decoder_reads_every_payload_exactly(self):
        cases = self.payloads()
        self.assertGreaterEqual(len(cases), 60)
        paths, masks_seen, versions_seen = [], set(), set()
        for i, (payload, level, mask, version) in enumerate(cases):
            matrix = (ia.qr_matrix(payload, level) if mask is None
                      else ia.qr_masked(payload, level)[mask])
            if version is not None:
                self.assertEqual(len(matrix), version * 4 + 17, (len(payload), level))
                versions_seen.add(version)
            if mask is not None:
                masks_seen.add(mask)
            path = os.path.join(self.dir, f"qr{i}.png")
            write_png(path, matrix, scale=3 if len(matrix) > 100 else 4)
            paths.append(path)
        self.assertEqual(masks_seen, set(range(8)))
        self.assertEqual(versions_seen, set(range(1, 41)))
        self.assertEqual(max(len(p.encode()) for p, *_ in cases), 2953)
        for (payload, *_), decoded in zip(cases, zbar(*paths)):
            self.assertEqual(decoded, payload)

    def test_the_penalty_picks_the_best_mask(self):
        payload = "xmpp:example.com?register;preauth=ABCDEFGHIJKLMNOPQRSTUVWX"
        chosen = ia.qr_matrix(payload)
        scores = [ia._qr_penalty(matrix) for matrix in ia.qr_masked(payload)]
        self.assertEqual(ia._qr_penalty(chosen), min(scores))
        self.assertGreater(max(scores), min(scores))

    def test_too_long_is_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "do not fit"):
            ia.qr_matrix("x" * 3000, level="L")

    def test_capacities_match_the_standard(self):
        self.assertEqual([ia.qr_capacity(v) for v in range(1, 11)],
                         [14, 26, 42, 62, 84, 106, 122, 152, 180, 213])
        self.assertEqual((ia.qr_capacity(40, "L"), ia.qr_capacity(40, "H")), (2953, 1273))

    def test_the_svg_draws_the_same_modules(self):
        matrix = ia.qr_matrix("hello")
        svg = ia.qr_svg(matrix, label="a <label>")
        self.assertIn('viewBox="0 0 29 29"', svg)
        self.assertIn('aria-label="a &lt;label&gt;"', svg)
        drawn = [[False] * 21 for _ in range(21)]
        for x, y, run in re.findall(r"M(\d+) (\d+)h(\d+)v1h-\d+z", svg):
            for dx in range(int(run)):
                drawn[int(y) - 4][int(x) - 4 + dx] = True
        self.assertEqual(drawn, matrix)

    def test_the_terminal_qr_scans_for_the_url_and_the_uri(self):
        db = os.path.join(self.dir, "t.db")
        for flag in ("--qr", "--qr=uri"):
            code, out, err = run_main("--db", db, "invites", "create", "example.com", flag,
                                      "--public-url", "https://{host}")
            self.assertEqual(code, 0, err)
            *art, url = out.rstrip("\n").split("\n")
            self.assertTrue(all(set(line) <= set(" \u2580\u2584\u2588") for line in art))
            matrix = []  # back from half blocks to modules: each character is two rows
            for line in art:
                matrix.append([c in "\u2580\u2588" for c in line])
                matrix.append([c in "\u2584\u2588" for c in line])
            matrix = matrix[:len(matrix[0])]  # the last line's lower half is padding
            path = os.path.join(self.dir, "terminal.png")
            write_png(path, matrix, quiet=0)
            expected = url if flag == "--qr" else ia.invite_by_token(ia.Store(db),
                                                                     url.rsplit("?", 1)[1])["uri"]
            self.assertEqual(zbar(path), [expected])


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
SIZES = ((390, 844), (1280, 800))  # a phone, a laptop


class Invitee:
    """A person in Chromium (Playwright, Debian's /usr/bin/chromium: no browser download), who keeps
    a screenshot of every page at each size and records every request the browser makes."""

    def __init__(self, test, shots):
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            if os.environ.get("INVITES_API_REQUIRE_ALL") == "1":
                raise AssertionError(
                    "playwright is not installed (INVITES_API_REQUIRE_ALL=1)") from None
            raise unittest.SkipTest(
                "playwright is not installed (pip install playwright)") from None
        chromium = require_program("chromium")
        self.test, self.shots, self.requests = test, shots, []
        self.playwright = sync_playwright().start()
        test.addCleanup(self.playwright.stop)
        self.browser = self.playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        test.addCleanup(self.browser.close)
        self.page = self.browser.new_page(viewport={"width": SIZES[0][0], "height": SIZES[0][1]})
        self.page.on("request", lambda r: self.requests.append((r.method, r.url)))
        self.console = []
        self.page.on("console", lambda m: self.console.append(m.text))

    def look(self, name):
        """Screenshot the page at each size (full page) into shots/NAME-WxH.png."""
        for width, height in SIZES:
            self.page.set_viewport_size({"width": width, "height": height})
            self.page.screenshot(path=os.path.join(self.shots, f"{name}-{width}x{height}.png"),
                                 full_page=True)
            past = self.page.evaluate("[...document.querySelectorAll('main *')].filter(e => "
                                      "e.getBoundingClientRect().right > innerWidth).map(e => "
                                      "e.outerHTML.slice(0, 80))")
            self.test.assertEqual(past, [], f"{name} at {width} px: these run past the right edge")
        self.page.set_viewport_size({"width": SIZES[0][0], "height": SIZES[0][1]})

    def text(self):
        return self.page.inner_text("main")

    def accessible(self, name):
        """Check the page with axe-core (WCAG 2.1 A and AA, and best practices) at each size, light
        and dark: the test fails on any violation, naming the rule and the element."""
        try:
            from axe_playwright_python.sync_playwright import Axe
        except ImportError:
            if os.environ.get("INVITES_API_REQUIRE_ALL") == "1":
                raise AssertionError("axe-playwright-python is not installed "
                                     "(INVITES_API_REQUIRE_ALL=1)") from None
            raise unittest.SkipTest("axe-playwright-python is not installed") from None
        rules = {"runOnly": {"type": "tag",
                             "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa",
                                        "best-practice"]}}
        for scheme in ("light", "dark"):
            self.page.emulate_media(color_scheme=scheme)
            for width, height in SIZES:
                self.page.set_viewport_size({"width": width, "height": height})
                found = Axe().run(self.page, options=rules).response["violations"]
                self.test.assertEqual([(v["id"], [n["html"][:80] for n in v["nodes"]]) for v
                                       in found], [],
                                      f"{name}, {scheme}, {width} px: axe-core found these")
        self.page.emulate_media(color_scheme="light")
        self.page.set_viewport_size({"width": SIZES[0][0], "height": SIZES[0][1]})

    def sign_up(self, bookmark, user, password, confirmation=None, name=None):
        """Open the bookmark (mints and redirects), press the invite page's main action, fill in the
        form and press its button; return the status of the answer to that press."""
        self.page.goto(bookmark)
        self.test.assertRegex(self.page.url, r"/invite\?[A-Za-z0-9_-]{24}$")
        if name:
            self.look(f"{name}-invite")
        self.page.click("a.button")  # "Create your account"
        self.test.assertIn("/register?t=", self.page.url)
        if name:
            self.look(f"{name}-form")
        return self.submit(user, password, confirmation)

    def submit(self, user, password, confirmation=None):
        """Fill in the form on the page and press its button; return the final answer's status."""
        if user is not None and not self.page.get_attribute("#user", "readonly"):
            self.page.fill("#user", user)
        self.page.fill("#password", password)
        self.page.fill("#password_confirm", password if confirmation is None else confirmation)
        with self.page.expect_navigation() as navigation:
            self.page.click("button[type=submit]")
        return navigation.value.status


def screenshot_dir(test, name):
    """Return where a test keeps its screenshots: $INVITES_API_KEEP_SCREENSHOTS/NAME, else a temp
    dir."""
    keep = os.environ.get("INVITES_API_KEEP_SCREENSHOTS")
    path = os.path.join(keep, name) if keep else tempfile.mkdtemp(dir=test.dir)
    os.makedirs(path, exist_ok=True)
    return path


class BrowserTest(LiveServerTestCase):
    """Headless Chromium opens the page; zbar reads the QR off the screenshot."""

    backend = MAKES_ACCOUNTS

    def chromium(self, url, width, height, *extra):
        """Open url; return (screenshot path, console lines, page-initiated request URLs)."""
        chromium = require_program("chromium")
        shot = os.path.join(self.dir, f"page-{width}x{height}.png")
        netlog = os.path.join(self.dir, f"net-{width}.json")
        profile = tempfile.mkdtemp(dir=self.dir)
        result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--log-net-log={netlog}",
                                 f"--window-size={width},{height}", f"--screenshot={shot}", *extra,
                                 url], capture_output=True, text=True, timeout=120)
        console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
        with open(netlog) as f:
            log = json.load(f)
        start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        requests = [e["params"]["url"] for e in log["events"] if e["type"] == start_job
                    and e.get("params", {}).get("initiator", "").startswith("http")]
        return shot, console, requests

    def test_the_page_in_a_phone_and_a_desktop_browser(self):
        status, headers, _ = self.create(extra="&note=See%20you%20at%20rehearsal")
        url = headers["location"]
        origin = f"http://127.0.0.1:{self.port}"
        # the phone's camera opens the sign-up form
        uri = f"{origin}/register?t={self.token_of(url)}"
        for width, height, extra in ((390, 844, ()),
                                     (1280, 800, ("--blink-settings=preferredColorScheme=0",))):
            shot, console, requests = self.chromium(url, width, height, *extra)
            self.assertEqual(zbar(shot), [uri], f"{width}x{height}")
            self.assertEqual(console, [], f"{width}x{height}")
            self.assertEqual([r for r in requests if not r.startswith(origin)], [])
        # The detector itself: a page that loads from another origin is caught.
        bad = ("data:text/html,<meta http-equiv='Content-Security-Policy' "
               "content=\"default-src 'none'\"><img src='https://example.org/x.png'>")
        _, console, _ = self.chromium(bad, 390, 844)
        self.assertTrue(any("violates the following Content Security Policy" in line for line
                            in console))

    def test_the_sign_up_form_at_phone_width(self):
        token = self.token_of(self.create(extra="&username=erin")[1]["location"])
        origin = f"http://127.0.0.1:{self.port}"
        free = f"t={self.token_of(self.create()[1]['location'])}"
        for query, name, width in ((free, "signup", 390), (f"t={token}", "bound", 390),
                                   (free, "narrow", 360)):
            shot, console, requests = self.chromium(f"{origin}/register?{query}", width, 740)
            self.assertEqual(console, [])
            self.assertEqual([r for r in requests if not r.startswith(origin)], [])
            with open(shot, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            if os.environ.get("INVITES_API_KEEP_SCREENSHOTS"):  # to look at them
                shutil.copy(shot,
                            os.path.join(os.environ["INVITES_API_KEEP_SCREENSHOTS"],
                                         f"{name}-{width}.png"))

    def test_the_error_pages_render_and_say_what_happened(self):
        token = self.token_of(self.create()[1]["location"])
        ia.revoke_invite(self.store, token)
        chromium = require_program("chromium")
        for path, words in ((f"/invite?{token}", "<h1>This invite has been withdrawn</h1>"),
                            ("/invite?" + "B" * 24, "<h1>We could not find this invite</h1>")):
            profile = tempfile.mkdtemp(dir=self.dir)
            result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                     "--dump-dom",
                                     f"http://127.0.0.1:{self.port}{path}"], capture_output=True,
                                    text=True, timeout=120)
            self.assertIn(words, result.stdout)  # the DOM as the browser rendered it
            self.assertIn("ask the person who invited you for a new invite", result.stdout)
            self.assertEqual([line for line in result.stderr.splitlines() if ":CONSOLE" in line],
                             [])


# ---------------------------------------------------------------------------
# Sign-up: an invite becomes an account through our page (here a program makes it)
# ---------------------------------------------------------------------------

def journey_passwords():
    """Return the passwords of one browser_journey: (first, bob's, new), unique to this run (the
    suite's other processes may be typing passwords at the same time)."""
    word = ia._random_id(6)
    return f"first password {word}", f"bob's password {word}", f"new password {word}"


def browser_journey(test, port, key, host, login, reset_cli, shots, passwords):
    """Take an invitee's whole path in Chromium against a serve --accounts on port: sign-up, a login
    as the new account, refusals with the form kept, a reload, a reset, a cross-site form."""
    first, bobs, new = passwords
    person = Invitee(test, shots)
    bookmark = f"http://127.0.0.1:{port}/invites_api?key={key}&redirect=true"
    test.assertEqual(person.sign_up(bookmark, "alice", first, name="signup"), 200)
    test.assertIn(f"Your account alice@{host} is ready", person.text())
    test.assertNotIn("already been used", person.text())
    test.assertRegex(person.page.url, r"/register\?t=[A-Za-z0-9_-]{24}&account=alice$")
    person.look("done")
    test.assertTrue(login("alice", first))
    posts = [r for r in person.requests if r[0] == "POST"]
    person.page.reload()  # a reload shows the same page and posts nothing
    test.assertIn(f"Your account alice@{host} is ready", person.text())
    test.assertEqual([r for r in person.requests if r[0] == "POST"], posts)
    # A taken name: the form again, the reason shown and the name kept; the invite is still there.
    test.assertEqual(person.sign_up(bookmark, "alice", first), 409)
    test.assertIn(f"alice@{host} is taken; choose another name", person.text())
    test.assertEqual(person.page.input_value("#user"), "alice")
    person.look("taken")
    # A mismatch: refused by us, the reason shown. Too short: the browser itself keeps the form
    # back.
    test.assertEqual(person.submit("bob", first, "another long one"), 400)
    test.assertIn("the two passwords are not the same", person.text())
    person.look("mismatch")
    before = len(person.requests)
    person.page.fill("#user", "bob")
    person.page.fill("#password", "short")
    person.page.fill("#password_confirm", "short")
    person.page.click("button[type=submit]")
    test.assertTrue(person.page.evaluate("!document.querySelector('#password').checkValidity()"))
    test.assertEqual(person.requests[before:], [])  # nothing was sent
    # A long address wraps inside the card at 390 px (look() checks that nothing runs past the
    # edge).
    long_name = "bobwithaverylongaddress20261202"
    test.assertEqual(person.submit(long_name, bobs), 200)
    test.assertIn(f"Your account {long_name}@{host} is ready", person.text())
    person.look("done-long-address")
    test.assertTrue(login(long_name, bobs))
    # A password reset: the new password logs in, the old one no longer does.
    person.page.goto(reset_cli("alice"))
    person.look("reset-invite")
    person.page.click("a.button")  # "Set a new password"
    test.assertIn(f"Set a new password for alice@{host}", person.text())
    person.look("reset-form")
    test.assertEqual(person.submit(None, new), 200)
    test.assertIn("Your new password is set", person.text())
    person.look("reset-done")
    test.assertTrue(login("alice", new))
    test.assertFalse(login("alice", first))
    # A form on a page of another origin posts a valid token to /register, sent by the same browser.
    person.page.goto(bookmark)
    token = person.page.url.rsplit("?", 1)[1]
    with contextlib.closing(ForeignSite(port, token)) as site:
        person.page.goto(site.url)
        with person.page.expect_navigation() as navigation:
            person.page.click("button")
        test.assertEqual(navigation.value.status, 403)
        test.assertIn("can only be sent from its own page", person.text())
        person.look("cross-site")
        person.accessible("the refused form's 403 page")
    test.assertFalse(login("mallory", "mallory's password"))
    # (Chromium notes each 4xx page it shows; nothing else may be said: no CSP violation, no script
    # error)
    test.assertEqual([m for m in person.console if "the server responded with a status of 4"
                      not in m], [])
    return token


class ForeignSite:
    """Another origin (its own loopback port) whose page holds a form posting to our /register."""

    def __init__(self, port, token):
        import http.server
        page = (f'<!doctype html><form method="post" action="http://127.0.0.1:{port}/register">'
                f'<input type="hidden" name="token" value="{token}"><input name="user" '
                'value="mallory">'
                '<input name="password" value="mallory\'s password"><input name="password_confirm" '
                'value="mallory\'s password"><button>Win a prize</button></form>').encode()

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class AccountsCommandTest(LiveServerTestCase):
    """serve --accounts command: a program makes the accounts; the password only on its stdin."""

    PASSWORD = "a long password"

    def setUp(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", tmp]))
        self.calls, self.made = os.path.join(tmp, "calls"), os.path.join(tmp, "made")
        # Names choose what the stand-in does: taken, broken, and slow ones that outlive the
        # timeout.
        program = write_program(tmp, "accounts", f"""echo "$@" >> '{self.calls}'
read password
echo "stdin:$password" >> '{self.calls}'
case "$1:$2" in
  exists:unknowable) test -e '{self.made}.knowable' && exit 0
                     test -e '{self.made}.gone' && exit 3; exit 1;;
  exists:ghost) exit 3;;
  exists:slow*) grep -qx "$2" '{self.made}' 2>/dev/null && exit 0; exit 3;;
  exists:*) exit 0;;
  mark:ghost) exit 3;;
  befriend:*) test "$INVITES_API_INVITER" = ghost && exit 3
              echo "friends $2 $INVITES_API_INVITER" >> '{self.calls}';;
  mark:*) echo "$2-$(grep -cx "$2" '{self.made}' 2>/dev/null)";;
  create:taken) exit 3;;
  create:broken) echo 'backend on fire' >&2; exit 1;;
  create:slowmade) echo slowmade >> '{self.made}'; sleep 30;;
  create:slowchild) setsid sh -c "sleep 2; echo slowchild >> '{self.made}'" & sleep 30;;
  create:unknowable) sleep 30;;
  create:*) echo "$2" >> '{self.made}';;
esac
""")
        self.notified, self.program = os.path.join(tmp, "notified"), program
        self.backend = ia.Builtin(ia.Accounts([program, "{action}", "{username}", "{host}"],
                                              ia.Settings(backend_timeout=1.5)))
        notify = write_program(tmp, "notify", f'echo "$INVITES_API_INVITE $@" >> {self.notified}\n')
        self.settings = {"notify": [notify]}
        super().setUp()

    def post_form(self, token, user, password=PASSWORD, confirmation=None, headers=()):
        """POST the sign-up form; return (status, headers, page)."""
        body = (f"token={token}&user={quote(user)}&password={quote(password)}"
                f"&password_confirm={quote(password if confirmation is None else confirmation)}")
        return self.request("POST", "/register",
                            {"Content-Type": "application/x-www-form-urlencoded",
                             **dict(headers)}, body)

    def sign_up(self, token, user, password=PASSWORD, confirmation=None, headers=()):
        """POST the form and follow its redirect as a browser would; return (status, page)."""
        status, answer, page = self.post_form(token, user, password, confirmation, headers)
        if status != 303:
            return status, page
        self.assertTrue(answer["location"].startswith(
            f"http://127.0.0.1:{self.port}/register?t={token}&account="))
        status, _, page = self.request("GET", answer["location"].split(str(self.port), 1)[1])
        return status, page

    def calls_made(self):
        with open(self.calls) if os.path.exists(self.calls) else io.StringIO() as f:
            return f.read().splitlines()

    def test_the_pages_speak_of_the_web_sign_up_and_group_the_apps(self):
        ia.update_key(self.store, "example.com", self.key_id, max_uses=2)
        token = self.token_of(self.create(extra="&uses=2")[1]["location"])
        page = self.request("GET", f"/invite?{token}")[2].decode()
        self.assertIn("It can create 2 accounts.", page)
        self.assertIn("To chat once your account exists, install one of these:", page)
        # (the button makes the account: no app needed first)
        self.assertNotIn("come back to this page", page)
        status, page = self.sign_up(token, "dora")
        self.assertEqual(status, 200)
        self.assertIn(b"This invite can create 1 more account.</p>", page)
        self.assertEqual(page.count(b"<strong>Android</strong>"), 1)
        self.assertIn(b"Conversations</a>, <a", page)

    def test_the_program_gets_the_password_on_stdin_never_in_its_arguments(self):
        ia.update_key(self.store, "example.com", self.key_id, max_uses=3)
        token = self.token_of(self.create(extra="&uses=3")[1]["location"])
        status, page = self.sign_up(token, "taken")
        self.assertEqual(status, 409)
        self.assertIn(b"choose another name", page)
        status, page = self.sign_up(token, "broken")
        self.assertEqual(status, 502)
        self.assertIn("backend on fire", self.log.getvalue())
        # both uses given back
        self.assertEqual(ia.invite_by_token(self.store, token)["uses_left"], 3)
        status, page = self.sign_up(token, "dora", "pass word with spaces")
        self.assertEqual(status, 200, page)
        self.assertIn(b"Your account dora@example.com is ready", page)
        self.assertIn(b"can create 2 more accounts", page)
        calls = self.calls_made()
        self.assertEqual(calls[-2:], ["create dora example.com", "stdin:pass word with spaces"])
        self.assertFalse([c for c in calls if not c.startswith("stdin:") and "pass" in c])
        self.assertNotIn("pass word", self.log.getvalue())
        self.assertNotIn(self.PASSWORD, self.log.getvalue())
        self.assertEqual([a["username"] for a in self.store.accounts(ia.invite_id(token))],
                         ["dora"])
        # The inviter hears of it: --notify-command gets the username and the host as arguments, the
        # invite's id in its environment (never its token).
        self.assertEqual(self.sign_up(token, "emil")[0], 200)

        def notified():
            with open(self.notified) if os.path.exists(self.notified) else io.StringIO() as f:
                lines = f.read().splitlines()
            return len(lines) == 2 and lines
        lines = wait_until(notified, "both uses are notified (after the answer)")
        invite_id = ia.invite_id(token)
        self.assertEqual(sorted(lines),
                         [f"{invite_id} dora example.com", f"{invite_id} emil example.com"])
        listed = json.loads(self.request("GET", f"/invites_api/invites?key={self.key}")[2])
        self.assertEqual([a["jid"] for a in listed[0]["accounts"]],
                         ["dora@example.com", "emil@example.com"])
        # The page of a built-in invite leads to the sign-up form, when this server makes accounts.
        status, _, page = self.request("GET", f"/invite?{token}")
        self.assertIn(f"/register?t={token}".encode(), page)

    def test_a_sign_up_redirects_to_a_page_a_reload_cannot_post_again(self):
        token = self.token_of(self.create()[1]["location"])
        status, answer, body = self.post_form(token, "alice")
        self.assertEqual((status, body), (303, b""))
        done = answer["location"].split(str(self.port), 1)[1]
        self.assertEqual(done, f"/register?t={token}&account=alice")
        for _ in range(2):  # a reload: the same page, and nothing runs again
            status, _, page = self.request("GET", done)
            self.assertEqual(status, 200)
            self.assertIn(b"Your account alice@example.com is ready", page)
            self.assertNotIn(b"already been used", page)
            self.assertNotIn(b"more account", page)
        self.assertEqual([c for c in self.calls_made() if not c.startswith("stdin:")],
                         ["create alice example.com"])
        # Only an account this invite made has such a page; the form itself now says the invite is
        # used.
        self.assertEqual(self.request("GET", f"/register?t={token}&account=bob")[0], 404)
        self.assertEqual(self.request("GET", f"/register?t={token}")[0], 410)

    def test_passwords_the_servers_refuse_are_refused_first_and_never_repeated(self):
        token = self.token_of(self.create()[1]["location"])
        for password, reason in [("my-secret\tpassword", "U+0009"),
                                 ("my-secret\x85password", "U+0085"),
                                 ("a" * 1024, "at most 1023 bytes"),
                                 ("\u00e9" * 600, "at most 1023 bytes"),
                                 ("short", "10 characters or longer")]:
            status, page = self.sign_up(token, "carol", password)
            text = html.unescape(page.decode())
            self.assertEqual(status, 400, text)
            self.assertIn(reason, text)
            self.assertIn('value="carol"', text)  # the form again, the name kept
            self.assertNotIn(password[:8] if len(password) > 8 else password,
                             text.replace("carol", ""))
        status, page = self.sign_up(token, "carol", confirmation="another long password")
        self.assertIn(b"the two passwords are not the same", page)
        self.assertNotIn("secret", self.log.getvalue())
        self.assertEqual(self.calls_made(), [])  # nothing reached the program
        self.assertEqual(ia.invite_by_token(self.store, token)["uses_left"], 1)

    def test_a_program_past_the_timeout_is_killed_with_its_children_and_the_outcome_asked(self):
        ia.update_key(self.store, "example.com", self.key_id, max_uses=5)
        token = self.token_of(self.create(extra="&uses=5")[1]["location"])
        # Its child in a session of its own would make the account 2 s later: killed, and asked,
        # nothing was made, so the use is given back.
        started = time.monotonic()
        status, page = self.sign_up(token, "slowchild")
        self.assertEqual(status, 502, page)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn(b"could not do it just now", page)
        self.assertEqual(ia.invite_by_token(self.store, token)["uses_left"], 5)
        # Made before it hung: the account exists, so it is recorded and the invitee sees it made.
        status, page = self.sign_up(token, "slowmade")
        self.assertEqual(status, 200, page)
        self.assertIn(b"Your account slowmade@example.com is ready", page)
        # Nobody can tell: the use is kept, and the page says so.
        status, page = self.sign_up(token, "unknowable")
        self.assertEqual(status, 502, page)
        self.assertIn(b"cannot tell whether it was done", page)
        self.assertEqual(ia.invite_by_token(self.store, token)["uses_left"], 3)
        # Recorded as unconfirmed, its use kept, until the server can tell; then, as made.
        self.assertEqual([(a["username"], a["action"]) for a
                          in self.store.accounts(ia.invite_id(token))],
                         [("slowmade", "create"), ("unknowable", "unconfirmed")])
        # (exists says unknowable is not knowable)
        self.assertEqual(self.sign_up(token, "taken")[0], 409)
        self.assertEqual(self.store.accounts(ia.invite_id(token))[1]["action"], "unconfirmed")
        # past when the killed child would have written
        time.sleep(max(0, started + 3 - time.monotonic()))
        with open(self.made) as f:
            self.assertEqual(f.read().split(), ["slowmade"])
        # the server can tell again: it was made after all
        open(self.made + ".knowable", "w").close()
        self.assertEqual(self.sign_up(token, "taken")[0], 409)
        self.assertEqual(self.store.accounts(ia.invite_id(token))[1]["action"], "create")
        self.assertEqual(ia.invite_by_token(self.store, token)["uses_left"], 3)
        self.assertNotIn(self.PASSWORD, self.log.getvalue())
        self.assertNotIn("create", self.log.getvalue())  # no argv in any error text

    def test_a_contact_invite_befriends_once_and_only_the_operator_names_its_inviter(self):
        key = ia.create_key(self.store, "example.com", inviter="alice")
        for extra in ("&inviter=mallory", "&inviter="):  # a key holder cannot choose or change it
            status, _, body = self.create(key, extra)
            self.assertEqual((status, body), (400, b"unknown parameter 'inviter'\n"))
        status, _, body = self.request("POST", "/invites_api", {"Authorization": f"Bearer {key}",
                                                                "Content-Type": "application/json"},
                                       json.dumps({"inviter": None}))
        self.assertEqual(status, 400, body)
        status, headers, body = self.create(key, headers={"Accept": "application/json"})
        invite = json.loads(body)
        self.assertEqual((status, invite["inviter"]), (201, "alice@example.com"))
        page = self.request("GET", f"/invite?{invite['token']}")[2].decode()
        self.assertIn("<h1>alice@example.com invited you to join example.com</h1>", page)
        self.assertIn('href="xmpp:alice@example.com?roster"', page)
        status, page = self.sign_up(invite["token"], "dora")
        self.assertEqual(status, 200, page)
        self.assertIn(b"<strong>alice@example.com</strong>, who invited you, is in your contacts",
                      page)
        self.assertEqual([c for c in self.calls_made() if c.startswith(("befriend", "friends"))],
                         ["befriend dora example.com", "friends dora alice"])  # once
        listed = json.loads(self.request("GET", f"/invites_api/invites?key={key}&all=true")[2])
        self.assertEqual(listed[0]["accounts"][0]["contact"], "made")
        # An inviter the server says has no account: the account is made, the page says so, the log
        # says why.
        ia.update_key(self.store, "example.com", key.split("/")[0], inviter="ghost")
        status, page = self.sign_up(self.token_of(self.create(key)[1]["location"]), "emil")
        self.assertEqual(status, 200, page)
        self.assertIn(b"We could not add <strong>ghost@example.com</strong>, who invited you", page)
        self.assertIn("sign-up of emil@example.com: the contact with ghost@example.com was not "
                      "made: ghost@example.com has no account", self.log.getvalue())
        # Resets are no contact invites; keys without an inviter mint as before.
        status, _, body = self.create(headers={"Accept": "application/json"})
        self.assertIsNone(json.loads(body)["inviter"])

    def test_an_unconfirmed_account_the_server_says_was_never_made_gives_its_use_back(self):
        # one use each
        first, second = (self.token_of(self.create()[1]["location"]) for _ in range(2))
        for token in (first, second):
            status, page = self.sign_up(token, "unknowable")
            self.assertEqual(status, 502, page)
            self.assertIn(b"cannot tell whether it was done", page)
        # While nobody can tell, the use stays held: the invite is used.
        self.assertEqual(self.sign_up(first, "dora")[0], 410)
        code, out, err = run_main("--db", self.db, "invites", "show", "example.com", first)
        self.assertEqual(code, 0, err)
        self.assertIn("unknowable@example.com (unconfirmed", out)
        self.assertIn("note: an account of this invite is unconfirmed: give --accounts", err)
        open(self.made + ".gone", "w").close()  # the server answers again: there is no such account
        # invites show --accounts asks, and the use comes back...
        code, out, err = run_main("--db", self.db, "invites", "show", "example.com", first,
                                  "--accounts", "command", "--accounts-command",
                                  f"{self.program} {{action}} {{username}} {{host}}")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("status: valid\n", out)
        self.assertIn("uses_left: 1\n", out)
        self.assertIn("accounts: \n", out)
        # ... and so does the next sign-up on the other invite, which then makes its account.
        status, page = self.sign_up(second, "dora")
        self.assertEqual(status, 200, page)
        self.assertEqual([(a["username"], a["action"]) for a
                          in self.store.accounts(ia.invite_id(second))], [("dora", "create")])
        self.assertEqual(self.sign_up(first, "emil")[0], 200)
        self.assertEqual(ia.invite_by_token(self.store, first)["uses_left"], 0)
        # Asked once after each timeout, once while nobody could tell, and twice where "not made"
        # was believed.
        self.assertEqual([c for c in self.calls_made() if c.startswith("exists unknowable")],
                         ["exists unknowable example.com"] * (2 + 1 + 2 + 2))

    def test_resets_are_a_key_permission_and_only_for_accounts_that_exist(self):
        status, _, body = self.create(extra="&type=reset&username=alice")
        self.assertEqual(status, 403)
        self.assertIn(b"may not make password-reset invites", body)
        ia.update_key(self.store, "example.com", self.key_id, may_reset=1)
        status, _, body = self.create(extra="&type=reset&username=ghost")  # no such account
        self.assertEqual((status, body), (400, b"there is no account ghost@example.com to reset\n"))
        self.assertEqual(self.invite_count(), 0)
        status, answer, _ = self.create(extra="&type=reset&username=alice",
                                        headers={"Accept": "application/json"})
        self.assertEqual(status, 201)
        reset = self.token_of(answer["location"])
        check = json.loads(self.request("GET", f"/invite/{reset}.json")[2])
        self.assertEqual((check["valid"], check["type"]), (True, "reset"))
        status, _, body = self.request("POST",
                                       f"/invites_api/invites/{reset}/redeem?key={self.key}")
        self.assertEqual(status, 400)
        self.assertIn(b"password-reset invite", body)
        # alice@ is made anew after the reset was minted (her mark changes): the reset cannot set
        # her password.
        self.assertEqual(self.sign_up(self.token_of(self.create()[1]["location"]), "alice")[0], 200)
        status, page = self.sign_up(reset, "alice")
        self.assertEqual(status, 403, page)
        self.assertIn(b"made for an earlier account named alice@example.com", page)
        self.assertNotIn("reset alice example.com", self.calls_made())
        self.assertEqual(ia.invite_by_token(self.store, reset)["uses_left"], 1)

    def test_the_cross_site_defence_passes_browsers_own_forms_and_refuses_others(self):
        token = self.token_of(self.create()[1]["location"])
        ours = f"http://127.0.0.1:{self.port}"
        refused = [{"Origin": "null"}, {"Origin": "http://evil.example"},
                   {"Origin": f"https://127.0.0.1:{self.port}"},
                   {"Sec-Fetch-Site": "cross-site", "Origin": ours},
                   {"Sec-Fetch-Site": "same-site", "Origin": ours},
                   # A claim no browser makes: the Origin names another site, whatever
                   # Sec-Fetch-Site says.
                   {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"},
                   {"Sec-Fetch-Site": "same-origin", "Origin": f"https://127.0.0.1:{self.port}"}]
        for headers in refused:
            status, page = self.sign_up(token, "alice", headers=headers)
            self.assertEqual(status, 403, headers)
            self.assertIn(b"<h1>This cannot be done from here</h1>", page)  # a styled page
            self.assertIn(b"can only be sent from its own page", page)
        self.assertEqual(self.calls_made(), [])
        # What Chromium sends under our Referrer-Policy, and under no-referrer: both are its own
        # page.
        self.assertEqual(self.sign_up(token, "alice",
                                      headers={"Origin": ours, "Sec-Fetch-Site": "same-origin"})[0],
                         200)
        token = self.token_of(self.create()[1]["location"])
        self.assertEqual(self.sign_up(token, "bob",
                                      headers={"Origin": "null",
                                               "Sec-Fetch-Site": "same-origin"})[0], 200)

    def test_unknown_tokens_count_toward_the_per_address_limit_and_errors_are_pages(self):
        status, page = self.sign_up("A" * 24, "alice")
        self.assertEqual(status, 404)
        self.assertIn(b"<h1>We could not find this invite</h1>", page)
        statuses = [self.sign_up("B" * 24, "alice")[0] for _ in range(ia.SIGNUPS_PER_MINUTE)]
        self.assertEqual(statuses[-1], 429)
        token = self.token_of(self.create()[1]["location"])
        # even a valid token, from this address, this minute
        status, page = self.sign_up(token, "alice")
        self.assertEqual(status, 429)
        self.assertIn(b"<h1>Too many attempts</h1>", page)
        self.assertEqual(ia.invite_by_token(self.store, token)["uses_left"], 1)

    def test_a_notify_program_that_hangs_is_killed_with_its_children_and_no_token_is_logged(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", tmp]))
        late = os.path.join(tmp, "late")
        self.app.settings.notify = [write_program(tmp, "notify",
                                                  f"(sleep 2; echo late > {late}) & sleep 30\n")]
        token = self.token_of(self.create()[1]["location"])
        with mock.patch.object(ia, "NOTIFY_TIMEOUT", 1):
            self.assertEqual(self.sign_up(token, "alice")[0], 200)
            wait_until(lambda: "--notify-command failed" in self.log.getvalue(),
                       "the failure is logged")
        self.assertIn("--notify-command failed: --notify-command timed out after 1 s",
                      self.log.getvalue())
        self.assertNotIn(token, self.log.getvalue())
        time.sleep(2.5)  # past when its child would have written
        self.assertFalse(os.path.exists(late))

    def test_a_malformed_form_is_refused_with_its_reason_and_uses_nothing(self):
        token = self.token_of(self.create()[1]["location"])
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        good = f"token={token}&password=a+long+password&password_confirm=a+long+password"
        for body, reason in [(good + "&user=bob&user=eve",
                              b"form field 'user' given more than once"),
                             (good + "&user=bob&admin=1", b"unknown form field 'admin'"),
                             # a lone surrogate
                             (good + "&user=%ED%A0%80", b"the form fields are not valid UTF-8"),
                             (good.encode() + "&user=bø".encode(), b"percent-encoded ASCII"),
                             (good + "&user=bob" + "&x=" * 30, b"too many form fields")]:
            status, _, answer = self.request("POST", "/register", form, body)
            self.assertEqual((status, reason.lower()
                              in html.unescape(answer.decode()).lower().encode()),
                             (400, True), answer)
        self.assertEqual(self.request("POST", "/register", {"Content-Type": "application/json"},
                                      good)[0], 415)
        self.assertFalse(os.path.exists(self.calls))  # the account program never ran
        self.assertEqual(ia.invite_by_token(self.store, token)["uses_left"], 1)


# ---------------------------------------------------------------------------
# The command backend: a program of yours mints the invites
# ---------------------------------------------------------------------------

class BackendServerTest(ServerProcessMixin, TempDirTestCase):
    """Our server as a process, minting through stand-in programs."""

    def setUp(self):
        super().setUp()
        self.runs = os.path.join(self.dir, "runs")
        # Prints what `ejabberdctl generate_invite HOST` prints: the URI, then the landing page (and
        # answers serve's start-up questions: status, registered_vhosts, list_invites).
        self.ejabberdctl = write_program(self.dir, "ejabberdctl", (
            'case "$1" in status|list_invites) exit 0;; registered_vhosts) echo example.com; exit '
            '0;; esac\n'
            f'echo run >> {self.runs}\n'
            '[ "$1" = generate_invite ] || exit 3\n'
            'token=$(head -c 18 /dev/urandom | base64 | tr "+/" "-_")\n'
            'echo "xmpp:$2?register;preauth=$token"\n'
            'echo "https://$2/invites/$token"\n'))

    def key(self, **policy):
        store = ia.Store(self.db)
        key = ia.create_key(store, "example.com", **policy)
        store.close()
        return key

    def run_count(self):
        if not os.path.exists(self.runs):
            return 0
        with open(self.runs) as f:
            return len(f.readlines())

    def test_a_program_taking_an_inviter_mints_contact_invites_one_not_taking_it_is_refused(self):
        # It prints only its page's URL: the URI is XEP-0401's contact invite from the inviter.
        program = write_program(self.dir, "mint",
                                'echo "https://example.com/i/$(head -c 18 /dev/urandom | base64 | '
                                'tr "+/" "-_")"\necho "for $1" >> ' + self.runs
                                + "\n")
        key = self.key(inviter="alice")
        proc, port = self.start("--backend", "command", "--backend-command",
                                f"{program} {{inviter}}")
        status, headers, body = self.create(key, headers={"Accept": "application/json"})
        self.assertEqual(status, 201, body)
        invite = json.loads(body)
        self.assertEqual(invite["uri"],
                         f"xmpp:alice@example.com?roster;preauth={invite['token']};ibr=y")
        with open(self.runs) as f:
            self.assertEqual(f.read(), "for alice\n")
        proc.terminate()
        proc.wait(10)
        # (no {inviter})
        proc, port = self.start("--backend", "command", "--backend-command", program)
        status, headers, body = self.create(key)
        self.assertEqual(status, 400)
        self.assertIn(b"the command backend cannot make contact invites (from alice)", body)

    def test_ejabberd_stand_in_mints_and_every_invite_is_recorded(self):
        key = self.key()
        proc, port = self.start("--backend", "ejabberd", "--ejabberdctl", self.ejabberdctl)
        status, headers, body = self.create(key, headers={"Accept": "application/json"})
        self.assertEqual(status, 201, body)
        data = json.loads(body)
        self.assertRegex(headers["location"], r"^https://example\.com/invites/[A-Za-z0-9_-]{24}$")
        self.assertEqual(data["uri"], f"xmpp:example.com?register;preauth={data['token']}")
        invite = ia.invite_by_token(ia.Store(self.db), data["token"])
        self.assertEqual((invite["host"], invite["key_id"], invite["backend"], invite["url"]),
                         ("example.com", key.split("/")[0], "ejabberd", headers["location"]))
        listed = json.loads(run_main("--db", self.db, "list", "example.com", "--json")[1])
        self.assertEqual(listed[0]["invites_created"], 1)
        # Options the backend cannot honour are refused, not dropped.
        status, _, body = self.create(key, "&ttl=1d")
        self.assertEqual((status, body),
                         (400,
                          b"the ejabberd backend cannot honour 'ttl': ejabberd gives every invite "
                          b"its own lifetime (mod_invites' token_expire_seconds)\n"))
        status, _, body = self.create(key, "&note=fine")
        self.assertEqual(status, 201)
        self.assertEqual(self.run_count(), 2)

    def test_quota_and_rate_are_checked_before_the_program_runs(self):
        key = self.key(max_invites=1)
        proc, port = self.start("--backend", "ejabberd", "--ejabberdctl", self.ejabberdctl)
        self.assertEqual(self.create(key)[0], 201)
        self.assertEqual(self.create(key)[0], 403)
        self.assertEqual(self.run_count(), 1)

    def test_backend_failures_are_502_logged_redacted_and_leave_no_record(self):
        key = self.key()
        secretish = "SuperSecretToken1234567890"
        programs = {
            "exit 1": write_program(self.dir, "fails",
                                    f"echo 'Error: it broke, {secretish}' >&2\nexit 1\n"),
            "no URL": write_program(self.dir, "silent", "echo 'all good, honest'\n"),
            "missing": os.path.join(self.dir, "does-not-exist"),
        }
        for case, program in programs.items():
            quiet = ("--quiet",) if case == "exit 1" else ()  # (no access log; failures still)
            proc, port = self.start("--backend", "command", "--backend-command",
                                    f"{program} {{host}}", *quiet)
            status, _, body = self.create(key)
            self.assertEqual(status, 502, case)
            self.assertLess(len(body), 120, case)
            proc.terminate()
            proc.wait(10)
            log = proc.stderr.read()
            self.assertIn("command backend", log, case)
            self.assertNotIn(secretish, log)
            access = re.search(r" GET /invites_api\?key=\S+ 502 [0-9.]+ms$", log, re.M)
            self.assertEqual(bool(access), not quiet, log)
        # `serve` warned about the missing program at start
        self.assertIn("warning: command backend", log)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            self.assertEqual(conn.execute("SELECT count(*) FROM invites").fetchone()[0], 0)
            self.assertEqual(conn.execute("SELECT invites_created FROM keys").fetchone()[0], 0)

    def test_a_stuck_program_and_its_children_are_killed_at_the_timeout(self):
        key = self.key()
        stuck = write_program(self.dir, "stuck", "sleep 30 &\nsleep 30\n")
        proc, port = self.start("--backend", "command", "--backend-command", f"{stuck} {{host}}",
                                "--backend-timeout", "0.5")
        started = time.monotonic()
        status, _, body = self.create(key)
        self.assertEqual(status, 502)
        self.assertIn(b"timed out", body)
        self.assertLess(time.monotonic() - started, 10)  # not the 30 s the program wanted
        self.assertEqual(ia.Store(self.db).read("SELECT count(*) FROM invites")[0][0], 0)

    def test_excess_requests_wait_for_a_slot_then_get_503_with_retry_after(self):
        key = self.key()
        # One slot, and a request waits for it at most 4 s (the --backend-timeout). Run N of the
        # program starts, then runs until the test makes the file go.N.
        runs = os.path.join(self.dir, "runs")
        gated = write_program(self.dir, "gated", (
            f"echo >> {runs}\nn=$(wc -l < {runs})\n"
            f'while [ ! -e {self.dir}/go.$n ]; do sleep 0.02; done\n'
            'echo "https://$1/invite?$(date +%s%N)abcdefghijklmnop"\n'))
        proc, port = self.start("--backend", "command", "--backend-command", f"{gated} {{host}}",
                                "--backend-concurrency", "1", "--backend-timeout", "4")
        results = []

        def started():
            with open(runs) if os.path.exists(runs) else io.StringIO() as f:
                return len(f.readlines())

        def create():
            status, headers, _ = self.create(key)
            results.append((status, headers.get("retry-after")))
        threads = [threading.Thread(target=create) for _ in range(3)]
        threads[0].start()
        wait_until(lambda: started() == 1, "the first request's run holds the slot")
        for t in threads[1:]:
            t.start()
        wait_until(lambda: self.open_connections() == 3, "two more requests wait for the slot")
        # The one of them that gets the slot next has it for 4 s from then: 1 s after the other
        # began to wait, so that one gives up (at 4 s) while the run is still going.
        time.sleep(1)
        open(os.path.join(self.dir, "go.1"), "w").close()
        wait_until(lambda: started() == 2, "a waiting request takes the freed slot")
        wait_until(lambda: len(results) == 2, "the first is answered and the other gives up")
        self.assertEqual(sorted(s for s, _ in results), [201, 503])
        self.assertEqual([r for s, r in results if s == 503], ["5"])
        open(os.path.join(self.dir, "go.2"), "w").close()
        for t in threads:
            t.join(30)
        self.assertEqual(sorted(s for s, _ in results), [201, 201, 503])
        self.assertEqual(started(), 2)

    def test_a_slow_backend_does_not_hold_up_other_clients(self):
        key = self.key()
        slow = write_program(self.dir, "slow",
                             'sleep 3\necho "https://$1/invite?$(date +%s%N)abcdefghijklmnop"\n')
        proc, port = self.start("--backend", "command", "--backend-command", f"{slow} {{host}}")
        results = []
        creating = threading.Thread(
            target=lambda: results.append(self.request("GET", f"/invites_api/?key={key}")[0]))
        creating.start()
        time.sleep(0.3)  # the program is running
        # {"valid": false...}
        self.assertEqual(self.request("GET", "/invite/AAAAAAAAAAAAAAAAAAAAAAAA.json")[0], 200)
        self.assertEqual(self.request("GET", "/health")[0], 200)
        self.assertTrue(creating.is_alive())  # answered while the backend was still minting
        creating.join(30)
        self.assertEqual(results, [201])

    def test_a_host_with_shell_syntax_is_refused_before_anything_runs(self):
        pwned = os.path.join(self.dir, "pwned")
        code, out, err = run_main("--db", self.db, "invites", "create",
                                  f"example.com;touch {pwned}",
                                  "--backend", "command", "--backend-command", "touch {host}")
        self.assertEqual(code, 2)
        self.assertIn("invalid host", err)
        backend = ia.CommandBackend(["sh", "-c", "touch {host}"])
        with self.assertRaises(ia.BadRequest):
            backend.mint({"host": f"example.com;touch {pwned}", "username": None})
        self.assertFalse(os.path.exists(pwned))
        # A valid host is one argv element: no shell ever sees it.
        recorder = write_program(self.dir, "argv", 'printf "%s\\n" "$#" "$@" > '
                                 + os.path.join(self.dir, "argv.txt")
                                 + '\necho "xmpp:$1?register;preauth=abcdefghijklmnopqrstuvwx"\n')
        code, out, err = run_main("--db", self.db, "invites", "create", "example.com", "--backend",
                                  "command", "--backend-command", f"{recorder} {{host}}")
        self.assertEqual(code, 0, err)
        with open(os.path.join(self.dir, "argv.txt")) as f:
            self.assertEqual(f.read(), "1\nexample.com\n")

    def test_the_cli_mints_through_a_backend_too(self):
        code, out, err = run_main("--db", self.db, "invites", "create", "example.com", "--backend",
                                  "ejabberd", "--ejabberdctl", self.ejabberdctl)
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"^https://example\.com/invites/[A-Za-z0-9_-]{24}\n$")
        code, out, err = run_main("--db", self.db, "invites", "create", "example.com", "--backend",
                                  "command", "--backend-command",
                                  f"{self.ejabberdctl} generate_invite {{host}} {{username}}",
                                  "--username", "dave")
        self.assertEqual(code, 0, err)


# ---------------------------------------------------------------------------
# Prosody: its own invites and accounts over its admin socket, on 0.12 and 13
# ---------------------------------------------------------------------------

def prosody_version(program):
    """Return the version of the Prosody a launcher runs: the prosody.version file beside its code.
    """
    with open(program) as f:
        source = re.search(r"^CFG_SOURCEDIR='([^']+)'", f.read(), re.M).group(1)
    with open(os.path.join(source, "prosody.version")) as f:
        return f.read().strip()


def debian_release():
    """Return this system's Debian VERSION_ID ("12", "13"), or None."""
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        return dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', f.read(), re.M)).get("VERSION_ID")
    return None


class AccountAnswersTest(unittest.TestCase):
    """What Prosody's admin shell answers is read strictly: an answer we do not know is a failure.
    """

    def accounts(self, answer):
        prosody = ia.ProsodyBackend(socket=os.devnull)
        # (what the admin shell answered, as JSON reads)
        prosody.lua = mock.Mock(return_value=answer)
        return prosody

    def test_only_done_is_success_and_anything_unknown_fails(self):
        self.assertIsNone(self.accounts({"outcome": "done"}).create("example.com", "alice",
                                                                    "a long password"))
        for answer, error, words in (
                ({"outcome": "taken"}, ia.Conflict, "is taken"),
                ("", ia.BackendError, "answer we do not know"),
                ({"outcome": "ok"}, ia.BackendError, "answer we do not know"),
                # (a word, not Prosody's object)
                ("done", ia.BackendError, "answer we do not know"),
                ({"outcome": "nohost"}, ia.BackendError,
                 "example.com is not a host of this Prosody"),
                ({"outcome": "refused", "reason": "Password fails SASLprep."}, ia.BadRequest,
                 "refused the password"),
                ({"outcome": "refused", "reason": "database is locked"}, ia.BackendError,
                 "could not do it")):
            with self.assertRaises(error) as caught:
                self.accounts(answer).create("example.com", "alice", "a long password")
            self.assertIn(words, str(caught.exception), answer)
            self.assertNotIn("a long password", str(caught.exception))
        with self.assertRaises(ia.BackendError):
            self.accounts({"outcome": "maybe"}).reset("example.com", "alice", "a long password")

    def test_the_admin_shell_answers_json_and_anything_else_fails(self):
        prosody = ia.ProsodyBackend(socket=os.devnull)
        prosody.admin = mock.Mock()
        prosody.admin.run.return_value = 'OK: {"outcome":"done","mark":"m1"}'
        self.assertEqual(prosody.mark("example.com", "alice"), "m1")
        prosody.admin.run.return_value = 'OK: ["example.com","example.org"]'
        self.assertEqual(prosody.lua("hosts"), ["example.com", "example.org"])
        # (text, as the Lua answered before it spoke JSON)
        prosody.admin.run.return_value = "OK: done"
        with self.assertRaises(ia.BackendError) as caught:
            prosody.lua("hosts")
        self.assertIn("an answer we do not know: 'done'", str(caught.exception))


class ProsodyTest(ServerProcessMixin, TempDirTestCase):
    """Against Debian's real Prosody: every invite we return must be one Prosody accepts."""

    HOST = "example.test"
    MODULES = ('"admin_shell", "http", "invites", "invites_page", "register_apps", "saslauth", '
               '"register", "invites_register", "roster"')

    def setUp(self):
        super().setUp()
        self.prosody = self.prosody_program()
        self.version = prosody_version(self.prosody)
        self.prosodyctl = require_program("prosodyctl")
        home = os.path.join(self.dir, "prosody")
        os.makedirs(os.path.join(home, "data"))
        os.makedirs(os.path.join(home, "certs"))
        self.http_port, self.c2s_port = free_port(), free_port()
        self.config = os.path.join(home, "prosody.cfg.lua")
        with open(self.config, "w") as f:
            f.write(f"""
pidfile = "{home}/prosody.pid"
data_path = "{home}/data"
certificates = "{home}/certs"
admin_socket = "{home}/prosody.sock"
daemonize = false
log = {{ info = "{home}/prosody.log" }}
modules_enabled = {{ {self.MODULES} }}
allow_registration = true
c2s_require_encryption = false
c2s_ports = {{ {self.c2s_port} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{}}
component_ports = {{}}
http_ports = {{ {self.http_port} }}
http_interfaces = {{ "127.0.0.1" }}
https_ports = {{}}
http_default_host = "{self.HOST}"
http_external_url = "http://127.0.0.1:{self.http_port}/"
VirtualHost "{self.HOST}"
VirtualHost "plain.test"
modules_disabled = {{ "invites_page" }}
""")
        self.home = home
        self.start_prosody()
        self.addCleanup(self.stop_prosody)

    def prosody_program(self):
        return require_program("prosody")

    def start_prosody(self):
        user = {}
        if os.geteuid() == 0:  # Prosody refuses to run as root: use its own user
            os.chmod(self.dir, 0o755)
            for root, dirs, files in os.walk(self.home):
                for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                    shutil.chown(name, "prosody", "prosody")
            # (Popen's own setuid, not runuser: runuser stops itself when Prosody is stopped, and
            # then neither dies of SIGTERM nor lets Prosody go; SIGKILLed, it left Prosody running)
            user = {"user": "prosody", "group": "prosody", "extra_groups": []}
        self.server = subprocess.Popen([self.prosody, "--config", self.config],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env=dict(os.environ, HOME=self.home), **user)
        deadline = time.monotonic() + 20
        while True:  # until its admin socket accepts (the file appears just before it listens)
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(os.path.join(self.home, "prosody.sock"))
                break
            except OSError:
                if time.monotonic() > deadline or self.server.poll() is not None:
                    self.fail("Prosody did not start")
                time.sleep(0.1)

    def stop_prosody(self):
        if self.server.poll() is not None:
            return
        self.server.terminate()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()

    def login(self, user, password):
        """Return whether a real XMPP client logs in as user@HOST with this password."""
        return logs_in(self.c2s_port, self.HOST, user, password)

    def prosody_page(self, url):
        """Return (status, page text, headers) of Prosody's own invite page at an URL on its HTTP
        port."""
        status, headers, page = http_request(self.http_port, "GET",
                                             url.split(f"127.0.0.1:{self.http_port}", 1)[1])
        return status, page.decode(), headers

    def assert_valid_at_prosody(self, url, username=None):
        self.assertRegex(url, rf"^http://127\.0\.0\.1:{self.http_port}/invites_page"
                              r"\?[A-Za-z0-9_-]{24}$")
        status, page, headers = self.prosody_page(url)
        self.assertEqual(status, 200)
        self.assertNotIn("Invite expired", page)
        token = url.rsplit("?", 1)[1]
        jid = f"{username}@{self.HOST}" if username else self.HOST
        self.assertEqual(headers.get("link"),
                         f'<xmpp:{jid}?register;preauth={token}>; rel="alternate"')

    def test_invites_minted_through_our_api_are_valid_in_prosody(self):
        store = ia.Store(self.db)
        key = ia.create_key(store, self.HOST, "prosody")
        store.close()
        # A prosodyctl first on PATH that records being run: the admin socket is used, no process at
        # all.
        ran = os.path.join(self.dir, "prosodyctl-ran")
        os.mkdir(os.path.join(self.dir, "bin"))
        write_program(os.path.join(self.dir, "bin"), "prosodyctl", f"echo ran >> '{ran}'\nexit 1\n")
        env = dict(os.environ, INVITES_API_DB=self.db,
                   PATH=os.path.join(self.dir, "bin") + os.pathsep + os.environ["PATH"])
        proc = subprocess.Popen([sys.executable, SCRIPT, "serve", "--port", "0", "--backend",
                                 "prosody", "--prosody-config", self.config],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self.addCleanup(self.reap, proc)
        line = wait_for_line(proc.stdout)
        self.assertRegex(line,
                         rf"prosody backend {re.escape(self.version)}, through its admin socket "
                         r".*/prosody\.sock\)")
        self.port = int(re.search(r"http://127\.0\.0\.1:(\d+)/invites_api", line).group(1))

        def create(_):
            status, headers, _ = self.create(key)
            return status, headers.get("location")
        status, url = create(0)
        self.assertEqual(status, 201)
        self.assert_valid_at_prosody(url)
        # A token we did not mint gets Prosody's expired page.
        page = self.prosody_page(url.rsplit("?", 1)[0] + "?" + "A" * 24)[1]
        self.assertIn("Invite expired", page)
        # 20 concurrent requests: 20 distinct invites, each valid in Prosody.
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(create, range(20)))
        self.assertEqual([s for s, _ in results], [201] * 20)
        urls = {u for _, u in results}
        self.assertEqual(len(urls), 20)
        for url in urls:
            self.assert_valid_at_prosody(url)
        recorded = ia.Store(self.db).read(
            "SELECT count(*) FROM invites WHERE backend = 'prosody'")[0][0]
        self.assertEqual(recorded, 21)
        # Prosody restarts: the next invite is minted over a new connection.
        self.stop_prosody()
        self.start_prosody()
        status, url = create(0)
        self.assertEqual(status, 201)
        self.assert_valid_at_prosody(url)
        self.assertFalse(os.path.exists(ran), "prosodyctl was run")
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        self.assertNotIn("warning", proc.stderr.read())

    def test_five_invites_minted_through_us_end_in_accounts_a_real_client_logs_into(self):
        key = self.make_key_for(self.HOST)
        proc, port = self.start("--backend", "prosody", "--prosody-config", self.config)
        for i in range(5):
            invite = json.loads(self.create(key, headers={"Accept": "application/json"})[2])
            token, password = invite["token"], f"a long password {i}"
            self.assertEqual(invite["uri"], f"xmpp:{self.HOST}?register;preauth={token}")
            client = Xmpp(self.c2s_port, self.HOST)  # XEP-0401 preauth, XEP-0077 registration
            self.assertEqual(client.register(token, f"member{i}", password), ("result", "result"))
            client.close()
            client = Xmpp(self.c2s_port, self.HOST)  # SASL SCRAM-SHA-1 as the new account
            self.assertTrue(client.login(f"member{i}", password))
            client.close()
            client = Xmpp(self.c2s_port, self.HOST)  # the used invite makes no second account
            self.assertEqual(client.register(token, f"other{i}", password), ("error", "error"))
            client.close()
            client = Xmpp(self.c2s_port, self.HOST)
            self.assertFalse(client.login(f"other{i}", password))
            client.close()
        client = Xmpp(self.c2s_port, self.HOST)
        self.assertFalse(client.login("member0", "a wrong password"))
        client.close()
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)

    def cli(self, *argv, status=0):
        """Run the command line in-process; return its stdout (status 1: its stderr)."""
        code, out, err = run_main("--db", self.db, *argv)
        self.assertEqual(code, status, err)
        return err if status else out

    def show(self, token, host=None):
        # (Prosody's tokens may begin with "-": after "--" they are not taken for options)
        return json.loads(self.cli("invites", "show", "--json", "--prosody-config", self.config,
                                   "--", host or self.HOST, token))

    def test_ttl_resets_state_and_revocation_go_through_prosody(self):
        key = self.make_key_for(self.HOST)
        proc, port = self.start("--backend", "prosody", "--prosody-config", self.config)

        def api(method, path, status=201):
            answer, _, body = self.request(method, path, {"Accept": "application/json"})
            self.assertEqual(answer, status, body)
            return json.loads(body) if body else None
        # ttl is honoured by Prosody itself: its own page says expired after it.
        short = api("GET", f"/invites_api?key={key}&ttl=3")
        self.assertEqual(api("GET", f"/invites_api/invites/{short['token']}?key={key}",
                             200)["status"], "valid")
        # Prosody used it: our records say so (CLI and API), and a used invite makes no account.
        invite = api("GET", f"/invites_api?key={key}")
        self.assertEqual(self.show(invite["token"])["status"], "valid")
        # Prosody's page, not ours
        self.assertEqual(self.show(invite["token"])["url"], invite["url"])
        client = Xmpp(self.c2s_port, self.HOST)
        self.assertEqual(client.register(invite["token"], "rita", "an old password"),
                         ("result", "result"))
        client.close()
        self.assertEqual(self.show(invite["token"])["status"], "used")
        self.assertEqual(api("GET", f"/invites_api/invites/{invite['token']}?key={key}",
                             200)["status"], "used")
        self.assertEqual(ia.invite_by_token(ia.Store(self.db), invite["token"])["uses_left"], 0)
        # A password reset: a day by default, the new password works and the old one no longer does.
        url = self.cli("invites", "create", self.HOST, "--reset", "rita", "--backend", "prosody",
                       "--prosody-config", self.config).strip()
        self.assert_valid_at_prosody(url, username="rita")
        reset = ia.invite_by_token(ia.Store(self.db), url.rsplit("?", 1)[1])
        self.assertEqual((reset["type"], reset["expires_at"] - reset["created_at"]),
                         ("reset", 86400))
        client = Xmpp(self.c2s_port, self.HOST)
        self.assertEqual(client.register(reset["token"], "rita", "a new password"),
                         ("result", "result"))
        client.close()
        for password, works in (("a new password", True), ("an old password", False)):
            client = Xmpp(self.c2s_port, self.HOST)
            self.assertEqual(client.login("rita", password), works)
            client.close()
        self.assertEqual(api("GET", f"/invites_api?key={key}&type=reset&username=rita")["type"],
                         "reset")
        api("GET", f"/invites_api?key={key}&type=reset", 400)  # a reset names its account
        api("GET", f"/invites_api?key={key}&uses=2", 400)  # Prosody's invites are single-use
        # Revoking deletes it in Prosody.
        doomed = api("GET", f"/invites_api?key={key}")
        self.cli("invites", "revoke", "--prosody-config", self.config, "--", self.HOST,
                 doomed["token"])
        self.assertIn("Invite expired", self.prosody_page(doomed["url"])[1])
        self.assertEqual(self.show(doomed["token"])["status"], "revoked")
        wait_until(lambda: "Invite expired" in self.prosody_page(short["url"])[1],
                   "Prosody's page says the 3 s invite expired")
        self.assertEqual(self.show(short["token"])["status"], "expired")
        # Prosody cannot be asked: never "valid" on our word alone.
        pending = api("GET", f"/invites_api?key={key}")
        self.stop_prosody()
        self.assertEqual(self.show(pending["token"])["status"], "unknown")
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)

    def test_roles_on_13_refused_on_0_12_ttl_and_resets(self):
        key = self.make_key_for(self.HOST)
        proc, port = self.start("--backend", "prosody", "--prosody-config", self.config)
        self.assertIn(f"prosody backend {self.version},", self.banner)

        def api(query, status=201):
            answer, _, body = self.create(key, query, {"Accept": "application/json"})
            self.assertEqual(answer, status, body)
            return json.loads(body)
        admin = ia.ProsodyAdmin(os.path.join(self.home, "prosody.sock"))
        self.addCleanup(admin.close)

        def role(user):
            return admin.run(">return true, "
                             f"require'core.usermanager'.get_user_role({ia.lua_string(user)}, "
                             f"{ia.lua_string(self.HOST)}).name").partition("OK: ")[2]
        if self.version.startswith("0."):  # 0.12 has no roles: refused, with the reason
            self.assertIn(f"on Prosody {self.version}: roles and groups need Prosody 13",
                          api("&roles=prosody:member", 400)["error"])
            self.assertIn("roles and groups need Prosody 13", api("&groups=team", 400)["error"])
            invite = api("")
            client = Xmpp(self.c2s_port, self.HOST)
            self.assertEqual(client.register(invite["token"], "member", "a long password"),
                             ("result", "result"))
            client.close()
        else:
            for roles, expected in (("prosody:member", "prosody:member"),
                                    (None, "prosody:registered")):
                invite = api(f"&roles={roles}" if roles else "")
                user = "member" if roles else "plain"
                client = Xmpp(self.c2s_port, self.HOST)
                self.assertEqual(client.register(invite["token"], user, "a long password"),
                                 ("result", "result"))
                client.close()
                self.assertEqual(role(user), expected)
            self.assertIn("mod_invites_groups", api("&groups=team", 400)["error"])
        short = api("&ttl=2")
        status = ">" + ia._PROSODY_LUA["status"].format(host=ia.lua_string(self.HOST),
                                                        token=ia.lua_string(short["token"]))
        self.assertEqual(admin.run(status), 'OK: "valid"')  # (JSON: util.json's)
        reset = api("&type=reset&username=member")
        client = Xmpp(self.c2s_port, self.HOST)
        self.assertEqual(client.register(reset["token"], "member", "a new password"),
                         ("result", "result"))
        client.close()
        client = Xmpp(self.c2s_port, self.HOST)
        self.assertTrue(client.login("member", "a new password"))
        client.close()
        self.assertEqual(self.show(reset["token"])["status"], "used")
        wait_until(lambda: admin.run(status) == 'OK: "token-expired"',
                   "Prosody itself honours the 2 s ttl")
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)

    def test_without_prosodys_invite_page_location_is_our_page_and_serve_warns(self):
        key = self.make_key_for("plain.test")
        proc, port = self.start("--backend", "prosody", "--prosody-config", self.config)
        location = self.create(key)[1]["location"]
        self.assertRegex(location, rf"^http://127\.0\.0\.1:{port}/invite\?[A-Za-z0-9_-]{{24}}$")
        token = location.rsplit("?", 1)[1]
        status, _, page = self.request("GET", location[location.index("/invite"):])
        self.assertEqual(status, 200)
        self.assertIn(f"xmpp:plain.test?register;preauth={token}", page.decode())
        client = Xmpp(self.c2s_port, "plain.test")  # the page's URI works in an app
        self.assertEqual(client.register(token, "uma", "a long password"), ("result", "result"))
        client.close()
        status = self.request("GET", location[location.index("/invite"):])[0]
        self.assertEqual(status, 410)  # used, as Prosody says
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        self.assertIn("warning: prosody backend: plain.test lacks mod_invites_page",
                      proc.stderr.read())

    def test_sign_up_from_our_page_makes_real_accounts(self):
        # Built-in invites (no --backend), accounts created in Prosody through its admin socket.
        key = self.make_key_for(self.HOST)
        proc, port = self.start("--accounts", "prosody", "--prosody-config", self.config)
        self.assertIn("accounts made by prosody", self.banner)

        def send(method, path, form=None, headers=None):
            body = "&".join(f"{k}={quote(v, safe='')}" for k, v
                            in form.items()) if form is not None else None
            status, answer, page = self.request(method, path, {
                **({"Content-Type": "application/x-www-form-urlencoded"} if form is not None
                   else {}), **(headers or {})}, body)
            if status == 303:  # after a sign-up, the page it leads to
                return send("GET", answer["location"].split(str(port), 1)[1])
            return status, page.decode(), answer.get("content-security-policy")

        def mint(query=""):
            return json.loads(self.create(key, query, {"Accept": "application/json"})[2])["token"]

        token = mint()
        status, page, _ = send("GET", f"/invite?{token}")
        self.assertIn(f'href="http://127.0.0.1:{port}/register?t={token}">Create your account',
                      page)
        status, page, csp = send("GET", f"/register?t={token}")
        self.assertEqual(status, 200)
        self.assertIn("form-action 'self'", csp)
        for field in ('name="user"', 'name="password"', 'name="password_confirm"',
                      f'name="token" value="{token}"'):
            self.assertIn(field, page)
        form = {"token": token, "user": "Alice", "password": "a long password",
                "password_confirm": "a long password"}
        self.assertEqual(send("POST", "/register", dict(form, password_confirm="another one"))[0],
                         400)
        self.assertEqual(send("POST", "/register", dict(form, user="a b"))[0], 400)
        self.assertEqual(send("POST", "/register", form, {"Origin": "https://evil.example"})[0],
                         403)
        status, page, _ = send("POST", "/register", form)
        self.assertEqual(status, 200, page)
        self.assertIn(f"Your account alice@{self.HOST} is ready", page)
        self.assertTrue(self.login("alice", "a long password"))
        # The used invite: 410, and no account made.
        self.assertEqual(send("POST", "/register", dict(form, user="bob"))[0], 410)
        self.assertFalse(self.login("bob", "a long password"))
        self.assertEqual(send("GET", f"/register?t={token}")[0], 410)
        # A taken name: the form again, and the invite is still there to use.
        second = mint()
        status, page, _ = send("POST", "/register", dict(form, token=second))
        self.assertEqual(status, 409)
        self.assertIn("taken; choose another name", page)
        self.assertIn('value="alice"', page.lower())
        self.assertEqual(send("POST", "/register", dict(form, token=second, user="carol"))[0], 200)
        self.assertTrue(self.login("carol", "a long password"))
        shown = self.show(token)
        self.assertEqual([a["jid"] for a in shown["accounts"]], [f"alice@{self.HOST}"])
        # A password reset from the built-in store: the new password works, the old one no longer.
        self.assertIn("cannot make password-reset invites without --accounts", self.cli(
            "invites", "create", self.HOST, "--reset", "alice",  # who can say alice exists?
            status=1))
        self.assertIn("there is no account ghost@",
                      self.cli("invites", "create", self.HOST, "--reset", "ghost",
                               "--accounts", "prosody", "--prosody-config",
                               self.config, status=1))
        url = self.cli("invites", "create", self.HOST, "--reset", "alice", "--accounts", "prosody",
                       "--prosody-config", self.config).strip()
        reset = url.rsplit("?", 1)[1]
        status, page, _ = send("GET", f"/register?t={reset}")
        self.assertIn(f"Set a new password for alice@{self.HOST}", page)
        status, page, _ = send("POST", "/register", {"token": reset, "password": "a new password",
                                                     "password_confirm": "a new password"})
        self.assertEqual(status, 200, page)
        self.assertTrue(self.login("alice", "a new password"))
        self.assertFalse(self.login("alice", "a long password"))
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)

    def test_an_invitee_signs_up_in_chromium_and_logs_in_with_a_real_client(self):
        key = self.make_key_for(self.HOST)
        proc, port = self.start("--accounts", "prosody", "--prosody-config", self.config)

        def reset(user):
            return self.cli("invites", "create", self.HOST, "--reset", user, "--accounts",
                            "prosody", "--prosody-config", self.config, "--public-url",
                            f"http://127.0.0.1:{port}").strip()
        passwords = journey_passwords()
        secrets = passwords + (key.split("/")[1],)
        with contextlib.closing(ArgvWatch(*secrets)) as watch:
            token = browser_journey(self, port, key, self.HOST, self.login, reset,
                                    screenshot_dir(self, f"prosody-{self.version}"), passwords)
        self.assertEqual(watch.seen, [])
        self.assertGreater(watch.samples, 10)
        # the cross-site post used nothing
        self.assertTrue(ia.check_invite(ia.Store(self.db), token)["valid"])
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        log = proc.stderr.read()
        for secret in secrets + (token,):
            self.assertNotIn(secret, log)

    def test_a_creation_prosody_answers_too_late_is_never_sent_again_and_keeps_its_use(self):
        key = self.make_key_for(self.HOST)
        proc, port = self.start("--accounts", "prosody", "--prosody-config", self.config,
                                "--backend-timeout", "1")
        token = self.mint(key)
        pid = self.server.pid
        self.assertEqual(listening_unix_pids(os.path.join(self.home, "prosody.sock")), [pid])
        stop_process(self, pid)  # a Prosody that is really slow: it answers nothing until continued
        form = {"token": token, "user": "slow", "password": "a long password",
                "password_confirm": "a long password"}
        seen = {"listening": listening_unix_pids(os.path.join(self.home, "prosody.sock")),
                "Prosody before": thread_states(pid)}
        started = time.monotonic()
        status, page = self.post_form(form)
        seen.update({"Prosody after": thread_states(pid),
                     "after s": round(time.monotonic() - started, 3)})
        # (after the answer: its timeout, however long the machine took)
        os.kill(pid, signal.SIGCONT)
        if status != 502:  # (what answered, for the failure to explain itself)
            proc.terminate()
            self.fail(f"a stopped Prosody answered {status}: {seen}; serve said "
                      f"{proc.stderr.read()[-2000:]!r}")
        self.assertIn("cannot tell whether it was done", page)
        self.assertNotIn("taken", page)
        # kept: it may have been made
        self.assertEqual(ia.invite_by_token(ia.Store(self.db), token)["uses_left"], 0)

        def logs_in():
            client = Xmpp(self.c2s_port, self.HOST)
            try:
                return client.login("slow", "a long password")
            finally:
                client.close()
        wait_until(logs_in, "the account was made (Prosody ran the one command it was sent)")
        self.assertEqual(self.post_form(dict(form, user="second"))[0], 410)  # no second account
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        self.assertNotIn("a long password", proc.stderr.read())

    def test_a_key_for_a_host_prosody_does_not_serve_is_named_at_start_and_at_sign_up(self):
        key = self.make_key_for("exmaple.test")
        proc, port = self.start("--accounts", "prosody", "--prosody-config", self.config)
        self.assertIn("--accounts prosody: exmaple.test is not a host of this Prosody",
                      wait_for_line(proc.stderr))
        token = self.mint(key)
        status, page = self.post_form({"token": token, "user": "alice",
                                       "password": "a long password",
                                       "password_confirm": "a long password"})
        self.assertEqual(status, 502)
        self.assertIn("could not do it just now", page)
        self.assertEqual(ia.invite_by_token(ia.Store(self.db), token)["uses_left"], 1)
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        log = proc.stderr.read()
        self.assertIn("exmaple.test is not a host of this Prosody", log)
        self.assertNotIn("attempt to index a nil value", log)

    def test_a_reset_never_sets_the_password_of_an_account_made_after_it(self):
        self.make_key_for(self.HOST)
        proc, port = self.start("--accounts", "prosody", "--prosody-config", self.config)
        admin = ia.ProsodyAdmin(os.path.join(self.home, "prosody.sock"))
        self.addCleanup(admin.close)

        def users(call, *args):
            values = ", ".join(ia.lua_string(a) for a in args + (self.HOST,))
            return admin.run(f">return true, tostring(require'core.usermanager'.{call}({values}))")

        post = self.post_form
        users("create_user", "dora", "dora's first password")
        url = self.cli("invites", "create", self.HOST, "--reset", "dora", "--accounts", "prosody",
                       "--prosody-config", self.config).strip()
        reset = url.rsplit("?", 1)[1]
        # Deleted and made again in Prosody itself, in the same second: another account, whose mark
        # is not the reset's (Prosody deletes an account's storage with it).
        users("delete_user", "dora")
        self.assertIn("true", users("create_user", "dora", "someone else's password"))
        status, page = post({"token": reset, "password": "the reset's password", "password_confirm":
                             "the reset's password"})
        self.assertEqual(status, 403, page)
        self.assertIn(f"made for an earlier account named dora@{self.HOST}", page)
        for password, works in (("someone else's password", True), ("the reset's password", False)):
            client = Xmpp(self.c2s_port, self.HOST)
            self.assertEqual(client.login("dora", password), works)
            client.close()
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)

    def test_a_stolen_database_opens_nothing_and_every_link_handed_out_still_works(self):
        # Issue 31, as an attacker who copied the database file (and its WAL) from a running server.
        key = self.make_key_for(self.HOST)
        self.cli("update", self.HOST, key.split("/")[0], "--max-uses", "3")
        proc, port = self.start("--accounts", "prosody", "--prosody-config", self.config)
        origin = f"http://127.0.0.1:{port}"

        def api(query):
            status, _, body = self.request("GET", f"/invites_api?key={key}{query}",
                                           {"Accept": "application/json"})
            self.assertEqual(status, 201, body)
            return json.loads(body)
        # Handed out: what the API answered, a page the bookmark led to, what the command line
        # printed.
        person = Invitee(self, screenshot_dir(self, f"prosody-{self.version}-stolen"))
        self.assertEqual(person.sign_up(f"{origin}/invites_api?key={key}&redirect=true", "alice",
                                        "alice's first one"), 200)
        alice_url = person.page.url.split("&account=")[0]  # (the done page: /register?t=TOKEN)
        self.assertTrue(self.login("alice", "alice's first one"))
        minted = [api(""), api("&uses=3"), api("&username=bob"), api("&type=reset&username=alice")]
        reset_url = self.cli("invites", "create", self.HOST, "--reset", "alice", "--accounts",
                             "prosody",
                             "--prosody-config", self.config, "--public-url", origin).strip()
        handed_out = [alice_url, reset_url] + [i[field] for i in minted for field
                                               in ("token", "uri", "url")]
        tokens = [alice_url.rsplit("=", 1)[1], reset_url.rsplit("?", 1)[1]] + [i["token"] for i
                                                                               in minted]
        # The copy, taken while serve runs.
        stolen = os.path.join(self.dir, "stolen")
        os.mkdir(stolen)
        for suffix in ("", "-wal"):
            if os.path.exists(self.db + suffix):
                shutil.copy(self.db + suffix, os.path.join(stolen, "invites.db" + suffix))
        data = database_bytes(os.path.join(stolen, "invites.db"))
        self.assertGreater(len(data), 8192)
        # (not assertNotIn: it would print the file)
        for secret in handed_out + [t[-16:] for t in tokens]:
            self.assertFalse(secret.encode() in data, f"{secret} is in the stolen database")
        # Everything the copy holds that could pass for a token (an invite's id above all) opens
        # nothing.
        with contextlib.closing(sqlite3.connect(os.path.join(stolen, "invites.db"))) as conn:
            values = {value for table in ("keys", "invites", "accounts", "meta")
                      for row in conn.execute(f"SELECT * FROM {table}") for value in row
                      if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_-]{12,128}", value)}
            ids = {row[0] for row in conn.execute("SELECT id FROM invites")}
        self.assertEqual(ids, {ia.invite_id(t) for t in tokens})
        self.assertGreaterEqual(len(values), len(ids))
        for value in values:
            self.assertEqual(self.request("GET", f"/invite?{value}")[0], 404, value)
            self.assertEqual(self.request("GET", f"/register?t={value}")[0], 404, value)
            self.assertFalse(json.loads(self.request("GET", f"/invite/{value}.json")[2])["valid"],
                             value)
        for invite_id in sorted(ids)[:3]:  # (sign-ups are 10 a minute from one address)
            form = {"token": invite_id, "user": "mallory", "password": "mallory's password",
                    "password_confirm": "mallory's password"}
            self.assertEqual(self.post_form(form)[0], 404)
        self.assertFalse(self.login("mallory", "mallory's password"))
        # Every link handed out still works, in the browser: bob's invite, then alice's reset.
        self.assertEqual(person.sign_up(minted[2]["url"], None, "bob's password"), 200)
        self.assertIn(f"Your account bob@{self.HOST} is ready", person.text())
        self.assertTrue(self.login("bob", "bob's password"))
        person.page.goto(reset_url)
        person.page.click("a.button")  # "Set a new password"
        self.assertEqual(person.submit(None, "alice's new one"), 200)
        self.assertIn("Your new password is set", person.text())
        self.assertTrue(self.login("alice", "alice's new one"))
        self.assertFalse(self.login("alice", "alice's first one"))
        for invite in minted[:2]:  # (and the others still open their pages)
            self.assertEqual(self.request("GET", invite["url"].split(origin, 1)[1])[0], 200)
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        log = proc.stderr.read()
        for token in tokens:
            self.assertNotIn(token, log)

    def make_key_for(self, host):
        store = ia.Store(self.db)
        key = ia.create_key(store, host, may_reset=1)
        store.close()
        return key

    def test_a_contact_invite_ends_with_the_inviter_and_the_newcomer_each_others_contacts(self):
        prosody = ia.ProsodyBackend(self.config)
        self.addCleanup(prosody.admin.close)
        word = ia._random_id(6)
        alices, bobs, daves = (f"{who}'s password {word}" for who in ("alice", "bob", "dave"))
        prosody.create(self.HOST, "alice", alices)
        prosody.create(self.HOST, "carol", "carol's password")
        code, out, err = run_main("--db", self.db, "create", self.HOST, "--inviter", "ghost",
                                  "--accounts", "prosody", "--prosody-config", self.config)
        self.assertEqual((code, out, err),
                         (1, "", f"error: ghost@{self.HOST} has no account: a contact invite is "
                                 "from an account (make it first)\n"))
        key = self.cli("create", self.HOST, "alice's bookmark", "--inviter", "alice", "--accounts",
                       "prosody", "--prosody-config", self.config).strip()
        proc, port = self.start("--accounts", "prosody", "--prosody-config", self.config)
        # online while bob signs up
        alice = XmppClient(self, self.c2s_port, f"alice@{self.HOST}", alices)
        person = Invitee(self, screenshot_dir(self, f"prosody-{self.version}-contact"))
        bookmark = f"http://127.0.0.1:{port}/invites_api?key={key}&redirect=true"
        person.page.goto(bookmark)
        text = person.text()
        self.assertIn(f"alice@{self.HOST} invited you to join {self.HOST}", text)
        self.assertIn("I already have an XMPP account", text)
        self.assertIn(f"alice@{self.HOST} will be asked to approve", text)
        self.assertEqual(person.page.get_attribute(f'a[href^="xmpp:alice@{self.HOST}"]', "href"),
                         f"xmpp:alice@{self.HOST}?roster")
        person.look("invite")
        person.accessible("the contact invite's page")
        person.page.click("a.button")  # "Create your account"
        person.accessible("the sign-up form")
        # (refused: the form again)
        self.assertEqual(person.submit("bob", bobs, "another long one"), 400)
        person.accessible("the form with its reason")
        self.assertEqual(person.submit("bob", bobs), 200)
        self.assertIn(f"alice@{self.HOST}, who invited you, is in your contacts", person.text())
        person.look("done")
        person.accessible("the done page")
        self.assertEqual(roster_of(self, self.c2s_port, f"bob@{self.HOST}", bobs),
                         {f"alice@{self.HOST}": "both"})
        self.assertEqual(alice.roster(), {f"bob@{self.HOST}": "both"})
        self.assertIn({f"bob@{self.HOST}": "both"}, alice.pushes)  # (she was told while online)
        token = person.page.url.split("t=", 1)[1].split("&", 1)[0]
        shown = json.loads(self.cli("invites", "show", self.HOST, token, "--json"))
        self.assertEqual((shown["inviter"], shown["accounts"][0]["contact"]),
                         (f"alice@{self.HOST}", "made"))
        # An inviter deleted since the key was made: the account is made all the same, the page says
        # so.
        self.cli("update", self.HOST, key.split("/")[0], "--inviter", "carol")
        subprocess.run(["runuser", "-u", "prosody", "--", self.prosodyctl, "--config", self.config,
                        "deluser",
                        f"carol@{self.HOST}"], check=True, capture_output=True, timeout=60)
        person.page.goto(bookmark)
        person.page.click("a.button")
        self.assertEqual(person.submit("dave", daves), 200)
        self.assertIn(f"We could not add carol@{self.HOST}, who invited you, to your contacts",
                      person.text())
        person.accessible("the done page without the contact")
        person.page.goto(f"http://127.0.0.1:{port}/invite?" + "Z" * 24)
        person.accessible("an unknown invite's 404 page")
        self.assertEqual(roster_of(self, self.c2s_port, f"dave@{self.HOST}", daves), {})
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        log = proc.stderr.read()
        self.assertIn(f"sign-up of dave@{self.HOST}: the contact with carol@{self.HOST} was not "
                      "made", log)
        for secret in (alices, bobs, daves, key.split("/")[1]):
            self.assertNotIn(secret, log)
        # serve says so at start
        proc, port = self.start("--accounts", "prosody", "--prosody-config", self.config)
        self.assertEqual(wait_for_line(proc.stderr),
                         f"warning: keys with --inviter carol for {self.HOST}: carol@{self.HOST} "
                         "has no account: a contact invite is from an account (make it first)\n")

    def test_prosodys_own_contact_invite_befriends_at_registration(self):
        prosody = ia.ProsodyBackend(self.config)
        self.addCleanup(prosody.admin.close)
        prosody.create(self.HOST, "alice", "alice's password")
        key = self.cli("create", self.HOST, "--inviter", "alice", "--backend", "prosody",
                       "--prosody-config", self.config).strip()
        proc, port = self.start("--backend", "prosody", "--prosody-config", self.config)
        status, headers, body = self.create(key, headers={"Accept": "application/json"})
        self.assertEqual(status, 201, body)
        invite = json.loads(body)
        self.assertEqual(invite["inviter"], f"alice@{self.HOST}")
        self.assertRegex(invite["uri"], rf"^xmpp:alice@{re.escape(self.HOST)}"
                                        r"\?roster;preauth=[A-Za-z0-9_-]+;ibr=y$")
        # (no mod_invites_page: ours)
        if not invite["url"].startswith(f"http://127.0.0.1:{self.http_port}/"):
            page = html.unescape(self.request("GET", f"/invite?{invite['token']}")[2].decode())
            self.assertIn(f"alice@{self.HOST} invited you to join {self.HOST}", page)
            self.assertIn("You are added to each other's contacts at once", page)
            # for apps, and for an account
            self.assertEqual(page.count(f'href="{invite["uri"]}"'), 2)
        # A newcomer's app registers with the invite's token (XEP-0401, Prosody's own contact
        # invite)...
        client = Xmpp(self.c2s_port, self.HOST)
        try:
            self.assertEqual(client.register(invite["token"], "erin", "erin's password"),
                             ("result", "result"))
        finally:
            client.close()
        # ... and Prosody made them contacts.
        self.assertEqual(roster_of(self, self.c2s_port, f"erin@{self.HOST}", "erin's password"),
                         {f"alice@{self.HOST}": "both"})
        self.assertEqual(roster_of(self, self.c2s_port, f"alice@{self.HOST}", "alice's password"),
                         {f"erin@{self.HOST}": "both"})
        # A username-bound invite cannot be a contact invite of Prosody's: refused, with the reason.
        status, _, body = self.create(key, "&username=frank")
        self.assertEqual(status, 400)
        self.assertIn(b"contact invites cannot be bound to a username", body)

    def test_values_reach_prosody_as_quoted_lua_strings(self):
        admin = ia.ProsodyAdmin(os.path.join(self.dir, "prosody", "prosody.sock"))
        self.addCleanup(admin.close)
        for text in ('a"); os.exit(1) --', "back\\slash ]] [[", "line\nbreak", "алиса", "<x>&amp;"):
            self.assertEqual(admin.run(f">{ia.lua_string(text)}"), f"Result: {text}")
        with self.assertRaises(ia.BackendError) as raised:
            admin.run("no_such_function()")
        self.assertIn("attempt to call a nil value", str(raised.exception))
        backend = ia.ProsodyBackend(self.config)
        self.addCleanup(backend.admin.close)
        self.assertIsNone(backend.check())
        with self.assertRaises(ia.BadRequest):  # never reaches Prosody
            ia.create_invite(ia.Store(self.db), host=self.HOST,
                             options={"username": 'x")os.exit()--'}, backend=backend)
        self.assertTrue(self.server.poll() is None)  # Prosody still runs

    def test_a_username_bound_invite_and_a_host_prosody_does_not_serve(self):
        store = ia.Store(self.db)
        ia.create_key(store, self.HOST)
        backend = ia.ProsodyBackend(self.config)
        self.addCleanup(backend.admin.close)
        self.assertIsNone(backend.check())
        invite = ia.create_invite(store, host=self.HOST, options={"username": "erin"},
                                  backend=backend)
        self.assert_valid_at_prosody(invite["url"], username="erin")
        self.assertEqual(invite["uri"], f"xmpp:erin@{self.HOST}?register;preauth={invite['token']}")
        with self.assertRaises(ia.BackendError) as raised:
            ia.create_invite(store, host="other.test", backend=backend)
        self.assertIn("other.test is not a host of this Prosody", str(raised.exception))
        self.assertEqual(store.read("SELECT count(*) FROM invites")[0][0], 1)
        self.assertEqual(backend.check_hosts(["other.test"]), [
            "prosody backend: other.test is not a host of this Prosody: invites for it cannot be "
            "made"])
        code, out, err = run_main("--db", self.db, "invites", "create", self.HOST, "--backend",
                                  "prosody", "--prosody-config", self.config)
        self.assertEqual(code, 0, err)
        self.assert_valid_at_prosody(out.strip())

    def test_serve_warns_when_prosody_cannot_be_reached(self):
        self.stop_prosody()
        proc, port = self.start("--backend", "prosody", "--prosody-config", self.config)
        proc.terminate()
        proc.wait(10)
        self.assertIn("warning: prosody backend: cannot reach Prosody's admin shell",
                      proc.stderr.read())


class ProsodyBackportsTest(ProsodyTest):
    """A second Prosody line where the release's backports have one: on Debian 12, Prosody 13 from
    bookworm-backports beside Debian's 0.12, in a private prefix (.ci/run puts it there and sets
    INVITES_API_PROSODY_BACKPORTS). It has no community modules there, so no mod_invites_page."""

    # Debian 13's backports hold the same Prosody line as its own: nothing more to test there.
    wanted = debian_release() == "12" or bool(os.environ.get("INVITES_API_PROSODY_BACKPORTS"))
    MODULES = ('"admin_shell", "http", "invites", "saslauth", "register", "invites_register", '
               '"roster"')
    # These check Prosody's own invite page.
    test_invites_minted_through_our_api_are_valid_in_prosody = None
    test_a_username_bound_invite_and_a_host_prosody_does_not_serve = None
    test_ttl_resets_state_and_revocation_go_through_prosody = None

    def prosody_program(self):
        path = os.environ.get("INVITES_API_PROSODY_BACKPORTS")
        if not path or not os.path.exists(path):
            if os.environ.get("INVITES_API_REQUIRE_ALL") == "1":
                raise AssertionError("the backports' Prosody is not set up: "
                                     "INVITES_API_PROSODY_BACKPORTS (INVITES_API_REQUIRE_ALL=1)")
            raise unittest.SkipTest("the backports' Prosody is not set up "
                                    "(INVITES_API_PROSODY_BACKPORTS, see .ci/run)")
        return path


# ---------------------------------------------------------------------------
# ejabberd: its mod_invites and accounts through its HTTP API or ejabberdctl, on 23.01 and 26
# ---------------------------------------------------------------------------

# The README's api_permissions: only the commands invites_api calls (ejabberd 23.01 and 26.07
# alike).
EJABBERD_COMMANDS = ("generate_invite, generate_invite_with_username, generate_reset_token, "
                     "list_invites, delete_invite_by_token, expire_invite_by_token, status, "
                     "registered_vhosts, register, check_account, change_password, private_get, "
                     "private_set, add_rosteritem")


def ejabberd_release():
    """Return the major version of the installed ejabberd package (23, 24, 26), or 0."""
    found = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "ejabberd"],
                           capture_output=True, text=True)
    known = found.returncode == 0 and found.stdout[:2].isdigit()
    return int(found.stdout.split(".")[0]) if known else 0


class SilentServer:
    """An HTTP server on loopback that answers its first `answers` requests with 200 and a JSON 0,
    then reads every later one and never answers (nor closes): an honest, really slow server."""

    def __init__(self, answers):
        self.answers, self.requests, self.held = answers, 0, []
        self.read = []  # (connection number, first line) of each request read
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            threading.Thread(target=self.talk, args=(conn, len(self.held)), daemon=True).start()

    def talk(self, conn, number):
        with contextlib.suppress(OSError):
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                if not data.startswith(b"POST "):  # (a body sent apart from its head)
                    continue
                self.read.append((number, data.split(b"\r\n", 1)[0].decode()))
                self.requests += 1
                if self.requests <= self.answers:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: 1\r\n\r\n0")

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


class SlowServerTest(unittest.TestCase):
    """A server that accepts and never answers: each call ends at its timeout, its outcome unknown.
    """

    def test_ejabberds_api_that_never_answers_is_an_unknown_outcome_on_any_connection(self):
        server = SilentServer(answers=1)
        self.addCleanup(server.close)
        api = ia.EjabberdApi(f"http://127.0.0.1:{server.port}/api", ia.Settings(backend_timeout=1))
        self.addCleanup(api.close)
        accounts = ia.EjabberdBackend(api)
        sent = []  # what the client sends, counted where it sends it (the server may read it later)
        real_request = http.client.HTTPConnection.request

        def recording(connection, method, url, *args, **kwargs):
            sent.append(url)
            return real_request(connection, method, url, *args, **kwargs)
        patch = mock.patch.object(http.client.HTTPConnection, "request", autospec=True,
                                  side_effect=recording)
        patch.start()
        self.addCleanup(patch.stop)
        # answered: its connection is kept alive
        self.assertTrue(accounts.exists("example.com", "fay"))
        for connection in ("kept alive", "new"):
            self.assertEqual(len(api._idle), 1 if connection == "kept alive" else 0)
            started = time.monotonic()
            with self.assertRaises(ia.OutcomeUnknown) as raised:
                accounts.create("example.com", "gus", "a long password")
            # (it waited its timeout, no less)
            self.assertGreaterEqual(time.monotonic() - started, 1)
            self.assertEqual(str(raised.exception), "ejabberd's API timed out after 1 s")
        # Each call sent once, never again (a retry would be sent before the call raised), and each
        # one reached the server (which reads in threads of its own: under load, a moment later).
        self.assertEqual(sent, ["/api/check_account", "/api/register", "/api/register"])
        try:
            wait_until(lambda: server.requests >= 3, "the server has read the three requests")
        finally:
            self.assertEqual(server.read, [(1, "POST /api/check_account HTTP/1.1"),
                                           (1, "POST /api/register HTTP/1.1"),
                                           (2, "POST /api/register HTTP/1.1")])


class EjabberdTest(ServerProcessMixin, TempDirTestCase):
    """The release's ejabberd (23.01 on Debian 12, 24.12 on 13), on loopback ports of its own (its
    default config listens everywhere): built-in invites become ejabberd accounts from our sign-up
    page (serve --accounts ejabberd)."""

    HOST = "example.test"
    MODULES = "{mod_admin_extra: {}, mod_private: {}, mod_roster: {}}"
    HANDLERS = '{"/api": mod_http_api}'
    API_WHO = "{acl: loopback}"  # who api_permissions lets call the API

    def setUp(self):
        super().setUp()
        real = require_program("ejabberdctl")
        os.chmod(self.dir, 0o755)
        dirs = {name: os.path.join(self.dir, "ejabberd", name) for name
                in ("conf", "spool", "logs")}
        for path in dirs.values():
            os.makedirs(path)
        self.c2s_port, self.http_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.http_port}/api"
        with open(os.path.join(dirs["conf"], "ejabberd.yml"), "w") as f:
            f.write(f"""hosts: ["{self.HOST}"]
loglevel: warning
listen:
  - {{port: {self.c2s_port}, ip: "127.0.0.1", module: ejabberd_c2s, starttls: false}}
  - {{port: {self.http_port}, ip: "127.0.0.1", module: ejabberd_http,
      request_handlers: {self.HANDLERS}}}
auth_method: internal
registration_timeout: infinity
acl: {{local: {{user_regexp: ""}}, loopback: {{ip: ["127.0.0.0/8", "::1/128"]}},
      robots: {{user: "robot@{self.HOST}"}}}}
access_rules: {{local: {{allow: local}}, register: {{allow: all}}, configure: {{allow: robots}}}}
api_permissions: {{"invites_api on loopback": {{from: [mod_http_api], who: {self.API_WHO},
    what: [{EJABBERD_COMMANDS}]}}}}
modules: {self.MODULES}
""")
        # A node name of each test's own: one that a previous test's node still holds would never
        # start. And a distribution port of its own, so no epmd at all: `ejabberdctl stopped` kills
        # a shared epmd that has no names, which a node starting beside it then failed to register
        # with, and died.
        self.node, self.dist_port = f"invites{os.getpid()}p{self.c2s_port}@localhost", free_port()
        with open(os.path.join(dirs["conf"], "ejabberdctl.cfg"), "w") as f:
            f.write(f"ERLANG_NODE={self.node}\nERL_EPMD_ADDRESS=127.0.0.1\n"
                    f"INET_DIST_INTERFACE=127.0.0.1\nERL_DIST_PORT={self.dist_port}\n")
        with open(os.path.join(dirs["conf"], "inetrc"), "w") as f:
            f.write("{lookup, [file, native]}.\n")
        for root, subdirs, files in os.walk(os.path.join(self.dir, "ejabberd")):
            for name in [root] + [os.path.join(root, n) for n in subdirs + files]:
                shutil.chown(name, "ejabberd", "ejabberd")
        self.ejabberdctl = write_program(self.dir, "ejabberdctl",
                                         f"exec {real} --config-dir {dirs['conf']} "
                                         f"--spool {dirs['spool']} --logs {dirs['logs']} \"$@\"\n")
        start = subprocess.run([self.ejabberdctl, "start"], capture_output=True, text=True,
                               timeout=60)
        self.addCleanup(lambda: subprocess.run([self.ejabberdctl, "stop"], capture_output=True,
                                               timeout=60)
                        and subprocess.run([self.ejabberdctl, "stopped"], capture_output=True,
                                           timeout=60))
        try:
            subprocess.run([self.ejabberdctl, "started"], check=True, capture_output=True,
                           timeout=60)
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError):
            logs = "".join(open(os.path.join(dirs["logs"], n)).read()[-1500:] for n
                           in os.listdir(dirs["logs"]))
            status = subprocess.run([self.ejabberdctl, "status"], capture_output=True, text=True,
                                    timeout=60)
            ports = {port: listening_pids(port) for port
                     in (self.c2s_port, self.http_port, self.dist_port)}
            self.fail(f"ejabberd did not start: start said {start.stdout + start.stderr!r}; logs "
                      f"(and crash dumps) {logs!r}; status {status.stdout + status.stderr!r}; its "
                      f"ports' listeners {ports}")
        status = subprocess.run([self.ejabberdctl, "status"], capture_output=True, text=True,
                                timeout=60).stdout
        self.version = re.search(r"ejabberd (\S+) is running", status).group(1)
        self.via = self.VIA()

    # How invites_api reaches ejabberd's commands: ejabberdctl here, its HTTP API in
    # EjabberdApiTest.
    def VIA(self):
        return ["--ejabberdctl", self.ejabberdctl]

    def login(self, user, password):
        """Return whether a real XMPP client logs in as user@HOST with this password."""
        return logs_in(self.c2s_port, self.HOST, user, password)

    def test_an_invitee_signs_up_in_chromium_and_logs_in_with_a_real_client(self):
        store = ia.Store(self.db)
        key = ia.create_key(store, self.HOST)
        store.close()
        proc, port = self.start("--accounts", "ejabberd", *self.via)
        self.assertNotIn("warning", self.banner)

        def reset(user):
            code, out, err = run_main("--db", self.db, "invites", "create", self.HOST, "--reset",
                                      user, "--accounts", "ejabberd", *self.via, "--public-url",
                                      f"http://127.0.0.1:{port}")
            self.assertEqual(code, 0, err)
            return out.strip()
        secret, passwords = key.split("/")[1], journey_passwords()
        # (through ejabberdctl the password itself is in its arguments: the only way it takes one)
        with contextlib.closing(ArgvWatch(secret,
                                          *(passwords if "--ejabberd-api" in self.via
                                            else ()))) as watch:
            token = browser_journey(self, port, key, self.HOST, self.login, reset,
                                    screenshot_dir(self, f"ejabberd-{self.version}"), passwords)
            self.assertEqual(watch.seen, [])
        # the cross-site post used nothing
        self.assertTrue(ia.check_invite(ia.Store(self.db), token)["valid"])
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        log = proc.stderr.read()
        for value in passwords + (secret, token):
            self.assertNotIn(value, log)

    def test_a_contact_invite_ends_with_the_inviter_and_the_newcomer_each_others_contacts(self):
        word = ia._random_id(6)
        alices, bobs, daves = (f"{who}'s password {word}" for who in ("alice", "bob", "dave"))
        for user, password in (("alice", alices), ("carol", "carol's password")):
            subprocess.run([self.ejabberdctl, "register", user, self.HOST, password], check=True,
                           capture_output=True, timeout=60)
        code, out, err = run_main("--db", self.db, "create", self.HOST, "--inviter", "ghost",
                                  "--accounts", "ejabberd", *self.via)
        self.assertEqual((code, out, err),
                         (1, "", f"error: ghost@{self.HOST} has no account: a contact invite is "
                                 "from an account (make it first)\n"))
        code, out, err = run_main("--db", self.db, "create", self.HOST, "--inviter", "alice",
                                  "--accounts", "ejabberd", *self.via)
        self.assertEqual(code, 0, err)
        key = out.strip()
        proc, port = self.start("--accounts", "ejabberd", *self.via)
        # online meanwhile
        alice = XmppClient(self, self.c2s_port, f"alice@{self.HOST}", alices, plain=True)
        person = Invitee(self, screenshot_dir(self, f"ejabberd-{self.version}-contact"))
        bookmark = f"http://127.0.0.1:{port}/invites_api?key={key}&redirect=true"
        person.page.goto(bookmark)
        self.assertIn(f"alice@{self.HOST} invited you to join {self.HOST}", person.text())
        self.assertIn("I already have an XMPP account", person.text())
        person.page.click("a.button")  # "Create your account"
        self.assertEqual(person.submit("bob", bobs), 200)
        self.assertIn(f"alice@{self.HOST}, who invited you, is in your contacts", person.text())
        self.assertEqual(roster_of(self, self.c2s_port, f"bob@{self.HOST}", bobs, plain=True),
                         {f"alice@{self.HOST}": "both"})
        self.assertEqual(alice.roster(), {f"bob@{self.HOST}": "both"})
        self.assertIn({f"bob@{self.HOST}": "both"}, alice.pushes)  # (she was told while online)
        # An inviter deleted since the key was made: the account is made all the same, the page says
        # so.
        self.assertEqual(run_main("--db", self.db, "update", self.HOST, key.split("/")[0],
                                  "--inviter", "carol")[0], 0)
        subprocess.run([self.ejabberdctl, "unregister", "carol", self.HOST], check=True,
                       capture_output=True, timeout=60)
        person.page.goto(bookmark)
        person.page.click("a.button")
        self.assertEqual(person.submit("dave", daves), 200)
        self.assertIn(f"We could not add carol@{self.HOST}, who invited you, to your contacts",
                      person.text())
        self.assertEqual(roster_of(self, self.c2s_port, f"dave@{self.HOST}", daves, plain=True), {})
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        log = proc.stderr.read()
        self.assertIn(f"sign-up of dave@{self.HOST}: the contact with carol@{self.HOST} was not "
                      "made", log)
        for secret in (bobs, daves, key.split("/")[1]):
            self.assertNotIn(secret, log)

    def test_an_ejabberdctl_that_outlives_the_timeout_is_killed_with_the_vm_it_started(self):
        store = ia.Store(self.db)
        key = ia.create_key(store, self.HOST)
        store.close()
        # Debian's ejabberdctl runs su, sh, then erl: 0.1 s is less than that VM takes to start.
        proc, port = self.start("--accounts", "ejabberd", *self.via,
                                "--backend-timeout", "0.1")
        token = self.mint(key)
        started = time.monotonic()
        status, page = self.post_form({"token": token, "user": "late",
                                       "password": "Tr0ub4dor-and-3",
                                       "password_confirm": "Tr0ub4dor-and-3"})
        self.assertEqual(status, 502, page)
        self.assertIn("cannot tell whether it was done", page)  # (check_account timed out as well)
        # well past when the VM would have registered it
        time.sleep(max(0, started + 5 - time.monotonic()))
        self.assertFalse(self.login("late", "Tr0ub4dor-and-3"))
        # (a process may end between the listing and the reading: cmdline() says b"" then)
        lingering = [p for p in os.listdir("/proc") if p.isdigit() and b"Tr0ub4dor" in cmdline(p)]
        self.assertEqual(lingering, [])
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        log = proc.stderr.read()
        self.assertIn("ejabberdctl timed out after 0.1 s", log)
        self.assertNotIn("Tr0ub4dor", log)

    def test_sign_up_reset_and_refusals_with_real_ejabberd_accounts(self):
        store = ia.Store(self.db)
        key = ia.create_key(store, self.HOST)
        store.close()
        proc, port = self.start("--accounts", "ejabberd", *self.via)

        def post(form):
            return self.post_form(form, follow=True, timeout=60)

        def mint():
            return self.mint(key)
        token = mint()
        form = {"token": token, "user": "alice", "password": "a long password",
                "password_confirm": "a long password"}
        status, page = post(form)
        self.assertEqual(status, 200, page)
        self.assertIn(f"Your account alice@{self.HOST} is ready", page)
        self.assertTrue(self.login("alice", "a long password"))
        self.assertEqual(post(dict(form, user="bob"))[0], 410)  # used: no second account
        self.assertFalse(self.login("bob", "a long password"))
        second = mint()
        status, page = post(dict(form, token=second))  # a taken name: the invite is not used
        self.assertEqual(status, 409, page)
        self.assertTrue(ia.check_invite(ia.Store(self.db), second)["valid"])
        code, out, err = run_main("--db", self.db, "invites", "create", self.HOST, "--reset",
                                  "ghost", "--accounts", "ejabberd", *self.via)
        self.assertEqual((code, err),
                         (1, f"error: there is no account ghost@{self.HOST} to reset\n"))
        code, out, err = run_main("--db", self.db, "invites", "create", self.HOST, "--reset",
                                  "alice", "--accounts", "ejabberd", *self.via)
        self.assertEqual(code, 0, err)
        reset = out.strip().rsplit("?", 1)[1]
        status, page = post({"token": reset, "password": "a new password",
                             "password_confirm": "a new password"})
        self.assertEqual(status, 200, page)
        self.assertTrue(self.login("alice", "a new password"))
        self.assertFalse(self.login("alice", "a long password"))
        # A reset for alice, who is then deleted and made again in ejabberd itself: another account
        # (ejabberd deletes an account's private storage, where her mark was, with it).
        code, out, err = run_main("--db", self.db, "invites", "create", self.HOST, "--reset",
                                  "alice", "--accounts", "ejabberd", *self.via)
        self.assertEqual(code, 0, err)
        for command in (["unregister", "alice", self.HOST],
                        ["register", "alice", self.HOST, "someone else's"]):
            subprocess.run([self.ejabberdctl, *command], check=True, capture_output=True,
                           timeout=60)
        status, page = post({"token": out.strip().rsplit("?", 1)[1],
                             "password": "the reset's password",
                             "password_confirm": "the reset's password"})
        self.assertEqual(status, 403, page)
        self.assertIn(f"made for an earlier account named alice@{self.HOST}", page)
        self.assertTrue(self.login("alice", "someone else's"))
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        self.assertNotIn("a new password", proc.stderr.read())


class EjabberdApiTest(EjabberdTest):
    """The same sign-ups, through ejabberd's HTTP API (mod_http_api): no password in any argv."""

    test_an_ejabberdctl_that_outlives_the_timeout_is_killed_with_the_vm_it_started = None

    def VIA(self):
        return ["--ejabberd-api", self.api]

    def test_the_api_answers_within_its_timeout_or_the_outcome_is_unknown(self):
        api = ia.EjabberdApi(self.api, ia.Settings(backend_timeout=2))
        accounts = ia.EjabberdBackend(api)
        self.assertEqual(accounts.check_accounts([self.HOST]), [])
        accounts.create(self.HOST, "fay", "a long password")
        with self.assertRaises(ia.Conflict):
            accounts.create(self.HOST, "fay", "a long password")
        self.assertTrue(accounts.exists(self.HOST, "fay"))

        # (an ejabberdctl's own VM names the node too, but not as its -name/-sname)
        def runs_the_node(pid):
            argv = cmdline(pid).split(b"\0")
            return b"beam" in argv[0] and any(a in (b"-name", b"-sname") and v == self.node.encode()
                                              for a, v in zip(argv, argv[1:]))
        beam = [int(p) for p in os.listdir("/proc") if p.isdigit() and runs_the_node(p)]
        self.assertEqual(len(beam), 1)
        beam = beam[0]
        self.assertEqual(listening_pids(self.http_port), [beam])
        stop_process(self, beam)  # ejabberd stops answering: a really slow server
        seen = {"listening before": listening_pids(self.http_port),
                "VM before": thread_states(beam),
                "connection": "kept alive" if api._idle else "new"}
        started = time.monotonic()
        try:
            accounts.create(self.HOST, "gus", "a long password")
        except ia.OutcomeUnknown as e:
            raised = e
        else:  # (what answered, for the failure to explain itself)
            seen.update({"listening after": listening_pids(self.http_port),
                         "VM after": thread_states(beam),
                         "after s": round(time.monotonic() - started, 3)})
            self.fail(f"a stopped ejabberd answered: {seen}")
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("timed out after 2 s", str(raised))
        self.assertNotIn("a long password", str(raised))
        os.kill(beam, signal.SIGCONT)
        with self.assertRaises(ia.Error) as raised:
            ia.EjabberdApi("http://admin@example.test:s3cret-pass@127.0.0.1:5280/api")
        self.assertNotIn("s3cret", str(raised.exception))
        port = free_port()
        self.assertEqual(ia.EjabberdApi(f"http://127.0.0.1:{port}/api").check(),
                         f"ejabberd's API at http://127.0.0.1:{port}/api does not answer: "
                         "ejabberd's API ConnectionRefusedError")


class EjabberdApiAuthTest(EjabberdApiTest):
    """ejabberd's API where api_permissions asks for an account (HTTP basic auth): the credentials
    come from a file, and without them serve says at start that the API refused."""

    API_WHO = '{user: "robot@example.test"}'
    test_an_invitee_signs_up_in_chromium_and_logs_in_with_a_real_client = None
    test_a_contact_invite_ends_with_the_inviter_and_the_newcomer_each_others_contacts = None
    test_sign_up_reset_and_refusals_with_real_ejabberd_accounts = None
    test_the_api_answers_within_its_timeout_or_the_outcome_is_unknown = None

    def test_credentials_from_a_file_and_a_clear_refusal_without(self):
        hals = f"hal's password {ia._random_id(6)}"  # (no other test's argv has it)
        subprocess.run([self.ejabberdctl, "register", "robot", self.HOST, "the robot's password"],
                       check=True, capture_output=True, timeout=60)
        store = ia.Store(self.db)
        key = ia.create_key(store, self.HOST)
        store.close()
        proc, port = self.start("--accounts", "ejabberd", "--ejabberd-api", self.api)
        warning = wait_for_line(proc.stderr, 30)
        self.assertIn(f"warning: --accounts ejabberd: ejabberd's API at {self.api} refused (",
                      warning)
        self.assertIn("(see api_permissions)", warning)
        proc.terminate()
        proc.wait(10)
        secret = os.path.join(self.dir, "ejabberd-api-auth")
        with open(secret, "w") as f:
            f.write("robot@example.test:the robot's password\n")
        with contextlib.closing(ArgvWatch("the robot's password", hals)) as watch:
            proc, port = self.start("--accounts", "ejabberd", "--ejabberd-api", self.api,
                                    "--ejabberd-api-auth-file", secret)
            self.assertNotIn("warning", self.banner)
            token = self.mint(key)
            status, _ = self.post_form({"token": token, "user": "hal", "password": hals,
                                        "password_confirm": hals})
            if status != 303:
                proc.terminate()
                self.fail(f"{status}: {proc.stderr.read()}")
        # (the test's own `ejabberdctl register robot` above may linger in a forked bash of
        # ejabberdctl 26)
        self.assertEqual([argv for argv in watch.seen if b" register robot " not in argv], [])
        self.assertTrue(self.login("hal", hals))
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        self.assertNotIn("robot's password", proc.stderr.read())


class Ejabberd26Test(EjabberdApiTest):
    """ejabberd 26 with mod_invites (trixie-backports' 26.07, installed by .ci/run on Debian 13):
    --backend ejabberd over its HTTP API and through ejabberdctl, with a real client."""

    wanted = ejabberd_release() >= 26 or os.environ.get("INVITES_API_EJABBERD_26") == "1"
    MODULES = ("{mod_admin_extra: {}, mod_private: {}, mod_roster: {}, mod_adhoc: {}, "
               "mod_register: {access: register, allow_modules: [mod_invites]}, mod_invites: "
               "{landing_page: auto}}")
    HANDLERS = '{"/api": mod_http_api, "/invites": mod_invites}'
    test_an_invitee_signs_up_in_chromium_and_logs_in_with_a_real_client = None
    test_sign_up_reset_and_refusals_with_real_ejabberd_accounts = None
    test_the_api_answers_within_its_timeout_or_the_outcome_is_unknown = None
    # (EjabberdTest's)
    test_a_contact_invite_ends_with_the_inviter_and_the_newcomer_each_others_contacts = None

    def test_ejabberds_own_invites_cannot_be_contact_invites_and_say_what_can(self):
        subprocess.run([self.ejabberdctl, "register", "alice", self.HOST, "a long password"],
                       check=True, capture_output=True, timeout=60)
        code, out, err = run_main("--db", self.db, "invites", "create", self.HOST, "--inviter",
                                  "alice", "--backend", "ejabberd", "--ejabberd-api", self.api)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err,
                         "error: the ejabberd backend cannot make contact invites (from alice): "
                         "ejabberd's API has no contact invites; use the built-in store (--backend "
                         "builtin) with --accounts ejabberd, whose sign-up makes the contact\n")

    # in this class's passwords alone: no other test's argv has it
    tag = "long-" + os.urandom(6).hex()

    def client(self):
        client = Xmpp(self.c2s_port, self.HOST)
        self.addCleanup(client.close)
        return client

    def journey(self, via, count):
        """Mint count invites through serve --backend ejabberd, register and log in with each, then
        a username-bound one, their state, a revocation and a reset; return serve's log."""
        store = ia.Store(self.db)
        key = ia.create_key(store, self.HOST, may_reset=1, max_uses=5)
        ia.create_key(store, "other.test")
        store.close()
        proc, port = self.start("--backend", "ejabberd", *via)
        self.assertIn("warning: ejabberd backend: other.test is not a host of this ejabberd",
                      wait_for_line(proc.stderr, 30))
        self.assertIn("ejabberd backend, through "
                      + ("its HTTP API" if "--ejabberd-api" in via else "ejabberdctl"), self.banner)

        def mint(extra="", status=201):
            answer, _, body = self.create(key, extra, {"Accept": "application/json"})
            self.assertEqual(answer, status, body)
            return json.loads(body) if status == 201 else body.decode()

        def show(token):
            code, out, err = run_main("--db", self.db, "invites", "show", self.HOST, token,
                                      "--json", "--backend", "ejabberd", *via)
            self.assertEqual(code, 0, err)
            return json.loads(out)
        invites = [mint() for _ in range(count)]
        for n, invite in enumerate(invites):
            self.assertRegex(invite["url"],
                             rf"^http://{self.HOST}:{self.http_port}/invites/{invite['token']}$")
            self.assertEqual(self.client().register(invite["token"], f"user{n}",
                                                    f"password {n} is {self.tag}"),
                             ("result", "result"))
            self.assertTrue(self.client().login(f"user{n}", f"password {n} is {self.tag}"))
        state = show(invites[0]["token"])
        self.assertEqual((state["status"], [a["jid"] for a in state["accounts"]]),
                         ("used", [f"user0@{self.HOST}"]))
        bound = mint("&username=erin")
        self.assertEqual(bound["uri"], f"xmpp:erin@{self.HOST}?register;preauth={bound['token']}")
        self.assertEqual(show(bound["token"])["status"], "valid")
        # The name is reserved for its invite: another invite cannot take it.
        other = mint()
        self.assertEqual(self.client().register(other["token"], "erin", "a long password")[1],
                         "error")
        self.assertEqual(self.client().register(bound["token"], "erin", f"erin's {self.tag}"),
                         ("result", "result"))
        self.assertTrue(self.client().login("erin", f"erin's {self.tag}"))
        # ejabberd (26.07) lets the holder of a username-bound invite choose another name: the
        # README says so.
        loose = mint("&username=fred")
        self.assertEqual(self.client().register(loose["token"], "notfred", "a long password"),
                         ("result", "result"))
        self.assertFalse(self.client().login("fred", "a long password"))
        revoked = mint()
        code, out, err = run_main("--db", self.db, "invites", "revoke", self.HOST, revoked["token"],
                                  "--backend", "ejabberd", *via)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.client().register(revoked["token"], "mallory", "a long password")[0],
                         "error")
        self.assertFalse(self.client().login("mallory", "a long password"))
        self.assertIn("there is no account ghost@", mint("&type=reset&username=ghost", 400))
        reset = mint("&type=reset&username=user0")
        self.assertEqual(reset["type"], "reset")
        self.assertEqual(self.client().register(reset["token"], "user0", f"user0's new {self.tag}"),
                         ("result", "result"))
        self.assertTrue(self.client().login("user0", f"user0's new {self.tag}"))
        self.assertFalse(self.client().login("user0", f"password 0 is {self.tag}"))
        code, out, err = run_main("--db", self.db, "invites", "create", "other.test", "--backend",
                                  "ejabberd", *via)
        self.assertEqual((code, err), (1, "error: other.test is not a host of this ejabberd\n"))
        for option, words in (("&ttl=1h", "own lifetime"), ("&uses=2", "one account each"),
                              ("&roles=prosody:member", "no roles")):
            self.assertIn(words, mint(option, 400))
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        return proc.stderr.read()

    def test_invites_through_the_api_become_accounts_a_real_client_logs_into(self):
        # (in every password of this journey)
        with contextlib.closing(ArgvWatch(self.tag)) as watch:
            self.journey(["--ejabberd-api", self.api], 5)
        self.assertEqual(watch.seen, [])

    def test_invites_minted_by_ejabberdctl_become_accounts_a_real_client_logs_into(self):
        # The same journey, each invite minted by an ejabberdctl run of its own (seen in its argv).
        with contextlib.closing(ArgvWatch("generate_invite")) as watch:
            log = self.journey(["--ejabberdctl", self.ejabberdctl], 2)
        self.assertTrue(any(b"ejabberdctl" in argv for argv in watch.seen), watch.seen[:3])
        self.assertNotIn("Traceback", log)

    def test_the_open_invites_cap_is_a_503_and_our_purge_makes_room(self):
        store = ia.Store(self.db)
        self.addCleanup(store.close)
        key = ia.create_key(store, self.HOST)
        api = ia.EjabberdApi(self.api)
        backend = ia.EjabberdBackend(api)
        used = [ia.create_invite(store, key, backend=backend) for _ in range(3)]
        for n, invite in enumerate(used):
            self.assertEqual(self.client().register(invite["token"], f"cap{n}", "a long password"),
                             ("result", "result"))
        for _ in range(1100):  # directly, as another inviter would: until ejabberd's cap
            code, output = api.call("generate_invite", host=self.HOST)
            if "num_invites_exceeded" in output:  # (past ejabberd's occasional 500 internal_error)
                break
        self.assertIn("num_invites_exceeded", output)
        with self.assertRaises(ia.Unavailable) as raised:
            ia.create_invite(store, key, backend=backend)
        self.assertIn("ejabberd refused: num_invites_exceeded", str(raised.exception))
        # nothing recorded, quota back
        self.assertEqual(store.read("SELECT count(*) FROM invites")[0][0], 3)
        # records the three uses, deletes them from ejabberd
        ia.purge_invites(store, backend=backend)
        self.assertEqual([ia.invite_status(ia.invite_by_token(store, i["token"])) for i in used],
                         ["used"] * 3)
        self.assertEqual([a["username"] for i in used for a
                          in store.accounts(ia.invite_id(i["token"]))], ["cap0", "cap1", "cap2"])
        self.assertEqual(ia.create_invite(store, key, backend=backend)["backend"], "ejabberd")


class EjabberdListingTest(TempDirTestCase):
    """A listing of invites that ejabberd minted asks ejabberd once for the page, not once an
    invite."""

    def test_one_list_invites_for_a_page(self):
        ejabberd = mock.Mock(spec=["call"])
        store = ia.Store(self.db)
        self.addCleanup(store.close)
        backend = ia.EjabberdBackend(ejabberd)
        tokens = [f"tok{n:021d}" for n in range(3)]
        ejabberd.call.side_effect = [(0, f"xmpp:example.com?register;preauth={t}\thttps://e/{t}")
                                     for t in tokens]
        for _ in tokens:
            ia.create_invite(store, host="example.com", backend=backend)
        rows = [{"token": t, "valid": "true" if n else "false", "type": "account_only",
                 "inviter": "example.com",
                 "invitee": "" if n else "ann@example.com", "token_uri": "xmpp:x",
                 "landing_page": f"https://e/{t}"}
                for n, t in enumerate(tokens)]  # (as both clients give them: the API's JSON)
        ejabberd.call.side_effect = None
        ejabberd.call.return_value = (0, rows)
        with mock.patch.object(ia, "make_ejabberd", return_value=ejabberd):
            code, out, err = run_main("--db", self.db, "invites", "list", "example.com",
                                      "--backend", "ejabberd", "--status", "all", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(i["status"] for i in json.loads(out)), ["used", "valid", "valid"])
        self.assertEqual([c.args for c in ejabberd.call.call_args_list[3:]], [("list_invites",)])


class EjabberdCtlTest(TempDirTestCase):
    """ejabberdctl's text is read once, at its edge: a listing comes back as the API's JSON holds
    it."""

    def test_listings_are_rows_and_names_and_other_answers_text(self):
        rows = "\\n".join(["tok1\\ttrue\\t2026-12-05 10:00:00\\t2026-12-10 "
                           "10:00:00\\taccount_only\\tadmin@example.com"
                           "\\t\\t\\txmpp:example.com?register;preauth=tok1\\thttps://e/tok1",
                           "tok2\\tfalse\\t\\t\\taccount_only\\tadmin@example.com\\tann@example.com"
                           "\\tann\\txmpp:x\\thttps://e/tok2", "a line of something else"])
        program = write_program(self.dir, "ejabberdctl", f"""case "$1" in
  list_invites) printf '{rows}\\n';;
  registered_vhosts) printf 'example.com\\nexample.org\\n';;
  status) echo "The node ejabberd@localhost is started. ejabberd 26.07 is running in that node";;
  *) echo "Unknown command $1"; exit 1;;
esac
""")
        ctl = ia.EjabberdCtl(program)
        code, listed = ctl.call("list_invites", host="example.com")
        self.assertEqual(code, 0)
        self.assertEqual([(r["token"], r["valid"], r["invitee"], r["landing_page"]) for r
                          in listed],
                         [("tok1", "true", "", "https://e/tok1"),
                          ("tok2", "false", "ann@example.com", "https://e/tok2")])
        self.assertEqual(ctl.hosts(), ["example.com", "example.org"])
        self.assertEqual(ctl.call("status"),
                         (0, "The node ejabberd@localhost is started. ejabberd 26.07 is running "
                             "in that node\n"))
        self.assertEqual(ctl.call("nonsense"), (1, "Unknown command nonsense\n"))
        # The backend reads those rows as it reads the API's.
        backend = ia.EjabberdBackend(ctl)
        self.assertEqual(backend.status({"host": "example.com", "token": "tok1"}), ("valid", None))
        self.assertEqual(backend.status({"host": "example.com", "token": "tok2"}),
                         ("used", "ann@example.com"))


class WithoutAModule:
    """ejabberd without a module that resets need: its reset is refused (sign-up is tested above).
    """

    test_an_invitee_signs_up_in_chromium_and_logs_in_with_a_real_client = None
    test_an_ejabberdctl_that_outlives_the_timeout_is_killed_with_the_vm_it_started = None
    test_sign_up_reset_and_refusals_with_real_ejabberd_accounts = None
    test_a_contact_invite_ends_with_the_inviter_and_the_newcomer_each_others_contacts = None

    def setUp(self):
        super().setUp()
        subprocess.run([self.ejabberdctl, "register", "alice", self.HOST, "a long password"],
                       check=True, capture_output=True, timeout=60)

    def reset_alice(self):
        """Ask the command line for a reset invite for alice; return (exit code, stdout, stderr)."""
        return run_main("--db", self.db, "invites", "create", self.HOST, "--reset", "alice",
                        "--accounts", "ejabberd", *self.via)


class EjabberdWithoutAdminExtraTest(WithoutAModule, EjabberdTest):
    """ejabberd without mod_admin_extra: no check_account, so no resets, and serve says so."""

    MODULES = "{}"

    def test_serve_warns_and_a_reset_is_refused_as_a_failure_not_as_a_missing_account(self):
        proc, port = self.start("--accounts", "ejabberd", *self.via)
        warning = wait_for_line(proc.stderr, 30)
        self.assertIn("--accounts ejabberd: ejabberd lacks check_account and change_password "
                      "(enable mod_admin_extra)", warning)
        code, out, err = self.reset_alice()
        self.assertEqual(code, 1)
        self.assertIn(f"error: could not ask whether alice@{self.HOST} exists, so no reset was "
                      "made", err)
        self.assertNotIn("there is no account", err)
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)


class EjabberdWithoutPrivateTest(WithoutAModule, EjabberdTest):
    """ejabberd without mod_private: nowhere to keep an account's mark, so no resets, and it says
    why."""

    MODULES = "{mod_admin_extra: {}}"

    def test_a_reset_is_refused_with_the_module_it_needs(self):
        code, out, err = self.reset_alice()
        self.assertEqual((code, out), (1, ""))
        self.assertIn("ejabberd kept no mark for the account (is mod_private enabled?)", err)
        self.assertEqual(ia.Store(self.db).read("SELECT count(*) FROM invites")[0][0], 0)


# ---------------------------------------------------------------------------
# Serving: HTTP/1.1, connections, the process, TLS, proxies, health and metrics, load
# ---------------------------------------------------------------------------

class SettingsTest(TempDirTestCase):
    """The command line's options reach serve, the backends and the routes as one Settings
    object, with their defaults in one place."""

    def test_defaults_normal_forms_and_unknown_names(self):
        default = ia.Settings()
        self.assertEqual((default.public_url, default.invite_ttl, default.apps,
                          default.trust_proxy),
                         (None, ia.DEFAULT_INVITE_TTL, ia.DEFAULT_APPS, None))
        given = ia.Settings(public_url="https://{host}/", trust_proxy=True, site_name="Choir")
        self.assertEqual((given.public_url, given.trust_proxy, given.site_name),
                         ("https://{host}", "x-forwarded-for", "Choir"))
        with self.assertRaises(TypeError):
            # (a misspelt setting is no silent default)
            ia.Settings(public_ulr="https://example.com")
        self.assertIs(ia.App(None, settings=given).settings, given)

    def test_the_command_lines_timeouts_and_log_reach_every_part_that_waits_or_logs(self):
        args = ia.build_parser().parse_args([
            "serve", "--backend", "command", "--backend-command", "mint {host}", "--accounts",
            "command", "--accounts-command", "make {action} {username} {host}", "--backend-timeout",
            "3", "--backend-concurrency", "2", "--timeout", "7", "--request-timeout", "4",
            "--max-connections", "9"])
        settings = ia.settings_of(args, max_connections=args.max_connections,
                                  timeout=args.timeout, request_timeout=args.request_timeout)
        backend = ia._backend(args, settings)
        self.assertEqual((backend.timeout, backend.accounts.timeout), (3, 3))
        self.assertEqual(backend._slots._value, 2)
        self.assertIs(backend.settings.log, sys.stderr)  # (a failure is logged where serve logs)
        prosody = ia.ProsodyBackend(socket=os.devnull, settings=settings)
        self.assertEqual((prosody.timeout, prosody.admin.timeout, prosody.admin.idle.qsize()),
                         (3, 3, 2))
        self.assertEqual(ia.make_ejabberd(None, None, "ejabberdctl", settings).timeout, 3)
        self.assertEqual(ia.make_ejabberd("http://127.0.0.1:1/api", None, "x", settings).timeout, 3)
        store = ia.Store(os.path.join(self.dir, "invites.db"))
        self.addCleanup(store.stop_group_commit)
        server = ia.make_server(ia.App(store, settings=settings), "127.0.0.1", 0)
        self.addCleanup(server.server_close)
        self.assertEqual((server.max_connections, server.idle_timeout, server.request_timeout),
                         (9, 7, 4))
        # A part made without settings reads the defaults, named once.
        self.assertEqual((ia.Accounts(["true"]).timeout, ia.CommandBackend(["true"]).timeout),
                         (ia.DEFAULT_BACKEND_TIMEOUT, ia.DEFAULT_BACKEND_TIMEOUT))


class HttpTest(LiveServerTestCase):
    """HTTP itself: methods, paths, framing, parameters, error bodies, CORS, keep-alive."""

    def test_json_errors_are_json(self):
        status, headers, body = self.request("GET", "/invites_api", {"Accept": "application/json"})
        self.assertEqual(status, 401)
        self.assertIn("error", json.loads(body))

    def test_plain_errors_are_short_plain_text(self):
        status, headers, body = self.create(key="nosuchkeyxxx/secret")
        self.assertEqual(status, 403)
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        self.assertLess(len(body), 200)
        self.assertEqual(int(headers["content-length"]), len(body))

    def test_cors_headers_are_on_every_api_response(self):
        responses = [self.create(), self.create(key="x"), self.request("GET", "/invites_api"),
                     self.request("PUT", "/invites_api"), self.request("OPTIONS", "/invites_api")]
        for status, headers, _ in responses:
            self.assertEqual(headers.get("access-control-allow-origin"), "*", status)
            for method in ("GET", "POST", "OPTIONS"):
                self.assertIn(method, headers["access-control-allow-methods"])
            self.assertIn("Authorization", headers["access-control-allow-headers"])
            self.assertIn("Content-Type", headers["access-control-allow-headers"])
            self.assertEqual(headers["access-control-max-age"], "7200")

    def test_options_needs_no_key_and_answers_204(self):
        status, headers, body = self.request("OPTIONS", "/invites_api",
                                             {"Origin": "https://example.net",
                                              "Access-Control-Request-Method": "POST"})
        self.assertEqual(status, 204)
        self.assertEqual(body, b"")
        self.assertEqual(self.invite_count(), 0)

    def test_other_methods_get_405_with_allow_and_head_creates_nothing(self):
        for method in ("PUT", "DELETE", "PATCH", "HEAD", "BREW"):
            status, headers, _ = self.request(method, f"/invites_api?key={self.key}")
            self.assertEqual(status, 405, method)
            self.assertEqual(headers["allow"], "GET, POST, OPTIONS")
        self.assertEqual(self.invite_count(), 0)

    def test_unknown_path_is_404_and_the_servers_own_address_a_page(self):
        for path in ("/invites", "/invites_api_x", f"/invites_apix?key={self.key}"):
            status, _, _ = self.request("GET", path)
            self.assertEqual(status, 404, path)
        status, headers, body = self.request("GET", "/")
        self.assertEqual((status, headers["content-type"]), (200, "text/html; charset=utf-8"))
        self.assertIn(b"This server makes account invites", body)
        self.assertIn("default-src 'none'", headers["content-security-policy"])

    def test_request_line_over_8_kib_is_414(self):
        answer = self.raw(b"GET /invites_api?key=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 414 "), answer[:80])

    def test_malformed_requests_are_400(self):
        for request in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.x\r\n\r\n",
                        b"GET /invites_api HTTP/1.1 extra\r\n\r\n",
                        b"GET /invites_api HTTP/1.1\r\nbad header line\r\n\r\n"):
            answer = self.raw(request)
            self.assertRegex(answer[:12], rb"^HTTP/1\.1 4\d\d", request)
        self.assertEqual(self.create()[0], 201)  # still serving

    def test_bad_content_length_and_bodies_are_4xx(self):
        status, _, _ = self.request("POST", "/invites_api", {"Authorization": f"Bearer {self.key}",
                                                             "Content-Type": "text/plain"},
                                    body=b"hello")
        self.assertEqual(status, 415)
        status, _, _ = self.request("POST", "/invites_api", {"Authorization": f"Bearer {self.key}",
                                                             "Content-Type": "application/json"},
                                    body=b"{" + b" " * 9000 + b"}")
        self.assertEqual(status, 413)
        # "\xb2" is a superscript two
        for bad in (b"abc", b"\xb2", b"-1", b"1\r\nContent-Length: 2"):
            answer = self.raw(b"POST /invites_api HTTP/1.1\r\nHost: x\r\nContent-Length: " + bad
                              + b"\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (bad, answer[:80]))
        answer = self.raw(b"POST /invites_api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                          b"chunked\r\n\r\n0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 411 "), answer[:80])
        self.assertEqual(self.invite_count(), 0)

    def test_unknown_and_repeated_parameters_are_400(self):
        status, _, body = self.create(extra="&colour=blue")
        self.assertEqual(status, 400)
        self.assertIn(b"colour", body)
        status, _, _ = self.create(extra=f"&key={self.key}")
        self.assertEqual(status, 400)
        self.assertEqual(self.invite_count(), 0)

    def test_bad_host_header_is_400(self):
        status, _, _ = self.create(headers={"Host": "evil.example/<script>"})
        self.assertEqual(status, 400)

    def test_http_1_1_keeps_the_connection_open_and_1_0_closes_it(self):
        answer = self.raw(b"GET /invites_api HTTP/1.0\r\n\r\n")
        self.assertIn(b"Connection: close", answer)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertNotIn(b"Connection: close", sock.recv(4096))
            sock.sendall(b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertIn(b"Connection: close", sock.recv(4096))

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        self.addCleanup(conn.close)
        for _ in range(5):
            status, _, _ = self.request("GET", f"/invites_api?key={self.key}", conn=conn)
            self.assertEqual(status, 201)
            status, _, _ = self.request("GET", "/invites_api?key=bad", conn=conn)
            self.assertEqual(status, 403)
        self.assertEqual(self.invite_count(), 5)

    def test_an_internal_error_is_500_logged_and_the_server_keeps_serving(self):
        with mock.patch.object(ia, "create_invite", side_effect=RuntimeError("boom")):
            status, _, body = self.create()
        self.assertEqual(status, 500)
        self.assertEqual(body, b"internal error\n")
        self.assertIn("RuntimeError: boom", self.log.getvalue())
        self.assertEqual(self.create()[0], 201)

    def test_a_database_failure_is_503_with_retry_after(self):
        with mock.patch.object(ia.Store, "insert_invite",
                               side_effect=ia.StoreError("database is locked")):
            status, headers, _ = self.create()
        self.assertEqual(status, 503)
        self.assertIn("retry-after", headers)


class ServingTest(LiveServerTestCase):
    """A thread per connection; every write through the group committer, answered after its COMMIT.
    """

    backend = ia.Builtin(ia.Accounts(["true"]))  # (so that an invite page has its QR code)

    def committer_connection(self):
        return self.store.write(lambda conn: conn)

    def test_the_answer_leaves_only_after_the_commit_returned(self):
        committed = []

        def trace(statement):
            if statement == "COMMIT":
                time.sleep(0.3)  # a slow disk: the answer must wait for it
                committed.append(time.monotonic())
        conn = self.committer_connection()
        conn.set_trace_callback(trace)
        self.addCleanup(conn.set_trace_callback, None)
        status, _, _ = self.create()
        answered = time.monotonic()
        self.assertEqual(status, 201)
        self.assertEqual(len(committed), 1)
        self.assertGreaterEqual(answered, committed[0])

    def test_a_failed_commit_is_503_and_stores_nothing(self):
        self.assertEqual(self.create()[0], 201)
        real_connect = self.store.connect

        class CommitFails:  # the committer's connection, whose COMMIT fails as on a disk I/O error
            def __init__(self, conn):
                self.conn = conn

            def execute(self, sql, *args):
                if sql == "COMMIT":
                    self.conn.execute("ROLLBACK")
                    raise sqlite3.OperationalError("disk I/O error")
                return self.conn.execute(sql, *args)

            def __getattr__(self, name):
                return getattr(self.conn, name)
        with mock.patch.object(self.store, "connect", lambda: CommitFails(real_connect())):
            status, headers, body = self.create(headers={"Accept": "application/json"})
            self.assertEqual(status, 503)
            self.assertIn("disk I/O error", json.loads(body)["error"])
            self.assertIn("retry-after", headers)
            # no write: not affected
            self.assertEqual(self.request("OPTIONS", "/invites_api")[0], 204)
        self.assertEqual(self.invite_count(), 1)
        self.assertEqual(self.store.key(self.key_id)["invites_created"], 1)
        self.assertIn("StoreError on GET /invites_api?key=[redacted]", self.log.getvalue())
        self.assertEqual(self.create()[0], 201)

    def test_pipelined_requests_are_answered_in_order(self):
        create = f"GET /invites_api?key={self.key} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        requests = [create, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\n\r\n",
                    create.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")]
        answer = self.raw(b"".join(requests))
        self.assertEqual(re.findall(rb"HTTP/1\.1 (\d{3}) ", answer),
                         [b"201", b"200", b"204", b"201"])
        self.assertEqual(self.invite_count(), 2)

    def test_a_client_reads_its_own_writes_on_one_connection(self):
        token = self.token_of(self.create()[1]["location"])
        path = f"/invites_api/invites/{token}?key={self.key}"
        answer = self.raw(f"DELETE {path} HTTP/1.1\r\nHost: x\r\n\r\n"
                          f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        self.assertEqual(re.findall(rb"HTTP/1\.1 (\d{3}) ", answer), [b"204", b"200"])
        self.assertEqual(json.loads(answer[answer.rindex(b"\r\n\r\n"):])["status"], "revoked")

    def test_a_client_that_sends_but_does_not_read_gets_every_answer(self):
        count = 40_000  # about 1.6 MB of requests and 11 MB of answers
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.port))
        self.addCleanup(sock.close)
        sender = threading.Thread(target=sock.sendall, daemon=True,
                                  args=(b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\n\r\n" * count,
                                        ))
        sender.start()
        time.sleep(1)  # the server answers until the client's window is full, then waits
        answers, data = 0, b""
        while answers < count:
            data += sock.recv(1 << 20)
            answers += data.count(b"HTTP/1.1 204 ")
            data = data[data.rfind(b"HTTP/1.1 204 ") + 1:] if b"HTTP/1.1 204 " in data else data
        sender.join(10)
        self.assertEqual(answers, count)

    def test_an_invite_page_seen_again_reuses_its_qr_code(self):
        location = self.create()[1]["location"]
        path = location[location.index("/invite"):]
        with mock.patch.object(ia, "qr_matrix", wraps=ia.qr_matrix) as qr_matrix:
            first = self.request("GET", path)
            second = self.request("GET", path)
        self.assertEqual((first[0], second[0]), (200, 200))
        self.assertEqual(qr_matrix.call_count, 1)
        svg = re.search(rb"<svg.*?</svg>", first[2], re.S).group(0)
        self.assertIn(svg, second[2])

    def test_expect_100_continue_is_answered_before_the_body_comes(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"POST /invites_api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + self.key.encode() +
                         b"\r\nContent-Type: application/json\r\ncontent-LENGTH: 11\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            self.assertEqual(sock.recv(4096), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b'{"uses": 1}')
            self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 201 "))
        self.assertEqual(self.invite_count(), 1)

    def test_a_request_in_pieces_and_one_cut_short(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            body = b'{"uses": 1}'
            for piece in (b"POST /invites_api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ",
                          self.key.encode(),
                          b"\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n",
                          body[:4], body[4:]):
                sock.sendall(piece)
                time.sleep(0.05)
            self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 201 "))
        answer = self.raw(b"POST /invites_api HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/json\r\n"
                          b"Content-Length: 11\r\n\r\n{\"us", shut=True)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:80])
        self.assertIn(b"shorter than Content-Length", answer)


class AttackTest(LiveServerTestCase):
    """What an attack run found on the old selector loop, each pinned: framing, 500s, the log."""

    def statuses(self, answer):
        return re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)

    def test_a_body_is_never_run_as_a_request(self):
        smuggled = (f"GET /invites_api?key={self.key}&note=smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
                    .encode())
        after = b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for method, path in (("OPTIONS", "/invites_api"), ("GET", "/nope"), ("PUT", "/invites_api"),
                             ("GET", "/health"), ("DELETE", "/invites_api/invites/x")):
            # Within the limit, the body is read (and dropped); the next request follows it.
            head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: {len(smuggled)}\r\n\r\n").encode()
            answer = self.raw(head + smuggled + after)
            self.assertEqual(len(self.statuses(answer)), 2, answer)
            self.assertNotIn(b"201", self.statuses(answer))
            # Over it: 413, and the connection closes: nothing after it is read as a request.
            head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n".encode()
            answer = self.raw(head + smuggled + after)
            self.assertEqual(self.statuses(answer), [b"413"], answer)
            self.assertIn(b"Connection: close", answer)
        self.assertEqual(self.invite_count(), 0)

    def test_framing_errors_get_4xx_and_close_the_connection(self):
        smuggled = f"GET /invites_api?key={self.key} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        cases = {
            b"POST /invites_api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n": b"411",
            b"POST /invites_api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
            b"identity\r\nContent-Length: 0\r\n\r\n": b"411",
            b"POST /invites_api HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: "
            b"0\r\n\r\n": b"400",
            b"POST /invites_api HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 5\r\n\r\n": b"400",
            b"POST /invites_api HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n": b"400",
            b"POST /invites_api HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n": b"400",
            b"GET /invites_api HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n": b"400",
            b"GET /invites_api HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n": b"400",
            b"GET /invites_api HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n": b"400",
            b"GET /invites_api HTTP/1.1\r\n\r\n": b"400",  # no Host
            b"GET /invites_api HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n": b"400",
            # not 505: client input is never a 5xx
            b"GET /invites_api HTTP/2.0\r\nHost: x\r\n\r\n": b"400",
            b"GET /invites_api HTTP/1.2\r\nHost: x\r\n\r\n": b"400",
            b"GET /invites_api\r\n\r\n": b"400",  # HTTP/0.9
            b"GET /invites_api  HTTP/1.1\r\nHost: x\r\n\r\n": b"400",
            b"GET /inv\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n": b"400",
            b"GET http://x/invites_api HTTP/1.1\r\nHost: x\r\n\r\n": b"400",
        }
        for request, status in cases.items():
            answer = self.raw(request + smuggled)
            self.assertEqual(self.statuses(answer), [status], request)
            self.assertIn(b"Connection: close", answer, request)
        self.assertEqual(self.invite_count(), 0)
        self.assertEqual(self.request("GET", "/health")[0], 200)  # HTTP/1.0 needs no Host
        self.assertEqual(self.raw(b"GET /health HTTP/1.0\r\n\r\n")[:12], b"HTTP/1.1 200")

    def test_a_bad_host_header_mints_nothing(self):
        for host in ("my_host:5282", "a b", "x:99999999", "[::1"):
            status, _, _ = self.create(headers={"Host": host})
            self.assertEqual(status, 400, host)
        self.app.settings.trust_proxy = "x-forwarded-for"
        self.assertEqual(self.create(headers={"X-Forwarded-Host": "bad_host"})[0], 400)
        self.assertEqual(self.invite_count(), 0)
        self.assertEqual(self.store.key(self.key_id)["invites_created"], 0)

    def test_input_that_once_gave_500_gets_400(self):
        json_headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        for body in (b"[" * 8000, b'{"note": "\\ud800"}',
                     b'{"username": "\\udc80"}', b'{"note": "a\\u0000b"}', b'{"note": ["x"]}',
                     b'{"uses": ' + b"[" * 900 + b"]" * 900 + b"}", b'{"uses": 1e400}',
                     b"\xff\xfe"):
            status, _, answer = self.request("POST", "/invites_api", json_headers, body)
            self.assertEqual(status, 400, body[:40])
        self.assertEqual(self.request("POST", "/invites_api", json_headers, b'{"note": "x"}')[0],
                         201)
        for query in ("&note=%ED%A0%80", "&note=%FF", "&username=%00", "&note=a%0Ab"):
            self.assertEqual(self.create(extra=query)[0], 400, query)
        # A non-Latin username: the page's Link header carries it percent-encoded (IRI to URI).
        location = self.create(extra="&username=%D0%B0%D0%BB%D0%B8%D1%81%D0%B0")[1]["location"]
        status, headers, _ = self.request("GET", location[location.index("/invite"):])
        self.assertEqual(status, 200)
        self.assertIn("<xmpp:%D0%B0%D0%BB%D0%B8%D1%81%D0%B0@example.com?register;preauth=",
                      headers["link"])
        token = self.token_of(self.create()[1]["location"])
        for body in (b'{"username": "a b"}', b'{"username": "\\ud800"}', b'{"username": 5}'):
            status, _, _ = self.request("POST", f"/invites_api/invites/{token}/redeem",
                                        json_headers, body)
            self.assertEqual(status, 400, body)
        self.assertEqual(ia.check_invite(self.store, token)["valid"], True)
        self.assertNotIn("internal error", self.log.getvalue())
        # argv not UTF-8
        code, _, err = run_main("--db", self.db, "create", "example.com", "bad \udcff name")
        self.assertEqual(code, 2)
        self.assertIn("not valid Unicode text", err)

    def test_a_recurring_database_error_is_logged_once_a_minute_with_a_count(self):
        self.assertEqual(self.create()[0], 201)
        os.chmod(self.db, 0o400)
        self.addCleanup(os.chmod, self.db, 0o600)
        for _ in range(30):
            self.assertEqual(self.create()[0], 503)
        errors = [line for line in self.log.getvalue().splitlines() if "StoreError" in line]
        self.assertEqual(len(errors), 1, errors)
        os.chmod(self.db, 0o600)
        self.assertEqual(self.create()[0], 201)
        with mock.patch.object(time, "monotonic", lambda: 10 ** 9):  # a minute (and more) later
            self.app.log_problem("StoreError again", cause=next(iter(self.app._problems)))
        self.assertIn("StoreError again (and 29 more times since it was last logged)",
                      self.log.getvalue())

    def test_ipv6_clients_are_limited_per_64(self):
        limiter = ia.RateLimiter(2)
        for address in ("2001:db8::1", "2001:db8::2", "2001:db8::ffff:1"):
            limiter.hit(address)
        self.assertGreater(limiter.over("2001:db8::9"), 0)  # the same /64
        self.assertEqual(limiter.over("2001:db8:0:1::1"), 0)  # another /64
        self.assertEqual(limiter.over("192.0.2.1"), 0)
        self.assertEqual(ia.address_key("2001:db8::1%eth0"), "2001:db8::/64")


class ProbingTest(LiveServerTestCase):
    """What probing the API as an attacker or a careless operator found (issue 29)."""

    def test_numbers_take_ascii_digits_only(self):
        for value in ("\u0663h", "\uff11d", "1\u0662h", "\u0661"):  # Arabic-Indic, fullwidth digits
            status, _, body = self.create(extra=f"&ttl={quote(value)}")
            self.assertEqual(status, 400, value)
            self.assertIn(repr(value), body.decode())
        for value in ("\u0663", "\uff11"):  # a count, and a page size
            self.assertEqual(self.create(extra=f"&uses={quote(value)}")[0], 400)
            listing = f"/invites_api/invites?key={self.key}&limit={quote(value)}"
            self.assertEqual(self.request("GET", listing)[0], 400)
        self.assertEqual(self.invite_count(), 0)
        for argv in (("create", "example.com", "--max-ttl", "\u0663h"),
                     ("create", "example.com", "--rate", "1/\u0663h"),
                     ("create", "example.com", "--expires", "\uff12\uff10\uff12\uff17-01-31"),
                     ("create", "example.com", "--max-uses", "\u0663"),
                     ("serve", "--port", "\u0665\u0662\u0668\u0662"),
                     ("serve", "--timeout", "\u0663"), ("serve", "--backend-timeout", "1e3"),
                     ("serve", "--invite-ttl", "\u0663d")):
            code, out, err = run_main("--db", self.db, *argv)
            self.assertEqual((code, out), (2, ""), argv)
            self.assertIn("error: argument", err)
            self.assertIn("invalid", err)
        for good in ("12h", "1d12h", "90"):
            self.assertEqual(self.create(extra=f"&ttl={good}")[0], 201)

    def test_json_null_means_none_where_the_readme_says_and_is_refused_elsewhere(self):
        def post(body):
            return self.request("POST", "/invites_api", {"Authorization": f"Bearer {self.key}",
                                                         "Content-Type": "application/json",
                                                         "Accept": "application/json"},
                                json.dumps(body))
        for body, words in (({"ttl": None}, "ttl cannot be null"),
                            ({"uses": None}, "uses cannot be null"),
                            ({"type": None}, "type cannot be null"),
                            ({"bogus": None}, "unknown option 'bogus'"),
                            ({"redirect": None}, "redirect cannot be null"),
                            ({"key": None}, "key must be a string"),
                            ({"username": True}, "username must be a string")):
            status, _, answer = post(body)
            self.assertEqual(status, 400, body)
            self.assertIn(words, json.loads(answer)["error"])
        self.assertEqual(self.invite_count(), 0)
        status, _, answer = post({"note": None, "username": None, "roles": None, "groups": None})
        self.assertEqual(status, 201, answer)
        invite = json.loads(answer)
        self.assertEqual((invite["note"], invite["username"]), (None, None))
        token = invite["token"]
        status, _, answer = self.request("POST", f"/invites_api/invites/{token}/redeem",
                                         {"Authorization": f"Bearer {self.key}",
                                          "Content-Type": "application/json"},
                                         json.dumps({"username": None}))
        self.assertEqual(status, 200, answer)

    def test_plain_text_answers_are_not_sniffed_and_echo_no_path_or_file(self):
        for method, path, headers, expected in (
                ("GET", "/%3Cscript%3Ealert(1)%3C/script%3E", {}, 404),
                ("GET", "/nothing/here?key=x", {"Accept": "text/html"}, 404),
                ("GET", "/invites_api?key=AAAAAAAAAAAA/wrong", {}, 403),
                ("GET", "/invites_api", {}, 401),
                ("GET", f"/invites_api?key={self.key}&ttl=forever", {}, 400),
                ("PUT", "/invites_api", {}, 405)):
            status, answer, body = self.request(method, path, headers)
            self.assertEqual(status, expected, path)
            self.assertEqual(answer["x-content-type-options"], "nosniff", path)
            self.assertNotIn(b"script", body)
            self.assertNotIn(b"nothing", body)
        # A database that cannot be written: 503, its path only in the log.
        os.chmod(self.db, 0o400)
        self.addCleanup(os.chmod, self.db, 0o600)
        for headers in ({}, {"Accept": "application/json"}):
            status, answer, body = self.create(headers=headers)
            self.assertEqual(status, 503)
            self.assertNotIn(self.dir.encode(), body)
            self.assertIn(b"the database", body)
        status, _, body = self.request("GET", "/health")
        self.assertEqual(status, 503)
        self.assertNotIn(self.dir.encode(), body)
        self.assertIn(self.db, self.log.getvalue())

    def test_the_documentation_says_the_headers_the_pages_send(self):
        claims = re.findall(r"`(Referrer-Policy|X-Content-Type-Options|Cache-Control"
                            r"|Content-Security-Policy): ([^`]+)`",
                            "\n".join(documentation().values()))
        self.assertGreaterEqual(len({name for name, _ in claims}), 4, claims)
        token = self.token_of(self.create()[1]["location"])
        for path in (f"/invite?{token}", "/invite?" + "Z" * 24, "/"):
            answer = self.request("GET", path)[1]
            for name, value in claims:
                self.assertTrue(answer[name.lower()].startswith(value),
                                (path, name, value, answer[name.lower()]))


class ConnectionLimitsTest(LiveServerTestCase):
    # A short request timeout for the stalled tests; a long idle one, so that a slow machine's
    # pauses never close the idle connections the eviction test counts on.
    settings = {"max_connections": 30, "timeout": 60, "request_timeout": 2}

    def test_twenty_stalled_clients_do_not_delay_another_clients_request(self):
        stalled = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", self.port))
            sock.sendall(b"GET /invites_api?key=")  # and never finish
            stalled.append(sock)
        self.addCleanup(lambda: [s.close() for s in stalled])
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.5)
        self.addCleanup(conn.close)
        status, _, _ = self.request("GET", f"/invites_api?key={self.key}", conn=conn)
        self.assertEqual(status, 201)

    def test_stalled_connections_are_dropped_after_the_timeout(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(b"GET /invites_api HTTP/1.1\r\n")
            self.assertEqual(sock.recv(100), b"")  # closed by the server after --request-timeout

    def test_when_full_a_new_connection_replaces_the_longest_waiting_one(self):
        idle = [socket.create_connection(("127.0.0.1", self.port), timeout=10) for _ in range(30)]
        self.addCleanup(lambda: [s.close() for s in idle])
        for sock in idle:
            sock.sendall(b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 204"))
        # Until each thread waits for its next request (a client reads its answer before the thread
        # that sent it comes back to wait: on a busy machine, not always in the order answered).
        deadline = time.monotonic() + 10
        while not (len(self.server.connections) == 30
                   and all(t.waiting_since is not None for t
                           in list(self.server.connections.values()))):
            self.assertLess(time.monotonic(), deadline, "the connections never all waited")
            time.sleep(0.01)
        longest = min(self.server.connections.values(),
                      key=lambda t: t.waiting_since).sock.getpeername()
        victim = next(sock for sock in idle if sock.getsockname() == longest)
        # All 30 wait: the longest waiting makes room, closed without a word (it had been answered).
        self.assertEqual(self.create()[0], 201)
        self.assertEqual(victim.recv(100), b"")
        for sock in idle:  # the others are still served
            if sock is not victim:
                sock.sendall(b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 204"))

    def test_connections_over_the_cap_are_refused_fast_with_503_when_all_are_busy(self):
        gate = threading.Event()
        holder = threading.Thread(target=self.store.write, args=(lambda conn: gate.wait(10),))
        holder.start()  # the committer waits: every create below is busy until the gate opens
        pool = ThreadPoolExecutor(30)
        self.addCleanup(pool.shutdown)
        creates = [pool.submit(self.create) for _ in range(30)]
        deadline = time.monotonic() + 5
        while self.server.open_connections < 30 or any(t.waiting_since is not None for t in
                                                       list(self.server.connections.values())):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        answer = self.raw(b"GET /invites_api HTTP/1.1\r\nHost: x\r\n\r\n", read_timeout=1.5)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer[:80])
        self.assertIn(b"Retry-After: 1", answer)
        gate.set()
        holder.join(5)
        self.assertEqual([c.result()[0] for c in creates], [201] * 30)
        self.assertEqual(self.create()[0], 201)


class ServerProcessTest(ServerProcessMixin, TempDirTestCase):

    def test_startup_line_prints_the_real_address(self):
        proc, port = self.start()
        self.assertGreater(port, 0)
        # Out of the box, it says how its invites become accounts.
        self.assertIn(f"(database {self.db}); its invites become accounts only through a sign-up "
                      "site of your own "
                      "(the redeem API): --accounts makes them accounts on the invite's page",
                      self.banner)
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)

    def test_sigterm_finishes_the_request_in_flight_then_exits_0(self):
        key = self.make_key()
        proc, port = self.start()

        def refused():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                # This probe reached the backlog just before serve closed its socket: ask again.
                return False
            return False
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /invites_api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + key.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            self.assertEqual(sock.recv(4096), b"HTTP/1.1 100 Continue\r\n\r\n")  # under way
            proc.send_signal(signal.SIGTERM)
            wait_until(refused, "serve stops taking connections")
            self.assertIsNone(proc.poll())  # still finishing our request
            sock.sendall(b"{}")
            answer = sock.recv(4096)
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer[:80])
        self.assertEqual(proc.wait(10), 0)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    def test_sigint_is_a_clean_exit(self):
        proc, _ = self.start()
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(10), 0)
        self.assertNotIn("Traceback", proc.stderr.read())

    def test_kill_9_under_load_loses_no_acknowledged_invite(self):
        key = self.make_key()
        proc, port = self.start("--quiet")
        acknowledged, stop = [], threading.Event()

        def hammer():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            while not stop.is_set():
                try:
                    conn.request("GET", f"/invites_api?key={key}")
                    response = conn.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    return
                if response.status == 201:
                    acknowledged.append(response.getheader("Location").rsplit("?", 1)[1])

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(acknowledged) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        stop.set()
        for t in threads:
            t.join(10)
        self.assertGreaterEqual(len(acknowledged), 300)
        # Restart on the same database, then check every acknowledged invite.
        proc, port = self.start("--quiet")
        proc.terminate()
        proc.wait(10)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            stored = {row[0] for row in conn.execute("SELECT id FROM invites")}
        missing = {ia.invite_id(t) for t in acknowledged} - stored
        self.assertEqual(missing, set(),
                         f"{len(missing)} of {len(acknowledged)} acknowledged invites lost")

    def test_server_log_never_contains_the_secret(self):
        key = self.make_key()
        proc, port = self.start()
        for headers, path in (({}, f"/invites_api?key={key}"),
                              ({"Authorization": f"Bearer {key}"}, "/invites_api"),
                              ({}, f"/invites_api?key={quote(key, safe='')}&redirect=true"),
                              ({}, f"/nowhere?key={key}"),
                              ({"Authorization": f"Basic {key}"}, "/invites_api")):
            self.request("GET", path, headers)
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        log = proc.stderr.read()
        self.assertEqual(len(log.strip().splitlines()), 5, log)
        self.assertNotIn(key.split("/")[1], log)

    def test_database_wal_and_shm_are_private_while_serving(self):
        key = self.make_key()
        proc, port = self.start("--quiet")
        self.assertEqual(self.create(key)[0], 201)
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(self.db + suffix).st_mode)
            self.assertEqual(mode, 0o600, f"{self.db + suffix}: {oct(mode)}")
        proc.terminate()
        proc.wait(10)

    def test_port_in_use_is_a_clear_error(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            code, out, err = run_main("--db", self.db, "serve", "--port", str(port))
        self.assertEqual(code, 1)
        self.assertIn(f"error: cannot listen on 127.0.0.1:{port}", err)


class SharedDatabaseTest(ServerProcessMixin, TempDirTestCase):

    def test_a_second_server_process_on_the_same_database_shares_the_rate_limit(self):
        store = ia.Store(self.db)
        key = ia.create_key(store, "example.com", "shared", rate_count=4, rate_period=3600)
        store.close()
        procs = [self.start("--quiet") for _ in range(2)]
        statuses = [http_request(procs[i % 2][1], "GET", f"/invites_api?key={key}")[0]
                    for i in range(6)]
        self.assertEqual(statuses, [201, 201, 201, 201, 429, 429])
        for proc, _ in procs:
            proc.terminate()
            self.assertEqual(proc.wait(10), 0)


def make_certificate(directory, name, common_name="127.0.0.1"):
    """Make a self-signed certificate and key with openssl; return (cert path, key path)."""
    openssl = require_program("openssl")
    cert, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={common_name}",
                    "-addext", f"subjectAltName=IP:{common_name}"], check=True, capture_output=True,
                   timeout=60)
    return cert, key


class TlsTest(ServerProcessMixin, TempDirTestCase):

    def fetch(self, port, cafile, path="/health"):
        import ssl
        context = ssl.create_default_context(cafile=cafile)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        der = conn.sock.getpeercert(binary_form=True)
        conn.close()
        return response, der

    def test_https_with_tls_1_2_or_newer_and_sighup_reloads_the_certificate(self):
        import ssl
        cert, key = make_certificate(self.dir, "live")
        with open(cert) as f:
            first_cert = f.read()
        proc, port = self.start("--tls-cert", cert, "--tls-key", key)
        response, der1 = self.fetch(port, cert)
        self.assertEqual(response.status, 200)
        # Location says https.
        store = ia.Store(self.db)
        key_text = ia.create_key(store, "example.com")
        response, _ = self.fetch(port, cert, f"/invites_api?key={key_text}")
        self.assertTrue(response.getheader("Location")
                        .startswith(f"https://127.0.0.1:{port}/invite?"))
        # TLS 1.1 is refused.
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        with self.assertRaises(ssl.SSLError):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                old.wrap_socket(raw)
        # Renewal: new files in place, SIGHUP, new connections get the new certificate.
        new_cert, new_key = make_certificate(self.dir, "renewed")
        os.replace(new_cert, cert)
        os.replace(new_key, key)
        proc.send_signal(signal.SIGHUP)
        while "reloaded the TLS certificate" not in wait_for_line(proc.stderr):
            pass  # (the request log's lines before it)
        response, der2 = self.fetch(port, cert)
        self.assertEqual(response.status, 200)
        self.assertNotEqual(der1, der2)
        with open(cert) as f:
            self.assertNotEqual(f.read(), first_cert)
        # A plain-HTTP client gets nothing and the server keeps going.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\n\r\n")
            try:
                self.assertFalse(raw.recv(100).startswith(b"HTTP/1.1 200"))
            except ConnectionResetError:
                pass  # refused: not TLS
        self.assertEqual(self.fetch(port, cert)[0].status, 200)
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        self.assertNotIn("Traceback", proc.stderr.read())

    def test_bad_tls_files_are_a_clear_error(self):
        code, _, err = run_main("--db", self.db, "serve", "--port", "0", "--tls-cert",
                                "/nonexistent.crt", "--tls-key", "/nonexistent.key")
        self.assertEqual(code, 1)
        self.assertIn("error: cannot load the TLS certificate '/nonexistent.crt'", err)
        self.assertEqual(run_main("--db", self.db, "serve", "--tls-cert", "x.crt")[0], 1)


class SystemdTest(TempDirTestCase):

    def test_the_units_pass_systemd_analyze_verify(self):
        analyze = (require_program("systemd-analyze")
                   if os.environ.get("INVITES_API_REQUIRE_ALL") == "1" else None)
        analyze = analyze or shutil.which("systemd-analyze")
        if analyze is None:
            self.skipTest("systemd-analyze is not installed")
        units = {}
        for name in ("invites-api.service", "invites-api.socket"):
            with open(os.path.join(HERE, "contrib", name)) as f:
                units[name] = f.read()
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(units[name])
        for needed in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=",
                       "DynamicUser=yes", "ExecStart=/usr/bin/python3 -m invites_api serve",
                       "PYTHONPATH=/usr/local/lib/invites_api"):
            self.assertIn(needed, units["invites-api.service"])
        result = subprocess.run([analyze, "verify", *(os.path.join(self.dir, n) for n in units)],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("Unknown", result.stderr)

    def test_serve_takes_a_listening_socket_the_way_systemd_passes_it(self):
        # As the unit runs it (a module, from / with PYTHONPATH), and as a script.
        self.serve_with_systemd_socket(["-m", "invites_api"], cwd="/", env={"PYTHONPATH": HERE})
        self.serve_with_systemd_socket([SCRIPT])

    def serve_with_systemd_socket(self, program, cwd=None, env=None):
        store = ia.Store(self.db)
        key = ia.create_key(store, "example.com")
        store.close()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # Like systemd: fd 3, LISTEN_FDS=1, LISTEN_PID = the service's own pid (set after fork, kept
        # by exec).
        launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
                    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.executable, "
                    "[sys.executable] + sys.argv[2:])")
        proc = subprocess.Popen([sys.executable, "-c", launcher, str(listener.fileno()), *program,
                                 "serve", "--quiet",
                                 "--port", "1"],  # --port is ignored: the socket is given
                                pass_fds=(listener.fileno(),),
                                env=dict(os.environ, INVITES_API_DB=self.db, **env or {}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait(),
                                 proc.stdout.close(), proc.stderr.close()))
        listener.close()  # only the service holds it now
        self.assertIn(f"127.0.0.1:{port}/invites_api", wait_for_line(proc.stdout))
        self.assertEqual(http_request(port, "GET", f"/invites_api?key={key}")[0], 201)
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)


class IPv6Test(ServerProcessMixin, TempDirTestCase):

    def test_serve_on_ipv6_loopback_and_on_all_addresses(self):
        key = self.make_key()
        for bind, client in (("::1", "::1"), ("::", "::1"), ("::", "127.0.0.1")):
            env = dict(os.environ, INVITES_API_DB=self.db)
            proc = subprocess.Popen([sys.executable, SCRIPT, "serve", "--port", "0", "--bind",
                                     bind], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                    text=True)
            self.addCleanup(self.reap, proc)
            line = wait_for_line(proc.stdout)
            port = int(re.search(r"http://\[[0-9a-f:]+\]:(\d+)/invites_api", line).group(1))
            conn = http.client.HTTPConnection(client, port, timeout=10)
            conn.request("GET", f"/invites_api?key={key}")
            response = conn.getresponse()
            response.read()
            conn.close()
            self.assertEqual(response.status, 201, (bind, client))
            shown = f"[{client}]" if ":" in client else client
            self.assertTrue(response.getheader("Location")
                            .startswith(f"http://{shown}:{port}/invite?"))
            proc.terminate()
            self.assertEqual(proc.wait(10), 0)
            self.assertRegex(proc.stderr.read(),
                             rf"Z {re.escape(client)} GET /invites_api\?key=\[redacted\] 201 ")


class SlowClientsTest(ServerProcessMixin, TempDirTestCase):
    """300 slow clients (that reconnect when dropped) do not starve a create every 100 ms."""

    seconds = float(os.environ.get("INVITES_API_SLOW_SECONDS", "30"))

    def attack(self, port, key, tls_context=None):
        stop = threading.Event()

        def connect():
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            if tls_context is None:  # a slow header; a TLS client just never sends its hello
                sock.sendall(b"GET /invites_api HTTP/1.1\r\nHost: x\r\n")
            return sock

        def slow_clients():
            socks = []
            while not stop.is_set():
                for i in range(300):
                    try:
                        if i >= len(socks):
                            socks.append(connect())
                        elif tls_context is None:
                            socks[i].sendall(b"X-Slow: 1\r\n")
                        else:
                            socks[i].setblocking(False)
                            if socks[i].recv(1) == b"":
                                raise OSError("closed")
                    except BlockingIOError:
                        pass
                    except OSError:
                        if i < len(socks):
                            socks[i].close()
                            try:
                                socks[i] = connect()
                            except OSError:
                                pass
                stop.wait(2)
            for sock in socks:
                sock.close()
        attacker = threading.Thread(target=slow_clients, daemon=True)
        attacker.start()
        time.sleep(1)
        statuses = []
        until = time.monotonic() + self.seconds
        while time.monotonic() < until:
            try:
                if tls_context is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                else:
                    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5,
                                                       context=tls_context)
                conn.request("GET", f"/invites_api?key={key}")
                statuses.append(conn.getresponse().status)
                conn.close()
            except OSError as e:
                statuses.append(type(e).__name__)
            time.sleep(0.1)
        stop.set()
        attacker.join(10)
        ok = statuses.count(201)
        print(f"\n{'TLS handshake' if tls_context else 'slow header'} clients: {ok} of "
              f"{len(statuses)} creates "
              f"answered 201 in {self.seconds:g} s", file=sys.stderr)
        self.assertGreaterEqual(ok, 0.95 * len(statuses), statuses)

    def test_slow_header_clients(self):
        key = self.make_key()
        _, port = self.start("--quiet", "--request-timeout", "3")
        self.attack(port, key)


class SilentTlsClientsTest(SlowClientsTest):
    """300 TLS clients that never send their hello (and reconnect) do not starve HTTPS creates."""

    test_slow_header_clients = None

    def test_silent_tls_clients(self):
        import ssl
        key = self.make_key()
        cert, tls_key = make_certificate(self.dir, "slow")
        _, port = self.start("--quiet", "--request-timeout", "3", "--tls-cert", cert, "--tls-key",
                             tls_key)
        self.attack(port, key, ssl.create_default_context(cafile=cert))


class ProxyTest(LiveServerTestCase):
    settings = {"trust_proxy": True}

    def test_trusted_proxy_headers_give_client_address_scheme_and_host(self):
        status, headers, _ = self.create(headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.9",
                                                  "X-Forwarded-Proto": "https",
                                                  "Host": "invites.example.com"})
        self.assertEqual(status, 201)
        self.assertTrue(headers["location"].startswith("https://invites.example.com/invite?"))
        self.assertIn(" 203.0.113.9 GET /invites_api", self.log.getvalue())
        # A client's own Forwarded header passes through a proxy that sets X-Forwarded-For: ignored.
        status, headers, _ = self.create(headers={
            "Forwarded": 'for="[2001:db8::1]";proto=https;host=x',
            "X-Forwarded-For": "203.0.113.10", "Host": "invites.example.com"})
        self.assertTrue(headers["location"].startswith("http://invites.example.com/"))
        self.assertNotIn("2001:db8::1", self.log.getvalue())
        self.assertIn(" 203.0.113.10 GET", self.log.getvalue())
        # --trust-proxy=forwarded: the proxy sets Forwarded
        self.app.settings.trust_proxy = "forwarded"
        status, headers, _ = self.create(headers={"Forwarded": 'for=198.51.100.1, '
                                                               'for="[2001:db8::1]:4711";'
                                                               'proto=https;host=x.example',
                                                  "X-Forwarded-For": "203.0.113.11",
                                                  "Host": "invites.example.com"})
        self.assertTrue(headers["location"].startswith("https://x.example/invite?"))
        self.assertIn(" 2001:db8::1 GET", self.log.getvalue())
        self.assertNotIn("203.0.113.11", self.log.getvalue())

    def test_untrusted_proxy_headers_are_ignored(self):
        self.app.settings.trust_proxy = False
        _, headers, _ = self.create(headers={"X-Forwarded-For": "203.0.113.9",
                                             "X-Forwarded-Proto": "https"})
        self.assertTrue(headers["location"].startswith(f"http://127.0.0.1:{self.port}/"))
        self.assertNotIn("203.0.113.9", self.log.getvalue())


class NginxTest(ServerProcessMixin, TempDirTestCase):
    """Debian's nginx on loopback in front of the server, as the README's recipe sets it up."""

    def test_behind_nginx_location_and_client_address_are_right(self):
        nginx = require_program("nginx")
        store = ia.Store(self.db)
        key = ia.create_key(store, "example.com")
        store.close()
        proc, port = self.start("--trust-proxy")
        front = free_port()
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {self.dir}/body; proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fcgi; uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  upstream invites_api {{ server 127.0.0.1:{port}; keepalive 4; }}
  server {{
    listen 127.0.0.2:{front};
    location / {{
      proxy_pass http://invites_api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
""")
        server = subprocess.Popen([nginx, "-c", conf, "-p", self.dir], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (server.terminate(), server.wait()))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.2", front), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.fail("nginx did not start")
                time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.2", front, timeout=10,
                                          source_address=("127.0.0.3", 0))
        conn.request("GET", f"/invites_api?key={key}", headers={"Host": "invites.example.com"})
        response = conn.getresponse()
        response.read()
        conn.close()
        self.assertEqual(response.status, 201)
        self.assertTrue(response.getheader("Location")
                        .startswith("http://invites.example.com/invite?"))

        def through_nginx(method, path, headers=None, body=None, source="127.0.0.3"):
            conn = http.client.HTTPConnection("127.0.0.2", front, timeout=10,
                                              source_address=(source, 0))
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            conn.close()
            return response.status, response.getheader("Location"), data
        # Smuggling through nginx's kept-alive upstream connections: a body that holds the start of
        # a request, then another client's request. Each client gets its own answer; nothing is
        # minted from the body.
        smuggled = b"GET /invites_api?note=smuggled HTTP/1.1\r\nHost: evil.example\r\nX-Ignore: "
        for padding in (0, 9000):
            for _ in range(10):
                status = through_nginx("OPTIONS", "/invites_api", body=smuggled + b"x" * padding)[0]
                self.assertEqual(status, 413 if padding else 204)
                status, location, _ = through_nginx("GET", "/invites_api",
                                                    {"Authorization": f"Bearer {key}",
                                                     "Accept": "application/json"})
                self.assertEqual(status, 201)
        self.assertEqual(ia.Store(self.db).read("SELECT count(*) FROM invites WHERE note IS NOT "
                                                "NULL OR uri LIKE '%evil%'")[0][0], 0)
        self.assertEqual(ia.Store(self.db).read("SELECT count(*) FROM invites")[0][0], 21)
        # A client's own Forwarded header does not hide it from the failed-authentication limit.
        statuses = [through_nginx("GET", f"/invites_api?key=AAAAAAAAAAAA/{i:032d}",
                                  {"Forwarded": f"for=10.9.0.{i}"}, source="127.0.0.4")[0] for i
                    in range(25)]
        self.assertEqual(statuses[:20], [403] * 20)
        self.assertEqual(statuses[20:], [429] * 5)
        proc.terminate()
        proc.wait(10)
        self.assertRegex(proc.stderr.read(),
                         r"Z 127\.0\.0\.3 GET /invites_api\?key=\[redacted\] 201 ")


class HealthAndMetricsTest(LiveServerTestCase):
    settings = {"auth_failures_per_minute": 20}

    def test_health_is_ok_when_the_database_reads_and_writes(self):
        status, headers, body = self.request("GET", "/health")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        self.assertNotIn("access-control-allow-origin", headers)

    def test_health_is_503_when_the_database_cannot_write_in_time(self):
        blocker = sqlite3.connect(self.db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        self.addCleanup(blocker.close)
        self.store.busy_timeout = 0.2
        self.store.stop_group_commit()
        self.store._local = threading.local()  # reconnect with the short busy timeout
        self.store.start_group_commit()
        started = time.monotonic()
        status, headers, body = self.request("GET", "/health")
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body)["status"], "error")
        self.assertIn("retry-after", headers)
        self.assertLess(time.monotonic() - started, 5)
        blocker.execute("ROLLBACK")
        self.assertEqual(self.request("GET", "/health")[0], 200)

    def parse_openmetrics(self, text):
        """Check the text against OpenMetrics' rules; return {sample name with labels: value}."""
        self.assertTrue(text.endswith("# EOF\n"), text[-50:])
        families, samples = {}, {}
        for line in text[:-len("# EOF\n")].splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                self.assertNotIn(name, families, "a family is declared once")
                self.assertIn(kind, ("counter", "gauge", "histogram"))
                families[name] = kind
            elif line.startswith("# HELP "):
                self.assertIn(line.split(" ")[2], families)
            else:
                match = re.fullmatch(r'([a-z_]+)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? '
                                     r'(-?[0-9.e+]+)', line)
                self.assertIsNotNone(match, line)
                name = match.group(1)
                family = next((f for f in families if name == f or name.startswith(f + "_")), None)
                self.assertIsNotNone(family, f"{name} has no TYPE")
                kind = families[family]
                if kind == "counter":
                    self.assertEqual(name, family + "_total", "counters end in _total")
                elif kind == "histogram":
                    self.assertIn(name[len(family):], ("_bucket", "_count", "_sum"))
                samples[name + (match.group(2) or "")] = float(match.group(4))
        return samples

    def test_metrics_are_openmetrics_and_count_what_happened(self):
        self.create()
        self.create()
        self.create(key="AAAAAAAAAAAA/wrong")
        status, headers, body = self.request("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"],
                         "application/openmetrics-text; version=1.0.0; charset=utf-8")
        samples = self.parse_openmetrics(body.decode())
        created = 'invites_api_invites_created_total{host="example.com",backend="builtin"}'
        self.assertEqual(samples[created], 2)
        self.assertEqual(samples['invites_api_requests_total{status="201"}'], 2)
        self.assertEqual(samples["invites_api_auth_failures_total"], 1)
        self.assertEqual(samples['invites_api_request_duration_seconds_bucket{le="+Inf"}'], 3)
        self.assertGreaterEqual(samples["invites_api_open_connections"], 1)
        self.assertGreater(samples["invites_api_database_size_bytes"], 0)
        self.assertNotIn(self.key.split("/")[1], body.decode())

    def test_metrics_token_is_required_when_set(self):
        self.app.settings.metrics_token = "s3cret-token"
        self.assertEqual(self.request("GET", "/metrics")[0], 401)
        self.assertEqual(self.request("GET", "/metrics", {"Authorization": "Bearer wrong"})[0], 401)
        self.assertEqual(self.request("GET", "/metrics",
                                      {"Authorization": "Bearer s3cret-token"})[0], 200)

    def test_header_limits(self):
        many = b"".join(b"X-H%d: 1\r\n" % i for i in range(100))
        self.assertTrue(self.raw(b"GET /health HTTP/1.1\r\n" + many
                                 + b"\r\n").startswith(b"HTTP/1.1 431 "))
        repeated = b"X-Same: 1\r\n" * 65  # one name, many lines: still too many
        self.assertTrue(self.raw(b"GET /health HTTP/1.1\r\n" + repeated
                                 + b"\r\n").startswith(b"HTTP/1.1 431 "))
        just_enough = b"X-Same: 1\r\n" * 62
        self.assertTrue(self.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 + just_enough +
                                 b"\r\n").startswith(b"HTTP/1.1 200 "))
        long = b"X-Long: " + b"a" * 9000 + b"\r\n"
        self.assertTrue(self.raw(b"GET /health HTTP/1.1\r\n" + long
                                 + b"\r\n").startswith(b"HTTP/1.1 431 "))

    def test_a_huge_body_is_refused_before_it_is_read(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"POST /invites_api HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\n"
                         b"Content-Length: 100000000\r\n\r\n{")
            answer = sock.recv(4096)  # answered at once, without waiting for 100 MB
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "))
        self.assertIn(b"Connection: close", answer)


class FuzzTest(LiveServerTestCase):
    settings = {"timeout": 0.5, "max_connections": 64}

    def test_ten_thousand_random_and_mutated_requests(self):
        rng = random.Random(20261122)  # seeded: a failure can be replayed
        good = [f"GET /invites_api?key={self.key} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                "POST /invites_api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                f"{self.key}\r\nContent-Type: "
                f"application/json\r\nContent-Length: 13\r\n\r\n{{\"uses\": 1}}  ".encode(),
                b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /invite?AAAAAAAAAAAAAAAAAAAAAAAA HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /invite/AAAAAAAAAAAAAAAAAAAAAAAA.json HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /health HTTP/1.0\r\n\r\n",
                b"DELETE /invites_api/invites/abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                b"x/y\r\n\r\n",
                b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\nGET "
                b"/health HTTP/1.1\r\n"
                b"OPTIONS /invites_api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
        pieces = [b"%", b"%zz", b"%00", b"\x00", b"\xff\xfe", b"\r\n", b"\n", b" ", b":", b"?",
                  b"&", b"=",
                  b"/../", b"HTTP/1.1", b"Content-Length: -1\r\n", b"Content-Length: 99999999\r\n",
                  b"Transfer-Encoding: chunked\r\n", b"Content-Length: \xb2\r\n", b"uses=\xc2\xb2&",
                  b"Authorization: Bearer \r\n", b"Host: \x01\r\n",
                  b"X" * 9000, b"\x16\x03\x01", "é".encode(), b"GET", b"PUT", b"BREW", b"\t"]

        def mutate(data):
            data = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                op = rng.random()
                spot = rng.randint(0, len(data))
                if op < 0.3:
                    data[spot:spot] = rng.choice(pieces)
                elif op < 0.5 and data:
                    del data[spot:spot + rng.randint(1, 20)]
                elif op < 0.7 and data:
                    data[min(spot, len(data) - 1)] = rng.randrange(256)
                elif op < 0.85:
                    data = data[:spot]  # truncated
                else:
                    data = bytearray(rng.randbytes(rng.randint(1, 300)))
            return bytes(data)
        cases = [mutate(rng.choice(good)) for _ in range(10_500)]

        def fds():
            return len(os.listdir("/proc/self/fd"))

        def fd_names():
            names = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    names.append(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass
            return sorted(names)
        statuses = {}

        def send(chunk):
            seen = []
            for data in chunk:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                        sock.sendall(data)
                        sock.shutdown(socket.SHUT_WR)  # what was sent is all there is
                        answer = b""
                        while len(answer) < 100_000:
                            part = sock.recv(65536)
                            if not part:
                                break
                            answer += part
                except (ConnectionResetError, BrokenPipeError):
                    continue
                for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer):
                    seen.append(int(status))
            return seen

        def settle(threads):
            deadline = time.monotonic() + 10
            while threading.active_count() > threads and time.monotonic() < deadline:
                time.sleep(0.1)
        threads_at_start = threading.active_count()
        # A warm-up first: SQLite keeps a few closed descriptors for reuse; measure after it.
        warm_up, cases = cases[:500], cases[500:]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, [warm_up[i::8] for i in range(8)]))
        settle(threads_at_start)
        before_threads, before_fds, before_names = threading.active_count(), fds(), fd_names()
        with ThreadPoolExecutor(8) as pool:
            for seen in pool.map(send, [cases[i::8] for i in range(8)]):
                for status in seen:
                    statuses[status] = statuses.get(status, 0) + 1
        server_errors = {s: n for s, n in statuses.items() if s >= 500 and s != 503}
        self.assertEqual(server_errors, {}, self.log.getvalue()[-3000:])
        self.assertGreater(sum(statuses.values()), 5000)
        self.assertEqual(len(cases), 10_000)
        deadline = time.monotonic() + 10
        while (threading.active_count() > before_threads
               or fds() > before_fds) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertLessEqual(threading.active_count(), before_threads, "threads leaked")
        after_names = fd_names()
        database = [n for n in after_names if n.startswith(self.db)]
        # (descriptors other tests of this process left may close meanwhile)
        from collections import Counter
        self.assertEqual(Counter(n for n in after_names if not n.startswith(self.db))
                         - Counter(n for n in before_names if not n.startswith(self.db)), Counter(),
                         "file descriptors leaked")
        # SQLite keeps a closed connection's descriptor for reuse while another holds a lock:
        # at most one per concurrent connection, not one per request.
        self.assertLessEqual(len(database), len([n for n in before_names if n.startswith(self.db)])
                             + 8, f"database descriptors leaked: {database}")
        self.assertNotIn("Traceback", self.log.getvalue())
        self.app.auth_limiter = ia.RateLimiter(20)  # the fuzzing tripped it, as it should
        self.assertEqual(self.create()[0], 201)
        other_before = len([n for n in before_names if not n.startswith(self.db)])
        print(f"\nfuzz: {len(cases)} requests sent, answers by status "
              f"{dict(sorted(statuses.items()))}, "
              f"threads {before_threads}->{threading.active_count()}, other fds {other_before}->"
              f"{len(after_names) - len(database)}, database fds "
              f"{before_fds - other_before}->{len(database)}", file=sys.stderr)


class ThousandConnectionsTest(ServerProcessMixin, TempDirTestCase):

    def test_a_thousand_simultaneous_connections(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        store = ia.Store(self.db)
        key = ia.create_key(store, "example.com")
        store.close()
        proc, port = self.start("--quiet", "--max-connections", "200")
        socks = []
        started = time.monotonic()
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
        time.sleep(1)  # let the server accept them all: 200 served, 800 refused at once
        request = (f"GET /invites_api?key={key} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                   .encode())
        for sock in socks:
            try:
                sock.sendall(request)
            except OSError:
                pass
        answers = {}
        for sock in socks:
            try:
                data = sock.recv(200)
            except OSError:
                data = b""
            status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else None
            answers[status] = answers.get(status, 0) + 1
            sock.close()
        elapsed = time.monotonic() - started
        # 200 served at once; the rest refused at once, unless the server had not yet accepted
        # them when slots freed up again (then they were served): nothing unanswered.
        self.assertEqual(set(answers) - {201, 503}, set(), answers)
        self.assertGreaterEqual(answers[201], 200)
        self.assertGreater(answers.get(503, 0), 0)
        self.assertEqual(answers[201] + answers[503], 1000)
        self.assertLess(elapsed, 30)
        self.assertEqual(self.create(key)[0], 201)  # still up
        created = ia.Store(self.db).read("SELECT count(*) FROM invites")[0][0]
        self.assertEqual(created, answers[201] + 1)
        print(f"\n1000 connections: {answers} in {elapsed:.1f} s", file=sys.stderr)
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)


# ---------------------------------------------------------------------------
# The database: durable writes, locks, faults, its file, upgrades, tokens at rest
# ---------------------------------------------------------------------------

class DurabilityTest(TempDirTestCase):

    def test_every_connection_commits_with_wal_and_full_sync(self):
        store = ia.Store(self.db)
        store.start_group_commit()
        self.addCleanup(store.stop_group_commit)
        settings = store.write(lambda conn: (conn.execute("PRAGMA journal_mode").fetchone()[0],
                                             conn.execute("PRAGMA synchronous").fetchone()[0]))
        self.assertEqual(settings, ("wal", 2))  # 2 = FULL: the WAL is fsynced at each commit

    def test_the_wal_stays_bounded_under_sustained_writes(self):
        store = ia.Store(self.db)
        store.start_group_commit()
        self.addCleanup(store.stop_group_commit)
        key = ia.create_key(store, "example.com")
        largest = [0]

        def writer(_):
            for _ in range(500):
                ia.create_invite(store, key, options={"note": "n" * 200})
                largest[0] = max(largest[0], os.path.getsize(self.db + "-wal"))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(writer, range(8)))
        self.assertEqual(store.read("SELECT count(*) FROM invites")[0][0], 4000)
        # 4,000 invites with notes make about 40 MB of WAL pages: it started over instead of
        # growing.
        self.assertLess(largest[0], 16 * 1024 * 1024)

    def test_a_write_is_answered_only_after_its_commit_returned(self):
        store = ia.Store(self.db)
        store.start_group_commit()
        self.addCleanup(store.stop_group_commit)
        key = ia.create_key(store, "example.com")
        events = []

        def trace(statement):
            if statement == "COMMIT":
                events.append("commit")
        conn = store.write(lambda conn: conn)  # the committer's own connection
        conn.set_trace_callback(trace)
        invite = ia.create_invite(store, key)
        events.append("answered")
        self.assertEqual(events, ["commit", "answered"])
        self.assertIsNotNone(ia.invite_by_token(store, invite["token"]))

    def test_a_failing_write_in_a_batch_leaves_the_others_committed(self):
        store = ia.Store(self.db)
        store.start_group_commit()
        self.addCleanup(store.stop_group_commit)
        key = ia.create_key(store, "example.com")
        gate = threading.Event()
        results = []
        # Hold the committer so the next writes land in one batch.
        blocker = threading.Thread(target=lambda: store.write(lambda conn: gate.wait(5)))
        blocker.start()
        time.sleep(0.1)

        def good():
            results.append(ia.create_invite(store, key)["token"])

        def bad():
            try:
                store.write(lambda conn: (conn.execute("UPDATE keys SET name = 'changed'"), 1 / 0))
            except Exception as e:
                results.append(type(e).__name__)
        workers = [threading.Thread(target=f) for f in (good, bad, good)]
        for w in workers:
            w.start()
        time.sleep(0.1)
        gate.set()
        for w in workers + [blocker]:
            w.join(5)
        tokens = [r for r in results if len(r) == 24]
        self.assertEqual(len(tokens), 2)
        self.assertIn("ZeroDivisionError", results)
        # the failed write left nothing behind
        self.assertEqual(store.key(key.split("/")[0])["name"], "")
        for token in tokens:
            self.assertIsNotNone(ia.invite_by_token(store, token))
        self.assertEqual(store.read("SELECT count(*) FROM invites")[0][0], 2)


class LockTest(ServerProcessMixin, TempDirTestCase):
    """Another process holds the database's write lock: only writes wait."""

    def hold_the_lock(self):
        """Start a process that holds the database's write lock until killed; return it."""
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(300)"), self.db],
            stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (holder.kill(), holder.wait(), holder.stdout.close()))
        self.assertEqual(wait_for_line(holder.stdout).strip(), "locked")
        return holder

    def test_only_writes_wait_for_a_lock_held_elsewhere(self):
        key = self.make_key()
        proc, port = self.start("--busy-timeout", "60")

        def get(path):
            return self.request("GET", path)[0]

        location = self.create(key)[1]["location"]
        holder = self.hold_the_lock()
        writes = []
        writer = threading.Thread(target=lambda: writes.append(get(f"/invites_api?key={key}")))
        writer.start()
        wait_until(lambda: self.open_connections() == 1, "the write waits for the lock")
        for path, status in (("/nope", 404), ("/metrics", 200),
                             (location[location.index("/invite"):], 200),
                             (f"/invites_api/invites?key={key}", 200)):
            self.assertEqual(get(path), status, path)
            # answered while the write still waits: not held up by it
            self.assertEqual(writes, [], path)
        holder.kill()
        holder.wait()
        writer.join(60)
        self.assertEqual(writes, [201])  # the lock is gone: the waiting write goes through

    def test_a_lock_held_past_the_busy_timeout_says_the_database_is_busy(self):
        key = self.make_key()
        proc, port = self.start("--busy-timeout", "0.5")
        self.hold_the_lock()
        for headers, body in (({}, b"the database is busy (another invites_api is writing it); try "
                               b"again\n"),
                              ({"Accept": "application/json"},
                               b'{"error": "the database is busy (another invites_api is writing '
                               b'it); try again"}\n')):
            status, answer, got = self.create(key, headers=headers)
            self.assertEqual((status, got), (503, body))
            self.assertEqual(answer["retry-after"], "5")
        # (after its 5 s busy timeout)
        code, out, err = run_main("--db", self.db, "create", "example.com")
        self.assertEqual((code, out, err),
                         (1, "", "error: the database is busy (another invites_api is writing it); "
                                 "try again\n"))


class FaultTest(LiveServerTestCase):

    def test_disk_full_is_503_half_writes_nothing_and_recovers(self):
        self.assertEqual(self.create()[0], 201)
        pages = self.store.write(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
        # the group committer's connection: the only writer
        writer = self.store.write(lambda conn: conn)
        writer.execute(f"PRAGMA max_page_count = {pages}")
        statuses = []
        for i in range(300):  # fill the last pages, then the disk is "full"
            status, headers, _ = self.create(extra=f"&note={'n' * 190}{i}")
            statuses.append(status)
            if status == 503:
                self.assertIn("retry-after", headers)
                break
        self.assertEqual(statuses[-1], 503)
        count = self.invite_count()
        # nothing half-written
        self.assertEqual(self.store.key(self.key_id)["invites_created"], count)
        self.assertEqual(self.create(extra=f"&note={'n' * 200}")[0], 503)
        writer.execute("PRAGMA max_page_count = 1073741823")  # space returns
        self.assertEqual(self.create()[0], 201)
        self.assertEqual(self.invite_count(), count + 1)
        self.assertIn("StoreError", self.log.getvalue())

    def test_a_lock_held_by_another_process_is_503_then_recovers(self):
        self.store.busy_timeout = 0.3
        self.store.stop_group_commit()
        self.store._local = threading.local()
        self.store.start_group_commit()
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); "
            "time.sleep(float(sys.argv[2]))"), self.db, "2"], stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (holder.kill(), holder.wait(), holder.stdout.close()))
        self.assertEqual(wait_for_line(holder.stdout).strip(), "locked")
        started = time.monotonic()
        status, headers, _ = self.create()
        self.assertEqual(status, 503)
        self.assertIn("retry-after", headers)
        self.assertLess(time.monotonic() - started, 2)  # the busy timeout, not a hang
        holder.wait(10)
        self.assertEqual(self.create()[0], 201)

    def test_a_deleted_or_read_only_database_gives_clear_errors_and_no_crash(self):
        self.assertEqual(self.create()[0], 201)
        os.chmod(self.db, 0o400)
        status, _, body = self.create()
        self.assertEqual(status, 503)
        self.assertIn(b"made read-only", body)
        os.chmod(self.db, 0o600)
        self.assertEqual(self.create()[0], 201)
        os.rename(self.db, self.db + ".moved")
        status, _, body = self.create()
        self.assertEqual(status, 503)
        self.assertIn(b"was deleted while in use", body)
        self.assertEqual(self.request("GET", "/health")[0], 503)
        self.assertIn("was deleted while in use", self.log.getvalue())
        os.rename(self.db + ".moved", self.db)
        self.assertEqual(self.create()[0], 201)  # back in place: it serves again


class CliDatabaseErrorsTest(TempDirTestCase):

    def assert_clean_error(self, path, code, err):
        self.assertEqual(code, 1, err)
        self.assertTrue(err.startswith("error: "), err)
        self.assertIn(path, err)
        self.assertNotIn("Traceback", err)

    def test_a_directory_as_db_is_an_error(self):
        code, _, err = run_main("--db", self.dir, "list", "example.com")
        self.assert_clean_error(self.dir, code, err)

    def test_a_non_sqlite_file_is_an_error_and_left_untouched(self):
        path = os.path.join(self.dir, "notes.txt")
        content = b"my precious notes, not a database\n" * 100
        with open(path, "wb") as f:
            f.write(content)
        self.assert_refused_and_untouched(path)

    def assert_refused_and_untouched(self, path):
        """Both key commands refuse the file with a clean error, and leave it as it was."""
        with open(path, "rb") as f:
            content = f.read()
        for argv in (("create", "example.com"), ("list", "example.com")):
            code, _, err = run_main("--db", path, *argv)
            self.assert_clean_error(path, code, err)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), content)

    def test_a_corrupt_database_is_an_error_and_left_untouched(self):
        path = os.path.join(self.dir, "corrupt.db")
        ia.Store(path).close()
        with open(path, "r+b") as f:
            f.seek(100)  # keep the 100-byte header, wreck the schema and the tables
            f.write(os.urandom(8192))
        self.assert_refused_and_untouched(path)

    def test_an_unwritable_path_is_an_error(self):
        blocker = os.path.join(self.dir, "a-file")
        open(blocker, "w").close()
        for path in (os.path.join(blocker, "x.db"), os.path.join(self.dir, "missing-dir", "x.db")):
            code, _, err = run_main("--db", path, "create", "example.com")
            self.assert_clean_error(path, code, err)

    def test_a_read_only_database_directory_is_an_error(self):
        if os.geteuid() == 0:
            self.skipTest("root can write anywhere; covered by the other paths")
        os.chmod(self.dir, 0o500)
        self.addCleanup(os.chmod, self.dir, 0o700)
        code, _, err = run_main("--db", self.db, "create", "example.com")
        self.assert_clean_error(self.db, code, err)

    def test_a_newer_schema_is_refused(self):
        ia.Store(self.db)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.execute("PRAGMA user_version = 99")
        code, _, err = run_main("--db", self.db, "list", "example.com")
        self.assert_clean_error(self.db, code, err)
        self.assertIn("newer", err)


def mount_tmpfs(test, path, size):
    """Mount a tmpfs of size (e.g. "800k") on path until the test ends (needs root)."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        message = f"cannot mount a tmpfs: {done.stderr.strip()}"
        if os.environ.get("INVITES_API_REQUIRE_ALL") == "1":
            raise AssertionError(message + " (INVITES_API_REQUIRE_ALL=1)")
        raise unittest.SkipTest(message)
    test.addCleanup(subprocess.run, ["umount", "-l", path], capture_output=True)


def schema_1_database(path, invites):
    """Make a database as invites_api's first schema left it, holding that many invites."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in ia.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO invites (token, host, type, uri, key_id, created_at, "
                         "expires_at) VALUES (?, 'example.com', 'register', ?, 'k', 1, 2)",
                         ((f"t{i:023d}", f"xmpp:example.com?register;preauth=t{i:023d}") for i
                          in range(invites)))
        conn.execute("COMMIT")


def as_nobody(*argv):
    """Run invites_api.py as the user nobody (with Debian's Python); return the CompletedProcess."""
    return subprocess.run(["runuser", "-u", "nobody", "--", require_program("/usr/bin/python3"),
                           SCRIPT, *argv], capture_output=True, text=True, timeout=60, cwd="/")


class DatabaseFileTest(TempDirTestCase):
    """The database file stays private and its own, and storage errors say what happened (issue 29).
    """

    def mode(self, path):
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_a_file_we_set_up_is_private_and_so_are_the_directories_we_make(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        open(self.db, "w").close()  # made empty by touch: 0644
        self.assertEqual(self.mode(self.db), 0o644)
        store = ia.Store(self.db)
        self.addCleanup(store.close)
        ia.create_key(store, "example.com")
        for path in (self.db, self.db + "-wal", self.db + "-shm"):
            self.assertEqual(self.mode(path), 0o600, path)
        # The default path, under umask 000: every directory made for it is 0700.
        home = os.path.join(self.dir, "home")
        os.mkdir(home, 0o755)
        env = {k: v for k, v in os.environ.items() if k != "INVITES_API_DB"}
        done = subprocess.run([sys.executable, SCRIPT, "create", "example.com"],
                              env=dict(env, HOME=home),
                              preexec_fn=lambda: os.umask(0), capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        for path in (".local", ".local/share", ".local/share/invites_api"):
            self.assertEqual(self.mode(os.path.join(home, path)), 0o700, path)
        self.assertEqual(self.mode(os.path.join(home, ".local/share/invites_api/invites.db")),
                         0o600)

    def test_another_programs_sqlite_file_is_refused_and_left_as_it_was(self):
        for version in (0, 3):
            path = os.path.join(self.dir, f"notes{version}.db")
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.execute("CREATE TABLE notes (text)")
                conn.execute("INSERT INTO notes VALUES ('my precious notes')")
                conn.execute(f"PRAGMA user_version = {version}")
                conn.commit()
            with open(path, "rb") as f:
                before = f.read()
            for argv in (("create", "example.com"), ("list", "example.com"),
                         ("serve", "--port", "0")):
                code, out, err = run_main("--db", path, *argv)
                self.assertEqual((code, out), (1, ""), argv)
                self.assertEqual(err,
                                 f"error: database {path!r} is another program's SQLite database "
                                 "(tables notes), not invites_api's: give --db a file of its own\n")
            with open(path, "rb") as f:
                self.assertEqual(f.read(), before)
            self.assertEqual(sorted(os.listdir(self.dir)),
                             sorted(n for n in os.listdir(self.dir) if "-" not in n))

    def test_serve_warns_of_a_database_other_users_can_read(self):
        ia.Store(self.db).close()
        os.chmod(self.db, 0o644)
        proc = subprocess.Popen([sys.executable, SCRIPT, "--db", self.db, "serve", "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (proc.kill(), proc.wait(), proc.stdout.close(),
                                 proc.stderr.close()))
        self.assertEqual(wait_for_line(proc.stderr, 60),
                         f"warning: database {self.db} can be read by other users (its keys' "
                         "hashes, its invites): "
                         # (SQLite gave them its mode)
                         f"chmod 600 {self.db} {self.db}-wal {self.db}-shm\n")
        self.assertIn("serving on", wait_for_line(proc.stdout, 60))

    def test_an_upgrade_on_a_full_disk_says_so_and_leaves_the_file_as_it_was(self):
        disk = os.path.join(self.dir, "disk")
        mount_tmpfs(self, disk, "2400k")
        schema_1_database(self.db, 2700)  # about 480 KB (its upgrade rebuilds the table of invites)
        path = shutil.copy(self.db, disk)
        with open(path, "rb") as f:
            before = f.read()
        filler = os.path.join(disk, "filler")
        with open(filler, "wb") as f:  # leave about 150 KB free
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            f.write(b"\0" * (free - 150_000))
        code, out, err = run_main("--db", path, "list", "example.com")
        self.assertEqual((code, out), (1, ""))
        self.assertRegex(err,
                         rf"^error: cannot upgrade database {re.escape(repr(path))}: the disk is "
                         rf"full \(free some space in {re.escape(disk)}\): upgrading it needs up "
                         r"to 1\.4[0-9] MB free \(three times the database's size\), [0-9.]+ KB "
                         r"were; it is left as it was\n\Z")
        self.assertNotIn("rollback", err)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        os.remove(filler)  # with the space back, it upgrades
        code, out, err = run_main("--db", path, "list", "example.com")
        self.assertEqual((code, out), (0, ""), err)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], len(ia.MIGRATIONS))
            self.assertEqual(conn.execute("SELECT count(*) FROM invites").fetchone()[0], 2700)

    def test_a_read_only_mount_a_read_only_directory_and_another_users_file_each_say_so(self):
        os.chmod(self.dir, 0o755)  # (nobody goes through it)
        disk = os.path.join(self.dir, "disk")
        mount_tmpfs(self, disk, "2m")
        path = os.path.join(disk, "invites.db")
        ia.Store(path).close()
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        for argv in (("list", "example.com"), ("create", "example.com")):
            code, out, err = run_main("--db", path, *argv)
            self.assertEqual((code, out, err),
                             (1, "", f"error: database {path!r} is on a file system mounted "
                                     "read-only: remount it read-write, or give "
                                     "a --db elsewhere\n"))
        subprocess.run(["mount", "-o", "remount,rw", disk], check=True)
        # A directory its owner may not write (where SQLite makes the -wal and -shm).
        folder = os.path.join(disk, "nobodys")
        os.mkdir(folder)
        shutil.chown(folder, "nobody")
        self.assertEqual(as_nobody("--db", f"{folder}/invites.db", "create",
                                   "example.com").returncode, 0)
        os.chmod(folder, 0o555)
        done = as_nobody("--db", f"{folder}/invites.db", "list", "example.com")
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertEqual(done.stderr,
                         f"error: database '{folder}/invites.db' is in a directory this user "
                         "(nobody) may not write, where SQLite makes its -wal and -shm files: "
                         f"make {folder} writable for the database's owner\n")
        # Another user's file.
        os.chmod(disk, 0o755)
        done = as_nobody("--db", path, "list", "example.com")
        self.assertEqual(done.stderr,
                         f"error: database {path!r} belongs to root (mode 600) and this user "
                         "(nobody) may not write it: run as its owner (e.g. sudo -u OWNER), or "
                         "see \"Which database\" in docs/database.md to share it\n")
        # Its own file, made read-only.
        shutil.chown(path, "nobody")
        os.chmod(path, 0o400)
        done = as_nobody("--db", path, "list", "example.com")
        self.assertEqual(done.stderr,
                         f"error: database {path!r} is read-only (mode 400): chmod u+w {path}\n")


# What each schema version wrote of an invite (the columns it had), and of the account a use made.
_V1_INVITE = ("token", "host", "type", "uri", "url", "key_id", "created_at", "expires_at",
              "uses_left")
_V2_INVITE = _V1_INVITE + ("uses", "username", "note", "revoked_at", "done_at")
_V3_INVITE = _V2_INVITE + ("backend",)
_V8_INVITE = _V3_INVITE + ("account_mark",)


def old_schema_database(path, version, program_dir, killed):
    """Make a database of an earlier schema version, holding invites as that version's code wrote
    them (tokens in plain text: the column, the stored URI, the accounts), and 200 more; return (its
    connection, open if killed, the links handed out: {token: (what it is, the status and uses left
    it must keep)}). killed: its last writes stay in the WAL, as a server killed with -9 leaves
    them; else they are in the file, as a clean stop leaves them."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    for statements in ia.MIGRATIONS[:version]:
        for statement in statements:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.execute("INSERT INTO keys (id, host, secret_hash, created_at) VALUES ('oldkey', "
                 "'example.com', x'00', 0)")
    columns = (_V8_INVITE if version >= 8 else _V3_INVITE if version >= 3
               else _V2_INVITE if version >= 2 else _V1_INVITE)
    now, links = int(time.time()), {}

    def invite(kind, status, uses_left, uses=1, expires=86400, username=None, revoked=None,
               backend="builtin", url=None, mark=None, token=None):
        token = token or ia._random_id(18)  # (before schema 10, ours were all random)
        jid = f"{username}@example.com" if username else "example.com"
        row = {"token": token, "host": "example.com", "type": "reset" if kind == "reset"
               else "register",
               "uri": f"xmpp:{jid}?register;preauth={token}", "url": url, "key_id": "oldkey",
               "created_at": now - 60, "expires_at": now + expires, "uses_left": uses_left,
               "uses": uses, "username": username, "note": f"{kind} note", "revoked_at": revoked,
               "done_at": revoked, "backend": backend, "account_mark": mark}
        conn.execute(f"INSERT INTO invites ({', '.join(columns)}) VALUES "
                     f"({', '.join('?' * len(columns))})", [row[c] for c in columns])
        links[token] = (kind, status, uses_left)
        return token

    invite("register", "valid", 1)
    invite("used", "used", 0)
    invite("expired", "expired", 1, expires=-10)
    if version >= 2:
        shared = invite("shared", "valid", 2, uses=3)
        invite("bound", "valid", 1, username="erin")
        invite("revoked", "revoked", 1, revoked=now - 30)
        if version >= 6:
            conn.execute("INSERT INTO accounts (token, host, username, action, created_at) "
                         "VALUES (?, 'example.com', 'carol', 'create', ?)", (shared, now - 50))
    # a server's invite (Prosody's): its token is the server's, kept as it keeps it
    if version >= 3:
        token = ia._random_id(18)
        invite("server", "unknown", 1, backend="prosody",
               url=f"https://example.com/invites_page?{token}", token=token)
    # (schema 7's resets named no account: any alice; from 8, alice as she was then)
    if version >= 7:
        invite("reset", "valid", 1, username="alice", mark="mark-alice" if version >= 8 else None)
    for n in range(200):  # (so that the old table spans many pages)
        invite(f"more{n}", "valid", 1)
    with open(os.path.join(program_dir, "accounts"), "a") as f:
        f.write("alice an old password\ncarol carol's password\n")
    if not killed:
        conn.close()
    return conn, links


def account_program(directory):
    """Write an accounts program (--accounts command) that keeps "NAME PASSWORD" lines in a file;
    return (its argv, the file)."""
    accounts = os.path.join(directory, "accounts")
    program = write_program(directory, "accounts-program", f"""read password
f='{accounts}'
touch "$f"
case "$1" in
  create) grep -q "^$2 " "$f" && exit 3; echo "$2 $password" >> "$f";;
  reset) grep -q "^$2 " "$f" || exit 3; grep -v "^$2 " "$f" > "$f.new"
         echo "$2 $password" >> "$f.new"; mv "$f.new" "$f";;
  exists) grep -q "^$2 " "$f" || exit 3;;
  mark) grep -q "^$2 " "$f" || exit 3; echo "mark-$2";;
  *) exit 1;;
esac
""")
    return [program, "{action}", "{username}", "{host}"], accounts


def database_bytes(path):
    """Return the bytes of a database file and its WAL, as whoever copies them reads them."""
    data = b""
    for name in (path, path + "-wal"):
        if os.path.exists(name):
            with open(name, "rb") as f:
                data += f.read()
    return data


class TokensAtRestTest(Requests, TempDirTestCase):
    """Only hashes of our tokens are stored, and an upgrade hashes those an earlier version stored,
    every link handed out still working (issue 31)."""

    def serve(self, store, program):
        """Serve store in a thread, making accounts through program; set self.port."""
        app = ia.App(store, ia.Builtin(ia.Accounts(program)), ia.Settings(log=io.StringIO()))
        server = ia.make_server(app, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        self.addCleanup(lambda: (server.shutdown(), thread.join(5), server.server_close()))
        self.port = server.server_address[1]

    def assert_nothing_plain(self, path, links, what):
        """Fail if the file or its WAL holds any of our links' tokens (any 16 characters of one) or
        URIs."""
        data = database_bytes(path)
        self.assertGreater(len(data), 4096)
        for token, (kind, _, _) in links.items():
            if kind == "server":
                continue  # (the XMPP server's own: kept, as it keeps it)
            # (not assertNotIn: it would print the file)
            for piece in (token, token[-16:], f"preauth={token}"):
                self.assertFalse(piece.encode() in data,
                                 f"{what}: the {kind} invite's token is in the file")

    def test_an_id_tells_nothing_of_its_tokens_random_part_and_a_taken_one_makes_a_new_token(self):
        store = ia.Store(self.db)
        self.addCleanup(store.close)
        key = ia.create_key(store, "example.com")
        with mock.patch.object(ia, "now", return_value=T0):
            made = [ia.create_invite(store, key) for _ in range(20)]
        # The first 5 characters: the time alone (the same for all made in a second, so that new ids
        # share index pages); the other 7: of the hash, which the database holds anyway.
        self.assertEqual({i["id"][:5] for i in made}, {made[0]["token"][:5]})
        for invite in made:
            digest = hashlib.sha256(invite["token"].encode()).digest()
            digest = base64.urlsafe_b64encode(digest).decode()
            self.assertEqual(invite["id"], invite["token"][:5] + digest[:7])
            self.assertEqual(store.invite(invite["id"])["token_hash"],
                             hashlib.sha256(invite["token"].encode()).digest())
        # A token whose id another invite has (1 in 2**42 within 4 s) is made again, in the same
        # write.
        fresh = ia._new_token()
        with mock.patch.object(ia, "_new_token", side_effect=[made[0]["token"], fresh]):
            again = ia.create_invite(store, key)
        self.assertEqual(again["token"], fresh)
        self.assertEqual(store.key(key.split("/")[0])["invites_created"], 21)
        self.assertEqual({ia.invite_by_token(store, t)["id"] for t in (made[0]["token"], fresh)},
                         {made[0]["id"], ia.invite_id(fresh)})
        # A token that gives an invite's id but not its hash opens nothing.
        forged = made[0]["id"][:5] + "A" * 19
        with mock.patch.object(ia, "invite_id", return_value=made[0]["id"]):
            self.assertIsNone(ia.invite_by_token(store, forged))

    def test_an_upgrade_from_each_earlier_schema_hashes_every_token_and_every_link_works(self):
        person = Invitee(self, screenshot_dir(self, "upgraded-links"))
        for version in range(1, len(ia.MIGRATIONS)):
            with self.subTest(schema=version):
                folder = os.path.join(self.dir, f"v{version}")
                os.mkdir(folder)
                path = os.path.join(folder, "invites.db")
                program, accounts = account_program(folder)
                old, links = old_schema_database(path, version, folder, killed=version % 2 == 0)
                before = database_bytes(path)
                token = next(t for t, (kind, _, _) in links.items() if kind == "register")
                self.assertIn(token.encode(), before)  # (the check below can fail)
                store = ia.Store(path)  # the upgrade, with the old WAL still there
                self.addCleanup(store.close)
                self.assertEqual(store.read("PRAGMA user_version")[0][0], len(ia.MIGRATIONS))
                self.assert_nothing_plain(path, links, f"schema {version}, just upgraded")
                old.close()
                # Counts and statuses as they were; each invite listed by its id.
                listed = {i["id"]: i for i
                          in ia.list_invites(store, "example.com", status=None, limit=1000)[0]}
                self.assertEqual(len(listed), len(links))
                for token, (kind, status, uses_left) in links.items():
                    invite = listed[ia.invite_id(token)]
                    self.assertEqual((invite["uses_left"], ia.invite_state(store, invite)),
                                     (uses_left, status), kind)
                    self.assertEqual(invite["note"] if version >= 2 else None, f"{kind} note"
                                     if version >= 2 else None)
                if version >= 6:  # the account an earlier use made is still the invite's
                    shared = next(t for t, (kind, _, _) in links.items() if kind == "shared")
                    self.assertEqual([a["username"] for a in store.accounts(ia.invite_id(shared))],
                                     ["carol"])
                # Every link handed out opens its page, and signs up (or resets) through the form.
                self.serve(store, program)
                for token, (kind, status, _) in links.items():
                    # (its page is the server's: its token, URI and URL are kept)
                    if kind == "server":
                        server = ia.invite_by_reference(store, ia.invite_id(token))
                        self.assertEqual((server["token"], server["url"], server["uri"]),
                                         (token, f"https://example.com/invites_page?{token}",
                                          f"xmpp:example.com?register;preauth={token}"))
                        continue
                    code, _, page = self.request("GET", f"/invite?{token}")
                    self.assertEqual(code, 200 if status == "valid" else 410, (kind, page[:300]))
                    if status != "valid" or kind.startswith("more"):
                        continue
                    page_url = f"http://127.0.0.1:{self.port}/invite?{token}"
                    # (in Chromium, as the invitee takes the link they were sent)
                    if kind == "register":
                        self.assertEqual(person.sign_up(page_url, "newregister",
                                                        "newregister's password"), 200)
                        self.assertIn("Your account newregister@example.com is ready",
                                      person.text())
                        continue
                    if kind == "reset":
                        person.page.goto(page_url)
                        person.page.click("a.button")  # "Set a new password"
                        self.assertEqual(person.submit(None, "a new password"), 200)
                        self.assertIn("Your new password is set", person.text())
                        continue
                    # (the others: the form as sent)
                    user = "erin" if kind == "bound" else f"new{kind}"
                    form = {"token": token, "user": user, "password": f"{user}'s password",
                            "password_confirm": f"{user}'s password"}
                    self.assertEqual(self.post_form(form, follow=True)[0], 200, kind)
                with open(accounts) as f:
                    made = f.read().splitlines()
                self.assertIn("newregister newregister's password", made)
                if version >= 2:
                    self.assertIn("newshared newshared's password", made)
                    self.assertIn("erin erin's password", made)
                if version >= 7:
                    self.assertIn("alice a new password", made)
                    self.assertNotIn("alice an old password", made)
                self.assert_nothing_plain(path, links, f"schema {version}, after the sign-ups")
                # And after a checkpoint and VACUUM (they rewrite the file from its live pages).
                store.read("PRAGMA wal_checkpoint(TRUNCATE)")
                store.read("VACUUM")
                self.assert_nothing_plain(path, links, f"schema {version}, after VACUUM")


# ---------------------------------------------------------------------------
# The command line: streams, exit codes, usage, and the documentation kept true
# ---------------------------------------------------------------------------

class CliTest(CliTestCase):
    """The command line itself: where --db may go, --version and --help, usage errors."""

    def test_db_is_accepted_before_or_after_the_subcommand_and_from_the_environment(self):
        other = os.path.join(self.dir, "other.db")
        run_main("create", "example.com", "--db", other)
        self.assertEqual(run_main("--db", other, "list", "example.com")[1].count("\n"), 1)
        with mock.patch.dict(os.environ, {"INVITES_API_DB": other}):
            self.assertEqual(run_main("list", "example.com")[1].count("\n"), 1)
            self.assertEqual(run_main("list", "example.com", "--db", self.db)[1], "")

    def test_version_and_help_with_examples(self):
        code, out, _ = run_main("--version")
        self.assertEqual((code, out), (0, f"invites_api {ia.__version__}\n"))
        for command in ("serve", "create", "list", "update", "delete", "invites", "invites create",
                        "invites list", "invites show", "invites revoke", "invites redeem"):
            code, out, _ = run_main(*command.split(), "--help")
            self.assertEqual(code, 0)
            self.assertRegex(out, r"\nexamples?:\n", command)
            if command != "invites":
                self.assertIn("--db", out)

    def test_usage_errors_exit_2(self):
        self.assertEqual(run_main()[0], 2)
        self.assertEqual(run_main("frobnicate")[0], 2)
        self.assertEqual(self.cli("delete", "example.com")[0], 2)
        self.assertEqual(self.cli("serve", "--invite-ttl", "soon")[0], 2)
        self.assertEqual(self.cli("serve", "--port", "70000")[0], 2)

    def test_durations(self):
        self.assertEqual(ia.parse_duration("90"), 90)
        self.assertEqual(ia.parse_duration("12h"), 12 * 3600)
        self.assertEqual(ia.parse_duration("1w2d"), 9 * 86400)
        self.assertEqual(ia.parse_duration("1d12h30m"), 86400 + 12 * 3600 + 1800)
        for bad in ("", "0", "5x", "h", "1.5d", "-3d", "d1", "\u00b2", "\u00b2d"):
            with self.assertRaises(ValueError, msg=bad):
                ia.parse_duration(bad)

    def test_a_mistyped_command_lists_the_commands(self):
        # (Python 3.12.8 and 3.13 stopped quoting the choices.)
        self.assertRegex(self._error(["bogus"]),
                         r"invalid choice: 'bogus' \(choose from '?serve'?, '?create'?, "
                         r"'?list'?, '?update'?, '?delete'?, '?invites'?\)")

    @staticmethod
    def _error(argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
            ia.build_parser().parse_args(argv)
        return err.getvalue()


class CliEdgeTest(CliTestCase):
    """Mistakes at the command line's edge get an error that says what to do, and never a secret."""

    def test_past_expiry_full_keys_and_limits_in_the_units_typed(self):
        code, out, err = self.cli("create", "example.com", "--expires", "2020-01-01")
        self.assertEqual(code, 2)
        self.assertIn("argument --expires: expiry '2020-01-01' is in the past (now is 20", err)
        key = self.cli("create", "example.com")[1].strip()
        code, out, err = self.cli("update", "example.com", key.split("/")[0], "--expires",
                                  "2021-06-01T10:00")
        self.assertEqual(code, 2)
        for command in (("delete", "example.com", key),
                        ("update", "example.com", key, "--name", "x"),
                        ("invites", "list", "example.com", "--key", key)):
            code, out, err = self.cli(*command)
            self.assertEqual((code, out), (1, ""), command)
            self.assertEqual(err,
                             "error: give the key's id alone (the part before the '/'), never its "
                             "secret; `list HOST` shows ids\n")
            self.assertNotIn(key.split("/")[1], err)
        store = ia.Store(self.db)
        self.addCleanup(store.close)
        with self.assertRaises(ia.BadRequest) as raised:
            ia.create_invite(store, key, options={"ttl": "30d"})
        self.assertEqual(str(raised.exception),
                         "ttl '30d' is over this key's limit of 1w (an operator can raise "
                         "it: update HOST KEY_ID --max-ttl)")
        ia.update_key(store, "example.com", key.split("/")[0], max_ttl=86400)
        with self.assertRaises(ia.BadRequest) as raised:
            ia.create_invite(store, key, options={"ttl": "2d"})
        self.assertIn("limit of 1d (an operator", str(raised.exception))

    def test_serves_errors_use_its_own_usage_and_lone_options_are_refused(self):
        code, out, err = self.cli("serve", "--port", "99999")
        self.assertEqual(code, 2)
        self.assertIn("usage: invites_api.py serve ", err)
        self.assertIn("invites_api.py serve: error: argument --port: invalid port '99999': 0 to "
                      "65535", err)
        for argv, words in ((["serve", "--accounts-command", "/bin/true {action}"],
                             "--accounts-command does nothing here: it is for --accounts command"),
                            (["invites", "create", "example.com", "--backend-command", "x {host}"],
                             "--backend-command does nothing here: it is for --backend command"),
                            (["serve", "--accounts", "prosody", "--ejabberd-api",
                              "http://127.0.0.1:1/api"],
                             "--ejabberd-api does nothing here: it is for --backend ejabberd or "
                             "--accounts ejabberd")):
            code, out, err = self.cli(*argv)
            self.assertEqual((code, err), (1, f"error: {words}\n"), argv)

    def test_a_bad_ejabberd_api_url_is_one_error_line(self):
        for url, words in (("ftp://x/api",
                            "--ejabberd-api 'ftp://x/api': expected http://HOST:PORT/api"),
                           ("http://robot:s3cret@127.0.0.1/api",
                            "--ejabberd-api: put credentials in "
                            "--ejabberd-api-auth-file, not in the URL")):
            result = subprocess.run([sys.executable, SCRIPT, "--db", self.db, "serve", "--accounts",
                                     "ejabberd",
                                     "--ejabberd-api", url], capture_output=True, text=True,
                                    timeout=30)
            self.assertEqual((result.returncode, result.stdout, result.stderr),
                             (1, "", f"error: {words}\n"))

    def test_a_directory_or_another_users_database_is_named_with_what_to_do(self):
        code, out, err = run_main("--db", self.dir, "list", "example.com")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err,
                         f"error: database {self.dir!r} is a directory: give the path of a file "
                         "(it is made if missing), e.g. --db /var/lib/invites_api/invites.db\n")
        if os.geteuid() != 0:
            self.skipTest("another user's database needs root to make")
        self.cli("create", "example.com")
        os.chmod(self.dir, 0o755)
        script = shutil.copy(SCRIPT, self.dir)  # (where nobody can read it), run by Debian's Python
        result = subprocess.run(["runuser", "-u", "nobody", "--",
                                 require_program("/usr/bin/python3"), script, "--db",
                                 self.db, "list", "example.com"], capture_output=True, text=True,
                                timeout=30, cwd="/")
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr,
                         f"error: database {self.db!r} belongs to root (mode 600) and this user "
                         "(nobody) may not write it: run as its owner (e.g. sudo -u OWNER), or "
                         "see \"Which database\" in docs/database.md to share it\n")

    def test_a_qr_code_of_a_loopback_address_is_warned_of(self):
        code, out, err = self.cli("invites", "create", "example.com", "--qr")
        self.assertEqual(code, 0)
        self.assertIn("warning: the QR code is of http://127.0.0.1:5282/invite?", err)
        self.assertIn("which only this machine can open (a phone cannot): give --public-url", err)
        code, out, err = self.cli("invites", "create", "example.com", "--qr", "--public-url",
                                  "https://{host}")
        self.assertEqual((code, err), (0, ""))


class CronStyleTest(TempDirTestCase):
    """The script run as a subprocess from another directory, as cron would."""

    def run_script(self, *argv, env=None):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.dir, **(env or {})}
        return subprocess.run([sys.executable, SCRIPT, *argv], cwd="/", env=env,
                              capture_output=True, text=True, timeout=30)

    def test_create_then_list_find_the_default_database_under_home(self):
        created = self.run_script("create", "example.com", "cron key")
        self.assertEqual(created.returncode, 0, created.stderr)
        self.assertRegex(created.stdout, r"^[A-Za-z0-9_-]{12}/[A-Za-z0-9_-]{32}\n$")
        path = os.path.join(self.dir, ".local", "share", "invites_api", "invites.db")
        # (stdout is the key alone)
        self.assertEqual(created.stderr, f"a key for example.com, in database {path}\n")
        listed = self.run_script("list", "example.com")
        self.assertEqual(listed.stdout, created.stdout.split("/")[0] + "\tcron key\n")
        self.assertEqual(listed.stderr, f"example.com: 1 key in database {path}\n")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)

    def test_errors_go_to_stderr_with_exit_1_and_no_traceback(self):
        result = self.run_script("delete", "example.com", "nosuchkey")
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr, "error: key 'nosuchkey' not found for host 'example.com'\n")

    def test_usage_errors_exit_2(self):
        result = self.run_script("create", "not a host")
        self.assertEqual(result.returncode, 2)
        self.assertIn("invalid host", result.stderr)

    def test_a_closed_pipe_is_not_a_traceback(self):
        for i in range(3):
            self.run_script("create", "example.com", f"key {i}" + "x" * 90)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.dir}
        reader, writer = os.pipe()
        os.close(reader)
        result = subprocess.run([sys.executable, SCRIPT, "list", "example.com"], stdout=writer,
                                cwd="/", env=env, stderr=subprocess.PIPE, text=True, timeout=30)
        os.close(writer)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNotIn("rror", result.stderr)

    def test_the_script_is_executable_with_a_shebang(self):
        with open(SCRIPT) as f:
            self.assertEqual(f.readline(), "#!/usr/bin/env python3\n")
        self.assertTrue(os.access(SCRIPT, os.X_OK))


class SeedWalkthroughTest(ServerProcessMixin, TempDirTestCase):
    """The seed README, step by step, against a server process."""

    def test_the_seed_readme_walkthrough(self):
        code, out, _ = run_main("--db", self.db, "create", "example.com", "My test key")
        key = out.strip()
        self.assertRegex(key, KEY_RE)
        proc, port = self.start("--quiet")

        status, headers, _ = self.create(key)
        self.assertEqual(status, 201)
        self.assertEqual(self.request("GET", headers["location"].split(str(port), 1)[1])[0], 200)
        self.assertEqual(self.create(key, "&redirect=true")[0], 303)
        self.assertEqual(self.request("GET", "/invites_api", {"Authorization": f"Bearer {key}"})[0],
                         201)
        code, out, _ = run_main("--db", self.db, "list", "example.com")
        self.assertEqual(out, f"{key.split('/')[0]}\tMy test key\n")
        self.assertEqual(run_main("--db", self.db, "delete", "example.com", key.split("/")[0])[0],
                         0)
        self.assertEqual(self.create(key)[0], 403)
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)


def documentation():
    """Return {path: text} of the README and of every page of docs/."""
    paths = ["README.md"] + sorted(os.path.join("docs", name) for name
                                   in os.listdir(os.path.join(HERE, "docs"))
                                   if name.endswith(".md"))
    texts = {}
    for path in paths:
        with open(os.path.join(HERE, path)) as f:
            texts[path] = f.read()
    return texts


def command_options(parser):
    """Return (command, option) for each long option of every command (and of the program: command
    "")."""
    import argparse
    found = set()

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + (name,))
            found.update((" ".join(path), option) for option in action.option_strings
                         if option.startswith("--") and option != "--help")
    walk(parser, ())
    return sorted(found)


def option_definitions(texts, command, option):
    """Return where an option is defined, as (path, row): a table row of its own (its first cell
    starts with a code span, and one of its code spans starts with the option), else its command's
    synopsis row (a first cell starting with a code span that starts with the command and names the
    option). A row that merely uses an option (a first cell like "built-in + `--accounts prosody`")
    defines nothing."""
    named = re.compile(rf"(?<![\w-]){re.escape(option)}(?![\w-])")
    own, synopsis = [], []
    for path, text in texts.items():
        for row in (line for line in text.splitlines() if line.startswith("| `")):
            spans = re.findall(r"`([^`]+)`", row.split("|")[1])
            if any(named.match(span) for span in spans):
                own.append((path, row))
            elif command and any(span.startswith(command + " ") and named.search(span) for span
                                 in spans):
                synopsis.append((path, row))
    return own or synopsis


def json_places(texts, marker):
    """Return the places (a table row, else a paragraph) of the documentation that hold marker."""
    places = []
    for path, text in texts.items():
        for block in re.split(r"\n\s*\n", text):
            rows = [line for line in block.splitlines() if line.startswith("| ")]
            places += [(path, unit) for unit in (rows or [block]) if marker in unit]
    return places


class ReadmeTest(TempDirTestCase):
    """The README and docs/ document every option of every command, and every field of every JSON
    answer, each in exactly one place (a new one fails this until it is documented; a second place
    fails it too)."""

    def undocumented(self, texts, parser=None):
        return [(command, option, [path for path, _ in found])
                for command, option in command_options(parser or ia.build_parser())
                for found in [option_definitions(texts, command, option)] if len(found) != 1]

    def test_every_option_is_defined_in_exactly_one_place(self):
        texts = documentation()
        self.assertEqual(self.undocumented(texts), [])
        # The check itself: a new option is caught, and so is an option defined a second time.
        parser = ia.build_parser()
        serve = next(a for a in parser._actions if a.choices and "serve"
                     in a.choices).choices["serve"]
        serve.add_argument("--a-new-option")
        self.assertEqual(self.undocumented(texts, parser), [("serve", "--a-new-option", [])])
        twice = dict(texts,
                     **{"docs/deploying.md": texts["docs/deploying.md"]
                        + "\n| `--port N` | again |\n"})
        self.assertEqual(self.undocumented(twice),
                         [("serve", "--port", ["docs/cli.md", "docs/deploying.md"])])

    def test_the_readme_is_a_first_page(self):
        readme = documentation()["README.md"]
        self.assertLessEqual(len(readme.splitlines()), 250)
        self.assertLess(readme.index("invites_api.py serve"), readme.index("make test"))
        for page in sorted(name for name in os.listdir(os.path.join(HERE, "docs"))
                           if name.endswith(".md")):
            self.assertIn(f"](docs/{page})", readme)  # (every page is linked from the first one)

    def test_every_json_field_is_documented_in_exactly_one_place(self):
        store = ia.Store(self.db)
        self.addCleanup(store.close)
        key = ia.create_key(store, "example.com", inviter="alice")
        invite = ia.create_invite(store, key)
        ia.sign_up(store, ia.Accounts(["true"]), ia.invite_by_token(store, invite["token"]), "bob",
                   "a long password", "a long password")
        account = store.accounts(invite["id"])[0]
        # what each answer's fields are, by the words that introduce them in the documentation
        answers = {
            "An invite in JSON:": ia.invite_info(invite, "https://example.com/invite",
                                                 accounts=[account]),
            "`list HOST [--json]`": ia.list_keys(store, "example.com")[0],
            "`GET /invite/TOKEN.json`": ia.check_invite(store, invite["token"]),
            "`GET /health`": {"status": "error", "reason": "..."},
        }
        fields = {marker: set(answer) for marker, answer in answers.items()}
        fields["An invite in JSON:"] |= set(ia.invite_info(invite, None,
                                                           accounts=[account])["accounts"][0])
        texts = documentation()
        for marker, names in fields.items():
            places = json_places(texts, marker)
            self.assertEqual(len(places), 1, f"{marker}: {[path for path, _ in places]}")
            for name in names:
                self.assertRegex(places[0][1], rf"[`{{,\s\"]{name}[`}},\"]",
                                 f"{marker} does not name {name}")


class LayoutTest(unittest.TestCase):
    """The shape issues 20 and 32 gave invites_api.py (and its tests' width), kept: a reader's
    limits, checked on the source."""

    @classmethod
    def setUpClass(cls):
        with open(SCRIPT, encoding="utf-8") as f:
            cls.lines = f.read().splitlines()
        cls.defs = [node for node in ast.walk(ast.parse("\n".join(cls.lines)))
                    if isinstance(node, (ast.ClassDef, ast.FunctionDef))]

    def test_no_line_over_100_characters_here_or_in_the_tests(self):
        self.assertEqual([n for n, line in enumerate(self.lines, 1) if len(line) > 100], [])
        with open(os.path.abspath(__file__), encoding="utf-8") as f:
            tests = f.read().splitlines()
        self.assertEqual([n for n, line in enumerate(tests, 1) if len(line) > 100], [])

    def test_no_class_over_250_lines_and_no_function_over_80(self):
        # The limit is a prompt to look, not a rule that cuts: what is longer says why here.
        exempt = {"build_parser": "the argparse table", "qr_masked": "the QR encoder",
                  "Store": "the file, its schema and every query: SQL in one place (issue 32)",
                  "InviteRequests": "every route and page of the application, in one class (issue "
                                    "32)"}
        too_long = [(node.name, node.end_lineno - node.lineno + 1) for node in self.defs
                    if node.end_lineno - node.lineno + 1 > (
                        250 if isinstance(node, ast.ClassDef) else 80)
                    and node.name not in exempt]
        self.assertEqual(too_long, [])

    def test_no_code_asks_which_backend_it_has_but_the_code_that_chooses_one(self):
        # Issue 20: every operation works through the Backend interface. So no comparison with a
        # backend's name ("builtin", "prosody", ...), with BUILTIN or with a backend's .name, and
        # no isinstance() of a backend, outside the code that chooses one: make_backend and the
        # command line's _backend, minted_by (who minted a stored invite) and ejabberd's sweep
        # (which of ejabberd's invites are its own); the string "builtin" only in those, in
        # Builtin's own name and in --backend's choices.
        backends = {"builtin", "prosody", "ejabberd", "command"}

        def innermost(node):
            return min((d for d in self.defs if d.lineno <= node.lineno <= d.end_lineno),
                       key=lambda d: d.end_lineno - d.lineno).name

        def asks(node):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                return any(isinstance(side, ast.Constant) and side.value in backends
                           or isinstance(side, ast.Name) and side.id == "BUILTIN"
                           or isinstance(side, ast.Attribute) and side.attr == "name"
                           and ast.unparse(side.value) != "args"  # (a key's --name)
                           for side in sides)
            return (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance"
                    and re.search(r"\b(Builtin|\w*Backend|AccountMaker|Accounts)\b",
                                  ast.unparse(node.args[1])) is not None)
        tree = ast.parse("\n".join(self.lines))
        asking = {innermost(node) for node in ast.walk(tree) if asks(node)}
        self.assertEqual(asking, {"make_backend", "_backend", "minted_by", "sweep"})
        named = {innermost(node) for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and node.value == "builtin"}
        self.assertEqual(named, {"Builtin", "make_backend", "_backend", "backend_args"})


# ---------------------------------------------------------------------------
# Running the suite: the slowest classes first, in a pool of processes
# ---------------------------------------------------------------------------

# The longest classes start first, so the pool ends together.
SLOW_FIRST = ("SlowClientsTest", "SilentTlsClientsTest", "ProsodyTest", "ProsodyBackportsTest",
              "EjabberdTest", "EjabberdApiTest", "EjabberdApiAuthTest", "Ejabberd26Test",
              "EjabberdWithoutPrivateTest",
              "EjabberdWithoutAdminExtraTest", "ServingTest", "FuzzTest", "QrTest",
              "BackendServerTest", "BrowserTest", "ServerProcessTest", "HealthAndMetricsTest",
              "ThousandConnectionsTest")


def run_class(name):
    """Run one test class; return (its unittest output, tests run, failed, skipped)."""
    stream = io.StringIO()
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(globals()[name])
    result = unittest.TextTestRunner(stream=stream, verbosity=0).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    return stream.getvalue(), result.testsRun, failed, len(result.skipped)


def run_all(jobs):
    """Run every test class in a pool of processes (most tests wait on sockets and programs)."""
    from concurrent.futures import ProcessPoolExecutor
    names = [name for name, value in globals().items() if isinstance(value, type)
             and issubclass(value, unittest.TestCase) and getattr(value, "wanted", True)
             and unittest.defaultTestLoader.getTestCaseNames(value)]
    names.sort(key=lambda n: SLOW_FIRST.index(n) if n in SLOW_FIRST else len(SLOW_FIRST))
    totals = [0, 0, 0]
    with ProcessPoolExecutor(jobs) as pool:
        for name, (output, run, failed, skipped) in zip(names, pool.map(run_class, names)):
            if failed or skipped:
                print(f"--- {name}\n{output}", file=sys.stderr)
            totals = [totals[0] + run, totals[1] + failed, totals[2] + skipped]
    run, failed, skipped = totals
    print(f"{run - failed - skipped} passed, {failed} failed, {skipped} skipped")
    return 0 if run and not failed else 1


if __name__ == "__main__":
    jobs = int(os.environ.get("INVITES_API_TEST_JOBS", "4"))
    if len(sys.argv) == 1 and jobs > 1:
        sys.exit(run_all(jobs))
    program = unittest.main(exit=False)
    result = program.result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    print(f"{result.testsRun - failed - skipped} passed, {failed} failed, {skipped} skipped")
    sys.exit(0 if result.wasSuccessful() and result.testsRun else 1)
