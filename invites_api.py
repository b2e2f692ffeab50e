#!/usr/bin/env python3
"""invites_api: an authenticated HTTP API that mints account invites.

A single-file, standard-library-only take on Prosody's mod_invites_api: API
keys are managed from the command line, and a GET or POST with a key mints an
invite and answers "201 Created" with the invite page in Location.

Commands:
  serve                   run the HTTP API (loopback, port 5282 by default)
  create HOST [NAME]      make an API key for HOST; prints KEY_ID/SECRET once
  list HOST               list HOST's keys, one "KEY_ID<TAB>NAME" per line
  delete HOST KEY_ID      revoke a key at once

Example:
  $ python3 invites_api.py create example.com "My test key"
  t3XbXfBhZ0mJ/0YF5xQ...
  $ curl -i 'http://127.0.0.1:5282/invites_api?key=t3XbXfBhZ0mJ/0YF5xQ...'
  HTTP/1.1 201 Created
  Location: http://127.0.0.1:5282/invite?Vb0tJ...
"""

import argparse
import base64
import hashlib
import hmac
import os
import re
import sqlite3
import sys
import threading
import time

__version__ = "0.1.0"


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

# Next to Prosody's own 5280/5281, without taking either: this often runs on
# the same machine as the XMPP server.
DEFAULT_PORT = 5282
# Loopback only: publishing the API is a decision (a TLS reverse proxy).
DEFAULT_BIND = "127.0.0.1"

# 72 bits: ids are unique across hosts and can be listed without harm.
KEY_ID_BYTES = 9
# 192 bits: far beyond brute force, so one SHA-256 is a sound hash at rest
# (a slow password hash would only slow every request down).
SECRET_BYTES = 24
# 144 bits, URL-safe: an invite token is a bearer credential for sign-up.
TOKEN_BYTES = 18
# Prosody's own default invite lifetime.
DEFAULT_INVITE_TTL = 7 * 86400

# A writer waits this long for another process's lock before giving up (503).
BUSY_TIMEOUT = 5.0
# Longest request line we read; longer ones get 414 (Prosody allows 8 KiB too).
MAX_REQUEST_LINE = 8192
# Largest request body we accept; an invite request needs a few hundred bytes.
MAX_BODY = 8192
# Seconds a connection may sit idle or stall mid-request before we drop it.
DEFAULT_TIMEOUT = 20.0
# Simultaneous connections served; more are refused with a fast 503.
DEFAULT_MAX_CONNECTIONS = 128
# Seconds `serve` waits for requests in flight when asked to stop.
SHUTDOWN_GRACE = 15.0

KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{12,64}\Z")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}\Z")
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_DURATION_RE = re.compile(r"(\d+)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def now():
    """Return the current time in UTC epoch seconds (tests replace this)."""
    return int(time.time())


def iso(ts):
    """Return epoch seconds as ISO 8601 UTC, or None for None."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class Error(Exception):
    """A failure a user can cause or fix: an HTTP status and a CLI exit code."""

    status = 500
    exit_code = 1
    headers = ()


class BadRequest(Error):
    status = 400


class Unauthorized(Error):
    status = 401
    headers = (("WWW-Authenticate", 'Bearer realm="invites_api"'),)


class Forbidden(Error):
    status = 403


class NotFound(Error):
    status = 404


class MethodNotAllowed(Error):
    status = 405

    def __init__(self, method, allowed):
        super().__init__(f"method {method!r} not allowed here")
        self.headers = (("Allow", ", ".join(allowed)),)


class LengthRequired(Error):
    status = 411


class PayloadTooLarge(Error):
    status = 413


class UnsupportedMediaType(Error):
    status = 415


class StoreError(Error):
    """The database cannot be opened, read or written."""

    status = 503
    headers = (("Retry-After", "5"),)


# ---------------------------------------------------------------------------
# Input checks shared by the CLI and HTTP
# ---------------------------------------------------------------------------

def parse_host(text):
    """Return text as a lower-case ASCII domain name; raise ValueError if it is not one."""
    host = text[:-1] if text.endswith(".") else text
    if not host or len(text) > 253:
        raise ValueError(f"invalid host {text!r}: expected a domain name like example.com")
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"invalid host {text!r}: not a valid (internationalised) domain name") from None
    if len(host) > 253 or not all(_LABEL_RE.match(label) for label in host.split(".")):
        raise ValueError(f"invalid host {text!r}: expected a domain name like example.com")
    return host


def parse_key_name(text):
    """Return a key name; raise ValueError on control characters or over 100 characters."""
    if len(text) > 100:
        raise ValueError(f"key name is {len(text)} characters long; at most 100 are allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"key name {text!r} contains control characters (tabs, newlines...)")
    return text


def parse_duration(text):
    """Return seconds for "90", "45m", "12h", "7d", "1w2d"...; raise ValueError otherwise."""
    text = text.strip().lower()
    if text.isdigit():
        seconds = int(text)
    elif text and _DURATION_RE.sub("", text) == "":
        seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_RE.findall(text))
    else:
        raise ValueError(f"invalid duration {text!r}: use seconds or units s m h d w, like 12h or 1w2d")
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be more than zero")
    if seconds > 100 * 365 * 86400:
        raise ValueError(f"invalid duration {text!r}: more than 100 years")
    return seconds


def parse_bool(name, value):
    """Return True/False for true/1/yes or false/0/no; raise BadRequest otherwise."""
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadRequest(f"{name}={value!r}: expected true or false")


# ---------------------------------------------------------------------------
# Store: the schema and the only code that writes SQL
# ---------------------------------------------------------------------------

# One entry per schema version; PRAGMA user_version counts those applied.
MIGRATIONS = [
    (  # 1: keys and invites
        """CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            secret_hash BLOB NOT NULL,
            created_at INTEGER NOT NULL,
            last_used_at INTEGER,
            invites_created INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX keys_by_host ON keys (host)",
        """CREATE TABLE invites (
            token TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            type TEXT NOT NULL,
            uri TEXT NOT NULL,
            url TEXT,
            key_id TEXT,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            uses_left INTEGER NOT NULL DEFAULT 1
        )""",
        "CREATE INDEX invites_by_key ON invites (key_id)",
    ),
]

