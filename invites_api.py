#!/usr/bin/env python3
"""invites_api: an authenticated HTTP API that mints account invites.

A single-file, standard-library-only take on Prosody's mod_invites_api: API
keys are managed from the command line, and a GET or POST with a key mints an
invite and answers "201 Created" with the invite page in Location.

Commands:
  serve                   run the HTTP API (loopback, port 5282 by default)
  create HOST [NAME]      make an API key for HOST; prints KEY_ID/SECRET once
  list HOST               list HOST's keys, one "KEY_ID<TAB>NAME" per line
  update HOST KEY_ID      change a key's name or policy (expiry, quota, rate)
  delete HOST KEY_ID      revoke a key at once
  invites ...             create, list, show, revoke or redeem invites directly

Example:
  $ python3 invites_api.py create example.com "My test key"
  t3XbXfBhZ0mJ/0YF5xQ...
  $ curl -i 'http://127.0.0.1:5282/invites_api?key=t3XbXfBhZ0mJ/0YF5xQ...'
  HTTP/1.1 201 Created
  Location: http://127.0.0.1:5282/invite?Vb0tJ...
"""

import argparse
import base64
import bisect
import functools
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
# An invite token is a bearer credential for sign-up: 18 bytes, 24 URL-safe
# characters, of which 14 bytes (112 bits) are random; see _new_token.
TOKEN_BYTES = 18
# Prosody's own default invite lifetime.
DEFAULT_INVITE_TTL = 7 * 86400
# Expired, used and revoked invites are kept this long (to show them), then purged.
DEFAULT_PURGE_GRACE = 30 * 86400
# Public invite checks one client address may make per minute.
CHECKS_PER_MINUTE = 60
# A backend program that has not answered by then is killed (Prosody answers in ~50 ms).
DEFAULT_BACKEND_TIMEOUT = 10.0
# Backend programs running at once; each prosodyctl is a Lua process of ~15 MB.
DEFAULT_BACKEND_CONCURRENCY = 4

# A writer waits this long for another process's lock before giving up (503).
BUSY_TIMEOUT = 5.0
# Longest request line we read; longer ones get 414 (Prosody allows 8 KiB too).
MAX_REQUEST_LINE = 8192
# Longest header line and most header lines we read; more get 431.
MAX_HEADER_LINE = 8192
MAX_HEADERS = 64
# Largest request body we accept; an invite request needs a few hundred bytes.
MAX_BODY = 8192
# Bytes a connection may have waiting (requests not yet handled, answers not
# yet taken); past this we stop reading it until the client catches up. More
# than the longest request head (64 lines of 8 KiB), so one always fits.
MAX_PENDING = 1024 * 1024
# Pipelined requests of one connection handled per round of the serving loop.
REQUESTS_PER_ROUND = 16
# Seconds a connection may sit idle or stall mid-request before we drop it.
DEFAULT_TIMEOUT = 20.0
# Simultaneous connections served; more are refused with a fast 503.
DEFAULT_MAX_CONNECTIONS = 128
# Failed authentications one client address may make per minute, then 429:
# key ids cannot be enumerated fast.
AUTH_FAILURES_PER_MINUTE = 20
# /health fails if the database cannot answer a read and a write within this.
HEALTH_TIMEOUT = 1.0
# Request latency histogram buckets, in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# How often `serve` folds the WAL back into the database, beside the writes,
# and the WAL length (pages) past which the writer lets it start over
# (SQLite's own automatic checkpoint is at 1000 pages too).
CHECKPOINT_INTERVAL = 0.1
WAL_RESTART_FRAMES = 1000
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


class BadCredentials(Forbidden):
    """A wrong, unknown, deleted or malformed key: counted per client address."""


class NotFound(Error):
    status = 404


class MethodNotAllowed(Error):
    status = 405

    def __init__(self, method, allowed):
        super().__init__(f"method {method!r} not allowed here")
        self.headers = (("Allow", ", ".join(allowed)),)


class Conflict(Error):
    status = 409


class Gone(Error):
    status = 410


class LengthRequired(Error):
    status = 411


class PayloadTooLarge(Error):
    status = 413


class UnsupportedMediaType(Error):
    status = 415


class TooManyRequests(Error):
    status = 429

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))
        self.headers = (("Retry-After", str(self.retry_after)),)


class Unavailable(Error):
    """Busy for now: try again shortly."""

    status = 503
    headers = (("Retry-After", "5"),)


class StoreError(Unavailable):
    """The database cannot be opened, read or written."""


class BackendError(Error):
    """The program that mints invites failed, timed out or answered nonsense."""

    status = 502


# ---------------------------------------------------------------------------
# Input checks shared by the CLI and HTTP
# ---------------------------------------------------------------------------

def parse_host(text):
    """Return text as a lower-case ASCII domain name; raise ValueError if it is not one."""
    host = text[:-1] if text.endswith(".") else text
    if not host or len(text) > 253:
        raise ValueError(f"invalid host {text!r}: expected a domain name like example.com")
    try:  # (the idna codec costs a millisecond to load; plain ASCII names need no conversion)
        host = host.lower() if host.isascii() else host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"invalid host {text!r}: not a valid (internationalised) domain name") from None
    if len(host) > 253 or not all(_LABEL_RE.match(label) for label in host.split(".")):
        raise ValueError(f"invalid host {text!r}: expected a domain name like example.com")
    return host


def _one_line(text, what, limit):
    """Return text if it is one line of at most limit characters; raise ValueError otherwise."""
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters long; at most {limit} are allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"{what} {text[:40]!r} contains control characters (tabs, newlines...)")
    return text


def parse_key_name(text):
    """Return a key name (one line, at most 100 characters); raise ValueError."""
    return _one_line(text, "key name", 100)


def parse_duration(text):
    """Return seconds for "90", "45m", "12h", "7d", "1w2d"...; raise ValueError otherwise."""
    text = text.strip().lower()
    if text.isascii() and text.isdigit():
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


_RATE_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400}


def parse_rate(text):
    """Return (count, period seconds) for "10/hour", "100/day", "5/15m"...; raise ValueError."""
    count, slash, period = text.strip().lower().partition("/")
    if not slash or not (count.isascii() and count.isdigit()) or int(count) < 1:
        raise ValueError(f"invalid rate {text!r}: use N/PERIOD, like 10/hour or 100/day")
    seconds = _RATE_PERIODS.get(period.rstrip("s")) or _RATE_PERIODS.get(period)
    if seconds is None:
        try:
            seconds = parse_duration(period)
        except ValueError:
            raise ValueError(f"invalid rate {text!r}: the period is second, minute, hour, day, week "
                             "or a duration like 15m") from None
    return int(count), seconds


def parse_expiry(text):
    """Return epoch seconds for a duration from now ("90d") or a UTC date ("2027-01-31")."""
    import calendar
    for layout in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return calendar.timegm(time.strptime(text.strip(), layout))
        except ValueError:
            pass
    try:
        return now() + parse_duration(text)
    except ValueError:
        raise ValueError(f"invalid expiry {text!r}: use a duration like 90d or a date like 2027-01-31") from None


def parse_count(text, what="count"):
    """Return a whole number >= 1 from text (or an int); raise ValueError otherwise."""
    if isinstance(text, bool) or not (isinstance(text, int) or re.fullmatch(r"[0-9]{1,10}", str(text).strip())):
        raise ValueError(f"invalid {what} {text!r}: expected a whole number of 1 or more")
    number = int(text)
    if not 1 <= number <= 1_000_000_000:
        raise ValueError(f"invalid {what} {text!r}: expected a whole number of 1 or more")
    return number


# RFC 7622 forbids these in a localpart (plus spaces and control characters).
_LOCALPART_FORBIDDEN = set('"&\'/:<>@')