_KEY_COLUMNS = "id, host, name, secret_hash, created_at, last_used_at, invites_created"
_INVITE_COLUMNS = "token, host, type, uri, url, key_id, created_at, expires_at, uses_left"


def default_db_path():
    """Return $INVITES_API_DB, else ~/.local/share/invites_api/invites.db."""
    # Deliberately not $XDG_DATA_HOME: cron and systemd rarely set it, and the
    # server and the CLI must find the same file for the same user.
    return os.environ.get("INVITES_API_DB") or os.path.join(
        os.path.expanduser("~"), ".local", "share", "invites_api", "invites.db")


class Store:
    """The sqlite3 database: one connection per thread, durable commits."""

    def __init__(self, path, create_dir=False):
        self.path = os.path.abspath(path)
        self._local = threading.local()
        self._committer = None
        if create_dir:
            try:
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the directory for database {self.path!r}: {e.strerror}") from None
        self._migrate(self.connect())

    # -- connections and transactions --------------------------------------

    def connect(self):
        """Return this thread's connection, opening it on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
        return conn

    def close(self):
        """Close this thread's connection (the last one to close folds the WAL back in)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    def _open(self):
        try:
            # Create the file ourselves so it is private from the first byte;
            # SQLite gives the -wal and -shm files the same mode.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot create database {self.path!r}: {e.strerror}") from None
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            # WAL: readers never block the writer; FULL: each commit is
            # fsynced before it returns, so an acknowledged invite survives
            # kill -9 and power loss.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open database {self.path!r}: {e}") from None
        if mode.lower() != "wal":
            raise StoreError(f"cannot open database {self.path!r}: WAL mode refused ({mode})")
        return conn

    def _migrate(self, conn):
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(f"database {self.path!r} has schema {version}, newer than this "
                                 f"invites_api {__version__} knows ({len(MIGRATIONS)}); upgrade it")
            if version == len(MIGRATIONS):
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Read again under the lock: another process may have migrated.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for number in range(version, len(MIGRATIONS)):
                    for statement in MIGRATIONS[number]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreError(f"database {self.path!r}: {e}") from None

    def read(self, sql, args=()):
        """Return all rows of a query, as sqlite3.Row."""
        try:
            return self.connect().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"database {self.path!r}: {e}") from None

    def write(self, fn):
        """Run fn(conn) in one durable transaction and return its result."""
        if self._committer is not None:
            return self._committer.submit(fn)
        conn = self.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"database {self.path!r}: {e}") from None
        return result

    def start_group_commit(self):
        """Route writes through one thread that commits many at a time (for serve)."""
        if self._committer is None:
            self._committer = GroupCommitter(self)

    def stop_group_commit(self):
        """Finish the queued writes and stop the committing thread."""
        committer, self._committer = self._committer, None
        if committer is not None:
            committer.stop()

    # -- keys -----------------------------------------------------------------

    def insert_key(self, key):
        """Store a new key (a dict with the keys table's columns)."""
        def insert(conn):
            conn.execute("INSERT INTO keys (id, host, name, secret_hash, created_at) VALUES (?, ?, ?, ?, ?)",
                         (key["id"], key["host"], key["name"], key["secret_hash"], key["created_at"]))
        self.write(insert)

    def key(self, key_id):
        """Return the key row with this id, or None."""
        rows = self.read(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,))
        return rows[0] if rows else None

    def keys_for_host(self, host):
        """Return the host's key rows, oldest first."""
        return self.read(f"SELECT {_KEY_COLUMNS} FROM keys WHERE host = ? ORDER BY created_at, rowid", (host,))

    def delete_key(self, host, key_id):
        """Delete a key; return whether it existed."""
        def delete(conn):
            return conn.execute("DELETE FROM keys WHERE host = ? AND id = ?", (host, key_id)).rowcount
        return self.write(delete) > 0

    # -- invites --------------------------------------------------------------

    def insert_invite(self, invite):
        """Store a new invite and count it on its key; raise Forbidden if the key is gone."""
        def insert(conn):
            counted = conn.execute(
                "UPDATE keys SET last_used_at = ?, invites_created = invites_created + 1 WHERE id = ?",
                (invite["created_at"], invite["key_id"])).rowcount
            if not counted:  # deleted between authentication and now
                raise Forbidden("invalid API key")
            conn.execute(f"INSERT INTO invites ({_INVITE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         tuple(invite[c] for c in _INVITE_COLUMNS.split(", ")))
        self.write(insert)

    def invite(self, token):
        """Return the invite row with this token, or None."""
        rows = self.read(f"SELECT {_INVITE_COLUMNS} FROM invites WHERE token = ?", (token,))
        return rows[0] if rows else None


class _Pending:
    """One write waiting for its group commit."""

    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn):
        self.fn = fn
        self.done = threading.Event()
        self.result = self.error = None


class GroupCommitter:
    """One thread that runs queued writes, many to a transaction, one fsync each.

    A write's caller is answered only after the COMMIT holding it returned,
    i.e. after it is on disk; writes that raise are undone by their savepoint
    alone and do not disturb the others in the batch.
    """

    def __init__(self, store):
        import queue
        self.store = store
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self.thread.start()

    def submit(self, fn):
        """Queue fn(conn), wait until it is committed, and return its result."""
        pending = _Pending(fn)
        self.queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def stop(self):
        """Commit what is queued, then end the thread."""
        self.queue.put(None)
        self.thread.join()

    def _run(self):
        conn = None
        while True:
            batch = [self.queue.get()]
            while not self.queue.empty() and batch[-1] is not None:
                batch.append(self.queue.get())
            stopping = batch[-1] is None
            batch = [p for p in batch if p is not None]
            if batch:
                if conn is None:
                    try:
                        conn = self.store.connect()
                    except StoreError as e:
                        for pending in batch:
                            pending.error = e
                            pending.done.set()
                        continue
                self._commit(conn, batch)
            if stopping:
                return

    def _commit(self, conn, batch):
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for pending in batch:
                    conn.execute("SAVEPOINT op")
                    try:
                        pending.result = pending.fn(conn)
                    except Exception as e:
                        conn.execute("ROLLBACK TO op")
                        pending.error = e
                    conn.execute("RELEASE op")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as e:
            error = e if isinstance(e, Error) else StoreError(f"database {self.store.path!r}: {e}")
            for pending in batch:
                pending.error = pending.error or error
        for pending in batch:
            pending.done.set()


# ---------------------------------------------------------------------------
# Operations: what a user can do; they return data or raise, never print
# ---------------------------------------------------------------------------

def _random_id(nbytes):
    return base64.urlsafe_b64encode(os.urandom(nbytes)).decode("ascii").rstrip("=")


def hash_secret(secret):
    """Return the digest stored for a key secret."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


# Compared against when the key id is unknown, so both failures take as long.
_NO_SUCH_KEY_HASH = hash_secret(_random_id(SECRET_BYTES))


def create_key(store, host, name=""):
    """Make an API key for host and return "KEY_ID/SECRET" (the only time the secret exists)."""
    key_id, secret = _random_id(KEY_ID_BYTES), _random_id(SECRET_BYTES)
    store.insert_key({"id": key_id, "host": host, "name": name,
                      "secret_hash": hash_secret(secret), "created_at": now()})
    return f"{key_id}/{secret}"


def list_keys(store, host):
    """Return the host's keys as dicts (no secrets), oldest first."""
    return [{"id": row["id"], "name": row["name"], "host": row["host"],
             "created_at": iso(row["created_at"]), "last_used_at": iso(row["last_used_at"]),
             "invites_created": row["invites_created"]}
            for row in store.keys_for_host(host)]