def parse_username(text):
    """Return an XMPP localpart, lower-cased; raise ValueError if it is not one."""
    name = text.strip().lower()
    if (not name or len(name.encode("utf-8")) > 1023
            or any(c in _LOCALPART_FORBIDDEN or c.isspace() or ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ValueError(f"invalid username {text!r}: an XMPP username has no spaces or any of \" & ' / : < > @")
    return name


def parse_note(text):
    """Return an invite's note (one line, at most 200 characters); raise ValueError."""
    return _one_line(text, "note", 200)


def parse_seconds(text):
    """Return a positive number of seconds (fractions allowed); raise ValueError."""
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"invalid number of seconds {text!r}") from None
    if not 0 < seconds <= 86400:
        raise ValueError(f"invalid number of seconds {text!r}: must be more than 0 and at most a day")
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
    (  # 2: key policy, per-invite options, revocation, purging, settings
        "ALTER TABLE keys ADD COLUMN expires_at INTEGER",
        "ALTER TABLE keys ADD COLUMN max_invites INTEGER",
        "ALTER TABLE keys ADD COLUMN rate_count INTEGER",
        "ALTER TABLE keys ADD COLUMN rate_period INTEGER",
        f"ALTER TABLE keys ADD COLUMN max_ttl INTEGER NOT NULL DEFAULT {DEFAULT_INVITE_TTL}",
        "ALTER TABLE keys ADD COLUMN max_uses INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE invites ADD COLUMN uses INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE invites ADD COLUMN username TEXT",
        "ALTER TABLE invites ADD COLUMN note TEXT",
        "ALTER TABLE invites ADD COLUMN revoked_at INTEGER",
        # When the invite stopped being usable by use or revocation (for purging).
        "ALTER TABLE invites ADD COLUMN done_at INTEGER",
        "DROP INDEX invites_by_key",
        # Serves both "this key's invites" and the rate window count.
        "CREATE INDEX invites_by_key ON invites (key_id, created_at)",
        "CREATE INDEX invites_by_host ON invites (host, created_at)",
        "CREATE INDEX invites_by_expiry ON invites (expires_at)",
        "CREATE INDEX invites_by_done ON invites (done_at) WHERE done_at IS NOT NULL",
    ),
    (  # 3: invites minted by an XMPP server (a backend) are recorded too
        "ALTER TABLE invites ADD COLUMN backend TEXT NOT NULL DEFAULT 'builtin'",
        # A slot held while a backend mints (uri = ''): purged if the server died meanwhile.
        "CREATE INDEX invites_minting ON invites (created_at) WHERE uri = ''",
    ),
    (  # 4: small facts, e.g. when /health last wrote
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
]

_KEY_COLUMNS = ("id, host, name, secret_hash, created_at, last_used_at, invites_created, "
                "expires_at, max_invites, rate_count, rate_period, max_ttl, max_uses")
# Settable with `create` and `update`.
KEY_POLICY = ("expires_at", "max_invites", "rate_count", "rate_period", "max_ttl", "max_uses")
_INVITE_COLUMNS = ("token, host, type, uri, url, key_id, created_at, expires_at, uses, uses_left, "
                   "username, note, revoked_at, done_at, backend")
_INVITE_COLUMN_NAMES = _INVITE_COLUMNS.split(", ")
_INSERT_INVITE = f"INSERT INTO invites ({_INVITE_COLUMNS}) VALUES ({', '.join('?' * len(_INVITE_COLUMN_NAMES))})"


def default_db_path():
    """Return $INVITES_API_DB, else ~/.local/share/invites_api/invites.db."""
    # Deliberately not $XDG_DATA_HOME: cron and systemd rarely set it, and the
    # server and the CLI must find the same file for the same user.
    return os.environ.get("INVITES_API_DB") or os.path.join(
        os.path.expanduser("~"), ".local", "share", "invites_api", "invites.db")


class Store:
    """The sqlite3 database: one connection per thread, durable commits."""

    def __init__(self, path, create_dir=False, busy_timeout=BUSY_TIMEOUT):
        self.path = os.path.abspath(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._committer = None
        self._round = None  # the serving loop's RoundWriter, while it runs
        self._identity = None  # (device, inode) of the file we opened
        self.wal_restart_wanted = False  # set by the checkpoint thread, done by the committer
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
        if self._identity is not None:
            # A later connection (a new thread): only to the very file we first
            # opened. Never create one, nor touch the -wal of another file.
            self.check_file()
        else:
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
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
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
        if self._identity is None:
            info = os.stat(self.path)
            self._identity = (info.st_dev, info.st_ino)
        return conn

    def check_file(self):
        """Raise StoreError if the database file was deleted, replaced or made read-only under us.

        SQLite would go on writing to a deleted file (lost at the next start)
        or through a file made read-only: refuse instead, and say why.
        """
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            raise StoreError(f"database {self.path!r} was deleted while in use; restore it or restart") from None
        if (info.st_dev, info.st_ino) != self._identity:
            raise StoreError(f"database {self.path!r} was replaced while in use; restart to use the new file")
        if not info.st_mode & 0o200:
            raise StoreError(f"database {self.path!r} was made read-only; make it writable again")

    def health(self, timeout=HEALTH_TIMEOUT):
        """Read and write the database within timeout seconds; raise StoreError if it cannot."""
        self.read("SELECT count(*) FROM keys WHERE id = ''")
        stamp = str(now())
        self.write(lambda conn: conn.execute(
            "INSERT INTO meta (name, value) VALUES ('health_checked_at', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (stamp,)), timeout=timeout)

    def size(self):
        """Return the bytes the database uses on disk (file and WAL)."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total

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

    def write(self, fn, timeout=None):
        """Run fn(conn) in one durable transaction and return its result.

        With timeout, raise StoreError if the commit has not returned by then
        (the write may still happen later). In the serving loop's thread, fn
        runs at once in the round's transaction, durable once commit_round()
        returned, which the loop calls before it sends the round's answers.
        """
        if self._round is not None and self._round.thread == threading.get_ident():
            return self._round.run(fn)
        if self._committer is not None:
            return self._committer.submit(fn, timeout)
        self.check_file()
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
        """Route writes through one thread that commits many at a time, and checkpoint
        the WAL from another (for serve)."""
        if self._committer is None:
            self._committer = GroupCommitter(self)
            self._checkpointing = threading.Event()
            threading.Thread(target=self._checkpoint_forever, args=(self._checkpointing,), name="checkpoint",
                             daemon=True).start()

    def fold_wal(self, conn):
        """After a writer's commit: let the WAL start over, if the checkpoint thread saw it grow.

        That thread copies the WAL into the database beside the writes, but
        only a checkpoint with no write in between lets the next write start
        the WAL over: done by the writer, after its batch was answered (by
        then there is little left to copy).
        """
        if self.wal_restart_wanted:
            self.wal_restart_wanted = False
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass  # busy or gone: the next write reports it

    def start_round(self):
        """Run this thread's writes at once, in one transaction until commit_round() (the serving loop)."""
        self._round = RoundWriter(self)

    def commit_round(self):
        """Commit the writes since the last call; return None, or the StoreError that undid them."""
        return self._round.commit()

    def round_answered(self):
        """The loop sent the round's answers: now is the time to let the WAL start over."""
        if self._round.conn is not None:
            self.fold_wal(self._round.conn)

    def stop_round(self):
        round, self._round = self._round, None
        if round is not None:
            round.close()

    def stop_group_commit(self):
        """Finish the queued writes and stop the committing and checkpointing threads."""
        committer, self._committer = self._committer, None
        if committer is not None:
            self._checkpointing.set()
            committer.stop()

    def _checkpoint_forever(self, stop):
        # The committer's connection does not checkpoint (wal_autocheckpoint=0):
        # a checkpoint there would hold up every answer in that batch. Here it
        # runs beside the writes instead, and keeps the WAL small.
        conn = None
        while not stop.wait(CHECKPOINT_INTERVAL):
            try:
                conn = conn or self._open()
                busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                # Writes keep coming, so the WAL never starts over by itself: ask the writer.
                self.wal_restart_wanted = frames > WAL_RESTART_FRAMES
            except (Error, sqlite3.Error):
                pass  # deleted, locked, full: the writes report it; try again next time
        if conn is not None:
            conn.close()

    # -- keys -----------------------------------------------------------------

    def insert_key(self, key):
        """Store a new key (a dict with the keys table's columns)."""
        columns = [c for c in _KEY_COLUMNS.split(", ") if c in key]
        sql = f"INSERT INTO keys ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        self.write(lambda conn: conn.execute(sql, [key[c] for c in columns]))

    def key(self, key_id, conn=None):
        """Return the key row with this id, or None; within a write transaction if conn is given."""
        if conn is not None:
            return conn.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        rows = self.read(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,))
        return rows[0] if rows else None

    def keys_for_host(self, host):
        """Return the host's key rows, oldest first."""
        return self.read(f"SELECT {_KEY_COLUMNS} FROM keys WHERE host = ? ORDER BY created_at, rowid", (host,))

    def update_key(self, host, key_id, changes):
        """Change a key's name or policy columns; return whether the key exists."""
        assignments = ", ".join(f"{column} = ?" for column in changes)  # names from KEY_POLICY
        def update(conn):
            return conn.execute(f"UPDATE keys SET {assignments} WHERE host = ? AND id = ?",
                                [*changes.values(), host, key_id]).rowcount
        return self.write(update) > 0 if changes else self.key(key_id) is not None

    def delete_key(self, host, key_id, revoke_invites=False, at=0):
        """Delete a key (and revoke its pending invites if asked); return whether it existed."""
        def delete(conn):
            deleted = conn.execute("DELETE FROM keys WHERE host = ? AND id = ?", (host, key_id)).rowcount
            if deleted and revoke_invites:
                conn.execute("UPDATE invites SET revoked_at = ?, done_at = ? WHERE key_id = ? "
                             "AND revoked_at IS NULL AND uses_left > 0", (at, at, key_id))
            return deleted
        return self.write(delete) > 0

    # -- invites --------------------------------------------------------------

    def insert_invite(self, conn, invite, key=None):
        """Within a write transaction: store a new invite and count it on its key,
        within the key's quota and rate; raise Forbidden or TooManyRequests.

        The caller read the key in the same transaction, so the quota and rate
        hold even when several servers share the database.
        """
        if key is not None:
            if key["max_invites"] is not None and key["invites_created"] >= key["max_invites"]:
                raise Forbidden("invite quota used up")
            if key["rate_count"] is not None:
                count, oldest = conn.execute(
                    "SELECT count(*), min(created_at) FROM invites WHERE key_id = ? AND created_at > ?",
                    (key["id"], invite["created_at"] - key["rate_period"])).fetchone()
                if count >= key["rate_count"]:
                    raise TooManyRequests(f"rate limit of {key['rate_count']} invites per "
                                          f"{key['rate_period']} s reached",
                                          oldest + key["rate_period"] - invite["created_at"])
            conn.execute("UPDATE keys SET last_used_at = ?, invites_created = invites_created + 1 WHERE id = ?",
                         (invite["created_at"], key["id"]))
        conn.execute(_INSERT_INVITE, [invite[c] for c in _INVITE_COLUMN_NAMES])

    def finish_invite(self, slot, token, uri, url):
        """Fill in a slot that insert_invite held while a backend minted the invite."""
        self.write(lambda conn: conn.execute("UPDATE invites SET token = ?, uri = ?, url = ? WHERE token = ?",
                                             (token, uri, url, slot)))

    def drop_invite(self, token):
        """Delete an invite record (a slot whose backend failed), giving its quota back."""
        def drop(conn):
            key_id = conn.execute("SELECT key_id FROM invites WHERE token = ?", (token,)).fetchone()
            conn.execute("DELETE FROM invites WHERE token = ?", (token,))
            if key_id and key_id[0]:
                conn.execute("UPDATE keys SET invites_created = invites_created - 1 WHERE id = ?", key_id)
        self.write(drop)

    def invite(self, token):
        """Return the invite row with this token, or None."""
        rows = self.read(f"SELECT {_INVITE_COLUMNS} FROM invites WHERE token = ?", (token,))
        return rows[0] if rows else None

    def invites(self, host, key_id=None, pending_at=None, limit=1000):
        """Return a host's invites (or one key's), newest first; only pending ones if pending_at is a time."""
        sql, args = f"SELECT {_INVITE_COLUMNS} FROM invites WHERE host = ?", [host]
        if key_id is not None:
            sql, args = sql + " AND key_id = ?", args + [key_id]
        if pending_at is not None:
            sql += " AND revoked_at IS NULL AND uses_left > 0 AND expires_at > ?"
            args.append(pending_at)
        return self.read(sql + " ORDER BY created_at DESC, rowid DESC LIMIT ?", args + [limit])

    def revoke_invite(self, token, at):
        """Revoke an invite; return whether it was pending (not yet used up or revoked)."""
        def revoke(conn):
            return conn.execute("UPDATE invites SET revoked_at = ?, done_at = coalesce(done_at, ?) "
                                "WHERE token = ? AND revoked_at IS NULL", (at, at, token)).rowcount
        return self.write(revoke) > 0

    def use_invite(self, token, at):
        """Take one use of a valid invite atomically; return the updated row, or None if none was left."""
        def use(conn):
            taken = conn.execute(
                "UPDATE invites SET uses_left = uses_left - 1, "
                "done_at = CASE WHEN uses_left = 1 THEN ? ELSE done_at END "
                "WHERE token = ? AND uses_left > 0 AND revoked_at IS NULL AND expires_at > ?",
                (at, token, at)).rowcount
            if taken:
                return conn.execute(f"SELECT {_INVITE_COLUMNS} FROM invites WHERE token = ?", (token,)).fetchone()
            return None
        return self.write(use)

    def purge_invites(self, before, stale_slots_before, batch=500):
        """Delete up to batch invites that expired, were used up or were revoked before a time,
        and slots of backends that never answered; return how many."""
        def purge(conn):
            return conn.execute(
                "DELETE FROM invites WHERE rowid IN (SELECT rowid FROM invites WHERE expires_at < ? LIMIT ?) "
                "OR rowid IN (SELECT rowid FROM invites WHERE done_at < ? LIMIT ?) "
                "OR rowid IN (SELECT rowid FROM invites WHERE uri = '' AND created_at < ? LIMIT ?)",
                (before, batch, before, batch, stale_slots_before, batch)).rowcount
        return self.write(purge)


class _Pending:
    """One write waiting for its group commit: `done` is held until the commit returned."""

    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn):
        self.fn = fn
        self.done = threading.Lock()  # cheaper than an Event; released once, by the committer
        self.done.acquire()
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

    def submit(self, fn, timeout=None):
        """Queue fn(conn), wait until it is committed, and return its result."""
        pending = _Pending(fn)
        self.queue.put(pending)
        if not pending.done.acquire(timeout=-1 if timeout is None else timeout):
            raise StoreError(f"database {self.store.path!r} did not answer within {timeout:g} s")
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
                        conn.execute("PRAGMA wal_autocheckpoint=0")  # see Store._checkpoint_forever
                    except (StoreError, sqlite3.Error) as e:
                        for pending in batch:
                            pending.error = e
                            pending.done.release()
                        continue
                self._commit(conn, batch)
                self.store.fold_wal(conn)
            if stopping:
                self.store.close()
                return

    def _commit(self, conn, batch):
        # First the whole batch as one plain transaction: every statement is a
        # trip through the GIL for this thread, and a savepoint per write
        # would double them. A write that raises before changing anything
        # (a bad key, a full quota) costs the others nothing; one that raises
        # after changing rows spoils the transaction: it is rolled back and
        # the rest run again, each in a savepoint (nobody was answered yet).
        try:
            self.store.check_file()
            conn.execute("BEGIN IMMEDIATE")
            try:
                if not self._run_writes(conn, batch, savepoints=False):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    self._run_writes(conn, [p for p in batch if p.error is None], savepoints=True)
                if conn.in_transaction:
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
            pending.done.release()

    def _run_writes(self, conn, batch, savepoints):
        """Run the writes; without savepoints, stop and return False at one that raised after changing rows."""
        for pending in batch:
            if savepoints:
                conn.execute("SAVEPOINT op")
            changes = conn.total_changes
            try:
                pending.result = pending.fn(conn)
            except Exception as e:
                pending.error = (StoreError(f"database {self.store.path!r}: {e}")
                                 if isinstance(e, sqlite3.Error) else e)
                if savepoints:
                    conn.execute("ROLLBACK TO op")
                elif conn.total_changes != changes or not conn.in_transaction:
                    return False
            if savepoints:
                conn.execute("RELEASE op")
        return True


class RoundWriter:
    """The serving loop's writes: each runs at once, in a savepoint of the round's
    transaction; the loop commits the round (one fsync) before it sends any of
    the round's answers, so here too an answer follows its commit."""

    def __init__(self, store):
        self.store = store
        self.thread = threading.get_ident()
        self.conn = None
        self.writes = 0  # writes that succeeded so far: the loop tells which requests wrote

    def run(self, fn):
        try:
            if self.conn is None:
                self.conn = self.store._open()
                self.conn.execute("PRAGMA wal_autocheckpoint=0")  # see Store._checkpoint_forever
            if not self.conn.in_transaction:
                self.store.check_file()
                self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("SAVEPOINT op")
        except sqlite3.Error as e:
            raise StoreError(f"database {self.store.path!r}: {e}") from None
        try:
            result = fn(self.conn)
        except BaseException as e:
            try:
                if self.conn.in_transaction:  # (an I/O error may have ended it already)
                    self.conn.execute("ROLLBACK TO op")
                    self.conn.execute("RELEASE op")
            except sqlite3.Error:
                pass  # the COMMIT will report it
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"database {self.store.path!r}: {e}") from None
            raise
        self.conn.execute("RELEASE op")
        self.writes += 1
        return result

    def commit(self):
        conn = self.conn
        if conn is None or not conn.in_transaction:
            return None
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return StoreError(f"database {self.store.path!r}: {e}")
        return None

    def close(self):
        if self.conn is not None:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.conn.close()


# ---------------------------------------------------------------------------
# Operations: what a user can do; they return data or raise, never print
# ---------------------------------------------------------------------------

def _random_id(nbytes):
    """Return nbytes of randomness as URL-safe base64 that does not start with "-"."""
    while True:  # a leading "-" would read as an option on the command line
        text = base64.urlsafe_b64encode(os.urandom(nbytes)).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


def _new_token():
    """Return a new invite token: 4 bytes of the time, then 14 random bytes (112 bits, unguessable).

    Tokens made in the same second sort together, so each batch of new
    invites writes one page of the token index instead of one page per
    invite: with fully random tokens the pages written per commit (and the
    checkpoints behind them) grew with the table, and p99 latency with them
    (from 4 to 14 ms over the benchmark's first 100,000 invites).
    """
    seconds = int(now()) % 2**31  # the top bit clear: the token never starts with "-" (an option, to a CLI)
    return base64.urlsafe_b64encode(seconds.to_bytes(4, "big") + os.urandom(TOKEN_BYTES - 4)).decode("ascii")


def hash_secret(secret):
    """Return the digest stored for a key secret."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


# Compared against when the key id is unknown, so both failures take as long.
_NO_SUCH_KEY_HASH = hash_secret(_random_id(SECRET_BYTES))


def create_key(store, host, name="", **policy):
    """Make an API key for host and return "KEY_ID/SECRET" (the only time the secret exists).

    policy: any of KEY_POLICY (expires_at, max_invites, rate_count,
    rate_period, max_ttl, max_uses); None means no limit.
    """
    key_id, secret = _random_id(KEY_ID_BYTES), _random_id(SECRET_BYTES)
    key = {"id": key_id, "host": host, "name": name, "secret_hash": hash_secret(secret), "created_at": now()}
    key.update({k: v for k, v in policy.items() if k in KEY_POLICY and v is not None})
    store.insert_key(key)
    return f"{key_id}/{secret}"


def key_info(row):
    """Return a key row as a dict for people and JSON: no secret, times in ISO 8601."""
    rate = f"{row['rate_count']}/{row['rate_period']}s" if row["rate_count"] is not None else None
    return {"id": row["id"], "name": row["name"], "host": row["host"],
            "created_at": iso(row["created_at"]), "last_used_at": iso(row["last_used_at"]),
            "invites_created": row["invites_created"], "expires_at": iso(row["expires_at"]),
            "max_invites": row["max_invites"], "rate": rate, "max_ttl": row["max_ttl"],
            "max_uses": row["max_uses"]}


def list_keys(store, host):
    """Return the host's keys as dicts (no secrets), oldest first."""
    return [key_info(row) for row in store.keys_for_host(host)]


def update_key(store, host, key_id, **changes):
    """Change a key's name or policy (None clears a limit); raise NotFound if there is no such key."""
    if not store.update_key(host, key_id, changes):
        raise NotFound(f"key {key_id!r} not found for host {host!r}")


def delete_key(store, host, key_id, revoke_invites=False):
    """Revoke a key at once (its invites stay valid unless revoke_invites); raise NotFound if unknown."""
    if not store.delete_key(host, key_id, revoke_invites, at=now()):
        raise NotFound(f"key {key_id!r} not found for host {host!r}")


def authenticate(store, presented, conn=None):
    """Return the key row for a presented "KEY_ID/SECRET"; raise Unauthorized or Forbidden.

    With conn, the key is read inside that write transaction.
    """
    if not presented:
        raise Unauthorized("an API key is required (?key= or Authorization: Bearer)")
    key_id, slash, secret = presented.partition("/")
    if not slash or not secret or not KEY_ID_RE.match(key_id):
        raise BadCredentials("malformed API key")
    key = store.key(key_id, conn)
    expected = key["secret_hash"] if key is not None else _NO_SUCH_KEY_HASH
    # Constant-time: the comparison does not reveal how much of a guess matched.
    if not hmac.compare_digest(hash_secret(secret), expected) or key is None:
        raise BadCredentials("invalid API key")
    if key["expires_at"] is not None and key["expires_at"] <= now():
        raise Forbidden("key expired")
    return key


def invite_options(options, key=None, default_ttl=DEFAULT_INVITE_TTL, backend=None):
    """Return checked ttl, uses, username, note from request options; raise BadRequest.

    options maps names to strings (query) or JSON values (body). Without a
    key (the command line) only sanity limits apply. An option the backend
    cannot honour is refused, never silently dropped.
    """
    max_ttl = key["max_ttl"] if key is not None else 100 * 365 * 86400
    max_uses = key["max_uses"] if key is not None else 1_000_000_000
    checked = {"ttl": min(default_ttl, max_ttl), "uses": 1, "username": None, "note": None}
    try:
        for name, value in options.items():
            if value is None:
                continue
            if name != "uses" and not isinstance(value, str) and not (name == "ttl" and isinstance(value, int)):
                raise ValueError(f"{name} must be a string")
            if name == "ttl":
                checked["ttl"] = parse_duration(str(value))
                if checked["ttl"] > max_ttl:
                    raise ValueError(f"ttl {value!r} is over this key's limit of {max_ttl} s")
            elif name == "uses":
                checked["uses"] = parse_count(value, "uses")
                if checked["uses"] > max_uses:
                    raise ValueError(f"uses {value!r} is over this key's limit of {max_uses}")
            elif name == "username":
                checked["username"] = parse_username(value)
            elif name == "note":
                checked["note"] = parse_note(value) or None
            else:
                raise ValueError(f"unknown option {name!r}")
            if backend is not None and name != "note" and name not in backend.options:
                raise ValueError(f"the {backend.name} backend cannot honour {name!r}")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return checked


def create_invite(store, credentials=None, host=None, options=None, default_ttl=DEFAULT_INVITE_TTL,
                  backend=None):
    """Mint an account invite, store it durably, and return it (a dict).

    credentials: the "KEY_ID/SECRET" a request presented; it is checked in
    the same write transaction that stores the invite, so a deleted or
    expired key, a used-up quota or a full rate window is always seen.
    None (the command line): for host, with no key limits. options: raw
    ttl, uses, username, note values (see invite_options). Built-in by
    default; with a backend, the XMPP server mints it and we record it.
    Raises Unauthorized, Forbidden, BadRequest, TooManyRequests,
    BackendError or Unavailable.
    """
    def insert(conn):
        key = authenticate(store, credentials, conn) if credentials is not None else None
        checked = invite_options(options or {}, key, default_ttl, backend)
        invite = _new_invite(key["host"] if key is not None else host, key, backend=backend, **checked)
        if backend is not None:
            invite["uri"] = ""  # a slot held while the backend mints: quota and rate are checked first
        store.insert_invite(conn, invite, key)
        return invite

    invite = store.write(insert)
    if backend is None:
        return invite
    try:
        minted = backend.mint(invite["host"], ttl=invite["expires_at"] - invite["created_at"],
                              uses=invite["uses"], username=invite["username"])
    except BaseException:
        store.drop_invite(invite["token"])  # give the slot and its quota back
        raise
    slot = invite["token"]
    invite.update(token=minted["token"] or slot, uri=minted["uri"] or "", url=minted["url"])
    store.finish_invite(slot, invite["token"], invite["uri"], invite["url"])
    return invite


def _new_invite(host, key, ttl, uses, username, note, backend=None):
    token = _new_token()
    created_at = now()
    jid = f"{username}@{host}" if username else host
    return {"token": token, "host": host, "type": "register",
            "uri": f"xmpp:{jid}?register;preauth={token}", "url": None,
            "key_id": key["id"] if key is not None else None, "created_at": created_at,
            "expires_at": created_at + ttl, "uses": uses, "uses_left": uses,
            "username": username, "note": note, "revoked_at": None, "done_at": None,
            "backend": "builtin" if backend is None else backend.name}


def invite_status(invite, at=None):
    """Return "valid", "used", "revoked" or "expired" for an invite row."""
    if invite["revoked_at"] is not None:
        return "revoked"
    if invite["uses_left"] <= 0:
        return "used"
    if invite["expires_at"] <= (now() if at is None else at):
        return "expired"
    return "valid"


def invite_info(invite, url=None):
    """Return an invite as a dict for JSON: everything but internals, times in ISO 8601."""
    return {"token": invite["token"], "host": invite["host"], "uri": invite["uri"], "url": url,
            "status": invite_status(invite), "created_at": iso(invite["created_at"]),
            "expires_at": iso(invite["expires_at"]), "uses": invite["uses"],
            "uses_left": invite["uses_left"], "username": invite["username"], "note": invite["note"],
            "key_id": invite["key_id"], "revoked_at": iso(invite["revoked_at"])}


def get_invite(store, token, host=None, key_id=None):
    """Return an invite by token, within a host and/or a key's own; raise NotFound otherwise."""
    invite = store.invite(token) if TOKEN_RE.match(token) else None
    if (invite is None or (host is not None and invite["host"] != host)
            or (key_id is not None and invite["key_id"] != key_id)):
        raise NotFound(f"invite {token[:40]!r} not found")
    return invite


def find_invite(store, token):
    """Return (built-in invite or None if unknown, its status) for the invite page."""
    invite = store.invite(token) if TOKEN_RE.match(token) else None
    if invite is None or invite["backend"] != "builtin":
        return None, None
    return invite, invite_status(invite)


def list_invites(store, host, key_id=None, include_all=False):
    """Return a host's invites (or one key's), newest first; pending ones only unless include_all."""
    return store.invites(host, key_id, pending_at=None if include_all else now())


def revoke_invite(store, token, host=None, key_id=None):
    """Revoke an invite at once; raise NotFound if it is not the host's or key's."""
    if get_invite(store, token, host, key_id)["backend"] != "builtin":
        raise BadRequest("this invite was minted by the XMPP server: revoke it there")
    store.revoke_invite(token, now())


def redeem_invite(store, token, host, username=None):
    """Use an invite once and return it; raise NotFound, Conflict (other username) or Gone."""
    invite = get_invite(store, token, host)
    if invite["backend"] != "builtin":
        raise BadRequest("this invite was minted by the XMPP server: it is redeemed there")
    if username is not None and invite["username"] and parse_username(username) != invite["username"]:
        raise Conflict("this invite is for another username")
    used = store.use_invite(token, now())
    if used is None:
        raise Gone(f"this invite is {invite_status(store.invite(token))}")
    return used


def check_invite(store, token):
    """Return the public facts about an invite: {valid, host, expires_at, username}; nothing secret."""
    invite = store.invite(token) if TOKEN_RE.match(token) else None
    if invite is None or invite["backend"] != "builtin" or invite_status(invite) != "valid":
        return {"valid": False, "host": None, "expires_at": None, "username": None}
    return {"valid": True, "host": invite["host"], "expires_at": iso(invite["expires_at"]),
            "username": invite["username"]}


def purge_invites(store, grace=DEFAULT_PURGE_GRACE):
    """Delete invites that stopped being valid more than grace seconds ago; return how many."""
    total = 0
    while True:
        deleted = store.purge_invites(now() - grace, now() - 3600)
        total += deleted
        if not deleted:
            return total


# ---------------------------------------------------------------------------
# Backends: an XMPP server mints the invite, through its own command line
# ---------------------------------------------------------------------------

_URL_RE = re.compile(r"https?://\S+")
_URI_RE = re.compile(r"xmpp:\S+")
_PREAUTH_RE = re.compile(r"preauth=([A-Za-z0-9_-]+)")
_SECRET_LOOKING_RE = re.compile(r"[A-Za-z0-9_-]{16,}")


def redact(text):
    """Return text with anything token-like (16+ URL-safe characters) replaced."""
    return _SECRET_LOOKING_RE.sub("[redacted]", text)


class Backend:
    """Mints invites by running a program with an argv (never a shell) and reading its output.

    The `command` backend: each argv element may hold {host}, {ttl} (seconds),
    {uses} and {username}; the options whose placeholder appears are the
    ones it honours. The invite is the last http(s) URL the program printed,
    else the last xmpp: URI.
    """

    name = "command"

    def __init__(self, argv, timeout=DEFAULT_BACKEND_TIMEOUT, concurrency=DEFAULT_BACKEND_CONCURRENCY,
                 log=None):
        self.template = list(argv)
        self.options = frozenset(o for o in ("ttl", "uses", "username") if any(f"{{{o}}}" in a for a in argv))
        self.timeout = timeout
        self.log = log  # a text stream for failures, or None
        self._slots = threading.BoundedSemaphore(concurrency)

    def argv(self, host, ttl, uses, username):
        """Return the program's argv for one invite; host must already be a valid domain."""
        values = {"{host}": host, "{ttl}": str(ttl), "{uses}": str(uses), "{username}": username or ""}
        argv = []
        for element in self.template:
            for placeholder, value in values.items():
                element = element.replace(placeholder, value)
            argv.append(element)
        return argv

    def parse(self, output):
        """Return (uri, url) from the program's output; either may be None."""
        urls, uris = _URL_RE.findall(output), _URI_RE.findall(output)
        return (uris[-1] if uris else None), (urls[-1] if urls else None)

    def mint(self, host, ttl=DEFAULT_INVITE_TTL, uses=1, username=None):
        """Run the program once; return {"token", "uri", "url"}; raise BadRequest, BackendError or Unavailable."""
        try:
            valid = parse_host(host) == host
        except ValueError:
            valid = False
        if not valid:  # it reaches the program only as a checked domain name, one argv element
            raise BadRequest(f"invalid host {host!r}")
        uri, url = self.parse(self.run(self.argv(host, ttl, uses, username)))
        if not uri and not url:
            self.fail("printed no invite URL or xmpp: URI")
        token = _PREAUTH_RE.search(uri or "") or re.search(r"[?/]([A-Za-z0-9_-]{16,})$", url or "")
        token = token.group(1) if token else None
        if uri is None and token:  # what an account invite's URI is, by XEP-0401
            uri = f"xmpp:{username + '@' if username else ''}{host}?register;preauth={token}"
        return {"token": token, "uri": uri, "url": url}

    def run(self, argv):
        """Run argv with the timeout and concurrency limits; return its stdout or raise."""
        import subprocess
        if not self._slots.acquire(timeout=self.timeout):
            raise Unavailable(f"all {self.name} backend slots are busy; try again")
        try:
            try:  # a new session, so that a timeout kills the program's children too
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
            except OSError as e:
                self.fail(f"cannot run {argv[0]!r}: {e.strerror}")
            try:
                stdout, stderr = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                import signal
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended just now
                    pass
                stdout, stderr = proc.communicate()
                self.fail(f"timed out after {self.timeout:g} s", stderr)
        finally:
            self._slots.release()
        if proc.returncode != 0:
            self.fail(f"exited with status {proc.returncode}", stderr + stdout)
        return stdout.decode("utf-8", "replace")

    def fail(self, reason, output=b""):
        """Log the failure with the program's output (redacted) and raise BackendError."""
        if self.log is not None:
            detail = redact(output.decode("utf-8", "replace")).strip().replace("\n", " | ")[:1000]
            self.log.write(f"{iso(now())} {self.name} backend {reason}: {detail or '(no output)'}\n")
            self.log.flush()
        raise BackendError(f"the {self.name} backend {reason}")

    def check(self):
        """Return a warning if the backend cannot work as configured, else None."""
        import shutil
        program = self.template[0] if self.template else ""
        if not shutil.which(program):
            return f"{self.name} backend: {program!r} is not an executable program (or not on PATH)"
        return None


class ProsodyBackend(Backend):
    """Prosody 0.12+ with mod_admin_shell and mod_invites: `prosodyctl shell invite create_account HOST`."""

    name = "prosody"

    def __init__(self, prosodyctl="prosodyctl", config=None, **kwargs):
        self.prefix = [prosodyctl] + (["--config", config] if config else [])
        super().__init__(self.prefix + ["shell", "invite", "create_account", "{username}@{host}"], **kwargs)
        self.options = frozenset({"username"})

    def argv(self, host, ttl, uses, username):
        return self.prefix + ["shell", "invite", "create_account", f"{username}@{host}" if username else host]

    def parse(self, output):
        answers = [line[4:].strip() for line in output.splitlines() if line.startswith("OK: ")]
        if not answers:
            return None, None
        return (answers[-1], None) if answers[-1].startswith("xmpp:") else (None, answers[-1])

    def check(self):
        warning = super().check()
        if warning:
            return warning
        try:
            self.run(self.prefix + ["shell", "server", "version"])
        except Error as e:
            return f"prosody backend: cannot reach Prosody's admin shell ({e}); is Prosody running " \
                   "with mod_admin_shell, and may this user open its admin socket?"
        return None


class EjabberdBackend(Backend):
    """ejabberd 26.01+ with mod_invites: `ejabberdctl generate_invite HOST`."""

    name = "ejabberd"

    def __init__(self, ejabberdctl="ejabberdctl", **kwargs):
        super().__init__([ejabberdctl, "generate_invite", "{host}"], **kwargs)


def make_backend(name, prosodyctl="prosodyctl", prosody_config=None, ejabberdctl="ejabberdctl",
                 command=None, timeout=DEFAULT_BACKEND_TIMEOUT, concurrency=DEFAULT_BACKEND_CONCURRENCY,
                 log=None):
    """Return the Backend called name, or None for the built-in store; raise Error if misconfigured."""
    limits = {"timeout": timeout, "concurrency": concurrency, "log": log}
    if name == "builtin":
        return None
    if name == "prosody":
        return ProsodyBackend(prosodyctl, prosody_config, **limits)
    if name == "ejabberd":
        return EjabberdBackend(ejabberdctl, **limits)
    if name == "command":
        import shlex
        try:
            argv = shlex.split(command or "")
        except ValueError as e:
            raise Error(f"--backend-command {command!r}: {e}") from None
        if not argv:
            raise Error("the command backend needs --backend-command 'PROGRAM ARGS... {host}'")
        return Backend(argv, **limits)
    raise Error(f"unknown backend {name!r}: use builtin, prosody, ejabberd or command")


# ---------------------------------------------------------------------------
# Rendering: invite URLs and the landing page
# ---------------------------------------------------------------------------

def invite_url(invite, base, template=None):
    """Return the URL of an invite's landing page: the template's, else {base}/invite?TOKEN."""
    if invite["url"]:
        return invite["url"]
    if template:
        from urllib.parse import quote
        return (template.replace("{host}", invite["host"]).replace("{token}", invite["token"])
                .replace("{uri}", quote(invite["uri"], safe="")))
    return f"{base}/invite?{invite['token']}"


# -- QR codes (ISO/IEC 18004), byte mode, versions 1 to 40 ------------------

# Per error-correction level: (format bits, EC codewords per block, EC blocks), by version.
_QR_LEVELS = {
    "L": (1, (0, 7, 10, 15, 20, 26, 18, 20, 24, 30, 18, 20, 24, 26, 30, 22, 24, 28, 30, 28, 28, 28, 28, 30,
              30, 26, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30),
          (0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 6, 6, 6, 6, 7, 8, 8, 9, 9, 10, 12, 12, 12, 13, 14, 15,
           16, 17, 18, 19, 19, 20, 21, 22, 24, 25)),
    "M": (0, (0, 10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26, 26, 26, 28, 28,
              28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28),
          (0, 1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17, 17, 18, 20, 21, 23, 25, 26,
           28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49)),
    "Q": (3, (0, 13, 22, 18, 26, 18, 24, 18, 22, 20, 24, 28, 26, 24, 20, 30, 24, 28, 28, 26, 30, 28, 30, 30,
              30, 30, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30),
          (0, 1, 1, 2, 2, 4, 4, 6, 6, 8, 8, 8, 10, 12, 16, 12, 17, 16, 18, 21, 20, 23, 23, 25, 27, 29, 34, 34,
           35, 38, 40, 43, 45, 48, 51, 53, 56, 59, 62, 65, 68)),
    "H": (2, (0, 17, 28, 22, 16, 22, 28, 26, 26, 24, 28, 24, 28, 22, 24, 24, 30, 28, 28, 26, 28, 30, 24, 30,
              30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30),
          (0, 1, 1, 2, 4, 4, 4, 5, 6, 8, 8, 11, 11, 16, 16, 18, 16, 19, 21, 25, 25, 25, 34, 30, 32, 35, 37, 40,
           42, 45, 48, 51, 54, 57, 60, 63, 66, 70, 74, 77, 81)),
}
# The eight mask conditions; a module (x column, y row) is flipped where true.
_QR_MASKS = (
    lambda x, y: (x + y) % 2 == 0, lambda x, y: y % 2 == 0, lambda x, y: x % 3 == 0,
    lambda x, y: (x + y) % 3 == 0, lambda x, y: (x // 3 + y // 2) % 2 == 0,
    lambda x, y: x * y % 2 + x * y % 3 == 0, lambda x, y: (x * y % 2 + x * y % 3) % 2 == 0,
    lambda x, y: ((x + y) % 2 + x * y % 3) % 2 == 0,
)


def _qr_raw_modules(version):
    """Return how many modules of a version carry data and EC codewords."""
    result = (16 * version + 128) * version + 64
    if version >= 2:
        align = version // 7 + 2
        result -= (25 * align - 10) * align - 55
        if version >= 7:
            result -= 36
    return result


def qr_capacity(version, level="M", utf8=False):
    """Return how many bytes a QR code of this version and level holds in byte mode
    (utf8: with the ECI header that marks the bytes as UTF-8)."""
    _, ec_len, blocks = _QR_LEVELS[level]
    data_bits = (_qr_raw_modules(version) // 8 - ec_len[version] * blocks[version]) * 8
    return (data_bits - 4 - (8 if version < 10 else 16) - (12 if utf8 else 0)) // 8


def _gf_multiply(x, y):
    z = 0
    for i in reversed(range(8)):
        z = (z << 1) ^ ((z >> 7) * 0x11D)
        z ^= ((y >> i) & 1) * x
    return z


def _reed_solomon(data, degree):
    """Return the degree EC codewords of data (Reed-Solomon over GF(256), polynomial 0x11D)."""
    divisor = [0] * (degree - 1) + [1]
    root = 1
    for _ in range(degree):
        for j in range(degree):
            divisor[j] = _gf_multiply(divisor[j], root)
            if j + 1 < degree:
                divisor[j] ^= divisor[j + 1]
        root = _gf_multiply(root, 2)
    remainder = [0] * degree
    for byte in data:
        factor = byte ^ remainder.pop(0)
        remainder.append(0)
        for i, coefficient in enumerate(divisor):
            remainder[i] ^= _gf_multiply(coefficient, factor)
    return remainder


def qr_matrix(data, level="M", mask=None, min_version=1):
    """Return the QR code of data (bytes or str) as rows of booleans (True = dark), with no quiet zone.

    Byte mode (non-ASCII text is marked UTF-8 with an ECI header, so that
    readers do not guess another charset), the smallest version from
    min_version that fits, and the mask with the lowest penalty (or the one
    given). Raises ValueError if too long.
    """
    utf8 = isinstance(data, str) and not data.isascii()
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fmt, ec_len, blocks = _QR_LEVELS[level]
    for version in range(min_version, 41):
        if len(data) <= qr_capacity(version, level, utf8):
            break
    else:
        raise ValueError(f"{len(data)} bytes do not fit in a QR code at level {level}")
    # The bit stream: mode, length, bytes, terminator, padding.
    capacity = _qr_raw_modules(version) // 8 - ec_len[version] * blocks[version]
    bits = [0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0] if utf8 else []  # ECI mode, designator 26: UTF-8
    bits += [0, 1, 0, 0] + [(len(data) >> i) & 1 for i in reversed(range(8 if version < 10 else 16))]
    for byte in data:
        bits += [(byte >> i) & 1 for i in reversed(range(8))]
    bits += [0] * min(4, capacity * 8 - len(bits))
    bits += [0] * (-len(bits) % 8)
    codewords = [int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8)]
    codewords += [0xEC, 0x11] * ((capacity - len(codewords)) // 2 + 1)
    codewords = codewords[:capacity]
    # Split into blocks, add EC to each, interleave.
    total = _qr_raw_modules(version) // 8
    count, degree = blocks[version], ec_len[version]
    short_count, short_len = count - total % count, total // count
    split, start = [], 0
    for i in range(count):
        length = short_len - degree + (0 if i < short_count else 1)
        block = codewords[start:start + length]
        start += length
        split.append((block, _reed_solomon(block, degree)))
    stream = [b[i] for i in range(short_len - degree + 1) for b, _ in split if i < len(b)]
    stream += [e[i] for i in range(degree) for _, e in split]

    size = version * 4 + 17
    dark = [[False] * size for _ in range(size)]
    function = [[False] * size for _ in range(size)]

    def put(x, y, value):
        dark[y][x] = value
        function[y][x] = True

    for i in range(size):  # timing patterns
        put(6, i, i % 2 == 0)
        put(i, 6, i % 2 == 0)
    for cx, cy in ((3, 3), (size - 4, 3), (3, size - 4)):  # finder patterns and separators
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                if 0 <= cx + dx < size and 0 <= cy + dy < size:
                    put(cx + dx, cy + dy, max(abs(dx), abs(dy)) not in (2, 4))
    if version > 1:  # alignment patterns
        align = version // 7 + 2
        step = (version * 8 + align * 3 + 5) // (align * 4 - 4) * 2
        positions = [6] + [size - 7 - i * step for i in reversed(range(align - 1))]
        for i, cx in enumerate(positions):
            for j, cy in enumerate(positions):
                if (i, j) not in ((0, 0), (0, align - 1), (align - 1, 0)):
                    for dy in range(-2, 3):
                        for dx in range(-2, 3):
                            put(cx + dx, cy + dy, max(abs(dx), abs(dy)) != 1)
    if version >= 7:  # version information, 18 bits twice
        remainder = version
        for _ in range(12):
            remainder = (remainder << 1) ^ ((remainder >> 11) * 0x1F25)
        info = version << 12 | remainder
        for i in range(18):
            bit = (info >> i) & 1 == 1
            put(size - 11 + i % 3, i // 3, bit)
            put(i // 3, size - 11 + i % 3, bit)

    def draw_format(mask_number):
        value = fmt << 3 | mask_number
        remainder = value
        for _ in range(10):
            remainder = (remainder << 1) ^ ((remainder >> 9) * 0x537)
        info = (value << 10 | remainder) ^ 0x5412
        bit = [(info >> i) & 1 == 1 for i in range(15)]
        for i in range(6):
            put(8, i, bit[i])
        put(8, 7, bit[6])
        put(8, 8, bit[7])
        put(7, 8, bit[8])
        for i in range(9, 15):
            put(14 - i, 8, bit[i])
        for i in range(8):
            put(size - 1 - i, 8, bit[i])
        for i in range(8, 15):
            put(8, size - 15 + i, bit[i])
        put(8, size - 8, True)  # the dark module

    draw_format(0)  # reserve the format areas before placing data
    i = 0
    for right in range(size - 1, 0, -2):  # data in two-column zigzags, bottom-right first
        if right <= 6:
            right -= 1
        for vertical in range(size):
            for j in range(2):
                x = right - j
                y = size - 1 - vertical if (right + 1) & 2 == 0 else vertical
                if not function[y][x] and i < len(stream) * 8:
                    dark[y][x] = (stream[i >> 3] >> (7 - (i & 7))) & 1 == 1
                    i += 1

    def masked(number):
        condition = _QR_MASKS[number]
        result = [[dark[y][x] ^ (not function[y][x] and condition(x, y)) for x in range(size)]
                  for y in range(size)]
        saved = [row[:] for row in dark], [row[:] for row in function]
        draw_format(number)
        for y in range(size):
            for x in range(size):
                if function[y][x] and (x == 8 or y == 8):
                    result[y][x] = dark[y][x]
        dark[:], function[:] = saved
        return result

    if mask is not None:
        return masked(mask)
    return min((masked(n) for n in range(8)), key=_qr_penalty)


def _qr_penalty(matrix):
    """Return the standard penalty score of a masked QR matrix (lower is easier to read)."""
    size = len(matrix)
    score = 0
    lines = matrix + [list(column) for column in zip(*matrix)]
    finder_like = ([True, False, True, True, True, False, True, False, False, False, False],
                   [False, False, False, False, True, False, True, True, True, False, True])
    for line in lines:
        run, previous = 0, None
        for module in line:  # rule 1: runs of five or more
            if module == previous:
                run += 1
            else:
                score += run - 2 if run >= 5 else 0
                run, previous = 1, module
        score += run - 2 if run >= 5 else 0
        padded = [False] * 4 + line + [False] * 4  # rule 3: finder-like patterns (quiet zone is light)
        for start in range(len(padded) - 10):
            if padded[start:start + 11] in finder_like:
                score += 40
    for y in range(size - 1):  # rule 2: 2x2 blocks of one colour
        for x in range(size - 1):
            if matrix[y][x] == matrix[y][x + 1] == matrix[y + 1][x] == matrix[y + 1][x + 1]:
                score += 3
    dark = sum(map(sum, matrix))  # rule 4: balance of dark and light
    total = size * size
    score += ((abs(dark * 20 - total * 10) + total - 1) // total - 1) * 10
    return score


@functools.lru_cache(maxsize=128)  # about 4 KB each; a page seen again (a refresh) costs no QR work
def _invite_qr(uri, host):
    """Return an invite page's QR code of its xmpp: URI (about 15 ms of CPU to make)."""
    return qr_svg(qr_matrix(uri), label=f"QR code of the invite for {host}; scan it with an XMPP app")


def qr_svg(matrix, quiet=4, label="QR code"):
    """Return a QR matrix as an inline SVG element (dark on white, with a quiet zone)."""
    import html
    size = len(matrix) + 2 * quiet
    path = []
    for y, row in enumerate(matrix):
        x = 0
        while x < len(row):
            if row[x]:
                run = 1
                while x + run < len(row) and row[x + run]:
                    run += 1
                path.append(f"M{x + quiet} {y + quiet}h{run}v1h-{run}z")
                x += run
            else:
                x += 1
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}" role="img" '
            f'aria-label="{html.escape(label)}" shape-rendering="crispEdges">'
            f'<rect width="{size}" height="{size}" fill="#fff"/>'
            f'<path fill="#000" d="{"".join(path)}"/></svg>')


def qr_text(matrix, quiet=4, colour=False):
    """Return a QR matrix as terminal text: two module rows per line in Unicode half blocks.

    "█" is dark above and below, "▀" dark above, "▄" dark below, space light.
    With colour, ANSI black on white, so it scans in dark terminals too.
    """
    size = len(matrix) + 2 * quiet
    padded = ([[False] * size for _ in range(quiet)]
              + [[False] * quiet + list(row) + [False] * quiet for row in matrix]
              + [[False] * size for _ in range(quiet + 1)])
    chars = {(True, True): "\u2588", (True, False): "\u2580", (False, True): "\u2584", (False, False): " "}
    lines = ["".join(chars[top, bottom] for top, bottom in zip(padded[y], padded[y + 1]))
             for y in range(0, size, 2)]
    if colour:
        lines = [f"\x1b[30;47m{line}\x1b[0m" for line in lines]
    return "\n".join(lines)


# -- the invite page ---------------------------------------------------------

# Links only: the page loads nothing from these sites.
DEFAULT_APPS = (
    {"platform": "Android", "name": "Conversations", "url": "https://play.google.com/store/apps/details?id=eu.siacs.conversations"},
    {"platform": "Android", "name": "Conversations (F-Droid)", "url": "https://f-droid.org/packages/eu.siacs.conversations/"},
    {"platform": "iOS", "name": "Monal", "url": "https://monal-im.org/"},
    {"platform": "iOS", "name": "Siskin IM", "url": "https://siskin.im/"},
    {"platform": "Windows, macOS, Linux", "name": "Gajim", "url": "https://gajim.org/download/"},
    {"platform": "Windows, macOS, Linux", "name": "Dino (Linux)", "url": "https://dino.im/"},
    {"platform": "Windows, macOS, Linux", "name": "Monal (macOS)", "url": "https://monal-im.org/"},
)


def load_apps(path):
    """Return the app list from a JSON file: [{"platform", "name", "url"}, ...]; raise Error if malformed."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            apps = json.load(f)
    except (OSError, ValueError) as e:
        raise Error(f"cannot read the app list {path!r}: {e}") from None
    if not isinstance(apps, list) or not all(
            isinstance(a, dict) and all(isinstance(a.get(k), str) and a[k] for k in ("platform", "name", "url"))
            and re.match(r"https?://", a["url"]) for a in apps):
        raise Error(f"the app list {path!r} must be a JSON array of "
                    '{"platform": ..., "name": ..., "url": "https://..."} objects')
    return tuple(apps)


_PAGE_STYLE = """
:root{color-scheme:light dark;--bg:#f3f4f6;--card:#fff;--text:#16181d;--muted:#4a5060;--accent:#1a56c4;
--on-accent:#fff;--line:#d5d8de}
@media (prefers-color-scheme:dark){:root{--bg:#111318;--card:#1d2027;--text:#eceef2;--muted:#b4b9c4;
--accent:#8ab4ff;--on-accent:#0b0d12;--line:#3a3f4a}}
*{box-sizing:border-box}
body{margin:0;padding:0 .75rem;background:var(--bg);color:var(--text);
font:17px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif}
header{padding:.75rem 1rem;font-weight:600;color:var(--muted);text-align:center}
main{max-width:34rem;margin:0 auto 2rem;padding:1.5rem 1.25rem;background:var(--card);border-radius:12px}
h1{font-size:1.5rem;line-height:1.25;margin:0 0 .75rem}
h2{font-size:1.1rem;margin:1.75rem 0 .5rem}
p{margin:.5rem 0}
.muted{color:var(--muted)}
.note{border-left:4px solid var(--accent);padding:.25rem .75rem;margin:1rem 0;white-space:pre-wrap}
a{color:var(--accent)}
a.button{display:block;text-align:center;padding:.9rem 1rem;margin:1.25rem 0;border-radius:8px;
background:var(--accent);color:var(--on-accent);text-decoration:none;font-weight:700;font-size:1.1rem}
a.button:focus-visible,button:focus-visible,input:focus-visible{outline:3px solid var(--text);outline-offset:2px}
figure{margin:.5rem auto;max-width:15rem}
figure svg{display:block;width:100%;height:auto;border-radius:4px}
figcaption{text-align:center;font-size:.9rem;color:var(--muted)}
.copy{display:flex;gap:.5rem}
.copy input{flex:1;min-width:0;padding:.6rem;border:1px solid var(--line);border-radius:6px;
background:var(--bg);color:var(--text);font:inherit;font-size:.9rem}
.copy button{padding:.6rem 1rem;border:0;border-radius:6px;background:var(--accent);color:var(--on-accent);
font:inherit;font-weight:600;cursor:pointer}
ul{padding-left:1.25rem}
li{margin:.35rem 0}
"""


def render_page(title, body_html, site_name, nonce, script=""):
    """Return a complete, self-contained HTML page (inline CSS; a script only with the CSP nonce)."""
    import html
    script = f'<script nonce="{nonce}">{script}</script>' if script else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="referrer" content="no-referrer">'
            f'<title>{html.escape(title)}</title><style nonce="{nonce}">{_PAGE_STYLE}</style></head>'
            f"<body><header>{html.escape(site_name)}</header><main>{body_html}</main>{script}</body></html>\n")


def in_words(seconds):
    """Return a duration in words: "in 6 days", "in 3 hours", "in less than a minute"."""
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = seconds // length
            return f"in {count} {unit}{'s' if count != 1 else ''}"
    return "in less than a minute"


_COPY_SCRIPT = ("var b=document.getElementById('copy'),i=document.getElementById('link');b.hidden=false;"
                "b.addEventListener('click',function(){i.select();(navigator.clipboard?"
                "navigator.clipboard.writeText(i.value):Promise.reject()).then(function(){b.textContent='Copied'},"
                "function(){document.execCommand('copy');b.textContent='Copied'})})")


def render_invite_page(invite, page_url, site_name, apps, nonce):
    """Return the landing page for a valid invite: who invites where, the app button, QR, link, apps."""
    import html
    esc = html.escape
    host = esc(invite["host"])
    left = invite["expires_at"] - now()
    expires = time.strftime("%d %B %Y, %H:%M UTC", time.gmtime(invite["expires_at"])).lstrip("0")
    details = f"This invite expires {in_words(left)} ({esc(expires)})."
    if invite["uses_left"] > 1:
        details += f" It can create {invite['uses_left']} more accounts."
    if invite["username"]:
        details += f" It is for the address <strong>{esc(invite['username'])}@{host}</strong>."
    note = f'<p class="note">{esc(invite["note"])}</p>' if invite["note"] else ""
    platforms = {}
    for app in apps:
        platforms.setdefault(app["platform"], []).append(
            f'<a href="{esc(app["url"])}" rel="noreferrer">{esc(app["name"])}</a>')
    app_list = "".join(f"<li><strong>{esc(p)}</strong>: {', '.join(links)}</li>" for p, links in platforms.items())
    qr = _invite_qr(invite["uri"], invite["host"])
    return render_page(f"Invite to {invite['host']}", (
        f"<h1>You have been invited to join {host}</h1>{note}"
        f'<p class="muted">{details}</p>'
        f'<a class="button" href="{esc(invite["uri"])}">Open in your XMPP app</a>'
        f"<h2>On another device?</h2>"
        f"<figure>{qr}<figcaption>Scan this with your XMPP app</figcaption></figure>"
        f'<h2><label for="link">Or copy the link to this page</label></h2>'
        f'<p class="copy"><input id="link" readonly value="{esc(page_url)}">'
        f'<button id="copy" type="button" hidden>Copy</button></p>'
        f"<h2>No app yet?</h2>"
        f"<p>Install one of these, then come back to this page and press the button above:</p>"
        f"<ul>{app_list}</ul>"), site_name, nonce, _COPY_SCRIPT)


_UNAVAILABLE = {
    "used": "This invite has already been used",
    "revoked": "This invite has been withdrawn",
    "expired": "This invite has expired",
    None: "We could not find this invite",
}


def render_unavailable_page(status, site_name, nonce):
    """Return the friendly page for a used, revoked, expired (status) or unknown (None) invite."""
    hint = ("Check that you opened the whole link. " if status is None else "") + \
        "Please ask the person who invited you for a new invite."
    return render_page("Invite not available", (
        f"<h1>{_UNAVAILABLE[status]}</h1><p>{hint}</p>"), site_name, nonce)


# ---------------------------------------------------------------------------
# HTTP: a thin translation between requests and operations
# ---------------------------------------------------------------------------

# The whole URL space: (path pattern, {method: handler method}, cross-origin?).
# Cross-origin routes answer OPTIONS preflights and carry CORS headers.
ROUTES = tuple((re.compile(pattern + r"\Z"), methods, cors) for pattern, methods, cors in (
    (r"/invites_api/?", {"GET": "api_create", "POST": "api_create"}, True),
    (r"/invites_api/invites/?", {"GET": "api_list"}, True),
    (r"/invites_api/invites/(?P<token>[^/]+)", {"GET": "api_show", "DELETE": "api_revoke"}, True),
    (r"/invites_api/invites/(?P<token>[^/]+)/redeem", {"POST": "api_redeem"}, True),
    (r"/invite/(?P<token>[^/]+)\.json", {"GET": "invite_check"}, True),
    (r"/invite(?:/(?P<token>[^/]*))?", {"GET": "invite_page", "HEAD": "invite_page"}, False),
    (r"/health", {"GET": "health", "HEAD": "health"}, False),
    (r"/metrics", {"GET": "metrics"}, False),
))
CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Headers", "Content-Type, Authorization"),
    ("Access-Control-Max-Age", "7200"),
)
_CORS_LINES = "".join(f"\r\n{name}: {value}" for name, value in CORS_HEADERS)
def page_headers(nonce):
    """Return the security headers of an HTML page whose inline style and script carry nonce."""
    return (
        ("Content-Security-Policy", f"default-src 'none'; style-src 'nonce-{nonce}'; "
                                    f"script-src 'nonce-{nonce}'; img-src data:; base-uri 'none'; "
                                    "form-action 'none'; frame-ancestors 'none'"),
        ("Referrer-Policy", "no-referrer"),  # the token is in the URL
        ("X-Content-Type-Options", "nosniff"),
        ("Cache-Control", "no-store"),
    )
_HOST_HEADER_RE = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?\Z|\[[0-9A-Fa-f:.]+\](:\d{1,5})?\Z")
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in list(range(32)) + [127]}


_date_cache = (0, "")


def http_date():
    """Return the current time as an HTTP date, formatted once a second (it is on every response)."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second)))
    return _date_cache[1]


def parse_query(query):
    """Return a query string's (name, value) pairs, decoded like urllib's parse_qsl; raise BadRequest
    past 20 of them. (Here on the hot path: parse_qsl is several times slower.)"""
    if not query:
        return []
    fields = [field for field in query.split("&") if field]
    if len(fields) > 20:
        raise BadRequest("too many query parameters")
    pairs = []
    for field in fields:
        name, _, value = field.partition("=")
        if "%" in field or "+" in field:
            from urllib.parse import unquote_plus
            name, value = unquote_plus(name), unquote_plus(value)
        pairs.append((name, value))
    return pairs


class Headers(dict):
    """A request's headers by lower-case name; a repeated header keeps every value."""

    def add(self, name, value):
        self.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = dict.get(self, name.lower())
        return values[0] if values else default

    def get_all(self, name):
        return dict.get(self, name.lower(), [])


class RateLimiter:
    """Counts events per client address in one-minute windows, in memory."""

    def __init__(self, per_minute):
        self.per_minute = per_minute
        self._window = None
        self._counts = {}
        self._noted = set()
        self._lock = threading.Lock()

    def hit(self, address):
        """Count one event; return 0 if allowed, else the seconds until the next window."""
        clock = time.monotonic()
        with self._lock:
            window = int(clock // 60)
            if window != self._window:  # a new minute: forget the old one (bounded memory)
                self._window, self._counts, self._noted = window, {}, set()
            count = self._counts[address] = self._counts.get(address, 0) + 1
        return 0 if count <= self.per_minute else 60 - clock % 60

    def first_time_over(self, address):
        """Return True the first time in this minute that it is asked about an address."""
        with self._lock:
            if address in self._noted:
                return False
            self._noted.add(address)
            return True

    def over(self, address):
        """Return 0 if the address is within its limit this minute, else the seconds until the next."""
        clock = time.monotonic()
        with self._lock:
            if int(clock // 60) != self._window or self._counts.get(address, 0) < self.per_minute:
                return 0
        return 60 - clock % 60


class Metrics:
    """Counters, gauges and a latency histogram for GET /metrics (OpenMetrics text)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = {}  # status -> count
        self.invites = {}  # (host, backend) -> count
        self.auth_failures = self.rate_limited = self.backend_failures = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def request(self, status, seconds):
        """Count one answered request and its duration."""
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            if status == 429:
                self.rate_limited += 1
            elif status == 502:
                self.backend_failures += 1
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def count(self, what, key=None):
        """Count an invite created (key: (host, backend)) or an auth failure."""
        with self._lock:
            if what == "invite":
                self.invites[key] = self.invites.get(key, 0) + 1
            else:
                self.auth_failures += 1

    def render(self, connections, database_bytes):
        """Return the OpenMetrics text exposition."""
        def family(name, kind, help, samples):
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"# HELP {name} {help}")
            lines.extend(samples)

        def labels(**pairs):
            return "{" + ",".join(f'{k}="{v}"' for k, v in pairs.items()) + "}"
        lines = []
        with self._lock:
            family("invites_api_invites_created", "counter", "Invites created.",
                   [f"invites_api_invites_created_total{labels(host=h, backend=b)} {n}"
                    for (h, b), n in sorted(self.invites.items())])
            family("invites_api_requests", "counter", "HTTP requests answered, by status.",
                   [f"invites_api_requests_total{labels(status=s)} {n}" for s, n in sorted(self.requests.items())])
            family("invites_api_auth_failures", "counter", "Requests with a wrong, unknown or malformed key.",
                   [f"invites_api_auth_failures_total {self.auth_failures}"])
            family("invites_api_rate_limited", "counter", "Requests answered 429.",
                   [f"invites_api_rate_limited_total {self.rate_limited}"])
            family("invites_api_backend_failures", "counter", "Backend programs that failed (502).",
                   [f"invites_api_backend_failures_total {self.backend_failures}"])
            cumulative, samples = 0, []
            for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), self.latency_counts):
                cumulative += count
                samples.append(f'invites_api_request_duration_seconds_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {cumulative}')
            samples += [f"invites_api_request_duration_seconds_count {cumulative}",
                        f"invites_api_request_duration_seconds_sum {self.latency_sum:.6f}"]
            family("invites_api_request_duration_seconds", "histogram", "Time from request line to response.",
                   samples)
        family("invites_api_open_connections", "gauge", "Client connections open now.",
               [f"invites_api_open_connections {connections}"])
        family("invites_api_database_size_bytes", "gauge", "Database file and WAL size.",
               [f"invites_api_database_size_bytes {database_bytes}"])
        return "\n".join(lines) + "\n# EOF\n"


class App:
    """What the request handler needs: the store and the serve options."""

    def __init__(self, store, public_url=None, invite_url_template=None,
                 invite_ttl=DEFAULT_INVITE_TTL, log=None, checks_per_minute=CHECKS_PER_MINUTE,
                 backend=None, site_name=None, apps=DEFAULT_APPS, trust_proxy=False, metrics_token=None,
                 auth_failures_per_minute=AUTH_FAILURES_PER_MINUTE):
        self.store = store
        self.trust_proxy = trust_proxy  # take client address and scheme from X-Forwarded-*/Forwarded
        self.metrics_token = metrics_token
        self.metrics = Metrics()
        self.auth_limiter = RateLimiter(auth_failures_per_minute)
        self.backend = backend  # None: the built-in store mints invites
        self.site_name = site_name  # None: the invite's host
        self.apps = apps
        self.public_url = public_url.rstrip("/") if public_url else None
        self.invite_url_template = invite_url_template
        self.invite_ttl = invite_ttl
        self.log = log  # a text stream for the access log, or None for quiet
        self.check_limiter = RateLimiter(checks_per_minute)

    def log_line(self, text):
        """Write one timestamped line to the log (if there is one)."""
        if self.log is not None:
            self.log.write(f"{iso(now())} {text}\n")
            self.log.flush()


def _make_handler_class():
    # http.server is imported only here, so the key commands start fast.
    import io
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        """Reads a request, calls one operation, writes one response."""

        protocol_version = "HTTP/1.1"
        server_version = f"invites_api/{__version__}"
        sys_version = ""
        disable_nagle_algorithm = True

        def __init__(self, server, client_address, request):
            # Not socketserver's __init__, which would read and write the socket
            # itself: the serving loop hands us one whole request, and sends the
            # answers we collect once the writes they report are committed.
            self.server, self.client_address = server, client_address
            self.rfile, self.wfile = io.BytesIO(request), None
            self.close_connection = True
            self.answers = []  # (status, body size, bytes)

        # -- one request --------------------------------------------------------

        def handle_one_request(self):
            self.command = self.path = None
            self.request_version = "HTTP/1.1"
            self._started = None
            self._body = None
            self._cors = None
            self.headers = None
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            self._started = time.monotonic()
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.close_connection = True
                self.respond(414, "request line too long\n")
            elif self.parse_request():  # on failure it answered through send_error
                if self.server.stopping:
                    self.close_connection = True
                self.dispatch()

        def parse_request(self):
            """Read the request line's parts and the headers; answer 400/431 and return False if bad.

            Our own, stricter and faster than http.server's (which goes through the email package).
            """
            words = self.raw_requestline.decode("latin-1").rstrip("\r\n").split(" ")
            self.requestline = " ".join(words)
            if len(words) != 3 or not words[1].startswith("/"):
                self.send_error(400)
                return False
            self.command, self.path, self.request_version = words
            if self.request_version not in ("HTTP/1.1", "HTTP/1.0"):
                self.request_version = "HTTP/1.1"
                self.send_error(400)  # not 505: client input never causes a 5xx
                return False
            headers = self.headers = Headers()
            for count in range(MAX_HEADERS + 1):  # lines, not names: a repeated name counts each time
                line = self.rfile.readline(MAX_HEADER_LINE + 1)
                if line in (b"\r\n", b"\n"):
                    break
                if not line.endswith(b"\n") or count == MAX_HEADERS:
                    self.send_error(431 if line else 400)  # too long, too many, or cut short
                    return False
                name, colon, value = line.decode("latin-1").partition(":")
                if not colon or not name or name != name.strip() or " " in name:
                    self.send_error(400)  # no colon, or obsolete line folding
                    return False
                headers.add(name, value.strip())
            connection = headers.get("Connection", "").lower()
            self.close_connection = "close" in connection or (self.request_version == "HTTP/1.0"
                                                              and "keep-alive" not in connection)
            return True  # (an Expect: 100-continue was answered by the loop, see _Connection.request)

        def dispatch(self):
            """Route the request, and turn errors into responses."""
            path, _, query = self.path.partition("?")
            try:
                for pattern, methods, cors in ROUTES:
                    match = pattern.match(path)
                    if match:
                        break
                else:
                    raise NotFound(f"no such page: {path[:100]!r}")
                allowed = tuple(methods) + (("OPTIONS",) if cors else ())
                self._cors = ", ".join(allowed) if cors else None
                if self.command == "OPTIONS" and cors:
                    return self.respond(204)
                if self.command not in methods:
                    raise MethodNotAllowed(self.command, allowed)
                self.query = query
                self.read_body()
                getattr(self, methods[self.command])(match.group("token") if "token" in pattern.groupindex
                                                     else None)
            except Error as e:
                if self._body is None and self.headers.get("Content-Length", "0").strip() != "0":
                    self.close_connection = True  # an unread body would spoil keep-alive
                if isinstance(e, BadCredentials):
                    self.count_auth_failure()
                elif isinstance(e, (StoreError, BackendError)):
                    self.log_line(f"{type(e).__name__} on {self.command} {self.redacted_path()}: {e}")
                self.respond_error(e)
            except Exception:
                import traceback
                self.close_connection = True
                self.log_line(f"internal error on {self.command} {self.redacted_path()}:\n"
                              + traceback.format_exc().rstrip())
                self.respond(500, "internal error\n")

        # -- routes -----------------------------------------------------------

        def count_auth_failure(self):
            """Count a failed authentication; log once when an address passes its limit this minute."""
            self.server.app.metrics.count("auth_failure")
            limiter = self.server.app.auth_limiter
            limiter.hit(self.client_ip())
            if limiter.over(self.client_ip()) and limiter.first_time_over(self.client_ip()):
                self.log_line(f"{self.client_ip()} passed {limiter.per_minute} failed authentications "
                              "this minute; refusing it with 429 until the minute ends")

        def refuse_if_guessing(self):
            """Answer 429 to an address that failed authentication too often this minute."""
            wait = self.server.app.auth_limiter.over(self.client_ip())
            if wait:
                raise TooManyRequests("too many failed authentications from your address", wait)

        def health(self, _):
            """Say whether the database answers a read and a write: GET /health."""
            self.params()
            try:
                self.server.app.store.health()
            except Error as e:
                return self.respond_json(503, {"status": "error", "reason": str(e).split(": ", 1)[-1]},
                                         [("Retry-After", "5")])
            self.respond_json(200, {"status": "ok"})

        def metrics(self, _):
            """Expose counters as OpenMetrics text: GET /metrics (with --metrics-token, a Bearer token)."""
            self.params()
            app = self.server.app
            if app.metrics_token is not None:
                given = (self.headers.get("Authorization") or "").partition(" ")[2].strip()
                if not hmac.compare_digest(given.encode(), app.metrics_token.encode()):
                    raise Unauthorized("this needs the metrics token (Authorization: Bearer)")
            text = app.metrics.render(self.server.open_connections, app.store.size())
            self.respond(200, text, content_type="application/openmetrics-text; version=1.0.0; charset=utf-8")

        def api_create(self, _):
            """Create an invite: GET or POST /invites_api."""
            app = self.server.app
            params = self.params("key", "redirect", "ttl", "uses", "username", "note")
            for name, value in self.json_body().items():
                if name in params:
                    raise BadRequest(f"option {name!r} given in both the query and the body")
                params[name] = str(value).lower() if isinstance(value, bool) else value
            redirect = parse_bool("redirect", str(params.pop("redirect", "")))
            credentials = self.presented_key(params.pop("key", ""))
            self.refuse_if_guessing()
            invite = create_invite(app.store, credentials, options=params, default_ttl=app.invite_ttl,
                                   backend=app.backend)
            app.metrics.count("invite", (invite["host"], invite["backend"]))
            url = self.invite_url(invite)
            status = 303 if redirect else 201
            if self.wants_json():
                return self.respond_json(status, invite_info(invite, url), [("Location", url)])
            self.respond(status, b"", [("Location", url)])

        def api_list(self, _):
            """List the key's invites: GET /invites_api/invites[?all=true]."""
            params = self.params("key", "all")
            key = self.authenticate(params.get("key", ""))
            invites = list_invites(self.server.app.store, key["host"], key["id"],
                                   include_all=parse_bool("all", params.get("all", "")))
            self.respond_json(200, [invite_info(i, self.invite_url(i)) for i in invites])

        def api_show(self, token):
            """Show one of the key's invites: GET /invites_api/invites/TOKEN."""
            key = self.authenticate(self.params("key").get("key", ""))
            invite = get_invite(self.server.app.store, token, key["host"], key["id"])
            self.respond_json(200, invite_info(invite, self.invite_url(invite)))

        def api_revoke(self, token):
            """Revoke one of the key's invites: DELETE /invites_api/invites/TOKEN."""
            key = self.authenticate(self.params("key").get("key", ""))
            revoke_invite(self.server.app.store, token, key["host"], key["id"])
            self.respond(204)

        def api_redeem(self, token):
            """Use an invite of the key's host once: POST /invites_api/invites/TOKEN/redeem."""
            params = self.params("key", "username")
            params.update(self.json_body())
            key = self.authenticate(params.pop("key", ""))
            username = params.pop("username", None)
            if params:
                raise BadRequest(f"unknown option {sorted(params)[0]!r}")
            if username is not None and not isinstance(username, str):
                raise BadRequest("username must be a string")
            invite = redeem_invite(self.server.app.store, token, key["host"], username)
            self.respond_json(200, invite_info(invite, self.invite_url(invite)))

        def invite_check(self, token):
            """Tell a registration front end whether an invite is valid: GET /invite/TOKEN.json."""
            self.params()
            wait = self.server.app.check_limiter.hit(self.client_ip())
            if wait:
                raise TooManyRequests("too many invite checks from your address", wait)
            self.respond_json(200, check_invite(self.server.app.store, token))

        def invite_page(self, token):
            """Serve the landing page of an invite: /invite?TOKEN or /invite/TOKEN."""
            app = self.server.app
            token = self.query if token is None else token
            invite, status = find_invite(app.store, token)
            nonce = _random_id(12)
            html_type = "text/html; charset=utf-8"
            site_name = app.site_name or (invite["host"] if invite is not None else "Invite")
            if status != "valid":  # unknown: 404; used, revoked, expired: 410
                return self.respond(404 if invite is None else 410,
                                    render_unavailable_page(status, site_name, nonce),
                                    page_headers(nonce), content_type=html_type)
            page_url = f"{self.public_base(invite['host'])}/invite?{invite['token']}"
            headers = page_headers(nonce) + (("Link", f'<{invite["uri"]}>; rel="alternate"'),)
            self.respond(200, render_invite_page(invite, page_url, site_name, app.apps, nonce), headers,
                         content_type=html_type)

        # -- reading requests -------------------------------------------------

        def params(self, *allowed):
            """Return the query string as a dict; raise BadRequest on unknown names, repeats or too many."""
            params = {}
            for name, value in parse_query(self.query):
                if name not in allowed:
                    raise BadRequest(f"unknown parameter {name[:40]!r}")
                if name in params:
                    raise BadRequest(f"parameter {name!r} given more than once")
                params[name] = value
            return params

        def json_body(self):
            """Return the request body's JSON object ({} for no body); raise BadRequest."""
            if not self._body:
                return {}
            import json
            try:
                data = json.loads(self._body)
            except ValueError:  # also bad UTF-8
                raise BadRequest("request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise BadRequest("request body must be a JSON object")
            return data

        def authenticate(self, query_key):
            """Return the key row for this request's credentials (Authorization wins over ?key=)."""
            self.refuse_if_guessing()
            return authenticate(self.server.app.store, self.presented_key(query_key))

        def client_ip(self):
            """Return the client's address: the socket's, or with --trust-proxy what the proxy says."""
            if self.server.app.trust_proxy and self.headers is not None:
                forwarded = self.headers.get("Forwarded")
                if forwarded:
                    match = re.search(r'(?i)for="?\[?([0-9A-Fa-f.:]+)', forwarded.split(",")[-1])
                    if match:
                        return match.group(1)
                chain = self.headers.get("X-Forwarded-For")
                if chain and chain.split(",")[-1].strip():
                    return chain.split(",")[-1].strip()[:64]  # the hop our proxy added
            return self.client_address[0]

        def scheme(self):
            """Return "http" or "https" as the client sees this server."""
            if self.server.app.trust_proxy:
                forwarded = self.headers.get("Forwarded") or ""
                match = re.search(r"(?i)proto=(https?)", forwarded)
                proto = match.group(1) if match else self.headers.get("X-Forwarded-Proto", "")
                if proto.strip().lower() in ("http", "https"):
                    return proto.strip().lower()
            return "https" if self.server.tls is not None else "http"

        def invite_url(self, invite):
            app = self.server.app
            return invite_url(invite, self.public_base(invite["host"]), app.invite_url_template)

        def presented_key(self, query_key):
            """Return the key from Authorization (which wins) or ?key=, or "" if none."""
            values = self.headers.get_all("Authorization") or []
            if len(values) > 1:
                raise BadRequest("more than one Authorization header")
            if values:
                scheme, _, credentials = values[0].strip().partition(" ")
                if scheme.lower() != "bearer":
                    raise BadCredentials(f"unsupported authorization scheme {scheme[:20]!r}; use Bearer")
                from urllib.parse import unquote
                credentials = unquote(credentials.strip())
                if not credentials:
                    raise BadCredentials("malformed API key")
                return credentials
            return query_key if isinstance(query_key, str) else ""

        def read_body(self):
            """Read the request body (at most MAX_BODY bytes) and return it."""
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise LengthRequired("send the body with Content-Length, not chunked")
            lengths = {value.strip() for value in self.headers.get_all("Content-Length")} or {"0"}
            length = lengths.pop() or "0"
            if lengths or not re.fullmatch(r"[0-9]{1,12}", length):  # ASCII digits only; one value
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
            return self.headers is not None and "application/json" in self.headers.get("Accept", "").lower()

        def public_base(self, host):
            """Return the scheme and authority invite URLs start with."""
            app = self.server.app
            if app.public_url:
                return app.public_url.replace("{host}", host)
            authority = self.headers.get("Host", "").strip()
            if app.trust_proxy and self.headers.get("X-Forwarded-Host"):
                authority = self.headers.get("X-Forwarded-Host").split(",")[0].strip()
            if not _HOST_HEADER_RE.match(authority):
                if authority:
                    raise BadRequest(f"invalid Host header {authority[:100]!r}")
                authority = "%s:%d" % self.server.server_address[:2]
            return f"{self.scheme()}://{authority}"

        # -- writing responses ------------------------------------------------

        def send_error(self, code, message=None, explain=None):
            """Answer the errors http.server finds while parsing (400, 431...)."""
            self.close_connection = True
            self.respond(code, self.responses.get(code, ("error",))[0].lower() + "\n")

        def respond_error(self, error):
            if self.wants_json():
                return self.respond_json(error.status, {"error": str(error)}, error.headers)
            self.respond(error.status, f"{error}\n", error.headers)

        def respond_json(self, status, data, headers=()):
            import json
            self.respond(status, json.dumps(data) + "\n", headers, content_type="application/json")

        def respond(self, status, body=b"", headers=(), content_type="text/plain; charset=utf-8"):
            """Send one complete response; every response goes through here."""
            if isinstance(body, str):
                body = body.encode("utf-8")
            reason = self.responses.get(status, ("",))[0]
            lines = [f"HTTP/1.1 {status} {reason}", f"Date: {http_date()}",
                     f"Server: {self.server_version}"]
            lines += [f"{name}: {value}" for name, value in headers]
            if self._cors:
                lines.append(f"Access-Control-Allow-Methods: {self._cors}{_CORS_LINES}")
            if status != 204:
                if body:
                    lines.append(f"Content-Type: {content_type}")
                lines.append(f"Content-Length: {len(body)}")
            if self.close_connection:
                lines.append("Connection: close")
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            self.answers.append((status, len(body), head if self.command == "HEAD" else head + body))

        def deliver(self, failed=None):
            """Count, log and return the answer's bytes, to be sent now that its writes are committed.

            failed: the StoreError of a commit that undid this request's writes;
            the answer that relied on them becomes a 503 saying so.
            """
            if failed is not None:
                self.answers.clear()
                self.close_connection = True
                self.log_line(f"StoreError on {self.command} {self.redacted_path()}: {failed}")
                self.respond_error(failed)
            # Counted and logged before sending: whoever sees the answer can already see the line.
            for status, size, _ in self.answers:
                if self._started is not None:
                    self.server.app.metrics.request(status, time.monotonic() - self._started)
                self.log_request(status, size)
            return b"".join(data for _, _, data in self.answers)

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
            if self._started is None or self.server.app.log is None:
                return
            ms = (time.monotonic() - self._started) * 1000
            method = (self.command or "-")[:20].translate(_UNPRINTABLE)
            self.log_line(f"{self.client_ip().translate(_UNPRINTABLE)} {method} {self.redacted_path()} {code} {ms:.1f}ms")

        def log_line(self, text):
            self.server.app.log_line(text)

        def log_message(self, format, *args):  # http.server's hook; we log through log_line only
            pass

    return Handler


class TLS:
    """The server's TLS settings (TLS 1.2 or newer), reloadable from the same files."""

    def __init__(self, cert, key):
        self.cert, self.key = cert, key
        self.context = self.load()

    def load(self):
        """Return a new server context from the files; raise Error if they do not load."""
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise Error(f"cannot load the TLS certificate {self.cert!r} and key {self.key!r}: {e}") from None
        return context

    def reload(self):
        """Switch new connections to the files' current contents (for renewals); keep the old on failure."""
        self.context = self.load()


_CONTENT_LENGTH_RE = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)", re.IGNORECASE)


class _Connection:
    """One client connection of the serving loop: bytes in, bytes out, and its state."""

    __slots__ = ("sock", "address", "inbuf", "outbuf", "last_active", "busy", "closing", "continued", "ended")

    def __init__(self, sock, address):
        self.sock, self.address = sock, address
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.last_active = time.monotonic()
        self.busy = False  # a request of it is being handled in a thread
        self.closing = False  # close once the answers are out
        self.continued = False  # "100 Continue" sent for the request being received
        self.ended = False  # the client sent all it will (it may still read)

    def request(self):
        """Return the first complete request in inbuf (and remove it), or None if more must come.

        Complete: the header lines and as many body bytes as a sane
        Content-Length says. Anything the handler must refuse (too long,
        conflicting or invalid lengths, chunked, cut short by the client's
        end) is handed over as it is, to be answered with a 4xx and the
        connection closed.
        """
        buf = self.inbuf
        ends = [i for i in (buf.find(b"\n\r\n"), buf.find(b"\n\n")) if i >= 0]
        if not buf:
            return None
        if not ends:
            if len(buf) <= MAX_REQUEST_LINE + (MAX_HEADERS + 1) * (MAX_HEADER_LINE + 1) and not self.ended:
                return None
            size = len(buf)  # far too long for a head (414, 431), or all there will be (400)
        else:
            end = min(ends)
            size = end + (3 if buf[end + 1] == 13 else 2)
            lengths = {value.strip() for value in _CONTENT_LENGTH_RE.findall(buf, 0, size)}
            length = lengths.pop() if len(lengths) == 1 else b"0"
            if length.isdigit() and length.isascii() and int(length) <= MAX_BODY:
                if len(buf) < size + int(length) and not self.ended:
                    if not self.continued and b"100-continue" in buf[:size].lower():
                        self.continued = True
                        self.outbuf += b"HTTP/1.1 100 Continue\r\n\r\n"
                    return None
                size = min(len(buf), size + int(length))
        request = bytes(buf[:size])
        del buf[:size]
        self.continued = False
        return request


def make_server(app, bind=DEFAULT_BIND, port=DEFAULT_PORT, max_connections=DEFAULT_MAX_CONNECTIONS,
                timeout=DEFAULT_TIMEOUT, tls=None, listen_socket=None):
    """Return a listening (not yet serving) HTTP server for app.

    tls: a TLS for HTTPS. listen_socket: an already listening socket (from
    systemd) to serve instead of binding bind:port.
    """
    import selectors
    import socket
    from http.server import HTTPServer

    class Server(HTTPServer):
        """One thread serves every connection (a selector loop, no thread per connection).

        Each round of the loop reads what arrived, handles every complete
        request, commits the round's writes in one transaction (one fsync) and
        only then sends the answers. A request that may take long (a backend
        mints the invite, /health) is handled in a thread of its own; its
        writes go through the group committer. TLS handshakes happen in
        threads too, then the connection joins the loop.
        """

        allow_reuse_address = True
        request_queue_size = 1024  # a burst is accepted and answered (or refused) fast, not dropped

        def __init__(self):
            self.app = app
            self.idle_timeout = timeout
            self.tls = tls
            self.max_connections = max_connections
            self.stopping = False
            self.connections = {}  # socket -> _Connection
            self.lingering = {}  # refused sockets -> when to close them
            self._carried = []  # connections with requests left for the next round
            self.handshakes = 0  # TLS handshakes under way (they count as connections)
            self.handler_class = _make_handler_class()
            self._stop = False
            self._stopped = threading.Event()
            self._stopped.set()
            self._lock = threading.Lock()
            self._arrived = []  # (connection, handler or None) back from threads, under _lock
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            if listen_socket is None:
                super().__init__((bind, port), self.handler_class)
            else:
                super().__init__(listen_socket.getsockname()[:2], self.handler_class, bind_and_activate=False)
                self.socket = listen_socket
                self.server_address = listen_socket.getsockname()

        @property
        def open_connections(self):
            return len(self.connections) + self.handshakes

        # -- the loop ---------------------------------------------------------

        def serve_forever(self, poll_interval=0.5):
            self._stopped.clear()
            self.app.store.start_round()
            selector = self._selector = selectors.DefaultSelector()
            self.socket.setblocking(False)
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            grace_until, next_sweep = None, 0
            try:
                while True:
                    ready, self._carried = self._carried, []
                    if self._stop and grace_until is None:
                        # No new connections; answer what came (with Connection: close), then end.
                        grace_until = time.monotonic() + SHUTDOWN_GRACE
                        selector.unregister(self.socket)
                        ready = [c for c in self.connections.values() if c.inbuf]
                    elif grace_until is not None and (time.monotonic() > grace_until or not any(
                            c.busy or c.outbuf or c.inbuf for c in self.connections.values())):
                        break
                    for key, events in selector.select(0 if ready else min(poll_interval, self.idle_timeout / 4)):
                        try:
                            if key.fileobj is self.socket:
                                self._accept()
                            elif key.fileobj is self._wake_r:
                                self._drain_wake()
                            elif key.data == "lingering":
                                self._linger(key.fileobj)
                            else:
                                conn = key.data
                                if events & selectors.EVENT_WRITE:
                                    self._send(conn)
                                    if conn.inbuf and not conn.busy:  # requests that waited for room
                                        ready.append(conn)
                                if events & selectors.EVENT_READ and self._receive(conn):
                                    ready.append(conn)
                        except Exception:
                            self._internal_error([key.data] if isinstance(key.data, _Connection) else [])
                    try:
                        ready += self._take_arrivals()
                        self._handle_round(ready)
                        if time.monotonic() >= next_sweep:
                            next_sweep = time.monotonic() + 0.1
                            self._close_idle()
                    except Exception:
                        self._internal_error(ready)
            finally:
                for conn in list(self.connections.values()):
                    self._close(conn)
                for sock in list(self.lingering):
                    self._linger(sock, at_end=True)
                selector.close()
                self.app.store.stop_round()
                self._stopped.set()

        def shutdown(self):
            self.stopping = self._stop = True
            self._wake()
            self._stopped.wait()

        def server_close(self):
            super().server_close()
            self._wake_r.close()
            self._wake_w.close()
            self.app.store.stop_group_commit()

        def wait_idle(self, timeout):
            """Return whether no request is being handled (the loop waits for them before it ends)."""
            return not any(c.busy for c in self.connections.values())

        def _internal_error(self, connections):
            # A bug: say so, drop the connections involved, keep serving the others.
            import traceback
            self.app.log_line(f"internal error in the serving loop:\n{traceback.format_exc().rstrip()}")
            for conn in connections:
                self._close(conn)

        def _wake(self):
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass  # already full: the loop wakes anyway

        def _drain_wake(self):
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

        # -- connections --------------------------------------------------------

        def _accept(self):
            for _ in range(64):  # a burst at a time; the rest next round
                try:
                    sock, address = self.socket.accept()
                except (BlockingIOError, ConnectionAbortedError):  # none left, or the client gave up
                    return
                except OSError as e:  # out of file descriptors or memory: do not spin on it
                    self.app.log_line(f"cannot accept connections: {e.strerror}")
                    time.sleep(0.05)
                    return
                if self.open_connections >= self.max_connections:
                    self._refuse(sock)
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.tls is not None:
                    self.handshakes += 1
                    threading.Thread(target=self._handshake, args=(sock, address), daemon=True).start()
                else:
                    self._add(sock, address)

        def _refuse(self, sock):
            # Refuse fast rather than queue behind a full house. Then linger: a
            # close with the client's request unread would reset the connection,
            # and the reset can destroy the 503 before the client reads it.
            try:
                sock.setblocking(False)
                sock.send(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                          b"Content-Type: text/plain\r\nContent-Length: 21\r\n"
                          b"Connection: close\r\n\r\ntoo many connections\n")
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                sock.close()
                return
            self.lingering[sock] = time.monotonic() + 2
            self._selector.register(sock, selectors.EVENT_READ, "lingering")

        def _linger(self, sock, at_end=False):
            """Discard what a refused client sends; close on its end, an error, or after 2 s."""
            try:
                done = at_end or not sock.recv(65536)
            except OSError as e:
                done = not _would_block(e)
            if done:
                self.lingering.pop(sock, None)
                self._selector.unregister(sock)
                sock.close()

        def _handshake(self, sock, address):
            # In a thread: a slow or silent client must not hold up the loop.
            try:
                sock.settimeout(self.idle_timeout)
                sock = self.tls.context.wrap_socket(sock, server_side=True)
            except OSError:  # a failed handshake (ssl.SSLError is an OSError) is no news
                sock.close()
                sock = None
            with self._lock:
                self._arrived.append((sock, address))
            self._wake()

        def _add(self, sock, address):
            sock.setblocking(False)
            conn = self.connections[sock] = _Connection(sock, address)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            return conn

        def _close(self, conn):
            if self.connections.pop(conn.sock, None) is not None:
                try:
                    self._selector.unregister(conn.sock)
                except (KeyError, ValueError):
                    pass
                conn.sock.close()

        def _receive(self, conn):
            """Read what the client sent; return whether it may hold a complete request."""
            try:
                data = conn.sock.recv(65536)
                while data and self.tls is not None and conn.sock.pending():  # decrypted, not yet read
                    data += conn.sock.recv(65536)
            except OSError as e:
                if _would_block(e):
                    return False
                data = b""
            if not data:  # the client is done sending: answer what it sent, then close
                conn.ended = True
                self._send(conn)
                return bool(conn.inbuf) and not conn.busy
            conn.last_active = time.monotonic()
            if conn.closing:
                return False  # answering the last request it will get
            conn.inbuf += data
            return not conn.busy

        def _send(self, conn):
            if conn.outbuf:
                try:
                    sent = conn.sock.send(conn.outbuf)
                    del conn.outbuf[:sent]
                    conn.last_active = time.monotonic()
                except OSError as e:
                    if not _would_block(e):
                        self._close(conn)
                        return
            if conn.sock not in self.connections:
                return
            if not conn.outbuf and not conn.busy and (conn.closing or conn.ended and not conn.inbuf):
                self._close(conn)
                return
            # Wait for room for the answers, for more requests, or (a request in a thread) for nothing.
            reading = not (conn.closing or conn.ended or len(conn.inbuf) > MAX_PENDING
                           or len(conn.outbuf) > MAX_PENDING)
            events = (selectors.EVENT_WRITE if conn.outbuf else 0) | (selectors.EVENT_READ if reading else 0)
            try:
                watched = self._selector.get_key(conn.sock).events
            except KeyError:
                watched = 0
            if events != watched:
                if not events:
                    self._selector.unregister(conn.sock)
                elif watched:
                    self._selector.modify(conn.sock, events, conn)
                else:
                    self._selector.register(conn.sock, events, conn)

        def _close_idle(self):
            # Idle or stalled (a request or an answer stuck half-way) for too long.
            now = time.monotonic()
            for conn in [c for c in self.connections.values() if c.last_active < now - self.idle_timeout
                         and not c.busy]:
                self._close(conn)
            for sock in [s for s, until in self.lingering.items() if until < now]:
                self._linger(sock, at_end=True)

        # -- requests -----------------------------------------------------------

        def _handle_round(self, ready):
            round, writes = [], self.app.store._round
            ready = list(dict.fromkeys(ready))
            for conn in ready:
                for _ in range(REQUESTS_PER_ROUND):  # pipelined beyond that: next round (fair to the others)
                    if (conn.busy or conn.closing or conn.sock not in self.connections
                            or len(conn.outbuf) > MAX_PENDING):  # a client that does not read waits
                        break
                    request = conn.request()
                    if request is None:
                        break
                    if self._is_slow(request):
                        conn.busy = True
                        threading.Thread(target=self._handle_in_thread, args=(conn, request), daemon=True).start()
                        break
                    before = writes.writes
                    handler = self._handle(conn, request)
                    round.append((conn, handler, writes.writes != before))
                    if handler.close_connection:
                        conn.closing = True
                else:
                    self._carried.append(conn)
            failed = self.app.store.commit_round()
            for conn, handler, wrote in round:
                self._answer(conn, handler, failed if wrote else None)
            for conn in ready:
                self._send(conn)
            self.app.store.round_answered()

        def _is_slow(self, request):
            """Whether a request is for a route that waits on another program (a backend minting),
            on a database check (/health, up to a second), or computes for long (an invite page's
            QR code, about 15 ms): handled in a thread, so the loop goes on serving the others."""
            words = request[:request.find(b"\n")].decode("latin-1").split(" ")
            if len(words) < 2:
                return False
            path = words[1].partition("?")[0]
            for pattern, methods, _ in ROUTES:  # as the handler will route it
                if pattern.match(path):
                    name = methods.get(words[0])
                    return name in ("invite_page", "health") or (name == "api_create" and self.app.backend is not None)
            return False

        def _handle(self, conn, request):
            handler = self.handler_class(self, conn.address, request)
            try:
                handler.handle_one_request()
            except Exception:  # the handler answers its own errors; this is a bug
                import traceback
                handler.close_connection = True
                handler.log_line("internal error:\n" + traceback.format_exc().rstrip())
                if not handler.answers:
                    handler.respond(500, "internal error\n")
            return handler

        def _handle_in_thread(self, conn, request):
            handler = self._handle(conn, request)
            self.app.store.close()  # this thread's connection, if it opened one: no fds left behind
            with self._lock:
                self._arrived.append((conn, handler))
            self._wake()

        def _take_arrivals(self):
            with self._lock:
                arrived, self._arrived = self._arrived, []
            ready = []
            for item, other in arrived:
                if isinstance(item, _Connection):  # a slow request was handled (and its writes committed)
                    item.busy = False
                    self._answer(item, other, None)
                    ready.append(item)  # requests that came meanwhile
                else:  # a TLS handshake ended
                    self.handshakes -= 1
                    if item is not None:
                        conn = self._add(item, other)
                        self._receive(conn)  # a request sent right behind the handshake may be read already
                        ready.append(conn)
            return [conn for conn in ready if conn.sock in self.connections]

        def _answer(self, conn, handler, failed):
            if handler.close_connection:
                conn.closing = True
            if conn.sock not in self.connections:
                return  # the client went away; the request was still handled and logged
            conn.outbuf += handler.deliver(failed)
            if not handler.answers:  # (cannot happen: every path answers; never leave a client waiting)
                conn.closing = True

    try:
        server = Server()
    except OSError as e:
        raise Error(f"cannot listen on {bind}:{port}: {e.strerror}") from None
    app.store.start_group_commit()
    return server


def _would_block(error):
    """Whether a non-blocking socket call only found nothing to do yet (plain or TLS)."""
    return isinstance(error, BlockingIOError) or type(error).__name__ in ("SSLWantReadError", "SSLWantWriteError")


def start_purging(store, grace, app=None, every=3600):
    """Start a thread that purges old invites every hour, in small batches between requests."""
    def purge_forever():
        while True:
            try:
                deleted = purge_invites(store, grace)
                if deleted and app is not None:
                    app.log_line(f"purged {deleted} old invites")
            except Error as e:  # the database is busy or gone: try again next time
                if app is not None:
                    app.log_line(f"purge failed: {e}")
            time.sleep(every)
    threading.Thread(target=purge_forever, name="purge", daemon=True).start()


def serve(server, banner=""):
    """Print banner, serve until SIGTERM or SIGINT, then let requests in flight finish."""
    import signal

    def stop(signum, frame):
        server.stopping = True
        threading.Thread(target=server.shutdown, daemon=True).start()

    def reload(signum, frame):
        if server.tls is None:
            return
        try:
            server.tls.reload()
            message = f"reloaded the TLS certificate {server.tls.cert}"
        except Error as e:
            message = f"kept the old TLS certificate: {e}"
        server.app.log_line(message)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    if banner:  # only now: whoever reads it may signal us at once
        print(banner, flush=True)
    server.serve_forever(poll_interval=0.2)
    server.socket.close()  # refuse new connections at once
    server.wait_idle(SHUTDOWN_GRACE)
    server.server_close()


# ---------------------------------------------------------------------------
# CLI: thin wrappers that print what the operations return
# ---------------------------------------------------------------------------

def _arg(parse, clear=None):
    """Wrap a ValueError-raising parser as an argparse type (a usage error, exit 2).

    With clear (e.g. "never"), that word parses as CLEAR: remove the limit.
    """
    def parse_arg(text):
        if clear is not None and text.strip().lower() == clear:
            return CLEAR
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse_arg.__name__ = parse.__name__.replace("parse_", "")
    return parse_arg


CLEAR = object()  # an `update` option's value that removes a limit


def open_store(args):
    """Return the Store named by --db, $INVITES_API_DB or the default path."""
    path = args.db or default_db_path()
    # Only the default location is created on demand; a mistyped --db
    # directory should be an error, not a surprise.
    return Store(path, create_dir=not args.db and not os.environ.get("INVITES_API_DB"),
                 busy_timeout=getattr(args, "busy_timeout", BUSY_TIMEOUT))


def _policy(args):
    """Return the key policy options given on the command line, as KEY_POLICY columns."""
    policy = {}
    if args.expires is not None:
        policy["expires_at"] = args.expires
    if args.max_invites is not None:
        policy["max_invites"] = args.max_invites
    if args.rate is not None:
        policy["rate_count"], policy["rate_period"] = (CLEAR, CLEAR) if args.rate is CLEAR else args.rate
    if args.max_ttl is not None:
        policy["max_ttl"] = args.max_ttl
    if args.max_uses is not None:
        policy["max_uses"] = args.max_uses
    return {name: None if value is CLEAR else value for name, value in policy.items()}


def cmd_create(args):
    """create HOST [NAME]: print a new key."""
    print(create_key(open_store(args), args.host, args.name, **_policy(args)))


def cmd_list(args):
    """list HOST: print the host's keys."""
    keys = list_keys(open_store(args), args.host)
    if args.json:
        import json
        print(json.dumps(keys, indent=2))
        return
    for key in keys:
        print(f"{key['id']}\t{key['name']}")


def cmd_update(args):
    """update HOST KEY_ID: change a key's name or policy."""
    changes = _policy(args)
    if args.name is not None:
        changes["name"] = args.name
    if not changes:
        raise Error("nothing to change: give --name or a policy option (see --help)")
    update_key(open_store(args), args.host, args.key_id, **changes)


def cmd_delete(args):
    """delete HOST KEY_ID: revoke a key."""
    delete_key(open_store(args), args.host, args.key_id, revoke_invites=args.revoke_invites)


def _cli_url(args, invite):
    """Return an invite's page URL as the command line sees it (--public-url or its default)."""
    base = (args.public_url or os.environ.get("INVITES_API_PUBLIC_URL")
            or f"http://{DEFAULT_BIND}:{DEFAULT_PORT}").rstrip("/")
    return invite_url(invite, base.replace("{host}", invite["host"]))


def _print_json(data):
    import json
    print(json.dumps(data, indent=2))


def _backend(args, log=None):
    """Return the backend the command line asks for (None: built-in)."""
    return make_backend(args.backend, args.prosodyctl, args.prosody_config, args.ejabberdctl,
                        args.backend_command, args.backend_timeout, args.backend_concurrency, log)


def cmd_invites_create(args):
    """invites create HOST: mint one invite and print its page URL."""
    options = {"ttl": args.ttl, "uses": args.uses, "username": args.username, "note": args.note}
    invite = create_invite(open_store(args), host=args.host, options=options, backend=_backend(args, sys.stderr))
    url = _cli_url(args, invite)
    if args.qr:
        print(qr_text(qr_matrix(invite["uri"] if args.qr == "uri" else url), colour=sys.stdout.isatty()))
    _print_json(invite_info(invite, url)) if args.json else print(url)


def cmd_invites_list(args):
    """invites list HOST: print a table of the host's invites."""
    invites = list_invites(open_store(args), args.host, args.key, include_all=args.all)
    if args.json:
        return _print_json([invite_info(i, _cli_url(args, i)) for i in invites])
    when = lambda ts: time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))  # noqa: E731
    rows = [("TOKEN", "CREATED", "EXPIRES", "USES LEFT", "STATUS", "KEY", "NOTE")]
    rows += [(i["token"], when(i["created_at"]), when(i["expires_at"]), f"{i['uses_left']}/{i['uses']}",
              invite_status(i), i["key_id"] or "(cli)", i["note"] or "") for i in invites]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def cmd_invites_show(args):
    """invites show HOST TOKEN: print one invite."""
    info = invite_info(get_invite(open_store(args), args.token, args.host), None)
    info["url"] = _cli_url(args, info)
    if args.json:
        return _print_json(info)
    for name, value in info.items():
        print(f"{name}: {'' if value is None else value}")


def cmd_invites_revoke(args):
    """invites revoke HOST TOKEN: revoke an invite."""
    revoke_invite(open_store(args), args.token, host=args.host)


def cmd_invites_redeem(args):
    """invites redeem HOST TOKEN: use an invite once (exit 1 if it is no longer valid)."""
    invite = redeem_invite(open_store(args), args.token, args.host, args.username)
    if args.json:
        _print_json(invite_info(invite, _cli_url(args, invite)))


def cmd_serve(args):
    """serve: run the HTTP API until stopped."""
    for template, option in ((args.public_url, "--public-url"), (args.invite_url, "--invite-url")):
        if template and not re.match(r"https?://[^/?#\s]+", template.replace("{host}", "h")):
            raise Error(f"{option} {template!r} must start with http:// or https:// and a host name")
    log = None if args.quiet else sys.stderr
    backend = _backend(args, log=sys.stderr)
    if backend is not None:
        warning = backend.check()
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise Error("--tls-cert and --tls-key go together")
    tls = TLS(args.tls_cert, args.tls_key) if args.tls_cert else None
    store = open_store(args)
    apps = load_apps(args.apps) if args.apps else DEFAULT_APPS
    app = App(store, public_url=args.public_url, invite_url_template=args.invite_url,
              invite_ttl=args.invite_ttl, log=log, backend=backend, site_name=args.site_name, apps=apps,
              trust_proxy=args.trust_proxy, metrics_token=args.metrics_token)
    server = make_server(app, args.bind, args.port, args.max_connections, args.timeout, tls,
                         systemd_socket())
    start_purging(store, args.purge_after, app)
    address, port = server.server_address[:2]
    shown = f"[{address}]" if ":" in address else address
    serve(server, f"invites_api {__version__} serving on {'https' if tls else 'http'}://{shown}:{port}"
                  f"/invites_api (database {store.path})")


def systemd_socket():
    """Return the listening socket systemd passed (LISTEN_PID/LISTEN_FDS, fd 3), or None."""
    import socket
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS", "").isdigit():
        return None
    if int(os.environ["LISTEN_FDS"]) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for our children
        os.environ.pop(name, None)
    try:
        sock = socket.socket(fileno=3)
    except OSError as e:
        raise Error(f"systemd passed fd 3, but it is not a socket: {e.strerror}") from None
    if sock.type != socket.SOCK_STREAM:
        raise Error("systemd passed fd 3, but it is not a stream socket (ListenStream=)")
    return sock


_EXAMPLES = {
    "serve": "example:\n  invites_api.py serve --port 5282 --public-url https://{host}\n",
    "create": 'examples:\n  invites_api.py create example.com "My test key"\n  -> prints KEY_ID/SECRET; '
              "keep it, it is shown only once\n"
              '  invites_api.py create example.com "sign-up form" --rate 10/hour --expires 90d\n',
    "list": "example:\n  invites_api.py list example.com\n  invites_api.py list example.com --json\n",
    "update": "example:\n  invites_api.py update example.com t3XbXfBhZ0mJ --rate 100/day --expires never\n",
    "delete": "example:\n  invites_api.py delete example.com t3XbXfBhZ0mJ [--revoke-invites]\n",
    "invites": "examples:\n  invites_api.py invites create example.com --uses 5 --ttl 2w --note 'choir'\n"
               "  invites_api.py invites list example.com --all\n",
    "invites create": "example:\n  invites_api.py invites create example.com --username alice --ttl 1d\n"
                      "  -> prints the invite page URL\n",
    "invites list": "example:\n  invites_api.py invites list example.com --all --json\n",
    "invites show": "example:\n  invites_api.py invites show example.com Vb0tJ3r1aQ2kWn9Yc8dZt0Ls\n",
    "invites revoke": "example:\n  invites_api.py invites revoke example.com Vb0tJ3r1aQ2kWn9Yc8dZt0Ls\n",
    "invites redeem": "example:\n  invites_api.py invites redeem example.com Vb0tJ3r1aQ2kWn9Yc8dZt0Ls --username alice\n",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, told the terminal width so that it does not import shutil (3 ms) to ask."""

    def __init__(self, prog, **kwargs):
        try:
            columns = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 80
        super().__init__(prog, width=kwargs.pop("width", columns - 2), **kwargs)


class _NotBuilt:
    """Stands in for the parser of a command argv did not name: takes arguments, keeps none."""

    def add_argument(self, *args, **kwargs):
        pass

    def add_subparsers(self, **kwargs):
        return self


def _command_words(argv):
    """Return the command (and action) argv names, skipping options and --db's value."""
    words, skip = [], False
    for arg in argv:
        if skip or arg in ("--db", "--"):
            skip = arg == "--db" and not skip
            if arg == "--":
                break
            continue
        if not arg.startswith("-"):
            words.append(arg)
            if len(words) == 2:
                break
    return words


def build_parser(argv=None):
    """Return the argparse parser: for all commands, or only for the one argv names.

    Building a subcommand's parser costs about half a millisecond (argparse
    looks up translations for each); a cron job running `create` needs one.
    """
    wanted = _command_words(argv) if argv is not None else []
    if wanted[:1] not in ([], ["invites"]) and wanted[0] not in _EXAMPLES:
        wanted = []  # a mistyped command: build them all, for the error's list of choices
    elif wanted[:1] == ["invites"] and len(wanted) > 1 and f"invites {wanted[1]}" not in _EXAMPLES:
        wanted = ["invites"]
    formatter = _HelpFormatter
    db_help = ("database file (default: $INVITES_API_DB, else "
               "~/.local/share/invites_api/invites.db)")
    common = argparse.ArgumentParser(add_help=False, formatter_class=formatter)
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

    def command(group, name, func, help, full_name=None):
        if not all(a == b for a, b in zip((full_name or name).split(), wanted)):
            return _NotBuilt()
        sub = group.add_parser(name, parents=[common], help=help, description=help,
                               epilog=_EXAMPLES[full_name or name], formatter_class=formatter)
        sub.set_defaults(func=func)
        return sub

    def host_arg(sub):
        sub.add_argument("host", type=_arg(parse_host), metavar="HOST",
                         help="the XMPP domain, e.g. example.com")

    def backend_args(sub):
        sub.add_argument("--backend", choices=("builtin", "prosody", "ejabberd", "command"), default="builtin",
                         help="who mints invites: this tool's own store (default), Prosody, ejabberd or a program")
        sub.add_argument("--prosodyctl", default="prosodyctl", metavar="PATH", help="prosody backend: prosodyctl")
        sub.add_argument("--prosody-config", metavar="PATH", help="prosody backend: Prosody's config file")
        sub.add_argument("--ejabberdctl", default="ejabberdctl", metavar="PATH", help="ejabberd backend: ejabberdctl")
        sub.add_argument("--backend-command", metavar="TEMPLATE",
                         help="command backend: program and arguments, split like a shell would but never run "
                              "by one; {host}, {ttl}, {uses}, {username} are filled in")
        sub.add_argument("--backend-timeout", type=_arg(parse_seconds), default=DEFAULT_BACKEND_TIMEOUT,
                         metavar="SECONDS", help=f"kill a backend program after this (default "
                                                 f"{DEFAULT_BACKEND_TIMEOUT:g})")
        sub.add_argument("--backend-concurrency", type=_arg(parse_count), default=DEFAULT_BACKEND_CONCURRENCY,
                         metavar="N", help=f"backend programs run at once (default {DEFAULT_BACKEND_CONCURRENCY})")

    def policy_args(sub, clear):
        none = " ('never' removes it)" if clear else ""
        sub.add_argument("--expires", type=_arg(parse_expiry, clear and "never"), metavar="WHEN",
                         help=f"the key stops working then: a duration (90d) or a UTC date (2027-01-31){none}")
        none = " ('none' removes it)" if clear else ""
        sub.add_argument("--max-invites", type=_arg(parse_count, clear and "none"), metavar="N",
                         help=f"total invites the key may ever make{none}")
        sub.add_argument("--rate", type=_arg(parse_rate, clear and "none"), metavar="N/PERIOD",
                         help=f"at most N invites per period, e.g. 10/hour, 100/day{none}")
        sub.add_argument("--max-ttl", type=_arg(parse_duration), metavar="DURATION",
                         help="longest invite lifetime a request may ask for (default 7d)")
        sub.add_argument("--max-uses", type=_arg(parse_count), metavar="N",
                         help="most uses a request may ask for per invite (default 1)")

    sub = command(commands, "serve", cmd_serve, "run the HTTP API")
    sub.add_argument("--bind", default=DEFAULT_BIND, metavar="ADDR",
                     help=f"address to listen on (default {DEFAULT_BIND}; 0.0.0.0 or :: for all)")
    sub.add_argument("--port", type=int, default=DEFAULT_PORT,
                     help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    sub.add_argument("--public-url", metavar="URL", default=os.environ.get("INVITES_API_PUBLIC_URL"),
                     help="start of invite page URLs, may contain {host} (default: "
                          "$INVITES_API_PUBLIC_URL, else the request's scheme and Host header)")
    sub.add_argument("--invite-url", metavar="TEMPLATE",
                     help="send Location to an external landing page instead; "
                          "placeholders {host}, {token}, {uri}")
    sub.add_argument("--invite-ttl", type=_arg(parse_duration), default=DEFAULT_INVITE_TTL,
                     metavar="DURATION", help="default invite lifetime, e.g. 12h, 7d, 1w2d (default 7d)")
    sub.add_argument("--purge-after", type=_arg(parse_duration), default=DEFAULT_PURGE_GRACE,
                     metavar="DURATION", help="delete invites this long after they expired, "
                                              "were used up or revoked (default 30d)")
    sub.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                     help=f"simultaneous connections (default {DEFAULT_MAX_CONNECTIONS})")
    sub.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                     help=f"drop idle or stalled connections after this (default {DEFAULT_TIMEOUT:g})")
    sub.add_argument("--site-name", metavar="NAME", help="shown at the top of invite pages (default: the host)")
    sub.add_argument("--apps", metavar="FILE.json",
                     help='the "No app yet?" list on invite pages: [{"platform", "name", "url"}, ...]')
    sub.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS (TLS 1.2+) with this certificate chain; "
                                                         "SIGHUP reloads it")
    sub.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    sub.add_argument("--trust-proxy", action="store_true",
                     help="behind a reverse proxy: take the client address and scheme from "
                          "X-Forwarded-For/-Proto/-Host or Forwarded (off: they could be forged)")
    sub.add_argument("--metrics-token", metavar="TOKEN", default=os.environ.get("INVITES_API_METRICS_TOKEN"),
                     help="require Authorization: Bearer TOKEN for /metrics (default: $INVITES_API_METRICS_TOKEN)")
    sub.add_argument("--busy-timeout", type=_arg(parse_seconds), default=BUSY_TIMEOUT, metavar="SECONDS",
                     help=f"how long a write waits for another process's lock before 503 (default {BUSY_TIMEOUT:g})")
    sub.add_argument("--quiet", action="store_true", help="no access log on stderr")
    backend_args(sub)

    sub = command(commands, "create", cmd_create, "make an API key and print it (KEY_ID/SECRET)")
    host_arg(sub)
    sub.add_argument("name", type=_arg(parse_key_name), nargs="?", default="", metavar="NAME",
                     help="a name to remember the key by (quote it if it has spaces)")
    policy_args(sub, clear=False)

    sub = command(commands, "list", cmd_list, "list a host's keys: KEY_ID<TAB>NAME")
    host_arg(sub)
    sub.add_argument("--json", action="store_true",
                     help="a JSON array with id, name, host, created_at, last_used_at, invites_created "
                          "and the key's policy")

    sub = command(commands, "update", cmd_update, "change a key's name or policy")
    host_arg(sub)
    sub.add_argument("key_id", metavar="KEY_ID", help="the id `list` shows")
    sub.add_argument("--name", type=_arg(parse_key_name), help="a new name")
    policy_args(sub, clear=True)

    sub = command(commands, "delete", cmd_delete, "revoke a key at once")
    host_arg(sub)
    sub.add_argument("key_id", metavar="KEY_ID", help="the id `list` shows (the part before the /)")
    sub.add_argument("--revoke-invites", action="store_true",
                     help="also revoke the pending invites the key made (they stay valid otherwise)")

    invites = _NotBuilt() if wanted[:1] not in ([], ["invites"]) else commands.add_parser(
        "invites", help="create, list, show, revoke or redeem invites",
        description="Manage invites directly, without HTTP.", epilog=_EXAMPLES["invites"], formatter_class=formatter)
    actions = invites.add_subparsers(dest="action", required=True, metavar="ACTION")
    url_help = ("start of the printed invite URLs, may contain {host} (default: "
                f"$INVITES_API_PUBLIC_URL, else http://{DEFAULT_BIND}:{DEFAULT_PORT})")

    sub = command(actions, "create", cmd_invites_create, "mint one invite and print its page URL",
                  "invites create")
    host_arg(sub)
    sub.add_argument("--ttl", metavar="DURATION", help="lifetime (default 7d)")
    sub.add_argument("--uses", metavar="N", help="how many accounts it may create (default 1)")
    sub.add_argument("--username", help="the only username it may register")
    sub.add_argument("--note", help="a note for yourself, shown on the invite (200 characters)")
    sub.add_argument("--public-url", metavar="URL", help=url_help)
    sub.add_argument("--json", action="store_true", help="print the invite as JSON")
    sub.add_argument("--qr", nargs="?", const="url", choices=("url", "uri"),
                     help="also print a QR code to scan from the screen: of the page URL (a phone camera "
                          "opens it), or with --qr=uri of the xmpp: URI (for an XMPP app)")
    backend_args(sub)

    sub = command(actions, "list", cmd_invites_list, "list a host's invites (pending ones unless --all)",
                  "invites list")
    host_arg(sub)
    sub.add_argument("--all", action="store_true", help="include used, expired and revoked invites")
    sub.add_argument("--key", metavar="KEY_ID", help="only the invites this key made")
    sub.add_argument("--public-url", metavar="URL", help=url_help)
    sub.add_argument("--json", action="store_true", help="a JSON array")

    sub = command(actions, "show", cmd_invites_show, "show one invite", "invites show")
    host_arg(sub)
    sub.add_argument("token", metavar="TOKEN")
    sub.add_argument("--public-url", metavar="URL", help=url_help)
    sub.add_argument("--json", action="store_true", help="print the invite as JSON")

    sub = command(actions, "revoke", cmd_invites_revoke, "revoke an invite at once", "invites revoke")
    host_arg(sub)
    sub.add_argument("token", metavar="TOKEN")

    sub = command(actions, "redeem", cmd_invites_redeem, "use an invite once; exit 1 if it is not valid",
                  "invites redeem")
    host_arg(sub)
    sub.add_argument("token", metavar="TOKEN")
    sub.add_argument("--username", help="the username being registered (checked if the invite has one)")
    sub.add_argument("--public-url", metavar="URL", help=url_help)
    sub.add_argument("--json", action="store_true", help="print the used invite as JSON")
    return parser


def main(argv=None):
    """Run the command line; return the exit code (0 ok, 1 failed, 2 usage)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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