def delete_key(store, host, key_id):
    """Revoke a key at once; raise NotFound if the host has no such key."""
    if not store.delete_key(host, key_id):
        raise NotFound(f"key {key_id!r} not found for host {host!r}")


def authenticate(store, presented):
    """Return the key row for a presented "KEY_ID/SECRET"; raise Unauthorized or Forbidden."""
    if not presented:
        raise Unauthorized("an API key is required (?key= or Authorization: Bearer)")
    key_id, slash, secret = presented.partition("/")
    if not slash or not secret or not KEY_ID_RE.match(key_id):
        raise Forbidden("malformed API key")
    key = store.key(key_id)
    expected = key["secret_hash"] if key is not None else _NO_SUCH_KEY_HASH
    # Constant-time: the comparison does not reveal how much of a guess matched.
    if not hmac.compare_digest(hash_secret(secret), expected) or key is None:
        raise Forbidden("invalid API key")
    return key


def create_invite(store, key, ttl=DEFAULT_INVITE_TTL):
    """Mint a single-use account invite for the key's host, store it durably, and return it."""
    token = _random_id(TOKEN_BYTES)
    created_at = now()
    invite = {"token": token, "host": key["host"], "type": "register",
              "uri": f"xmpp:{key['host']}?register;preauth={token}", "url": None,
              "key_id": key["id"], "created_at": created_at, "expires_at": created_at + ttl,
              "uses_left": 1}
    store.insert_invite(invite)
    return invite


def invite_status(invite, at=None):
    """Return "valid", "used" or "expired" for an invite row."""
    if invite["uses_left"] <= 0:
        return "used"
    if invite["expires_at"] <= (now() if at is None else at):
        return "expired"
    return "valid"


def find_invite(store, token):
    """Return a valid invite by token; raise NotFound if unknown, used or expired."""
    invite = store.invite(token) if TOKEN_RE.match(token) else None
    if invite is None or invite_status(invite) != "valid":
        raise NotFound("this invite does not exist, has been used or has expired")
    return invite


# ---------------------------------------------------------------------------
# Rendering: invite URLs and the landing page
# ---------------------------------------------------------------------------

def invite_url(invite, base, template=None):
    """Return the URL of an invite's landing page: the template's, else {base}/invite?TOKEN."""
    if invite.get("url"):
        return invite["url"]
    if template:
        from urllib.parse import quote
        return (template.replace("{host}", invite["host"]).replace("{token}", invite["token"])
                .replace("{uri}", quote(invite["uri"], safe="")))
    return f"{base}/invite?{invite['token']}"


_PAGE_STYLE = """
body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2025}
main{max-width:34rem;margin:2rem auto;padding:1.5rem;background:#fff;border-radius:8px}
h1{font-size:1.4rem;margin-top:0}
a.button{display:inline-block;padding:.75rem 1.25rem;border-radius:6px;background:#1859c9;
color:#fff;text-decoration:none;font-weight:600}
@media (prefers-color-scheme:dark){body{background:#15171a;color:#e8eaed}main{background:#23262b}
a.button{background:#4f8df5;color:#0b0c0e}}
"""


def render_page(title, body_html):
    """Return a complete, self-contained HTML page."""
    import html
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head>"
            f"<body><main>{body_html}</main></body></html>\n")


def render_invite_page(invite):
    """Return the landing page for a valid invite."""
    import html
    host = html.escape(invite["host"])
    expires = time.strftime("%d %B %Y, %H:%M UTC", time.gmtime(invite["expires_at"]))
    return render_page(f"Invite to {invite['host']}", (
        f"<h1>You have been invited to {host}</h1>"
        f"<p>Use this invite to create your account on {host}.</p>"
        f'<p><a class="button" href="{html.escape(invite["uri"])}">Open in your XMPP app</a></p>'
        f"<p>This invite expires on {html.escape(expires)}.</p>"))


def render_missing_invite_page():
    """Return the page shown for an unknown, used or expired invite."""
    return render_page("Invite not available", (
        "<h1>This invite is not available</h1>"
        "<p>It may have been used already, or it has expired.</p>"
        "<p>Please ask the person who sent it to you for a new one.</p>"))


# ---------------------------------------------------------------------------
# HTTP: a thin translation between requests and operations
# ---------------------------------------------------------------------------

API_PATHS = ("/invites_api", "/invites_api/")
API_METHODS = ("GET", "POST", "OPTIONS")
PAGE_METHODS = ("GET", "HEAD")
CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", ", ".join(API_METHODS)),
    ("Access-Control-Allow-Headers", "Content-Type, Authorization"),
    ("Access-Control-Max-Age", "7200"),
)
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
)
_HOST_HEADER_RE = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?\Z|\[[0-9A-Fa-f:.]+\](:\d{1,5})?\Z")
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in list(range(32)) + [127]}


class App:
    """What the request handler needs: the store and the serve options."""

    def __init__(self, store, public_url=None, invite_url_template=None,
                 invite_ttl=DEFAULT_INVITE_TTL, log=None):
        self.store = store
        self.public_url = public_url.rstrip("/") if public_url else None
        self.invite_url_template = invite_url_template
        self.invite_ttl = invite_ttl
        self.log = log  # a text stream for the access log, or None for quiet


def _make_handler_class():
    # http.server is imported only here, so the key commands start fast.
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        """Reads a request, calls one operation, writes one response."""

        protocol_version = "HTTP/1.1"
        server_version = f"invites_api/{__version__}"
        sys_version = ""
        disable_nagle_algorithm = True

        def setup(self):
            self.timeout = self.server.idle_timeout
            super().setup()

        # -- the request loop -------------------------------------------------

        def handle_one_request(self):
            self.command = self.path = None
            self.request_version = "HTTP/1.1"
            self._started = None
            self._body = None
            try:
                self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            except OSError:  # idle timeout or the client went away
                self.close_connection = True
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            self._started = time.monotonic()
            self.server.request_started()
            try:
                if len(self.raw_requestline) > MAX_REQUEST_LINE:
                    self.close_connection = True
                    self.respond(414, "request line too long\n")
                elif self.parse_request():  # on failure it answered through send_error
                    if self.headers.defects:  # a header line without a colon, say
                        return self.send_error(400)
                    if self.server.stopping:
                        self.close_connection = True
                    self.dispatch()
            except OSError:
                self.close_connection = True
            finally:
                self.server.request_finished()

        def dispatch(self):
            """Route the request, and turn errors into responses."""
            path, _, query = self.path.partition("?")
            try:
                if path in API_PATHS:
                    self.api(query)
                elif path == "/invite" or path.startswith("/invite/"):
                    self.page(path, query)
                else:
                    raise NotFound(f"no such page: {path[:100]!r}")
            except Error as e:
                if self._body is None and self.headers.get("Content-Length", "0").strip() != "0":
                    self.close_connection = True  # an unread body would spoil keep-alive
                self.respond_error(e)
            except Exception:
                import traceback
                self.close_connection = True
                self.log_line(f"internal error on {self.command} {self.redacted_path()}:\n"
                              + traceback.format_exc().rstrip())
                self.respond(500, "internal error\n")

        # -- routes -----------------------------------------------------------

        def api(self, query):
            """Create an invite (GET, POST) or answer a CORS preflight (OPTIONS)."""
            if self.command == "OPTIONS":
                return self.respond(204)
            if self.command not in ("GET", "POST"):
                raise MethodNotAllowed(self.command, API_METHODS)
            params = self.query_params(query)
            self.read_body()
            unknown = sorted(set(params) - {"key", "redirect"})
            if unknown:
                raise BadRequest(f"unknown parameter {unknown[0]!r}")
            redirect = parse_bool("redirect", params.get("redirect", ""))
            key = authenticate(self.server.app.store, self.presented_key(params))
            invite = create_invite(self.server.app.store, key, ttl=self.server.app.invite_ttl)
            url = invite_url(invite, self.public_base(invite["host"]),
                             self.server.app.invite_url_template)
            headers = [("Location", url)]
            if self.wants_json():
                import json
                body = json.dumps({"url": url, "uri": invite["uri"], "token": invite["token"],
                                   "host": invite["host"], "created_at": iso(invite["created_at"]),
                                   "expires_at": iso(invite["expires_at"])})
                return self.respond(303 if redirect else 201, body + "\n", headers,
                                    content_type="application/json")
            self.respond(303 if redirect else 201, b"", headers)

        def page(self, path, query):
            """Serve the landing page of an invite: /invite?TOKEN or /invite/TOKEN."""
            if self.command not in PAGE_METHODS:
                raise MethodNotAllowed(self.command, PAGE_METHODS)
            token = path[len("/invite/"):] if path.startswith("/invite/") else query
            try:
                invite = find_invite(self.server.app.store, token)
            except NotFound:
                return self.respond(404, render_missing_invite_page(), PAGE_HEADERS,
                                    content_type="text/html; charset=utf-8")
            headers = PAGE_HEADERS + (("Link", f'<{invite["uri"]}>; rel="alternate"'),)
            self.respond(200, render_invite_page(invite), headers,
                         content_type="text/html; charset=utf-8")

        # -- reading requests -------------------------------------------------

        def query_params(self, query):
            """Return the query string as a dict; raise BadRequest on repeats or too many."""
            from urllib.parse import parse_qsl
            try:
                pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=20)
            except ValueError:
                raise BadRequest("too many query parameters") from None
            params = {}
            for name, value in pairs:
                if name in params:
                    raise BadRequest(f"parameter {name!r} given more than once")
                params[name] = value
            return params

        def presented_key(self, params):
            """Return the key from Authorization (which wins) or ?key=, or "" if none."""
            values = self.headers.get_all("Authorization") or []
            if len(values) > 1:
                raise BadRequest("more than one Authorization header")
            if values:
                scheme, _, credentials = values[0].strip().partition(" ")
                if scheme.lower() != "bearer":
                    raise Forbidden(f"unsupported authorization scheme {scheme[:20]!r}; use Bearer")
                from urllib.parse import unquote
                credentials = unquote(credentials.strip())
                if not credentials:
                    raise Forbidden("malformed API key")
                return credentials
            return params.get("key", "")

        def read_body(self):
            """Read the request body (at most MAX_BODY bytes) and return it."""
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise LengthRequired("send the body with Content-Length, not chunked")
            length = self.headers.get("Content-Length", "0").strip() or "0"
            if not length.isdigit():
                self.close_connection = True
                raise BadRequest(f"invalid Content-Length {length[:20]!r}")
            if int(length) > MAX_BODY:
                self.close_connection = True
                raise PayloadTooLarge(f"request body over {MAX_BODY} bytes")
            self._body = self.rfile.read(int(length)) if int(length) else b""
            if len(self._body) < int(length):
                self.close_connection = True
                raise BadRequest("request body shorter than Content-Length")
            if self._body:
                ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    raise UnsupportedMediaType(f"request body must be application/json, not {ctype!r}")
            return self._body

        def wants_json(self):
            return "application/json" in self.headers.get("Accept", "").lower()

        def public_base(self, host):
            """Return the scheme and authority invite URLs start with."""
            app = self.server.app
            if app.public_url:
                return app.public_url.replace("{host}", host)
            authority = self.headers.get("Host", "").strip()
            if not _HOST_HEADER_RE.match(authority):
                if authority:
                    raise BadRequest(f"invalid Host header {authority[:100]!r}")
                authority = "%s:%d" % self.server.server_address[:2]
            return f"http://{authority}"

        # -- writing responses ------------------------------------------------

        def send_error(self, code, message=None, explain=None):
            """Answer the errors http.server finds while parsing (400, 431...)."""
            self.close_connection = True
            self.respond(code, self.responses.get(code, ("error",))[0].lower() + "\n")

        def respond_error(self, error):
            if self.command in ("GET", "POST", "OPTIONS") and self.wants_json():
                import json
                return self.respond(error.status, json.dumps({"error": str(error)}) + "\n",
                                    error.headers, content_type="application/json")
            self.respond(error.status, f"{error}\n", error.headers)

        def respond(self, status, body=b"", headers=(), content_type="text/plain; charset=utf-8"):
            """Send one complete response; every response goes through here."""
            if isinstance(body, str):
                body = body.encode("utf-8")
            reason = self.responses.get(status, ("",))[0]
            lines = [f"HTTP/1.1 {status} {reason}", f"Date: {self.date_time_string()}",
                     f"Server: {self.server_version}"]
            lines += [f"{name}: {value}" for name, value in headers]
            if self.path and self.path.split("?")[0] in API_PATHS:
                lines += [f"{name}: {value}" for name, value in CORS_HEADERS]
            if status != 204:
                if body:
                    lines.append(f"Content-Type: {content_type}")
                lines.append(f"Content-Length: {len(body)}")
            if self.close_connection:
                lines.append("Connection: close")
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            self.wfile.write(head if self.command == "HEAD" else head + body)
            self.log_request(status, len(body))

        # -- logging ----------------------------------------------------------

        def redacted_path(self):
            """Return the request path fit for a log: no key, no invite token."""
            if not self.path:
                return "-"
            path, sep, query = self.path.partition("?")
            if path.startswith("/invite/"):
                path = "/invite/[token]"
            if sep and path == "/invite":
                query = "[token]"
            elif sep:
                from urllib.parse import parse_qsl, quote
                try:
                    pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=20)
                    query = "&".join(f"{quote(n)}=[redacted]" if n.lower() == "key" else
                                     f"{quote(n)}={quote(v)}" for n, v in pairs)
                except ValueError:
                    query = "[unparsable]"
            return (path[:200] + sep + query[:200]).translate(_UNPRINTABLE)

        def log_request(self, code="-", size="-"):
            if self._started is None:
                return
            ms = (time.monotonic() - self._started) * 1000
            method = (self.command or "-")[:20].translate(_UNPRINTABLE)
            self.log_line(f"{self.client_address[0]} {method} {self.redacted_path()} {code} {ms:.1f}ms")

        def log_line(self, text):
            if self.server.app.log is not None:
                self.server.app.log.write(f"{iso(now())} {text}\n")
                self.server.app.log.flush()

        def log_message(self, format, *args):  # http.server's hook; we log through log_line only
            pass

    return Handler


def make_server(app, bind=DEFAULT_BIND, port=DEFAULT_PORT, max_connections=DEFAULT_MAX_CONNECTIONS,
                timeout=DEFAULT_TIMEOUT):
    """Return a listening (not yet serving) HTTP server for app."""
    from http.server import ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        block_on_close = False
        allow_reuse_address = True
        request_queue_size = 128

        def __init__(self):
            self.app = app
            self.idle_timeout = timeout
            self.stopping = False
            self._slots = threading.BoundedSemaphore(max_connections)
            self._in_flight = 0
            self._idle = threading.Condition()
            super().__init__((bind, port), _make_handler_class())

        def process_request(self, request, client_address):
            if not self._slots.acquire(blocking=False):
                try:  # refuse fast rather than queue behind a full house
                    request.setblocking(False)
                    request.send(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                                 b"Content-Type: text/plain\r\nContent-Length: 21\r\n"
                                 b"Connection: close\r\n\r\ntoo many connections\n")
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._slots.release()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._slots.release()

        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], OSError):  # a vanished client is no news
                super().handle_error(request, client_address)

        def request_started(self):
            with self._idle:
                self._in_flight += 1

        def request_finished(self):
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

        def wait_idle(self, timeout):
            """Wait until no request is being handled; return whether that happened."""
            with self._idle:
                return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

        def server_close(self):
            super().server_close()
            self.app.store.stop_group_commit()

    try:
        server = Server()
    except OSError as e:
        raise Error(f"cannot listen on {bind}:{port}: {e.strerror}") from None
    app.store.start_group_commit()
    return server


def serve(server, banner=""):
    """Print banner, serve until SIGTERM or SIGINT, then let requests in flight finish."""
    import signal

    def stop(signum, frame):
        server.stopping = True
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if banner:  # only now: whoever reads it may signal us at once
        print(banner, flush=True)
    server.serve_forever(poll_interval=0.2)
    server.socket.close()  # refuse new connections at once
    server.wait_idle(SHUTDOWN_GRACE)
    server.server_close()


# ---------------------------------------------------------------------------
# CLI: thin wrappers that print what the operations return
# ---------------------------------------------------------------------------

def _arg(parse):
    """Wrap a ValueError-raising parser as an argparse type (a usage error, exit 2)."""
    def parse_arg(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse_arg.__name__ = parse.__name__.replace("parse_", "")
    return parse_arg


def open_store(args, for_serve=False):
    """Return the Store named by --db, $INVITES_API_DB or the default path."""
    path = args.db or default_db_path()
    # Only the default location is created on demand; a mistyped --db
    # directory should be an error, not a surprise.
    return Store(path, create_dir=not args.db and not os.environ.get("INVITES_API_DB"))


def cmd_create(args):
    """create HOST [NAME]: print a new key."""
    print(create_key(open_store(args), args.host, args.name))


def cmd_list(args):
    """list HOST: print the host's keys."""
    keys = list_keys(open_store(args), args.host)
    if args.json:
        import json
        print(json.dumps(keys, indent=2))
        return
    for key in keys:
        print(f"{key['id']}\t{key['name']}")


def cmd_delete(args):
    """delete HOST KEY_ID: revoke a key."""
    delete_key(open_store(args), args.host, args.key_id)


def cmd_serve(args):
    """serve: run the HTTP API until stopped."""
    for template, option in ((args.public_url, "--public-url"), (args.invite_url, "--invite-url")):
        if template and not re.match(r"https?://[^/?#\s]+", template.replace("{host}", "h")):
            raise Error(f"{option} {template!r} must start with http:// or https:// and a host name")
    store = open_store(args)
    app = App(store, public_url=args.public_url, invite_url_template=args.invite_url,
              invite_ttl=args.invite_ttl, log=None if args.quiet else sys.stderr)
    server = make_server(app, args.bind, args.port, args.max_connections, args.timeout)
    address, port = server.server_address[:2]
    shown = f"[{address}]" if ":" in address else address
    serve(server, f"invites_api {__version__} serving on http://{shown}:{port}/invites_api "
                  f"(database {store.path})")


_EXAMPLES = {
    "serve": "example:\n  invites_api.py serve --port 5282 --public-url https://{host}\n",
    "create": 'example:\n  invites_api.py create example.com "My test key"\n  -> prints KEY_ID/SECRET; '
              "keep it, it is shown only once\n",
    "list": "example:\n  invites_api.py list example.com\n  invites_api.py list example.com --json\n",
    "delete": "example:\n  invites_api.py delete example.com t3XbXfBhZ0mJ\n",
}


def build_parser():
    """Return the argparse parser for all commands."""
    formatter = argparse.RawDescriptionHelpFormatter
    db_help = ("database file (default: $INVITES_API_DB, else "
               "~/.local/share/invites_api/invites.db)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS, help=db_help)
    parser = argparse.ArgumentParser(
        prog="invites_api.py", formatter_class=formatter,
        description="Authenticated HTTP API to mint account invites; API keys managed here.",
        epilog="examples:\n  invites_api.py create example.com \"My test key\"\n"
               "  invites_api.py serve\n"
               "  curl -i 'http://127.0.0.1:5282/invites_api?key=KEY_ID/SECRET'\n")
    parser.add_argument("--db", metavar="PATH", default=None, help=db_help)
    parser.add_argument("--version", action="version", version=f"invites_api {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help):
        sub = commands.add_parser(name, parents=[common], help=help, description=help,
                                  epilog=_EXAMPLES[name], formatter_class=formatter)
        sub.set_defaults(func=func)
        return sub

    host_help = "the XMPP domain the key mints invites for, e.g. example.com"
    sub = command("serve", cmd_serve, "run the HTTP API")
    sub.add_argument("--bind", default=DEFAULT_BIND, metavar="ADDR",
                     help=f"address to listen on (default {DEFAULT_BIND}; 0.0.0.0 or :: for all)")
    sub.add_argument("--port", type=int, default=DEFAULT_PORT,
                     help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    sub.add_argument("--public-url", metavar="URL",
                     help="start of invite page URLs, may contain {host} (default: this "
                          "server's scheme and the request's Host header)")
    sub.add_argument("--invite-url", metavar="TEMPLATE",
                     help="send Location to an external landing page instead; "
                          "placeholders {host}, {token}, {uri}")
    sub.add_argument("--invite-ttl", type=_arg(parse_duration), default=DEFAULT_INVITE_TTL,
                     metavar="DURATION", help="invite lifetime, e.g. 12h, 7d, 1w2d (default 7d)")
    sub.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                     help=f"simultaneous connections (default {DEFAULT_MAX_CONNECTIONS})")
    sub.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                     help=f"drop idle or stalled connections after this (default {DEFAULT_TIMEOUT:g})")
    sub.add_argument("--quiet", action="store_true", help="no access log on stderr")

    sub = command("create", cmd_create, "make an API key and print it (KEY_ID/SECRET)")
    sub.add_argument("host", type=_arg(parse_host), metavar="HOST", help=host_help)
    sub.add_argument("name", type=_arg(parse_key_name), nargs="?", default="", metavar="NAME",
                     help="a name to remember the key by (quote it if it has spaces)")

    sub = command("list", cmd_list, "list a host's keys: KEY_ID<TAB>NAME")
    sub.add_argument("host", type=_arg(parse_host), metavar="HOST", help=host_help)
    sub.add_argument("--json", action="store_true",
                     help="a JSON array with id, name, host, created_at, last_used_at, invites_created")

    sub = command("delete", cmd_delete, "revoke a key at once")
    sub.add_argument("host", type=_arg(parse_host), metavar="HOST", help=host_help)
    sub.add_argument("key_id", metavar="KEY_ID", help="the id `list` shows (the part before the /)")
    return parser


def main(argv=None):
    """Run the command line; return the exit code (0 ok, 1 failed, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        for name, value in (("--port", args.port), ("--max-connections", args.max_connections)):
            if not (0 <= value <= 65535 if name == "--port" else value >= 1):
                parser.error(f"argument {name}: invalid value {value}")
        if args.timeout <= 0:
            parser.error(f"argument --timeout: must be more than zero, not {args.timeout:g}")
    try:
        args.func(args)
        sys.stdout.flush()  # inside the try, so a closed pipe is handled below
    except Error as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (`| head`) has what it wanted; make the final flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
