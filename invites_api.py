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
import contextlib
import functools
import hashlib
import hmac
import io
import os
import pwd
import re
import select
import sqlite3
import sys
import threading
import time
import unicodedata

__version__ = "0.1.0"


# ---------------------------------------------------------------------------
# Constants: every limit and default, named once
# ---------------------------------------------------------------------------

# Next to Prosody's own 5280/5281, without taking either: this often runs on
# the same machine as the XMPP server.
DEFAULT_PORT = 5282
# Loopback only: publishing the API is a decision (a TLS reverse proxy).
DEFAULT_BIND = "127.0.0.1"

# 72 bits: ids are unique across hosts and can be listed without harm.
KEY_ID_BYTES = 9
# Invites a listing shows at once unless told (the API: at most MAX_LIST_LIMIT).
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
# 192 bits: far beyond brute force, so one SHA-256 is a sound hash at rest
# (a slow password hash would only slow every request down).
SECRET_BYTES = 24
# An invite token is a bearer credential for sign-up: 18 bytes, 24 URL-safe
# characters, of which 14 bytes (112 bits) are random; see _new_token. The
# database keeps only its SHA-256 and its public id (see invite_id).
TOKEN_BYTES = 18
# Prosody's own default invite lifetime, and that of a password-reset invite.
DEFAULT_INVITE_TTL = 7 * 86400
RESET_INVITE_TTL = 86400
# Expired, used and revoked invites are kept this long (to show them), then purged.
DEFAULT_PURGE_GRACE = 30 * 86400
PURGE_BATCH = 500  # of each kind a purge deletes at once, so that its write is short
# Public invite checks, and sign-up attempts, one client address may make per minute.
CHECKS_PER_MINUTE = 60
SIGNUPS_PER_MINUTE = 10
# A backend program that has not answered by then is killed (Prosody answers in ~50 ms).
DEFAULT_BACKEND_TIMEOUT = 10.0
# Backend calls running at once (programs, or connections to the XMPP server).
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
# Seconds a connection may sit idle between requests before we close it.
DEFAULT_TIMEOUT = 20.0
# Seconds from a request's first byte to its last (head and body, and a TLS
# handshake): a client cannot hold a connection by sending a byte at a time.
DEFAULT_REQUEST_TIMEOUT = 5.0
# Simultaneous connections served; more are refused with a fast 503.
DEFAULT_MAX_CONNECTIONS = 128
# Failed authentications one client address may make per minute with one key id (or with
# malformed keys), then 429: a key cannot be guessed fast, and one broken client behind a shared
# address (an old key in a script) does not lock out the others' keys. With all ids together,
# ten times as many: ids cannot be sprayed fast either.
AUTH_FAILURES_PER_MINUTE = 20
AUTH_FAILURES_PER_ADDRESS = 10
# /health fails if the database cannot answer a read and a write within this.
HEALTH_TIMEOUT = 1.0
# Request latency histogram buckets, in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Seconds `serve` waits for requests in flight when asked to stop.
SHUTDOWN_GRACE = 15.0
# The invite page's "No app yet?" list (--apps replaces it). Links only: the page loads nothing
# from these sites.
DEFAULT_APPS = (
    {"platform": "Android", "name": "Conversations",
     "url": "https://play.google.com/store/apps/details?id=eu.siacs.conversations"},
    {"platform": "Android", "name": "Conversations (F-Droid)",
     "url": "https://f-droid.org/packages/eu.siacs.conversations/"},
    {"platform": "iOS", "name": "Monal", "url": "https://monal-im.org/"},
    {"platform": "iOS", "name": "Siskin IM", "url": "https://siskin.im/"},
    {"platform": "Windows, macOS, Linux", "name": "Gajim", "url": "https://gajim.org/download/"},
    {"platform": "Windows, macOS, Linux", "name": "Dino (Linux)", "url": "https://dino.im/"},
    {"platform": "Windows, macOS, Linux", "name": "Monal (macOS)", "url": "https://monal-im.org/"},
)

KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{12,64}\Z")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}\Z")
INVITE_ID_RE = re.compile(r"[A-Za-z0-9_-]{12}\Z")  # (shorter than any token: never taken for one)
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_DURATION_RE = re.compile(r"([0-9]+)([smhdw])")  # (not \d: it takes any script's digits)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


# ---------------------------------------------------------------------------
# Errors: every failure a user can meet, each with its HTTP status
# ---------------------------------------------------------------------------

class Error(Exception):
    """A failure a user can cause or fix: an HTTP status and a CLI exit code."""

    status = 500
    exit_code = 1
    headers = ()


# One class per status a user meets; a message quotes the bad value.
class BadRequest(Error): status = 400
class Forbidden(Error): status = 403
class NotFound(Error): status = 404
class Conflict(Error): status = 409
class Gone(Error): status = 410
class UnsupportedMediaType(Error): status = 415
class BackendError(Error): status = 502  # the program that mints invites failed


class Unauthorized(Error):
    status = 401
    headers = (("WWW-Authenticate", 'Bearer realm="invites_api"'),)


class BadCredentials(Forbidden):
    """A wrong, unknown, deleted or malformed key: counted per client address."""


class MethodNotAllowed(Error):
    status = 405

    def __init__(self, method, allowed):
        super().__init__(f"method {method!r} not allowed here")
        self.headers = (("Allow", ", ".join(allowed)),)


class TooManyRequests(Error):
    status = 429

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.headers = (("Retry-After", str(max(1, int(retry_after)))),)


class Unavailable(Error):
    """Busy for now: try again shortly."""

    status = 503
    headers = (("Retry-After", "5"),)


class StoreError(Unavailable):
    """The database cannot be opened, read or written: the message names the file (for the log
    and the command line), `public` says what happened without it (for HTTP answers)."""

    def __init__(self, message, public=None):
        super().__init__(message)
        self.public = public or "the database is unavailable; try again shortly"


class OutcomeUnknown(BackendError):
    """The XMPP server may or may not have done what it was asked (a timeout, a lost connection)."""


# Another process holds the write lock past the busy timeout (SQLite's "database is locked").
DATABASE_BUSY = "the database is busy (another invites_api is writing it); try again"


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
        raise ValueError(f"invalid host {text!r}: not a valid "
                         "(internationalised) domain name") from None
    if len(host) > 253 or not all(_LABEL_RE.match(label) for label in host.split(".")):
        raise ValueError(f"invalid host {text!r}: expected a domain name like example.com")
    return host


def _one_line(text, what, limit):
    """Return text if it is one line of at most limit characters; raise ValueError otherwise."""
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters long; at most {limit} are allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"{what} {text[:40]!r} contains control characters (tabs, newlines...)")
    _check_unicode(text, what)
    return text


def _check_unicode(text, what):
    """Raise ValueError if text holds a lone surrogate (JSON "\\ud800", or non-UTF-8 bytes)."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise ValueError(f"{what} {text[:40]!r} is not valid Unicode text")


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
        raise ValueError(f"invalid duration {text!r}: use seconds "
                         "or units s m h d w, like 12h or 1w2d")
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be more than zero")
    if seconds > 100 * 365 * 86400:
        raise ValueError(f"invalid duration {text!r}: more than 100 years")
    return seconds


def format_duration(seconds):
    """Return seconds in the largest unit that divides them: "7d", "12h", "90m", "45s"."""
    for unit in ("w", "d", "h", "m"):
        if seconds % _DURATION_UNITS[unit] == 0:
            return f"{seconds // _DURATION_UNITS[unit]}{unit}"
    return f"{seconds}s"


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
            raise ValueError(f"invalid rate {text!r}: the period is second, "
                             "minute, hour, day, week or a duration like 15m") from None
    return int(count), seconds


def parse_expiry(text):
    """Return epoch seconds for a duration from now ("90d") or a UTC date ("2027-01-31")."""
    import calendar
    if not text.isascii():  # (strptime's digits are any script's)
        raise ValueError(f"invalid expiry {text!r}: use a duration "
                         "like 90d or a date like 2027-01-31")
    for layout in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            at = calendar.timegm(time.strptime(text.strip(), layout))
        except ValueError:
            continue
        if at <= now():
            raise ValueError(f"expiry {text.strip()!r} is in the past (now is {iso(now())})")
        return at
    try:
        return now() + parse_duration(text)
    except ValueError:
        raise ValueError(f"invalid expiry {text!r}: use a duration "
                         "like 90d or a date like 2027-01-31") from None


def parse_port(text):
    """Return a TCP port, 0 to 65535 (0: any free one); raise ValueError."""
    if not re.fullmatch(r"[0-9]{1,5}", text.strip()) or int(text) > 65535:
        raise ValueError(f"invalid port {text!r}: 0 to 65535")
    return int(text)


def parse_count(text, what="count"):
    """Return a whole number >= 1 from text (or an int); raise ValueError otherwise."""
    if isinstance(text, bool) or not (isinstance(text, int)
                                      or re.fullmatch(r"[0-9]{1,10}", str(text).strip())):
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
            or any(c in _LOCALPART_FORBIDDEN or c.isspace() or ord(c) < 32 or ord(c) == 127
                   for c in name)):
        raise ValueError(f"invalid username {text!r}: an XMPP username "
                         "has no spaces or any of \" & ' / : < > @")
    _check_unicode(name, "username")
    return name


_ACCOUNT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")


def parse_account_name(text):
    """Return a new account's username: lower-cased, 1-64 of a-z 0-9 . _ - ; raise ValueError."""
    name = text.strip().lower()
    if not _ACCOUNT_NAME_RE.match(name):
        raise ValueError(f"the username {text[:64]!r} cannot be used: 1 to 64 letters a-z, "
                         "digits, dots, dashes or underscores, starting with a letter or digit")
    return name


# XMPP servers store at most this many bytes of a password (ejabberd: 1,023 in UTF-8).
MAX_PASSWORD_BYTES = 1023


def check_password(password, confirmation, username):
    """Raise ValueError unless the password may be set; never quote it."""
    # 10 characters or more, at most MAX_PASSWORD_BYTES in UTF-8, one SASLprep takes, equal to
    # the confirmation and not the username.
    if len(password) < 10:
        raise ValueError("the password must be 10 characters or longer")
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is too long: at most {MAX_PASSWORD_BYTES} bytes in UTF-8 "
                         f"(about {MAX_PASSWORD_BYTES // 2} accented letters)")
    problem = saslprep_problem(password)
    if problem:
        raise ValueError(f"the password cannot be used: it contains {problem}")
    if password != confirmation:
        raise ValueError("the two passwords are not the same")
    if password.lower() == username.lower():
        raise ValueError("the password must not be the username")


def saslprep_problem(text):
    """Return what in text SASLprep (RFC 4013) refuses, or None."""
    # Its prohibited characters and bidi rule; unassigned code points pass, as they do in
    # Prosody's SASLprep (emoji are such).
    import stringprep
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text
                     if not stringprep.in_table_b1(c))
    mapped = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for c in mapped:
        if stringprep.in_table_c21_c22(c) or stringprep.in_table_c8(c) or stringprep.in_table_c9(c):
            return (f"a control or formatting character (U+{ord(c):04X}; tabs and line breaks "
                    "are such)")
        if (stringprep.in_table_c3(c) or stringprep.in_table_c4(c) or stringprep.in_table_c5(c)
                or stringprep.in_table_c6(c) or stringprep.in_table_c7(c)):
            return f"a character meant for no text (U+{ord(c):04X})"
    right_to_left = [stringprep.in_table_d1(c) for c in mapped]
    if any(right_to_left) and (any(map(stringprep.in_table_d2, mapped))
                               or not (right_to_left[0] and right_to_left[-1])):
        return "right-to-left letters mixed with left-to-right ones in a way SASLprep refuses"
    return None


def parse_note(text):
    """Return an invite's note (one line, at most 200 characters); raise ValueError."""
    return _one_line(text, "note", 200)


def parse_seconds(text):
    """Return a positive number of seconds (fractions allowed); raise ValueError."""
    # (not float() alone: it takes "١", "1e3" and "inf")
    if not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", text.strip()):
        raise ValueError(f"invalid number of seconds {text!r}")
    seconds = float(text)
    if not 0 < seconds <= 86400:
        raise ValueError(f"invalid number of seconds {text!r}: "
                         "must be more than 0 and at most a day")
    return seconds


@contextlib.contextmanager
def bad_request():
    """Turn a ValueError raised while checking a request's values into a BadRequest (400)."""
    try:
        yield
    except ValueError as e:
        raise BadRequest(str(e)) from None


# ---------------------------------------------------------------------------
# Roles: what mints invites (Backend: the built-in store or an XMPP server), what makes
# the accounts of ours (AccountMaker)
# ---------------------------------------------------------------------------

class Backend:
    """What mints invites, as the operations use it; this base is a server we cannot ask."""

    options = frozenset()  # the per-invite options it honours, with "reset" if it makes resets
    used_here = False  # its invites are used here (our sign-up page, the redeem API), their
    # tokens made here and kept only as hashes (a server's tokens are kept, as it keeps them)
    accounts = None  # who makes the accounts of built-in invites used here, if anyone

    def __init__(self, name):
        self.name = name

    @property
    def sign_up_accounts(self):
        """Who makes its invites' accounts on our sign-up page (None: nobody)."""
        return self.accounts if self.used_here else None

    @property
    def display_name(self):
        return f"the {self.name} backend"

    def refusal_reason(self, option):
        """Return why an option cannot be honoured, for its 400 (or "")."""
        return ""

    def mint(self, invite, roles=None, groups=None):
        """Mint a held invite; return the server's token, uri and url (a dict), or {} for ours."""
        raise BackendError(f"{self.display_name} is not running here")

    def account_mark(self, host, username):
        """Return what names the account username@host for a reset (None: there is none); raise."""
        exists = getattr(self, "exists", None)
        ask = exists and (lambda: "" if exists(host, username) else None)
        return _ask_mark(host, username, ask)

    def status(self, invite):
        """Return (a valid invite's status as its server knows it, the account a use made)."""
        return "unknown", None

    def revoke(self, invite):
        """Withdraw an invite in the server that minted it; raise BadRequest if we cannot."""
        raise BadRequest("this invite was minted by the XMPP "
                         f"server ({self.name}): revoke it there")

    def sweep(self, store):
        """Tell the server to forget invites we know are done (before a purge)."""

    def check(self):
        """Return why it cannot work as configured (serve's start-up warning), or None."""
        return None

    def check_hosts(self, hosts):
        """Return warnings about what the XMPP server lacks for these hosts."""
        return []

    def start_warnings(self, hosts):
        """Return what keeps it (or its accounts) from working for these hosts."""
        problem = self.check()
        warnings = [problem] if problem else self.check_hosts(hosts)
        if self.accounts is not None:
            try:
                warnings += self.accounts.check_accounts(hosts)
            except Error as e:
                warnings.append(f"--accounts {self.accounts.name}: {e}")
        return warnings

    def describe(self):
        """Return how invites are minted, for serve's start-up line."""
        return f"{self.name} backend"

    def close(self):
        """Close its connections to the XMPP server, and those of its accounts."""
        for part in {id(self): self, id(self.accounts): self.accounts}.values():
            connection = getattr(part, "admin", None) or getattr(part, "ejabberd", None)
            if part is not None and hasattr(connection, "close"):
                connection.close()


class AccountMaker:
    """What makes the accounts of built-in invites on our sign-up page (--accounts): a program
    of yours (Accounts), Prosody (ProsodyBackend) or ejabberd (EjabberdBackend)."""

    # After an answer that never came: if "there is no such account" is final (nothing sent can
    # still make it later), the use is given back at once; else it waits for the server to say.
    missing_is_final = False

    def create(self, host, username, password):
        """Create username@host; raise Conflict (taken), BadRequest, BackendError or
        OutcomeUnknown (nobody can tell whether it was made)."""
        raise NotImplementedError

    def reset(self, host, username, password):
        """Set username@host's password; raise Conflict if there is no such account."""
        raise NotImplementedError

    def exists(self, host, username):
        """Return whether username@host exists; raise BackendError if the server cannot tell."""
        raise NotImplementedError

    def mark(self, host, username, new=None):
        """Return what tells username@host from a later account of its name (None: there is
        none), setting it to new if it has none yet."""
        raise NotImplementedError

    def befriend(self, host, username, inviter):
        """Make username and inviter each other's contacts; raise Conflict if inviter is gone."""
        raise NotImplementedError

    def check_accounts(self, hosts):
        """Return warnings about what making accounts for these hosts lacks (serve's start)."""
        return []

    def describe_accounts(self):
        """Return who makes the accounts, for serve's start-up line."""
        raise NotImplementedError


def _ask_mark(host, username, ask):
    """Return ask()'s mark of an account for a reset; raise if nobody can tell or it fails."""
    if ask is None:
        raise BadRequest(f"cannot tell whether {username}@{host} exists, so no reset was made: a "
                         "reset needs --accounts (or a backend that can ask the XMPP server)")
    try:
        mark = ask()
    except BackendError as e:
        raise BackendError(f"could not ask whether {username}@{host} exists, so no reset was "
                           f"made: {e}") from None
    if mark is None:
        raise BadRequest(f"there is no account {username}@{host} to reset")
    return mark


def minted_by(invite, backend):
    """Return the Backend that minted an invite: backend, the built-in store, or one not here."""
    if invite["backend"] == backend.name:
        return backend
    if invite["backend"] == Builtin.name:
        return Builtin(backend.accounts)
    return Backend(invite["backend"])


# ---------------------------------------------------------------------------
# Store: the schema, the only code that writes SQL, and the built-in store's Backend
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
    (  # 5: a decoy key (an id no request presents): an unknown id is checked against its hash
        "INSERT INTO keys (id, host, secret_hash, created_at) VALUES ('', '', randomblob(32), 0)",
    ),
    (  # 6: the accounts each use of a built-in invite made (or whose password it set)
        """CREATE TABLE accounts (
            token TEXT NOT NULL,
            host TEXT NOT NULL,
            username TEXT NOT NULL,
            action TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )""",
        "CREATE INDEX accounts_by_token ON accounts (token)",
    ),
    (  # 7: password-reset invites are a key's permission, off unless given (off for existing keys)
        "ALTER TABLE keys ADD COLUMN may_reset INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX accounts_by_name ON accounts (host, username, created_at)",
    ),
    (  # 8: a reset names the account it was made for (a later account of the same name is another)
        "ALTER TABLE invites ADD COLUMN account_mark TEXT",
    ),
    (  # 9: contact invites: who invites (a key's or an invite's), whether the contact was made
        "ALTER TABLE keys ADD COLUMN inviter TEXT",
        "ALTER TABLE invites ADD COLUMN inviter TEXT",
        "ALTER TABLE accounts ADD COLUMN contact TEXT",
    ),
    (  # 10: our tokens only as hashes: an invite is found by its public id (see invite_id), then
        # its token's hash is compared. Only an XMPP server's invite keeps its token, URI and URL,
        # as that server does. (invite_id() and sha256() are Python's, for this migration; the
        # old table's pages are zeroed as they are freed: see _migrate.)
        """CREATE TABLE invites_10 (
            id TEXT PRIMARY KEY,
            token_hash BLOB,
            server_token TEXT,
            host TEXT NOT NULL,
            type TEXT NOT NULL,
            uri TEXT,
            url TEXT,
            key_id TEXT,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            uses INTEGER NOT NULL DEFAULT 1,
            uses_left INTEGER NOT NULL DEFAULT 1,
            username TEXT,
            note TEXT,
            revoked_at INTEGER,
            done_at INTEGER,
            backend TEXT NOT NULL DEFAULT 'builtin',
            account_mark TEXT,
            inviter TEXT
        )""",
        """INSERT INTO invites_10 SELECT invite_id(token),
            CASE WHEN uri != '' THEN sha256(token) END,
            CASE WHEN backend != 'builtin' AND uri != '' THEN token END, host, type,
            CASE WHEN backend != 'builtin' AND uri != '' THEN uri END,
            CASE WHEN backend != 'builtin' THEN url END, key_id, created_at, expires_at, uses,
            uses_left, username, note, revoked_at, done_at, backend, account_mark, inviter
            FROM invites""",
        "DROP TABLE invites",
        "ALTER TABLE invites_10 RENAME TO invites",
        "CREATE INDEX invites_by_key ON invites (key_id, created_at)",
        "CREATE INDEX invites_by_host ON invites (host, created_at)",
        "CREATE INDEX invites_by_expiry ON invites (expires_at)",
        "CREATE INDEX invites_by_done ON invites (done_at) WHERE done_at IS NOT NULL",
        # A slot held while a server mints (no token yet): purged if the server died meanwhile.
        "CREATE INDEX invites_minting ON invites (created_at) WHERE token_hash IS NULL",
        "ALTER TABLE accounts RENAME COLUMN token TO invite",
        "UPDATE accounts SET invite = invite_id(invite)",
        "DROP INDEX accounts_by_token",
        "CREATE INDEX accounts_by_invite ON accounts (invite)",
    ),
]

_KEY_COLUMNS = ("id, host, name, secret_hash, created_at, last_used_at, invites_created, "
                "expires_at, max_invites, rate_count, rate_period, max_ttl, max_uses, may_reset, "
                "inviter")
# An unknown id finds the decoy row by the same two index lookups a known one takes.
_KEY_OR_DECOY = (f"SELECT {_KEY_COLUMNS} FROM keys "
                 "WHERE id = coalesce((SELECT id FROM keys WHERE id = ?), '')")
# Settable with `create` and `update`.
KEY_POLICY = ("expires_at", "max_invites", "rate_count", "rate_period", "max_ttl", "max_uses",
              "may_reset", "inviter")
_INVITE_COLUMNS = ("id, token_hash, server_token, host, type, uri, url, key_id, created_at, "
                   "expires_at, uses, uses_left, username, note, revoked_at, done_at, backend, "
                   "account_mark, inviter")
_INVITE_COLUMN_NAMES = _INVITE_COLUMNS.split(", ")
# What invite_status says, as SQL (each ? is the time).
_INVITE_STATUS_SQL = {"valid": "revoked_at IS NULL AND uses_left > 0 AND expires_at > ?",
                      "used": "revoked_at IS NULL AND uses_left <= 0",
                      "expired": "revoked_at IS NULL AND uses_left > 0 AND expires_at <= ?",
                      "revoked": "revoked_at IS NOT NULL"}
_GIVE_BACK_USE = ("UPDATE invites SET uses_left = uses_left + 1, done_at = CASE WHEN revoked_at "
                  "IS NULL THEN NULL ELSE done_at END WHERE id = ? AND uses_left < uses")
_INSERT_INVITE = (f"INSERT INTO invites ({_INVITE_COLUMNS}) "
                  f"VALUES ({', '.join('?' * len(_INVITE_COLUMN_NAMES))})")


def _make_private_dirs(folder):
    """Make folder and its missing parents, each readable by this user alone (0700)."""
    if os.path.isdir(folder):
        return
    _make_private_dirs(os.path.dirname(folder))
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
        os.chmod(folder, 0o700)  # (mkdir's mode passes through the umask)


def _user(uid):
    """Return a user's name, or their uid if they have none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _size(nbytes):
    """Return a size in bytes as people read it: "200 KB", "1.5 MB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


def default_db_path():
    """Return $INVITES_API_DB, else ~/.local/share/invites_api/invites.db."""
    # Deliberately not $XDG_DATA_HOME: cron and systemd rarely set it, and the
    # server and the CLI must find the same file for the same user.
    return os.environ.get("INVITES_API_DB") or os.path.join(
        os.path.expanduser("~"), ".local", "share", "invites_api", "invites.db")


class Store:
    """The sqlite3 file and the only code that reads or writes it (SQL in one place): one
    connection per thread, the schema's migrations, durable commits; keys, invites, accounts."""

    def __init__(self, path, create_dir=False, busy_timeout=BUSY_TIMEOUT):
        self.path = os.path.abspath(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._identity = None  # (device, inode) of the file we opened
        self.committer = GroupCommitter(self)
        if create_dir:
            try:
                _make_private_dirs(os.path.dirname(self.path))
            except OSError as e:
                raise self.error("cannot create the directory for "
                                 f"database {self.path!r}: {e.strerror}") from None
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
            if os.path.isdir(self.path):
                raise self.error(f"database {self.path!r} is a directory: give "
                                 "the path of a file (it is made if missing), "
                                 "e.g. --db /var/lib/invites_api/invites.db")
            try:
                # Create the file ourselves so it is private from the first byte;
                # SQLite gives the -wal and -shm files the same mode.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
            except FileExistsError:
                self._check_access()
                if os.path.getsize(self.path) == 0:  # (made by touch: ours to set up, privately)
                    os.chmod(self.path, 0o600)
            except OSError as e:
                raise self.error(f"cannot create database {self.path!r}: {e.strerror}") from None
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            self._check_ours(conn)  # (before WAL mode, which would change another's file)
            # WAL: readers never block the writer; FULL: each commit is
            # fsynced before it returns, so an acknowledged invite survives
            # kill -9 and power loss.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
            # What is deleted is overwritten with zeros, not left in free pages (an earlier
            # schema's tokens, a deleted key's hash). Debian's SQLite does so unless told.
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            raise self.problem(e, "cannot open database") from None
        if mode.lower() != "wal":
            raise self.error(f"cannot open database {self.path!r}: WAL mode refused ({mode})")
        if self._identity is None:
            info = os.stat(self.path)
            self._identity = (info.st_dev, info.st_ino)
        return conn

    def _check_access(self):
        """Raise StoreError saying why, if this user may not read and write the database."""
        if not os.access(self.path, os.R_OK | os.W_OK):
            raise self.error(self._why_not_writable(), "the database cannot be written")

    def _why_not_writable(self):
        """Return why this user cannot write the database (a read-only mount, a file of another
        user or made read-only, a directory where SQLite cannot make its -wal and -shm)."""
        folder = os.path.dirname(self.path)
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return (f"database {self.path!r} is on a file system mounted read-only: "
                    "remount it read-write, or give a --db elsewhere")
        info, me = os.stat(self.path), os.getuid()
        if info.st_uid != me and not os.access(self.path, os.W_OK):
            return (f"database {self.path!r} belongs to {_user(info.st_uid)} (mode "
                    f"{info.st_mode & 0o777:o}) and this user ({_user(me)}) may not write it: "
                    "run as its owner (e.g. sudo -u OWNER), or see \"Which database\" in "
                    "docs/database.md to share it")
        if not os.access(self.path, os.W_OK):
            return (f"database {self.path!r} is read-only (mode {info.st_mode & 0o777:o}): "
                    f"chmod u+w {self.path}")
        if not os.access(folder, os.W_OK):
            return (f"database {self.path!r} is in a directory this user ({_user(me)}) may not "
                    f"write, where SQLite makes its -wal and -shm files: make {folder} "
                    "writable for the database's owner")
        return None

    def _check_ours(self, conn):
        """Raise StoreError if the file is another program's SQLite database (left as it is)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master "
                                                 "WHERE type = 'table'")}
        if tables and (version == 0 or not {"keys", "invites"} <= tables):
            conn.close()
            raise self.error(f"database {self.path!r} is another program's SQLite database "
                             f"(tables {', '.join(sorted(tables)[:5])}), not invites_api's: give "
                             "--db a file of its own")

    def problem(self, error, doing="database"):
        """Return a StoreError saying what a sqlite3.Error means here (busy, full, read-only)."""
        text = str(error)
        if "locked" in text or "busy" in text:
            return self.error(DATABASE_BUSY, DATABASE_BUSY)
        if "full" in text or ("I/O error" in text and self.free() < 1 << 20):
            return self.error(f"{doing} {self.path!r}: the disk is full (free some space in "
                              f"{os.path.dirname(self.path)})", "the database's disk is full")
        if "readonly" in text or "unable to open" in text:
            why = os.path.exists(self.path) and self._why_not_writable()
            if why:
                return self.error(why, "the database cannot be written")
        return self.error(f"{doing} {self.path!r}: {text}")

    def free(self):
        """Return the bytes free for this user beside the database (a large number if unknown)."""
        try:
            found = os.statvfs(os.path.dirname(self.path))
        except OSError:
            return 1 << 62
        return found.f_bavail * found.f_frsize

    def error(self, message, public=None):
        """Return a StoreError: message names the file; its public text says "the database"."""
        public = public or message.replace(f"database {self.path!r}", "the database")
        return StoreError(message, public if self.path not in public else None)

    def exposed(self):
        """Return the database's files that other users may read (its -wal and -shm too)."""
        return [path for path in (self.path, self.path + "-wal", self.path + "-shm")
                if os.path.exists(path) and os.stat(path).st_mode & 0o044]

    def check_file(self):
        """Raise StoreError if the database file was deleted, replaced or made read-only."""
        # SQLite would go on writing to a deleted file (lost at the next start) or through a file
        # made read-only: refuse instead, and say why.
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            raise self.error(f"database {self.path!r} was deleted "
                             "while in use; restore it or restart") from None
        if (info.st_dev, info.st_ino) != self._identity:
            raise self.error(f"database {self.path!r} was replaced while "
                             "in use; restart to use the new file")
        if not info.st_mode & 0o200:
            raise self.error(f"database {self.path!r} was made read-only; make it writable again")

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
                raise self.error(f"database {self.path!r} has schema {version}, newer than this "
                                 f"invites_api {__version__} knows ({len(MIGRATIONS)}); upgrade it")
            if version == len(MIGRATIONS):
                return
            # (The WAL may hold two copies of every page, a rebuilt table's and its zeroed old
            # one's, while the file grows by the new table before the WAL is emptied.)
            need, free = 3 * self.size(), self.free()
            conn.create_function("invite_id", 1, invite_id, deterministic=True)
            conn.create_function("sha256", 1, hash_secret, deterministic=True)
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Read again under the lock: another process may have migrated.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for number in range(version, len(MIGRATIONS)):
                    for statement in MIGRATIONS[number]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number + 1}")
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:  # (SQLite may have rolled back itself: a full disk)
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
            # The WAL still holds pages written before (with tokens, before schema 10): copy it
            # into the file and empty it (unless another process still reads from it).
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            problem = self.problem(e, "cannot upgrade database")
            if "disk is full" in str(problem):
                problem.args = (f"{problem}: upgrading it needs up to {_size(need)} free (three "
                                f"times the database's size), {_size(free)} were; it is left as "
                                "it was",)
            raise problem from None

    def read(self, sql, args=()):
        """Return all rows of a query, as sqlite3.Row."""
        try:
            return self.connect().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise self.problem(e) from None

    def write(self, fn, timeout=None):
        """Run fn(conn) in a durable transaction (by the group committer); return its result."""
        # With timeout, raise StoreError if the commit has not returned by then (the write may
        # still happen later).
        return self.committer.submit(fn, timeout)

    def start_group_commit(self):
        """Commit writes from one thread, many to a transaction (for serve)."""
        self.committer.start()

    def stop_group_commit(self):
        """Finish the queued writes and stop the committing thread."""
        self.committer.stop()

    # -- keys ----------------------------------------------------------------

    def insert_key(self, key):
        """Store a new key (a dict with the keys table's columns); return False if its id is
        taken (by a key of any host: ids are unique across hosts)."""
        columns = [c for c in _KEY_COLUMNS.split(", ") if c in key]
        sql = f"INSERT INTO keys ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"

        def insert(conn):
            try:
                conn.execute(sql, [key[c] for c in columns])
            except sqlite3.IntegrityError as e:
                if "keys.id" not in str(e):
                    raise
                return False
            return True
        return self.write(insert)

    def key(self, key_id, conn=None, decoy=False):
        """Return the key row with this id, or None (within conn's transaction if given)."""
        # decoy: return the decoy row (id '') for an unknown id, found by the same work.
        sql = _KEY_OR_DECOY if decoy else f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?"
        rows = (conn.execute(sql, (key_id,)).fetchall() if conn is not None
                else self.read(sql, (key_id,)))
        return rows[0] if rows else None

    def key_inviters(self):
        """Return (host, inviter) of the keys that mint contact invites."""
        return [tuple(row) for row in self.read("SELECT DISTINCT host, inviter FROM keys WHERE "
                                                "inviter IS NOT NULL ORDER BY host, inviter")]

    def key_hosts(self):
        """Return the hosts that have keys."""
        return [row[0] for row in self.read("SELECT DISTINCT host FROM keys "
                                            "WHERE host != '' ORDER BY host")]

    def keys_for_host(self, host):
        """Return the host's key rows, oldest first."""
        return self.read(f"SELECT {_KEY_COLUMNS} FROM keys WHERE host = ? "
                         "ORDER BY created_at, rowid", (host,))

    def update_key(self, host, key_id, changes):
        """Change a key's name or policy columns; return whether the key exists."""
        if not changes:
            return self.key(key_id) is not None
        assignments = ", ".join(f"{column} = ?" for column in changes)  # names from KEY_POLICY
        sql = f"UPDATE keys SET {assignments} WHERE host = ? AND id = ?"
        args = [*changes.values(), host, key_id]
        return self.write(lambda conn: conn.execute(sql, args).rowcount) > 0

    def delete_key(self, host, key_id, revoke_invites=False, at=0):
        """Delete a key (and revoke its pending invites if asked); return whether it existed."""
        def delete(conn):
            deleted = conn.execute("DELETE FROM keys WHERE host = ? AND id = ?",
                                   (host, key_id)).rowcount
            if deleted and revoke_invites:
                conn.execute("UPDATE invites SET revoked_at = ?, done_at = ? WHERE key_id = ? "
                             "AND revoked_at IS NULL AND uses_left > 0", (at, at, key_id))
            return deleted
        return self.write(delete) > 0

    # -- invites --------------------------------------------------------------

    def charge_key(self, conn, key, at):
        """Count a new invite against its key's quota and rate, in a write transaction."""
        # Raises Forbidden or TooManyRequests. The caller read the key in the same transaction, so
        # the quota and rate hold even when several servers share the database.
        if key["max_invites"] is not None and key["invites_created"] >= key["max_invites"]:
            raise Forbidden("invite quota used up")
        if key["rate_count"] is not None:
            count, oldest = conn.execute(
                "SELECT count(*), min(created_at) FROM "
                "invites WHERE key_id = ? AND created_at > ?",
                (key["id"], at - key["rate_period"])).fetchone()
            if count >= key["rate_count"]:
                raise TooManyRequests(f"rate limit of {key['rate_count']} invites per "
                                      f"{key['rate_period']} s reached",
                                      oldest + key["rate_period"] - at)
        conn.execute("UPDATE keys SET last_used_at = ?, invites_created "
                     "= invites_created + 1 WHERE id = ?", (at, key["id"]))

    def insert_invite(self, conn, invite):
        """Store a new invite row in a write transaction; return False if its id is taken."""
        try:  # (not ON CONFLICT DO NOTHING: that costs every insert a lookup, 3 % of creates/s)
            conn.execute(_INSERT_INVITE, [invite[c] for c in _INVITE_COLUMN_NAMES])
        except sqlite3.IntegrityError as e:
            if "invites.id" not in str(e):
                raise
            return False  # (only this statement was undone)
        return True

    def finish_invite(self, held, invite):
        """Record what the backend minted in the row insert_invite held (id held)."""
        values = [invite[c] for c in ("id", "token_hash", "server_token", "uri", "url",
                                      "account_mark")]
        self.write(lambda conn: conn.execute(
            "UPDATE invites SET id = ?, token_hash = ?, server_token = ?, uri = ?, url = ?, "
            "account_mark = ? WHERE id = ?", values + [held]))

    def drop_invite(self, invite_id):
        """Delete an invite record (a slot whose backend failed), giving its quota back."""
        def drop(conn):
            key_id = conn.execute("SELECT key_id FROM invites WHERE id = ?",
                                  (invite_id,)).fetchone()
            conn.execute("DELETE FROM invites WHERE id = ?", (invite_id,))
            if key_id and key_id[0]:
                conn.execute("UPDATE keys SET invites_created = invites_created - 1 WHERE id = ?",
                             key_id)
        self.write(drop)

    def invite(self, invite_id):
        """Return the invite row with this id, or None."""
        rows = self.read(f"SELECT {_INVITE_COLUMNS} FROM invites WHERE id = ?", (invite_id,))
        return rows[0] if rows else None

    def invites(self, host, key_id=None, status=None, at=0, limit=1000, after=None):
        """Return (a page of a host's or key's invites, newest first; how many in all)."""
        # Of one status at time at, or any (None); after: the id of the invite the page starts
        # after. (Not the slots held while a server mints.)
        where, args = "host = ? AND token_hash IS NOT NULL", [host]
        if key_id is not None:
            where, args = where + " AND key_id = ?", args + [key_id]
        if status is not None:
            where += " AND " + _INVITE_STATUS_SQL[status]
            args += [at] * _INVITE_STATUS_SQL[status].count("?")
        total = self.read(f"SELECT count(*) FROM invites WHERE {where}", args)[0][0]
        if after is not None:  # (the newest-first order of the index, from just past that invite)
            where += (" AND (created_at, rowid) < "
                      "(SELECT created_at, rowid FROM invites WHERE id = ?)")
            args.append(after)
        rows = self.read(f"SELECT {_INVITE_COLUMNS} FROM invites WHERE {where} "
                         "ORDER BY created_at DESC, rowid DESC LIMIT ?", args + [limit])
        return rows, total

    def revoke_invite(self, invite_id, at):
        """Revoke an invite; return whether it was pending (not yet used up or revoked)."""
        def revoke(conn):
            return conn.execute("UPDATE invites SET revoked_at = ?, done_at = coalesce(done_at, ?) "
                                "WHERE id = ? AND revoked_at IS NULL",
                                (at, at, invite_id)).rowcount
        return self.write(revoke) > 0

    def use_invite(self, invite_id, at):
        """Take one use of a valid invite atomically; return the row, or None if none was left."""
        def use(conn):
            taken = conn.execute(
                "UPDATE invites SET uses_left = uses_left - 1, "
                "done_at = CASE WHEN uses_left = 1 THEN ? ELSE done_at END "
                "WHERE id = ? AND uses_left > 0 AND revoked_at IS NULL AND expires_at > ?",
                (at, invite_id, at)).rowcount
            if taken:
                return conn.execute(f"SELECT {_INVITE_COLUMNS} FROM invites WHERE id = ?",
                                    (invite_id,)).fetchone()
            return None
        return self.write(use)

    def give_back_use(self, invite_id):
        """Undo one use_invite (the account it was for could not be made)."""
        self.write(lambda conn: conn.execute(_GIVE_BACK_USE, (invite_id,)))

    def record_account(self, invite_id, host, username, action, at):
        """Record the account a use of an invite made (action "create") or reset ("reset")."""
        self.write(lambda conn: conn.execute(
            "INSERT INTO accounts (invite, host, username, "
            "action, created_at) VALUES (?, ?, ?, ?, ?)",
            (invite_id, host, username, action, at)))

    def backend_hosts(self, backend):
        """Return the hosts with invites that a backend minted."""
        return [row[0] for row in self.read("SELECT DISTINCT host FROM invites WHERE backend = ?",
                                            (backend,))]

    def confirm_account(self, invite_id, username):
        """Record that an account whose creation nobody could confirm was made after all."""
        self.write(lambda conn: conn.execute("UPDATE accounts SET action = 'create' "
                                             "WHERE invite = ? AND username = ? AND "
                                             "action = 'unconfirmed'", (invite_id, username)))

    def forget_account(self, invite_id, username):
        """Drop an unconfirmed account that was never made and give back its use; return
        whether there was one."""
        def forget(conn):
            if not conn.execute("DELETE FROM accounts WHERE invite = ? AND username = ? AND "
                                "action = 'unconfirmed'", (invite_id, username)).rowcount:
                return False
            conn.execute(_GIVE_BACK_USE, (invite_id,))
            return True
        return self.write(forget)

    def accounts(self, invite_id):
        """Return the accounts an invite made or reset, oldest first."""
        return self.read("SELECT username, host, action, created_at, contact FROM accounts "
                         "WHERE invite = ? ORDER BY created_at, rowid", (invite_id,))

    def record_contact(self, invite_id, username, outcome):
        """Record whether an account made by a contact invite became its inviter's contact."""
        self.write(lambda conn: conn.execute("UPDATE accounts SET contact = ? WHERE invite = ? "
                                             "AND username = ?", (outcome, invite_id, username)))

    def purge_invites(self, before, stale_slots_before):
        """Delete a batch of invites ended before a time, and stale slots; return how many."""
        # Ended: expired, used up or revoked; stale: a slot whose backend never answered.
        def purge(conn):
            return conn.execute(
                "DELETE FROM invites WHERE rowid IN (SELECT rowid FROM invites WHERE expires_at < "
                "? LIMIT ?) OR rowid IN (SELECT rowid FROM invites WHERE done_at < ? LIMIT ?) OR "
                "rowid IN (SELECT rowid FROM invites WHERE token_hash IS NULL AND created_at < ? "
                "LIMIT ?)",
                (before, PURGE_BATCH, before, PURGE_BATCH, stale_slots_before, PURGE_BATCH)
            ).rowcount
        return self.write(purge)


class _Pending:
    """One write waiting for its commit: `done` is held until the COMMIT holding it returned."""

    __slots__ = ("fn", "committed", "result", "error")

    def __init__(self, fn):
        self.fn = fn
        self.committed = threading.Lock()  # cheaper than an Event; released once, by the committer
        self.committed.acquire()
        self.result = self.error = None


class GroupCommitter:
    """The one write path: each write runs in a savepoint of a transaction shared with the
    writes queued beside it, and its caller is answered only after that COMMIT returned.

    While serving, one thread commits every write (a batch per transaction, one fsync);
    otherwise (a command) the caller's thread runs the same commit for its one write.
    A write that raises is undone by its savepoint alone; a failed COMMIT fails
    every write of the batch with StoreError.
    """

    def __init__(self, store):
        self.store = store
        self.queue = self.thread = None

    def start(self):
        import queue
        if self.thread is None:
            self.queue = queue.SimpleQueue()
            self.thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
            self.thread.start()

    def submit(self, fn, timeout=None):
        """Run fn(conn) in the next commit, wait until it returned; return fn's result."""
        pending = _Pending(fn)
        if self.thread is None:
            self._commit(self.store.connect(), [pending])
        else:
            self.queue.put(pending)
            if not pending.committed.acquire(timeout=-1 if timeout is None else timeout):
                raise self.store.error(f"database {self.store.path!r} did "
                                       f"not answer within {timeout:g} s")
        if pending.error is not None:
            raise pending.error
        return pending.result

    def stop(self):
        """Commit what is queued, then end the thread (later writes commit in their own)."""
        thread = self.thread
        if thread is not None:
            self.queue.put(None)
            thread.join()
            self.thread = None

    def _run(self):
        while True:
            batch = [self.queue.get()]
            while batch[-1] is not None and not self.queue.empty():
                batch.append(self.queue.get())
            stopping = batch[-1] is None
            batch = [pending for pending in batch if pending is not None]
            if batch:
                try:
                    conn = self.store.connect()
                except StoreError as e:  # cannot open the file: every write of the batch fails
                    for pending in batch:
                        pending.error = e
                        pending.committed.release()
                else:
                    self._commit(conn, batch)
            if stopping:
                self.store.close()
                return

    def _commit(self, conn, batch):
        try:
            self.store.check_file()
            conn.execute("BEGIN IMMEDIATE")
            try:
                alone = len(batch) == 1  # its failure may undo the whole transaction: no savepoint
                for pending in batch:
                    alone or conn.execute("SAVEPOINT write")
                    try:
                        pending.result = pending.fn(conn)
                    except Exception as e:
                        pending.error = (self.store.problem(e)
                                         if isinstance(e, sqlite3.Error) else e)
                        conn.execute("ROLLBACK" if alone else "ROLLBACK TO write")
                    alone or conn.execute("RELEASE write")
                if conn.in_transaction:
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as e:
            error = e if isinstance(e, Error) else self.store.problem(e)
            for pending in batch:
                pending.error = pending.error or error
        finally:
            for pending in batch:
                pending.committed.release()


# -- the built-in store as a Backend: it mints by storing ---------------------


class Builtin(Backend):
    """This tool's own store: its invites become accounts here, through an Accounts if given."""

    name = "builtin"
    used_here = True
    display_name = "the built-in store"

    def __init__(self, accounts=None):
        self.accounts = accounts

    @property
    def options(self):
        return frozenset({"ttl", "uses", "username", "inviter"}
                         | ({"reset"} if self.accounts else set()))

    def refusal_reason(self, option):
        if option == "reset":
            return " without --accounts, which can tell whether the account exists"
        return ": it is for the XMPP server"

    def mint(self, invite, roles=None, groups=None):
        return {}  # the held row is the invite

    def account_mark(self, host, username):
        accounts = self.accounts  # (a random mark, kept where the account's deletion takes it)
        return _ask_mark(host, username,
                         accounts and (lambda: accounts.mark(host, username, new=_random_id(12))))

    def status(self, invite):
        return invite_status(invite), None

    def revoke(self, invite):
        pass  # the store's revocation is all there is

    def describe(self):
        return ""  # (serve's start-up line says nothing of it)


BUILTIN = Builtin()  # the built-in store when no one makes accounts (the key commands, tests)


# ---------------------------------------------------------------------------
# Operations: what a user can do; they return data or raise, never print
# ---------------------------------------------------------------------------

def now():
    """Return the current time in UTC epoch seconds (tests replace this)."""
    return int(time.time())


def iso(ts):
    """Return epoch seconds as ISO 8601 UTC, or None for None."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _random_id(nbytes):
    """Return nbytes of randomness as URL-safe base64 that does not start with "-"."""
    while True:  # a leading "-" would read as an option on the command line
        text = base64.urlsafe_b64encode(os.urandom(nbytes)).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


def _new_token():
    """Return a new invite token: 4 bytes of the time, then 14 random bytes (112 bits)."""
    # Tokens made in the same second sort together, so each batch of new invites writes one
    # page of the token index instead of one per invite: with fully random tokens the pages
    # written per commit (and the checkpoints behind them) grew with the table, and p99
    # latency with them (from 4 to 14 ms over the benchmark's first 100,000 invites).
    seconds = int(now()) % 2**31  # the top bit clear: a token never starts with "-" (an option)
    raw = seconds.to_bytes(4, "big") + os.urandom(TOKEN_BYTES - 4)
    return base64.urlsafe_b64encode(raw).decode("ascii")


def invite_id(token):
    """Return the public id of the invite a token opens: the token's first 5 characters, then
    the first 7 of its SHA-256's (URL-safe base64): 12 characters."""
    # The 5 are 30 bits of our token's time, so that new invites' ids still share index pages;
    # the 7 (42 bits) come from the hash, which the database holds anyway. So an id shown in a
    # list, a log or a stolen database tells nothing of the token's random part: all 112 bits
    # stay secret (of a token of an earlier release, all random: 114 of its 144).
    return _invite_id(token, hash_secret(token))


def _invite_id(token, digest):
    return token[:5] + base64.urlsafe_b64encode(digest[:6]).decode("ascii")[:7]


def _token_fields(token):
    """Return what an invite row keeps of a token: its public id and its hash."""
    digest = hash_secret(token)
    return {"token": token, "id": _invite_id(token, digest), "token_hash": digest}


def opened(row, token=None):
    """Return an invite row as a dict with the token it was opened with (None: by its id; a
    server's invite: the server's own token) and, for ours, the URI built from that token."""
    invite = dict(row)
    invite["token"] = token = token or row["server_token"]
    if row["uri"] is None and row["server_token"] is None and token:  # (ours: never stored)
        jid = f"{row['username']}@{row['host']}" if row["username"] else row["host"]
        invite["uri"] = f"xmpp:{jid}?register;preauth={token}"
    return invite


def invite_by_token(store, token):
    """Return the invite a whole token opens (see opened), or None."""
    # One index probe by the id the token gives, then its hash compared in constant time.
    if not TOKEN_RE.match(token or ""):
        return None
    digest = hash_secret(token)
    row = store.invite(_invite_id(token, digest))
    if row is None or row["token_hash"] is None or not hmac.compare_digest(row["token_hash"],
                                                                           digest):
        return None
    return opened(row, token)


def invite_by_reference(store, reference):
    """Return the invite an operator names by its public id or its whole token, or None."""
    if INVITE_ID_RE.match(reference):
        row = store.invite(reference)
        return None if row is None or row["token_hash"] is None else opened(row)
    return invite_by_token(store, reference)


def hash_secret(secret):
    """Return the digest stored for a key secret."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def create_key(store, host, name="", **policy):
    """Make an API key for host and return "KEY_ID/SECRET" (the only time the secret exists)."""
    # policy: any of KEY_POLICY; None means no limit.
    key_id, secret = _random_id(KEY_ID_BYTES), _random_id(SECRET_BYTES)
    key = {"id": key_id, "host": host, "name": name, "secret_hash": hash_secret(secret),
           "created_at": now()}
    key.update({k: v for k, v in policy.items() if k in KEY_POLICY and v is not None})
    while not store.insert_key(key):  # (the id is another key's: 72 random bits, but still)
        key["id"] = key_id = _random_id(KEY_ID_BYTES)
    return f"{key_id}/{secret}"


def key_info(row):
    """Return a key row as a dict for people and JSON: no secret, times in ISO 8601."""
    rate = f"{row['rate_count']}/{row['rate_period']}s" if row["rate_count"] is not None else None
    return {"id": row["id"], "name": row["name"], "host": row["host"],
            "created_at": iso(row["created_at"]), "last_used_at": iso(row["last_used_at"]),
            "invites_created": row["invites_created"], "expires_at": iso(row["expires_at"]),
            "max_invites": row["max_invites"], "rate": rate, "max_ttl": row["max_ttl"],
            "max_uses": row["max_uses"], "may_reset": bool(row["may_reset"]),
            "inviter": f"{row['inviter']}@{row['host']}" if row["inviter"] else None}


def list_keys(store, host):
    """Return the host's keys as dicts (no secrets), oldest first."""
    return [key_info(row) for row in store.keys_for_host(host)]


def _key_id(key_id):
    """Return a key id as given to update and delete; refuse a whole KEY_ID/SECRET unechoed."""
    if "/" in key_id:
        raise BadRequest("give the key's id alone (the part before the "
                         "'/'), never its secret; `list HOST` shows ids")
    return key_id


def update_key(store, host, key_id, **changes):
    """Change a key's name or policy (None clears a limit); raise NotFound if unknown."""
    if not store.update_key(host, _key_id(key_id), changes):
        raise NotFound(f"key {key_id!r} not found for host {host!r}")


def delete_key(store, host, key_id, revoke_invites=False):
    """Revoke a key at once (its invites stay valid unless revoke_invites)."""
    if not store.delete_key(host, _key_id(key_id), revoke_invites, at=now()):
        raise NotFound(f"key {key_id!r} not found for host {host!r}")


def authenticate(store, presented, conn=None):
    """Return the key row for a presented "KEY_ID/SECRET" (read in conn, if given)."""
    if not presented:
        raise Unauthorized("an API key is required (?key= or Authorization: Bearer)")
    key_id, slash, secret = presented.partition("/")
    if not slash or not secret or not KEY_ID_RE.match(key_id):
        raise BadCredentials("malformed API key")
    key = store.key(key_id, conn, decoy=True)
    # Constant-time, and the same work for an unknown id (the decoy's hash) as for a wrong secret.
    if (key is None or not hmac.compare_digest(hash_secret(secret), key["secret_hash"])
            or key["id"] != key_id):
        raise BadCredentials("invalid API key")
    if key["expires_at"] is not None and key["expires_at"] <= now():
        raise Forbidden("key expired")
    return key


def presented_key(authorization, query_key):
    """Return the key a request presents: Authorization: Bearer (which wins), ?key=, or ""."""
    if len(authorization) > 1:
        raise BadRequest("more than one Authorization header")
    if authorization:
        scheme, _, credentials = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            raise BadCredentials(f"unsupported authorization scheme {scheme[:20]!r}; use Bearer")
        from urllib.parse import unquote
        credentials = unquote(credentials.strip())
        if not credentials:
            raise BadCredentials("malformed API key")
        return credentials
    return query_key if isinstance(query_key, str) else ""


def guessed(presented):
    """Return what a failed authentication is counted by, besides its address: its key id, or
    "malformed" for a key that is not KEY_ID/SECRET."""
    key_id, slash, secret = presented.partition("/")
    return ("key", key_id) if slash and secret and KEY_ID_RE.match(key_id) else "malformed"


def refuse_if_guessing(limiter, client, presented):
    """Raise TooManyRequests if this address failed too often this minute with this key id (or
    with malformed keys), or with all ids together."""
    # (each BadCredentials is counted at the HTTP boundary: App.count_auth_failure)
    wait = max(limiter.over(client, guessed(presented)),
               limiter.over(client, "all", AUTH_FAILURES_PER_ADDRESS * limiter.per_minute))
    if wait:
        raise TooManyRequests("too many failed authentications from your address", wait)


def address_key(address):
    """Return what per-address limits count: the IPv4 address, or the /64 of an IPv6 address."""
    if ":" not in address:
        return address
    import ipaddress
    try:
        return str(ipaddress.IPv6Network((address.partition("%")[0], 64), strict=False))
    except ValueError:
        return address


class RateLimiter:
    """Counts events per client address (IPv6: per /64) in one-minute windows, in memory."""

    def __init__(self, per_minute, clock=time.monotonic):
        self.per_minute, self.clock = per_minute, clock  # (tests fix the clock mid-minute)
        self._window = None
        self._counts = {}
        self._noted = set()
        self._lock = threading.Lock()

    def hit(self, address, subject=None):
        """Count one event (of an address, with subject); return 0 if allowed, else the seconds
        until the next window."""
        clock, name = self.clock(), (address_key(address), subject)
        with self._lock:
            window = int(clock // 60)
            if window != self._window:  # a new minute: forget the old one (bounded memory)
                self._window, self._counts, self._noted = window, {}, set()
            count = self._counts[name] = self._counts.get(name, 0) + 1
        return 0 if count <= self.per_minute else 60 - clock % 60

    def first_time_over(self, address):
        """Return True the first time in this minute that it is asked about an address."""
        address = address_key(address)
        with self._lock:
            if address in self._noted:
                return False
            self._noted.add(address)
            return True

    def over(self, address, subject=None, limit=None):
        """Return 0 if the address (with subject) is within its limit (per_minute unless given)
        this minute, else seconds to wait."""
        clock, name = self.clock(), (address_key(address), subject)
        with self._lock:
            if (int(clock // 60) != self._window
                    or self._counts.get(name, 0) < (limit or self.per_minute)):
                return 0
        return 60 - clock % 60


def parse_limit(text, what="limit"):
    """Return a listing's page size: 1 to MAX_LIST_LIMIT; raise ValueError."""
    count = parse_count(text, what)
    if count > MAX_LIST_LIMIT:
        raise ValueError(f"{what} {text!r}: at most {MAX_LIST_LIMIT:,}")
    return count


# The invite options a request may give; JSON's null means "none" (as left out) for these alone.
INVITE_OPTIONS = ("ttl", "uses", "username", "note", "type", "roles", "groups")
_NULL_MEANS_NONE = ("username", "note", "roles", "groups")


def _invite_option(name, value):
    """Return one invite option's value checked (options: query strings or JSON values)."""
    if name not in INVITE_OPTIONS:
        raise ValueError(f"unknown option {name[:40]!r}")
    if value is None and name in _NULL_MEANS_NONE:
        return None
    if value is None:
        raise ValueError(f"{name} cannot be null: give a value, or leave it out for the default")
    if (name != "uses" and not isinstance(value, str)
            and not (name == "ttl" and isinstance(value, int))):
        raise ValueError(f"{name} must be a string")
    if name == "ttl":
        return parse_duration(str(value))
    if name == "uses":
        return parse_count(value, "uses")
    if name == "username":
        return parse_username(value)
    if name == "note":
        return parse_note(value) or None
    if name in ("roles", "groups"):  # for the XMPP server: "prosody:member,team"
        names = tuple(_one_line(n.strip(), name[:-1], 100) for n in value.split(","))
        if not all(names):
            raise ValueError(f"{name} {value!r}: names separated by commas")
        return names
    if name == "type" and value in ("register", "reset"):
        return value
    raise ValueError(f"type {value!r}: register (a new account) or reset (a password)")


def invite_options(options, key, default_ttl, backend):
    """Return an invite request's options checked against the key's policy and the backend."""
    wanted = {"ttl": None, "uses": 1, "username": None, "note": None, "type": "register",
              "roles": None, "groups": None}
    # An inviter is the key's; only the command line, with no key, names one.
    options = dict(options)
    inviter = key["inviter"] if key is not None else options.pop("inviter", None)
    with bad_request():
        for name, value in options.items():
            wanted[name] = _invite_option(name, value)
            if value is not None and name not in ("note", "type") and name not in backend.options:
                raise ValueError(f"{backend.display_name} cannot honour "
                                 f"{name!r}{backend.refusal_reason(name)}")
        if key is not None and (wanted["ttl"] or 0) > key["max_ttl"]:
            raise ValueError(f"ttl {options['ttl']!r} is over this key's limit of "
                             f"{format_duration(key['max_ttl'])} (an operator can raise it: "
                             "update HOST KEY_ID --max-ttl)")
        if key is not None and wanted["uses"] > key["max_uses"]:
            raise ValueError(f"uses {options['uses']!r} is over this key's "
                             f"limit of {key['max_uses']} (an operator can "
                             "raise it: update HOST KEY_ID --max-uses)")
        if wanted["type"] == "reset":
            _check_reset(wanted, key, backend)
        wanted["inviter"] = inviter if wanted["type"] == "register" else None  # (not a reset's)
        if wanted["inviter"] and "inviter" not in backend.options:
            raise ValueError(f"{backend.display_name} cannot make contact invites (from "
                             f"{inviter}){backend.refusal_reason('inviter')}")
    if wanted["ttl"] is None:  # a reset is short-lived: a day
        ttl = RESET_INVITE_TTL if wanted["type"] == "reset" else default_ttl
        wanted["ttl"] = min(ttl, key["max_ttl"]) if key is not None else ttl
    return wanted


def _check_reset(wanted, key, backend):
    """Raise unless a password-reset invite may be made so (ValueError) by this key (Forbidden)."""
    if key is not None and not key["may_reset"]:
        raise Forbidden("this key may not make password-reset invites (an operator can allow it: "
                        "update HOST KEY_ID --allow-resets)")
    if not wanted["username"] or wanted["uses"] != 1 or wanted["roles"] or wanted["groups"]:
        raise ValueError("a password-reset invite needs the username (and is for one use, with no "
                         "roles or groups)")
    if "reset" not in backend.options:
        raise ValueError(f"{backend.display_name} cannot make password-reset "
                         f"invites{backend.refusal_reason('reset')}")


def create_invite(store, credentials=None, host=None, options=None, default_ttl=DEFAULT_INVITE_TTL,
                  backend=BUILTIN):
    """Mint an invite: check the key and options, hold its place, have the backend mint it."""
    # credentials: the "KEY_ID/SECRET" a request presented (None: the command line, for host). The
    # key is read in the write transaction that holds the invite's place, so a deleted or expired
    # key, a used-up quota or a full rate window is always seen, by several servers too.
    def hold(conn):
        key = authenticate(store, credentials, conn) if credentials is not None else None
        wanted = invite_options(options or {}, key, default_ttl, backend)
        invite = _new_invite(key["host"] if key is not None else host, key, backend, wanted)
        if key is not None:
            store.charge_key(conn, key, invite["created_at"])
        while not store.insert_invite(conn, invite):  # (its id is taken: 1 in 2**42 in 4 s)
            invite.update(_token_fields(_new_token()))
        return invite, wanted

    invite, wanted = store.write(hold)
    held = invite["id"]
    try:
        if invite["type"] == "reset":
            invite["account_mark"] = backend.account_mark(invite["host"], invite["username"])
        minted = backend.mint(invite, wanted["roles"], wanted["groups"])
    except BaseException:
        store.drop_invite(held)  # its place and quota back (its token was never shown)
        raise
    if minted:  # (a server's token is kept as the server keeps it: it is asked by it)
        invite.update(minted, **_token_fields(minted["token"]), server_token=minted["token"])
    if minted or invite["account_mark"] is not None:
        store.finish_invite(held, invite)
    return opened(invite, invite["token"])


def _new_invite(host, key, backend, wanted):
    """Return a new invite row for host, as it is held while the backend mints it (ours: as
    it stays, its token kept only as a hash; a server's: a place held, with no token yet)."""
    created_at = now()
    invite = {"host": host, "type": wanted["type"], "uri": None, "url": None,
              "server_token": None, "key_id": key["id"] if key is not None else None,
              "created_at": created_at, "expires_at": created_at + wanted["ttl"],
              "uses": wanted["uses"], "uses_left": wanted["uses"], "username": wanted["username"],
              "note": wanted["note"], "revoked_at": None, "done_at": None,
              "backend": backend.name, "account_mark": None, "inviter": wanted["inviter"],
              **_token_fields(_new_token())}
    if not backend.used_here:
        invite["token_hash"] = None  # (held)
    return invite


def invite_status(invite, at=None):
    """Return "valid", "used", "revoked" or "expired" for an invite row."""
    if invite["revoked_at"] is not None:
        return "revoked"
    if invite["uses_left"] <= 0:
        return "used"
    if invite["expires_at"] <= (now() if at is None else at):
        return "expired"
    return "valid"


def invite_state(store, invite, backend=BUILTIN):
    """Return an invite's status, as the server that minted it knows it (recording a use it saw)."""
    status = invite_status(invite)
    if status != "valid":
        return status
    status, account = minted_by(invite, backend).status(invite)  # never "valid" on our word alone
    if status == "used":
        record_use(store, invite, account)
    return status


def record_use(store, invite, account=None):
    """Record a use that the XMPP server saw of an invite it minted, with the account it made."""
    if store.use_invite(invite["id"], now()) and account:
        username, _, host = account.rpartition("@")
        store.record_account(invite["id"], host, username, "create", now())


def invite_info(invite, url=None, status=None, accounts=()):
    """Return an invite as a dict for JSON: no internals, ISO 8601 times, its accounts."""
    # Its token, URI and URL: null for one of ours shown by its id (only their hash is kept).
    return {"id": invite["id"], "token": invite["token"], "host": invite["host"],
            "type": invite["type"],
            "uri": invite["uri"], "url": url, "status": status or invite_status(invite),
            "created_at": iso(invite["created_at"]), "expires_at": iso(invite["expires_at"]),
            "uses": invite["uses"], "uses_left": invite["uses_left"],
            "username": invite["username"], "note": invite["note"], "key_id": invite["key_id"],
            "revoked_at": iso(invite["revoked_at"]), "inviter": inviter_jid(invite),
            "accounts": [{"jid": f"{a['username']}@{a['host']}", "action": a["action"],
                          "at": iso(a["created_at"]), "contact": a["contact"]} for a in accounts]}


def inviter_jid(invite):
    """Return the JID of whoever a contact invite is from, or None."""
    return f"{invite['inviter']}@{invite['host']}" if invite["inviter"] else None


def get_invite(store, reference, host=None, key_id=None, whole_token=False):
    """Return an invite by its id or whole token (only the token if whole_token), within a host
    and/or a key's own; raise NotFound otherwise."""
    invite = (invite_by_token if whole_token else invite_by_reference)(store, reference)
    if (invite is None or (host is not None and invite["host"] != host)
            or (key_id is not None and invite["key_id"] != key_id)):
        raise NotFound(f"invite {reference[:40]!r} not found")
    return invite


def check_inviter(backend, host, inviter):
    """Return whether the XMPP server could tell that inviter@host has an account; raise
    BadRequest if it says there is none."""
    asker = backend.accounts or backend
    if not hasattr(asker, "exists"):
        return False
    if not asker.exists(host, inviter):
        raise BadRequest(f"{inviter}@{host} has no account: a contact invite is from an account "
                         "(make it first)")
    return True


def inviter_warnings(backend, inviters):
    """Return what keeps keys' contact invites from working: (host, inviter)s."""
    warnings = []
    for host, inviter in inviters:
        try:
            if "inviter" not in backend.options:
                raise BadRequest(f"{backend.display_name} cannot make contact invites"
                                 f"{backend.refusal_reason('inviter')}")
            check_inviter(backend, host, inviter)
        except BadRequest as e:
            warnings.append(f"keys with --inviter {inviter} for {host}: {e}")
        except Error:
            pass  # (the server cannot be asked: said already)
    return warnings


def show_invite(store, reference, backend, host=None, key_id=None):
    """Return (one invite, its status as its server knows it), its unconfirmed accounts asked
    about first (see settle_accounts)."""
    invite = get_invite(store, reference, host, key_id)
    accounts = minted_by(invite, backend).sign_up_accounts
    status = invite_state(store, _settled(store, invite, accounts), backend)
    return opened(store.invite(invite["id"]), invite["token"]), status


def _settled(store, invite, accounts):
    """Return the invite as it is once its unconfirmed accounts were asked about."""
    if accounts is not None and settle_accounts(store, accounts, invite):
        return opened(store.invite(invite["id"]), invite["token"])
    return invite


def find_invite(store, token, backend=BUILTIN):
    """Return (an invite that our page shows, or None; its status): by its whole token only."""
    invite = invite_by_token(store, token)
    if invite is None or invite["url"] or not invite["uri"]:  # (one with a page of its own)
        return None, None
    return invite, invite_state(store, invite, backend)


def list_invites(store, host, key_id=None, status="valid", limit=DEFAULT_LIST_LIMIT, after=None):
    """Return (a page of a host's or key's invites, newest first; how many in all)."""
    # status None: any; after: the id (or token) of the last invite of the previous page.
    if status is not None and status not in _INVITE_STATUS_SQL:
        raise BadRequest(f"status {status!r}: valid, used, expired, revoked or all")
    if after is not None:
        last = invite_by_reference(store, after)
        if last is None:
            raise BadRequest(f"after {after[:40]!r}: not an invite of this listing")
        after = last["id"]
    rows, total = store.invites(host, key_id, status, now(), limit, after)
    return [opened(row) for row in rows], total


def revoke_invite(store, reference, host=None, key_id=None, backend=BUILTIN):
    """Revoke an invite at once, in the server that minted it too; raise NotFound or BadRequest."""
    invite = get_invite(store, reference, host, key_id)
    minted_by(invite, backend).revoke(invite)
    store.revoke_invite(invite["id"], now())


def redeem_invite(store, token, host, username=None):
    """Use an invite once and return it; raise NotFound, Conflict (other username) or Gone."""
    # By its whole token, never its id: redeeming is the invitee's act, and ids are listed.
    invite = get_invite(store, token, host, whole_token=True)
    if not minted_by(invite, BUILTIN).used_here:
        raise BadRequest("this invite was minted by the XMPP server: it is redeemed there")
    if invite["type"] == "reset":
        raise BadRequest("this is a password-reset invite: it is used on this "
                         "server's sign-up page, never redeemed for a new account")
    with bad_request():
        username = None if username is None else parse_username(username)
    if username is not None and invite["username"] and username != invite["username"]:
        raise Conflict("this invite is for another username")
    used = store.use_invite(invite["id"], now())
    if used is None:
        raise Gone(f"this invite is {invite_status(store.invite(invite['id']))}")
    return opened(used, token)


def check_invite(store, token):
    """Return the public facts about an invite, nothing secret."""
    # {valid, type, host, expires_at, username}; type: register (a new account) or reset.
    invite = invite_by_token(store, token)
    if (invite is None or not minted_by(invite, BUILTIN).used_here
            or invite_status(invite) != "valid"):
        return {"valid": False, "type": None, "host": None, "expires_at": None, "username": None}
    return {"valid": True, "type": invite["type"], "host": invite["host"],
            "expires_at": iso(invite["expires_at"]),
            "username": invite["username"]}


def sign_up(store, accounts, invite, username, password, confirmation):
    """Use a built-in invite (as invite_by_token found it) to make its account through accounts
    (an AccountMaker), or set a password, and of a contact invite make the newcomer and the
    inviter contacts; return (invite, username, why the contact could not be made or None)."""
    # Raises Gone, Forbidden, BadRequest, Conflict (the name is taken, or a reset's account is
    # missing), BackendError, or OutcomeUnknown (the use is kept: nobody can tell whether the
    # account was made). Invariant: an invite never makes more accounts than its uses, and
    # every account it made is recorded; a failed contact never undoes an account.
    invite = _settled(store, invite, accounts)  # (a use an unmade account held may be back)
    if invite_status(invite) != "valid":
        raise Gone(f"this invite is {invite_status(invite)}")
    with bad_request():
        username = parse_account_name(invite["username"] or username)
        check_password(password, confirmation, username)
    reset = invite["type"] == "reset"
    mark = accounts.mark(invite["host"], username) if reset else None
    if reset and mark is None:
        raise Conflict(f"there is no account {username}@{invite['host']}")
    # (A reset of schema 7 names no mark: the account of its name, as it did then.)
    if reset and invite["account_mark"] is not None and mark != invite["account_mark"]:
        # the account was deleted and made again since
        raise Forbidden("this reset was made for an earlier account "
                        f"named {username}@{invite['host']}, so it cannot "
                        "set this one's password: ask for a new one")
    used = store.use_invite(invite["id"], now())
    if used is None:
        raise Gone(f"this invite is {invite_status(store.invite(invite['id']))}")
    try:
        (accounts.reset if reset else accounts.create)(invite["host"], username, password)
    except OutcomeUnknown:
        # A reset cannot be seen from outside, and a creation nobody can confirm keeps its use.
        if reset:
            raise
        if not _made_after_all(store, accounts, invite, username):
            store.record_account(invite["id"], invite["host"], username, "unconfirmed", now())
            raise
    except BaseException:
        store.give_back_use(invite["id"])
        raise
    store.record_account(invite["id"], invite["host"], username, "reset" if reset else "create",
                         now())
    return opened(used, invite["token"]), username, (
        befriend(store, accounts, invite, username) if invite["inviter"] and not reset else None)


def befriend(store, accounts, invite, username):
    """Make a contact invite's newcomer and inviter each other's contacts, asked once; record
    the outcome (made, failed, unknown); return why it failed, or None."""
    try:
        accounts.befriend(invite["host"], username, invite["inviter"])
    except Error as e:
        store.record_contact(invite["id"], username,
                             "unknown" if isinstance(e, OutcomeUnknown) else "failed")
        return str(e)
    store.record_contact(invite["id"], username, "made")
    return None


def settle_accounts(store, accounts, invite):
    """Ask the server about the invite's unconfirmed accounts: record those that exist as made,
    give back the use of those it says do not; return whether a use came back."""
    # "Does not exist" is believed when said twice, the second asked after the first answer:
    # by then the server is serving again and has read the creation it was sent before it
    # stalled, so that creation cannot still come after.
    returned = False
    for account in store.accounts(invite["id"]):
        if account["action"] != "unconfirmed":
            continue
        try:
            if accounts.exists(account["host"], account["username"]):
                store.confirm_account(invite["id"], account["username"])
            elif not accounts.exists(account["host"], account["username"]):
                returned |= store.forget_account(invite["id"], account["username"])
        except BackendError:
            pass  # still nobody can tell: it stays unconfirmed, its use kept
    return returned


def _made_after_all(store, accounts, invite, username):
    """After a lost answer: True if the account exists, False if nobody can tell."""
    # If it surely does not exist (the program was killed), the use is given back and
    # BackendError raised; if nobody can tell, the use is kept.
    host = invite["host"]
    try:
        made = accounts.exists(host, username)
    except BackendError:
        return False
    if not made and accounts.missing_is_final:
        store.give_back_use(invite["id"])
        raise BackendError(f"the server did not make {username}@{host} "
                           "in time; nothing was used") from None
    return made


def purge_invites(store, grace=DEFAULT_PURGE_GRACE, backend=BUILTIN):
    """Delete invites that stopped being valid over grace seconds ago; return how many."""
    # First, a backend that keeps invites we know are done (ejabberd) is told to drop them.
    backend.sweep(store)
    total = 0
    while True:
        deleted = store.purge_invites(now() - grace, now() - 3600)
        total += deleted
        if not deleted:
            return total


# ---------------------------------------------------------------------------
# HTTP routes and pages: what each request means, read here and answered through the operations
# ---------------------------------------------------------------------------

# The whole URL space: (path pattern, {method: handler method}, cross-origin?, a page people read?).
# Cross-origin routes answer OPTIONS preflights and carry CORS headers; a page's errors are pages.
ROUTES = tuple((re.compile(pattern + r"\Z"), methods, cors, page)
               for pattern, methods, cors, page in (
    (r"/invites_api/?", {"GET": "api_create", "POST": "api_create"}, True, False),
    (r"/invites_api/invites/?", {"GET": "api_list"}, True, False),
    (r"/invites_api/invites/(?P<token>[^/]+)", {"GET": "api_show", "DELETE": "api_revoke"},
     True, False),
    (r"/invites_api/invites/(?P<token>[^/]+)/redeem", {"POST": "api_redeem"}, True, False),
    (r"/invite/(?P<token>[^/]+)\.json", {"GET": "invite_check"}, True, False),
    (r"/invite(?:/(?P<token>[^/]*))?", {"GET": "invite_page", "HEAD": "invite_page"}, False, True),
    (r"/register", {"GET": "signup_page", "POST": "signup"}, False, True),
    (r"/", {"GET": "home", "HEAD": "home"}, False, True),
    (r"/health", {"GET": "health", "HEAD": "health"}, False, False),
    (r"/metrics", {"GET": "metrics"}, False, False),
))
CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Headers", "Content-Type, Authorization"),
    ("Access-Control-Max-Age", "7200"),
)


def page_headers(nonce, form=False):
    """Return an HTML page's security headers (form: it posts a form to us)."""
    form_action = "'self'" if form else "'none'"
    return (
        ("Content-Security-Policy", f"default-src 'none'; style-src 'nonce-{nonce}'; "
                                    f"script-src 'nonce-{nonce}'; img-src data:; base-uri 'none'; "
                                    f"form-action {form_action}; frame-ancestors 'none'"),
        # The token is in the URL: no other site sees it in a Referer. (Not no-referrer: under that
        # policy browsers send "Origin: null" with our own forms, which then look cross-site.)
        ("Referrer-Policy", "same-origin"),
        ("Cache-Control", "no-store"),
    )


def parse_fields(text, allowed, what):
    """Return a query string's or form's fields as a dict; raise BadRequest."""
    # Refused: names not allowed, repeats, more than 20, text not UTF-8 once decoded.
    from urllib.parse import parse_qsl
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=20, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest(f"the {what}s are not valid UTF-8") from None
    except ValueError:
        raise BadRequest(f"too many {what}s") from None
    fields = {}
    for name, value in pairs:
        if name not in allowed:
            raise BadRequest(f"unknown {what} {name[:40]!r}")
        if name in fields:
            raise BadRequest(f"{what} {name!r} given more than once")
        fields[name] = value
    return fields


def parse_bool(name, value):
    """Return True/False for true/1/yes or false/0/no; raise BadRequest otherwise."""
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadRequest(f"{name}={value!r}: expected true or false")


def form_fields(headers, body, allowed):
    """Return an HTML form's fields (application/x-www-form-urlencoded); raise BadRequest."""
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType(f"a form is sent as application/x-www-form-urlencoded, not "
                                   f"{ctype!r}")
    try:
        text = body.decode("ascii")
    except UnicodeError:
        raise BadRequest("the form is not valid: a form body is percent-encoded ASCII") from None
    return parse_fields(text, allowed, "form field")


def json_fields(headers, body):
    """Return a request body's JSON object of plain values ({} for none); raise BadRequest."""
    if not body:
        return {}
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType(f"request body must be application/json, not {ctype!r}")
    import json
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict) or any(isinstance(v, (dict, list)) for v in data.values()):
        raise BadRequest("request body must be a JSON object of strings, numbers and booleans")
    return data


def with_json(params, values):
    """Return a query's parameters with a JSON body's values (unknown names are left to the
    operation); raise BadRequest for a name given in both, a key not a string, a null redirect."""
    for name, value in values.items():
        if name in params:
            raise BadRequest(f"option {name!r} given in both the query and the body")
        if name == "key" and not isinstance(value, str):
            raise BadRequest("key must be a string: KEY_ID/SECRET")
        if name == "redirect" and value is None:
            raise BadRequest("redirect cannot be null: true or false, or leave it out")
        params[name] = (str(value).lower() if name == "redirect" and isinstance(value, bool)
                        else value)
    return params


def invite_url(invite, base, template=None):
    """Return the URL of an invite's landing page: the template's, else {base}/invite?TOKEN
    (None for one of ours shown by its id: its token is not kept)."""
    if invite["url"]:
        return invite["url"]
    if invite["token"] is None:
        return None
    if template:
        from urllib.parse import quote
        return (template.replace("{host}", invite["host"]).replace("{token}", invite["token"])
                .replace("{uri}", quote(invite["uri"], safe="")))
    return f"{base}/invite?{invite['token']}"


def iri_to_uri(text):
    """Return text with non-ASCII and controls percent-encoded as UTF-8 (RFC 3987, 3.1)."""
    from urllib.parse import quote
    return quote(text, safe="".join(map(chr, range(0x20, 0x7f))))


# What the log is given (the access log, a program's output) never holds a key or a token.
_SECRET_LOOKING_RE = re.compile(r"[A-Za-z0-9_-]{12,64}/[A-Za-z0-9_-]{16,}|[A-Za-z0-9_-]{16,}")


def redact(text):
    """Return text with anything key-like or token-like (16+ URL-safe characters) replaced."""
    return _SECRET_LOOKING_RE.sub("[redacted]", text)


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
                   [f"invites_api_requests_total{labels(status=s)} {n}"
                    for s, n in sorted(self.requests.items())])
            family("invites_api_auth_failures", "counter",
                   "Requests with a wrong, unknown or malformed key.",
                   [f"invites_api_auth_failures_total {self.auth_failures}"])
            family("invites_api_rate_limited", "counter", "Requests answered 429.",
                   [f"invites_api_rate_limited_total {self.rate_limited}"])
            family("invites_api_backend_failures", "counter", "Backend programs that failed (502).",
                   [f"invites_api_backend_failures_total {self.backend_failures}"])
            cumulative, samples = 0, []
            for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), self.latency_counts):
                cumulative += count
                le = "+Inf" if bound == float("inf") else bound
                samples.append(f'invites_api_request_duration_seconds_bucket{{le="{le}"}} '
                               f"{cumulative}")
            samples += [f"invites_api_request_duration_seconds_count {cumulative}",
                        f"invites_api_request_duration_seconds_sum {self.latency_sum:.6f}"]
            family("invites_api_request_duration_seconds", "histogram",
                   "Time from request line to response.", samples)
        family("invites_api_open_connections", "gauge", "Client connections open now.",
               [f"invites_api_open_connections {connections}"])
        family("invites_api_database_size_bytes", "gauge", "Database file and WAL size.",
               [f"invites_api_database_size_bytes {database_bytes}"])
        return "\n".join(lines) + "\n# EOF\n"


class Settings:
    """What the command line was told, in one place: built at its edge from the options (each
    setting named as its option is), read by serve, the backends and the routes."""

    # Serving: --max-connections, --timeout (idle seconds between requests), --request-timeout.
    max_connections = DEFAULT_MAX_CONNECTIONS
    timeout = DEFAULT_TIMEOUT
    request_timeout = DEFAULT_REQUEST_TIMEOUT
    # The XMPP server or program: --backend-timeout, --backend-concurrency.
    backend_timeout = DEFAULT_BACKEND_TIMEOUT
    backend_concurrency = DEFAULT_BACKEND_CONCURRENCY
    # The routes and pages.
    public_url = None  # --public-url: where invite URLs start ({host}), else the request's
    invite_url_template = None  # --invite-url: an external landing page instead of ours
    invite_ttl = DEFAULT_INVITE_TTL  # --invite-ttl
    site_name = None  # --site-name; None: the invite's host
    apps = None  # --apps: the "No app yet?" list; None: DEFAULT_APPS
    # --trust-proxy: None, or the one header a trusted reverse proxy sets ("x-forwarded-for",
    # "forwarded"; True means the first)
    trust_proxy = None
    metrics_token = None  # --metrics-token
    notify = None  # --notify-command: an argv run after each use of an invite on our page
    checks_per_minute = CHECKS_PER_MINUTE
    auth_failures_per_minute = AUTH_FAILURES_PER_MINUTE
    # The log: a text stream (serve's stderr) for what happened and what failed, or None; the
    # access log (a line a request) goes there too unless --quiet.
    log = None
    access_log = True

    def __init__(self, **values):
        for name, value in values.items():
            if not hasattr(Settings, name) or name.startswith("_"):
                raise TypeError(f"unknown setting {name!r}")
            setattr(self, name, value)
        self.public_url = self.public_url.rstrip("/") if self.public_url else None
        self.apps = DEFAULT_APPS if self.apps is None else self.apps
        self.trust_proxy = ("x-forwarded-for" if self.trust_proxy is True
                            else self.trust_proxy or None)

    def log_line(self, text):
        """Write one timestamped line to the log (if there is one)."""
        if self.log is not None:
            self.log.write(f"{iso(now())} {text}\n")
            self.log.flush()


DEFAULTS = Settings()  # (what a part made without settings reads)


class App:
    """What the request handler needs: the store, the backend, the settings; and what it keeps
    between requests (rate limiters, metrics, the problems it logged)."""

    def __init__(self, store, backend=BUILTIN, settings=DEFAULTS):
        self.store = store
        self.backend = backend  # who mints invites, and who makes the accounts of built-in ones
        self.settings = settings
        self.metrics = Metrics()
        self.signup_limiter = RateLimiter(SIGNUPS_PER_MINUTE)
        self.auth_limiter = RateLimiter(settings.auth_failures_per_minute)
        self.check_limiter = RateLimiter(settings.checks_per_minute)
        self._problems = {}  # cause -> [when last logged, times since]
        self._lock = threading.Lock()

    def log_line(self, text):
        """Write one timestamped line to the log (if there is one)."""
        self.settings.log_line(text)

    def log_problem(self, text, cause):
        """Log a failure that may recur on every request once per cause and minute."""
        # (The database is read-only, a backend is down.) The line says how often it happened.
        clock = time.monotonic()
        with self._lock:
            seen = self._problems.get(cause)
            if seen is not None and clock - seen[0] < 60:
                seen[1] += 1
                return
            if len(self._problems) > 100:
                self._problems.clear()
            self._problems[cause] = [clock, 0]
        if seen is not None and seen[1]:
            text += f" (and {seen[1]} more times since it was last logged)"
        self.log_line(text)

    def count_auth_failure(self, client, presented):
        """Count a failed authentication; log once when an address passes a limit this minute."""
        self.metrics.count("auth_failure")
        limiter = self.auth_limiter
        limiter.hit(client, guessed(presented))
        limiter.hit(client, "all")
        try:
            refuse_if_guessing(limiter, client, presented)
        except TooManyRequests:
            if limiter.first_time_over(client):
                self.log_line(f"{client.translate(_UNPRINTABLE)} passed the failed "
                              f"authentications allowed this minute ({limiter.per_minute} with "
                              f"one key id, {AUTH_FAILURES_PER_ADDRESS * limiter.per_minute} in "
                              "all); refusing it with 429 until the minute ends")


class InviteRequests:
    """The application's request handler: a route reads a request, calls one operation, answers;
    the invitee's pages among them. (make_server makes it an HTTP handler with StrictHTTP.)"""

    def setup(self):
        self.app = self.server.app  # (read by every route: an attribute, not a property)
        super().setup()

    @property
    def trust_proxy(self):
        return self.app.settings.trust_proxy

    def dispatch(self):
        """Route the request to its operation: the one boundary that turns errors into answers."""
        path, _, self.query = self.path.partition("?")
        self.form = None  # the sign-up form's fields, shown again with an error
        self.presented = ""  # the key it presented, once read (failures are counted by its id)
        try:
            for pattern, methods, cors, self.page in ROUTES:
                match = pattern.match(path)
                if match:
                    break
            else:  # (a person's browser gets a page; the path is not echoed)
                self.page = "text/html" in (self.headers.get("Accept") or "")
                raise NotFound("no such page here")
            allowed = tuple(methods) + (("OPTIONS",) if cors else ())
            if cors:
                self.response_headers += [("Access-Control-Allow-Methods", ", ".join(allowed)),
                                          *CORS_HEADERS]
            if self.command == "OPTIONS" and cors:
                return self.respond(204)
            if self.command not in methods:
                raise MethodNotAllowed(self.command, allowed)
            getattr(self, methods[self.command])(match.groupdict().get("token"))
        except Error as e:
            if isinstance(e, BadCredentials):
                self.app.count_auth_failure(self.client, self.presented)
            elif isinstance(e, (StoreError, BackendError)):
                self.app.log_problem(f"{type(e).__name__} on {self.command} "
                                     f"{self.redacted_path()}: {e}", cause=str(e))
            self.respond_error(e)
        except Exception:
            import traceback
            self.close_connection = True
            self.log_message("internal error on %s %s:\n%s", self.command, self.redacted_path(),
                             traceback.format_exc().rstrip())
            self.respond(500, "internal error\n")

    # -- routes -----------------------------------------------------------------------------

    def home(self, _):
        """What a person who opens the server's own address sees: GET /."""
        self.params()
        self.respond_html(200, lambda nonce: render_page(
            "Invites", "<h1>This server makes account invites</h1><p>Invites "
                       "come as links; open the link you were given. If you have "
                       "none, ask the person who runs this server for one.</p>",
            self.app.settings.site_name or "Invites", nonce))

    def health(self, _):
        """Say whether the database answers a read and a write: GET /health."""
        self.params()
        try:
            self.app.store.health()
        except StoreError as e:
            return self.respond_json(503, {"status": "error", "reason": e.public},
                                     [("Retry-After", "5")])
        self.respond_json(200, {"status": "ok"})

    def metrics(self, _):
        """Expose counters as OpenMetrics text: GET /metrics (with --metrics-token)."""
        self.params()
        if self.app.settings.metrics_token is not None:
            given = (self.headers.get("Authorization") or "").partition(" ")[2].strip()
            if not hmac.compare_digest(given.encode(), self.app.settings.metrics_token.encode()):
                raise Unauthorized("this needs the metrics token (Authorization: Bearer)")
        text = self.app.metrics.render(self.server.open_connections, self.app.store.size())
        self.respond(200, text, content_type="application/openmetrics-text; "
                                             "version=1.0.0; charset=utf-8")

    def api_create(self, _):
        """Create an invite: GET or POST /invites_api."""
        params = self.options("key", "redirect", *INVITE_OPTIONS)
        redirect = parse_bool("redirect", str(params.pop("redirect", "")))
        credentials = self.credentials(params.pop("key", ""))
        invite = create_invite(self.app.store, credentials, options=params,
                               default_ttl=self.app.settings.invite_ttl, backend=self.app.backend)
        self.app.metrics.count("invite", (invite["host"], invite["backend"]))
        url = self.invite_url(invite)
        status = 303 if redirect else 201
        if self.wants_json():
            return self.respond_json(status, invite_info(invite, url), [("Location", url)])
        self.respond(status, b"", [("Location", url)])

    def api_list(self, _):
        """List the key's invites a page at a time: GET /invites_api/invites."""
        # X-Total-Count says how many there are; a Link rel="next" gives the next page.
        params = self.params("key", "all", "status", "limit", "after")
        key = self.authenticate(params.get("key", ""))
        status = None if parse_bool("all", params.get("all", "")) else params.get("status", "valid")
        with bad_request():
            limit = parse_limit(params.get("limit", str(DEFAULT_LIST_LIMIT)))
        store = self.app.store
        invites, total = list_invites(store, key["host"], key["id"],
                                      None if status == "all" else status, limit,
                                      params.get("after"))
        headers = [("X-Total-Count", str(total))]
        if len(invites) == limit and total > limit:
            from urllib.parse import urlencode
            query = urlencode({**{k: v for k, v in params.items() if k != "key"}, "limit": limit,
                               "after": invites[-1]["id"]})
            next_page = f'{self.public_base(key["host"])}/invites_api/invites?{query}'
            headers.append(("Link", f'<{next_page}>; rel="next"'))
        self.respond_json(200, [invite_info(i, self.invite_url(i),
                                            invite_state(store, i, self.app.backend),
                                            store.accounts(i["id"])) for i in invites], headers)

    def api_show(self, reference):
        """Show one of the key's invites: GET /invites_api/invites/ID (or TOKEN)."""
        key = self.authenticate(self.params("key").get("key", ""))
        invite, status = show_invite(self.app.store, reference, self.app.backend, key["host"],
                                     key["id"])
        self.respond_json(200, invite_info(invite, self.invite_url(invite), status,
                                           self.app.store.accounts(invite["id"])))

    def api_revoke(self, reference):
        """Revoke one of the key's invites: DELETE /invites_api/invites/ID (or TOKEN)."""
        key = self.authenticate(self.params("key").get("key", ""))
        revoke_invite(self.app.store, reference, key["host"], key["id"], self.app.backend)
        self.respond(204)

    def api_redeem(self, token):
        """Use an invite of the key's host once: POST /invites_api/invites/TOKEN/redeem."""
        params = self.options("key", "username")
        key = self.authenticate(params.pop("key", ""))
        username = params.pop("username", None)
        if params:
            raise BadRequest(f"unknown option {sorted(params)[0]!r}")
        if username is not None and not isinstance(username, str):
            raise BadRequest("username must be a string")
        invite = redeem_invite(self.app.store, token, key["host"], username)
        self.respond_json(200, invite_info(invite, self.invite_url(invite)))

    def invite_check(self, token):
        """Tell a registration front end whether an invite is valid: GET /invite/TOKEN.json."""
        self.params()
        wait = self.app.check_limiter.hit(self.client)
        if wait:
            raise TooManyRequests("too many invite checks from your address", wait)
        self.respond_json(200, check_invite(self.app.store, token))

    # -- the invitee's pages: an invite's page, the sign-up form, its result -------------

    def invite_page(self, token):
        """Serve the landing page of an invite: /invite?TOKEN or /invite/TOKEN."""
        invite, status = find_invite(self.app.store, self.query if token is None else token,
                                     self.app.backend)
        if status != "valid":  # unknown: 404; used, revoked, expired: 410
            return self.respond_page(404 if invite is None else 410, status, invite)
        base = self.public_base(invite["host"])
        minter = minted_by(invite, self.app.backend)
        signup = f"{base}/register?t={invite['token']}" if minter.sign_up_accounts else None
        self.respond_html(200, lambda nonce: render_invite_page(
            invite, f"{base}/invite?{invite['token']}", self.site_name(invite),
            self.app.settings.apps, nonce, signup, in_apps=not minter.used_here),
            headers=[("Link", f'<{invite["uri"]}>; rel="alternate"')])

    def signup_page(self, _):
        """The sign-up form of a built-in invite: GET /register?t=TOKEN[&account=]."""
        params = self.params("t", "account")
        invite, status = find_invite(self.app.store, params.get("t", ""))
        if invite is None or minted_by(invite, self.app.backend).sign_up_accounts is None:
            return self.respond_page(404, None)
        if "account" in params:  # (Post/Redirect/Get) only an account this invite made or reset
            made = [a for a in self.app.store.accounts(invite["id"])
                    if a["username"] == params["account"] and a["action"] != "unconfirmed"]
            if not made:
                return self.respond_page(404, None)
            return self.respond_page(200, invite=invite, username=params["account"],
                                     done=made[0]["contact"] or True)
        if status != "valid":
            return self.respond_page(410, status)
        self.respond_page(200, invite=invite)

    def signup(self, _):
        """Use a built-in invite to make its account: POST /register, then 303 to the done page."""
        wait = self.app.signup_limiter.hit(self.client)  # (unknown tokens count too: no guessing)
        if wait:
            raise TooManyRequests("too many sign-up attempts from your address; try again in a "
                                  "minute", wait)
        fields = self.form_body("token", "user", "password", "password_confirm")
        invite = invite_by_token(self.app.store, fields.get("token", ""))  # (read once)
        accounts = invite and minted_by(invite, self.app.backend).sign_up_accounts
        if not accounts:  # (not ours, or nobody here makes accounts)
            return self.respond_page(404, None)
        if not self.same_origin(invite["host"]):
            raise Forbidden("this form can only be sent from its own page")
        self.form = {"invite": invite, "username": fields.get("user", "")}
        used, username, unfriended = sign_up(self.app.store, accounts, invite,
                                             fields.get("user", ""), fields.get("password", ""),
                                             fields.get("password_confirm", ""))
        if unfriended:  # (the account is made and kept: its page says to add the inviter by hand)
            self.app.log_line(f"sign-up of {username}@{used['host']}: the contact with "
                              f"{inviter_jid(used)} was not made: {unfriended}")
        from urllib.parse import quote
        done = (f"{self.public_base(invite['host'])}/register?t={used['token']}&"
                f"account={quote(username)}")
        self.respond(303, b"", [("Location", done)])
        notify = self.app.settings.notify
        if notify:  # after the answer: the inviter's news must not hold up the invitee
            notify_use(notify, used["id"], username, used["host"], self.app.log_line)

    def same_origin(self, host):
        """Return whether a form post comes from our own pages (the cross-site request defence)."""
        # An Origin that names a site must be ours, scheme included, whatever else is claimed;
        # then Sec-Fetch-Site, which every current browser sends, must be same-origin ("Origin:
        # null" with it: our page under a proxy's no-referrer). Without it, "null" is refused;
        # with neither header, it is no browser's.
        site, origin = self.headers.get("Sec-Fetch-Site"), self.headers.get("Origin")
        ours = (self.public_base(host), f"{self.scheme}://{self.authority}")
        if origin not in (None, "null", *ours):
            return False
        return site == "same-origin" if site is not None else origin != "null"

    def respond_page(self, status, unavailable=None, invite=None, username="", error=None,
                     done=False):
        """Answer with an invite unavailable (404, 410), the sign-up form, or its result."""
        site_name, apps = self.site_name(invite), self.app.settings.apps
        if done:  # (True, or a contact invite's outcome: made, failed, unknown)
            return self.respond_html(status, lambda nonce: render_signup_done(
                invite, username, site_name, apps, nonce, contact=done))
        if invite is not None and unavailable is None:
            return self.respond_html(status, lambda nonce: render_signup_page(
                invite, "/register", site_name, nonce, username, error), form=True)
        self.respond_html(status,
                          lambda nonce: render_unavailable_page(unavailable, site_name, nonce))

    def site_name(self, invite=None):
        return self.app.settings.site_name or (invite["host"] if invite is not None else "Invite")

    # -- reading requests -------------------------------------------------------------------

    def params(self, *allowed):
        """Return the query string as a dict; raise BadRequest if bad (see parse_fields)."""
        return parse_fields(self.query, allowed, "parameter")

    def form_body(self, *allowed):
        return form_fields(self.headers, self.body, allowed)

    def options(self, *allowed):
        """Return the query string's parameters with a JSON body's values (see with_json)."""
        return with_json(self.params(*allowed), json_fields(self.headers, self.body))

    def credentials(self, query_key):
        """Return the key this request presents, unless its address is refused for guessing."""
        try:
            self.presented = presented_key(self.headers.get_all("Authorization") or [], query_key)
        finally:  # (a malformed Authorization too: refused if its address guessed too often)
            refuse_if_guessing(self.app.auth_limiter, self.client, self.presented)
        return self.presented

    def authenticate(self, query_key):
        """Return the key row of this request's credentials (Authorization wins over ?key=)."""
        return authenticate(self.app.store, self.credentials(query_key))

    def wants_json(self):
        accept = (self.headers.get("Accept") or "") if self.headers is not None else ""
        return "application/json" in accept.lower()

    def public_base(self, host):
        """Return the scheme and authority invite URLs start with."""
        if self.app.settings.public_url:
            return self.app.settings.public_url.replace("{host}", host)
        address, port = self.server.server_address[:2]
        authority = self.authority or (f"[{address}]:{port}" if ":" in address
                                       else f"{address}:{port}")
        return f"{self.scheme}://{authority}"

    def invite_url(self, invite):
        return invite_url(invite, self.public_base(invite["host"]),
                          self.app.settings.invite_url_template)

    # -- answering --------------------------------------------------------------------------

    def respond_error(self, error):
        """Answer an Error: JSON if asked for, the sign-up form again, a page, or plain text."""
        message = error.public if isinstance(error, StoreError) else str(error)  # (no file path)
        if self.wants_json():
            return self.respond_json(error.status, {"error": message}, error.headers)
        if self.form is not None and isinstance(error, Gone):
            invite = self.app.store.invite(self.form["invite"]["id"])
            return self.respond_page(410, invite_status(invite))
        if self.form is not None and isinstance(error, (BadRequest, Conflict, BackendError)):
            reason = next((text for kind, text in _FORM_ERRORS if isinstance(error, kind)),
                          str(error))
            return self.respond_page(error.status, error=reason, **self.form)
        if self.page:  # a person reads it
            site_name = self.app.settings.site_name or "Invite"
            return self.respond_html(error.status, lambda nonce: render_error_page(
                error.status, message, site_name, nonce), headers=error.headers)
        self.respond(error.status, f"{message}\n", error.headers)

    def respond_json(self, status, data, headers=()):
        import json
        self.respond(status, json.dumps(data) + "\n", headers, content_type="application/json")

    def respond_html(self, status, render, form=False, headers=()):
        """Answer with the page render(nonce) makes, under its security headers."""
        nonce = _random_id(12)
        self.respond(status, render(nonce), tuple(headers) + page_headers(nonce, form),
                     content_type="text/html; charset=utf-8")

    # -- logging ----------------------------------------------------------------------------

    def redacted_path(self):
        """Return the request target fit for a log: key- or token-like parts redacted."""
        if not self.path:
            return "-"
        from urllib.parse import unquote_plus
        return redact(unquote_plus(self.path[:400], errors="replace")).translate(_UNPRINTABLE)

    def answered(self, code, seconds):
        self.app.metrics.request(code, seconds)
        if self.app.settings.access_log:
            self.log_message("%s %s %s %d %.1fms", self.client.translate(_UNPRINTABLE),
                             (self.command or "-")[:20].translate(_UNPRINTABLE),
                             self.redacted_path(),
                             code, seconds * 1000)

    def log_line(self, text):
        self.app.log_line(text)


# What a person sees on the sign-up form when the server failed (the reason goes to the log).
_FORM_ERRORS = (
    (OutcomeUnknown, "The server did not answer in time, so we cannot tell "
                     "whether it was done. Try logging in with this name and "
                     "password; if that does not work, ask for a new invite."),
    (BackendError, "The server could not do it just now. Please try again later."),
)


# ---------------------------------------------------------------------------
# Backends: Prosody, ejabberd or a program of yours mints invites and makes accounts
# ---------------------------------------------------------------------------

_URL_RE = re.compile(r"https?://\S+")
_URI_RE = re.compile(r"xmpp:\S+")
_PREAUTH_RE = re.compile(r"preauth=([A-Za-z0-9_-]+)")

# What a program may print that we keep (the rest is read and dropped): enough for an invite URL
# or an error message, bounded against a program that prints without end.
PROGRAM_OUTPUT_LIMIT = 64 * 1024


def run_program(argv, what, timeout, stdin=b"", env=None):
    """Run argv (never a shell) in a session of its own; return (status, stdout, stderr)."""
    # Raises BackendError if it cannot start, OutcomeUnknown after killing it and every process
    # it started at the timeout. No error text holds the arguments (a password or token).
    import selectors
    import subprocess
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, env=env)
    except OSError as e:
        raise BackendError(f"{what}: cannot run "
                           f"{os.path.basename(argv[0])!r}: {e.strerror}") from None
    deadline = time.monotonic() + timeout
    output = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    with proc, selectors.DefaultSelector() as selector:
        try:
            proc.stdin.write(stdin)  # (small: a password line; the pipe holds it)
            proc.stdin.close()
        except OSError:  # it did not wait for its input
            pass
        for stream in output:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            events = selector.select(left) if left > 0 else []
            if not events:
                _kill_tree(proc.pid)
                proc.wait()
                raise OutcomeUnknown(f"{what} timed out after {timeout:g} s") from None
            for key, _ in events:
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                elif len(output[key.fileobj]) < PROGRAM_OUTPUT_LIMIT:
                    output[key.fileobj] += data[:PROGRAM_OUTPUT_LIMIT - len(output[key.fileobj])]
        try:
            status = proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # it closed its output but goes on
            _kill_tree(proc.pid)
            proc.wait()
            raise OutcomeUnknown(f"{what} timed out after {timeout:g} s") from None
    return status, bytes(output[proc.stdout]), bytes(output[proc.stderr])


def _kill_tree(pid):
    """SIGKILL a program's process group and every process descended from it."""
    # su and sh may start sessions of their own, which a group kill misses; they are frozen
    # first, so that none forks meanwhile.
    import signal
    family = {pid}
    while True:
        for member in family:
            with contextlib.suppress(OSError):
                os.kill(member, signal.SIGSTOP)
        grown = family | _children_of(family)
        if grown == family:
            break
        family = grown
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    for member in family:
        with contextlib.suppress(OSError):
            os.kill(member, signal.SIGKILL)


def _children_of(parents):
    """Return the pids whose parent is in parents (from /proc)."""
    children = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rpartition(b")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in parents:
                children.add(int(name))
    return children


class ServerBackend(Backend):
    """An XMPP server (or a program) that mints invites: a timeout and a cap on calls at once."""

    def __init__(self, settings=DEFAULTS):
        self.settings, self.timeout = settings, settings.backend_timeout
        self._slots = threading.BoundedSemaphore(settings.backend_concurrency)

    @contextlib.contextmanager
    def slot(self):
        """Hold one of the calls that may run at once; raise Unavailable if none frees in time."""
        if not self._slots.acquire(timeout=self.timeout):
            raise Unavailable(f"all {self.name} backend slots are busy; try again")
        try:
            yield
        finally:
            self._slots.release()

    def mint(self, invite, roles=None, groups=None):
        host, username = invite["host"], invite["username"]
        try:
            valid = parse_host(host) == host
        except ValueError:
            valid = False
        if not valid:  # it reaches a program only as a checked domain name
            raise BadRequest(f"invalid host {host!r}")
        output = self.fetch(host, invite["expires_at"] - invite["created_at"], invite["uses"],
                            username, invite["type"], roles, groups, invite["inviter"])
        if isinstance(output, dict):  # (a server's answer as data: Prosody's)
            uri, url = output.get("uri") or None, output.get("url") or None
        else:  # a program's text: its last URL and xmpp: URI
            urls, uris = _URL_RE.findall(output), _URI_RE.findall(output)
            uri, url = (uris[-1] if uris else None), (urls[-1] if urls else None)
        if not uri and not url:
            self.fail("printed no invite URL or xmpp: URI")
        token = _PREAUTH_RE.search(uri or "") or re.search(r"[?/]([A-Za-z0-9_-]{16,})$", url or "")
        token = token.group(1) if token else None
        if uri is None and token:  # what an account (or contact) invite's URI is, by XEP-0401
            uri = (f"xmpp:{invite['inviter']}@{host}?roster;preauth={token};ibr=y"
                   if invite["inviter"] else
                   f"xmpp:{username + '@' if username else ''}{host}?register;preauth={token}")
        return {"token": token or invite["token"], "uri": uri or "", "url": url}

    def fetch(self, host, ttl, uses, username, kind, roles, groups, inviter):
        """Return the server's answer for one invite: text holding its URL or xmpp: URI, or
        {"url": ..., "uri": ...}."""
        raise NotImplementedError

    def fail(self, reason, output=b""):
        """Log the failure with the program's output (redacted) and raise BackendError."""
        detail = redact(output.decode("utf-8", "replace")).strip().replace("\n", " | ")[:1000]
        self.settings.log_line(f"{self.name} backend {reason}: {detail or '(no output)'}")
        raise BackendError(f"the {self.name} backend {reason}")


class CommandBackend(ServerBackend):
    """A program mints each invite: its argv's {host}, {ttl}, {uses}, {username}, {inviter}
    are filled in."""

    name = "command"

    def __init__(self, argv, settings=DEFAULTS):
        super().__init__(settings)
        self.template = list(argv)
        # The options whose placeholder appears are the ones it honours.
        self.options = frozenset(o for o in ("ttl", "uses", "username", "inviter")
                                 if any(f"{{{o}}}" in a for a in argv))

    def fetch(self, host, ttl, uses, username, kind, roles, groups, inviter):
        argv = fill_placeholders(self.template, host=host, ttl=ttl, uses=uses,
                                 username=username or "", inviter=inviter or "")
        with self.slot():
            try:
                status, stdout, stderr = run_program(argv, "the command backend", self.timeout)
            except BackendError as e:
                self.fail(str(e).replace("the command backend", "", 1).lstrip(": "))
        if status != 0:
            self.fail(f"exited with status {status}", stderr + stdout)
        return stdout.decode("utf-8", "replace")

    def check(self):
        import shutil
        program = self.template[0] if self.template else ""
        if not shutil.which(program):
            return f"command backend: {program!r} is not an executable program (or not on PATH)"
        return None

    def describe(self):
        return f"command backend, running {self.template[0]!r}"


def lua_string(text):
    """Return text as a Lua string literal: all but printable ASCII (and \\ and ") as \\ddd."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}"
                         for b in text.encode("utf-8")) + '"'


def prosody_socket(config=None):
    """Return the path of Prosody's admin socket, as its config (or Debian's default) sets it."""
    try:
        with open(config or "/etc/prosody/prosody.cfg.lua", encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError):
        text = ""

    def option(name, default):
        match = re.search(rf"""(?m)^\s*{name}\s*=\s*["']([^"']+)["']""", text)
        return match.group(1) if match else default
    return os.path.join(option("data_path", "/var/lib/prosody"),
                        option("admin_socket", "prosody.sock"))


# What prosodyctl shell sends first: a stream in Prosody's admin namespace.
_ADMIN_STREAM = (b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/"
                 b"streams' xmlns='xmpp:prosody.im/admin' xml:lang='en' id=''>")


class ProsodyAdmin:
    """A client of Prosody's admin socket, as `prosodyctl shell` is, on a few connections."""

    # Each command is <repl-input>LINE</repl-input>, answered by <repl-output>s and one
    # <repl-result> (type='error' on failure); one command at a time on a connection. One that
    # fails (Prosody restarted) is opened again, once, for the same command.

    def __init__(self, path, settings=DEFAULTS):
        import queue
        self.path, self.timeout = path, settings.backend_timeout
        self.idle = queue.LifoQueue()
        for _ in range(settings.backend_concurrency):
            self.idle.put(None)  # a free slot, not connected yet

    def run(self, line):
        """Run a line of Lua in Prosody's admin shell; return its answer; never send it twice."""
        # Raises BackendError (refused, or unreachable), Unavailable (busy) or OutcomeUnknown (the
        # line was sent but no answer came).
        import queue
        from xml.etree.ElementTree import ParseError
        try:
            conn = self.idle.get(timeout=self.timeout)
        except queue.Empty:
            raise Unavailable("every connection to Prosody is busy; try again") from None
        try:
            for attempt in (1, 2):
                sent = False
                try:
                    conn = conn or self._connect()
                    sent = self._send(conn, line)
                    ok, text = self._answer(conn)
                    break
                except (OSError, ParseError) as e:
                    # (a late answer on this connection would be taken for the next command's)
                    conn = conn and conn["sock"].close()
                    if sent:
                        raise OutcomeUnknown("no answer from Prosody's "
                                             f"admin socket: {e}") from None
                    if attempt == 2:
                        raise BackendError(f"cannot use Prosody's admin socket {self.path!r}: "
                                           f"{e}") from None
        finally:
            self.idle.put(conn)
        if not ok:
            raise BackendError(f"Prosody refused: {text.strip()[:300]}")
        return text

    def close(self):
        """Close the open connections."""
        for _ in range(self.idle.qsize()):
            conn = self.idle.get_nowait()
            if conn is not None:
                conn["sock"].close()
            self.idle.put(None)

    def _connect(self):
        import socket
        from xml.etree.ElementTree import XMLPullParser
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            sock.sendall(_ADMIN_STREAM)
        except OSError:
            sock.close()
            raise
        return {"sock": sock, "parser": XMLPullParser(("start", "end")), "depth": 0, "stream": None}

    def _send(self, conn, line):
        """Send one line and return True; a failure raises OSError (a cut line runs nothing)."""
        import socket
        from xml.sax.saxutils import escape
        # A connection Prosody closed while idle (a restart) is seen before anything is sent.
        sock = conn["sock"]
        if select.select([sock], [], [], 0)[0] and not sock.recv(1, socket.MSG_PEEK):
            raise OSError("Prosody closed the connection")
        sock.sendall(f"<repl-input>{escape(line)}</repl-input>".encode("utf-8"))
        return True

    def _answer(self, conn):
        """Return (ok, text) of the next <repl-result>, with the <repl-output>s before it."""
        texts = []
        while True:
            for event, element in conn["parser"].read_events():
                conn["depth"] += 1 if event == "start" else -1
                if event == "start" and conn["stream"] is None:
                    conn["stream"] = element
                elif event == "end" and conn["depth"] == 1:  # a whole stanza of the stream
                    conn["stream"].remove(element)  # (the stream would keep every one)
                    texts.append(element.text or "")
                    if element.tag.endswith("}repl-result"):
                        return element.get("type") != "error", "\n".join(texts)
            data = conn["sock"].recv(65536)
            if not data:
                raise OSError("Prosody closed the connection")
            conn["parser"].feed(data)


# Prosody's own mod_invites and usermanager, run in its admin shell (">" is a line of Lua): every
# value goes in as a Lua literal (lua_string, a number or nil), never as text pasted into code.
# Each returns its answer as JSON (Prosody's util.json), read as such by ProsodyBackend.lua.
_PROSODY_INVITES = ('local J = require"util.json".encode if not prosody.hosts[{host}] then '
                    'error({host} .. " is not a host of this Prosody") end local m = '
                    'require"core.modulemanager".get_module({host}, "invites") if '
                    'not m then error("mod_invites is not loaded on " .. {host}) end ')
# (usermanager on a host Prosody does not serve fails with "attempt to index a nil value")
# An account's answer: {{"outcome": "done", "taken", "missing", "refused" (with "reason") or
# "nohost"}}.
_PROSODY_USERS = ('local J = require"util.json".encode local um = require"core.usermanager" '
                  'if not prosody.hosts[{host}] then return true, J({{outcome = "nohost"}}) end ')
_PROSODY_DONE = 'return true, J({{outcome = "done"}})'
_PROSODY_REFUSED = ('if not ok then return true, J({{outcome = "refused", reason = tostring(e)}}) '
                    'end ')
_PROSODY_INVITE = 'return true, J({{url = i.landing_page, uri = i.uri}})'
_PROSODY_LUA = {
    "register": _PROSODY_INVITES + (
        'local i = assert(m.create_account({username}, {extra}, {ttl})) ' + _PROSODY_INVITE),
    "reset": _PROSODY_INVITES + (
        'local i = assert(m.create_account_reset({username}, {ttl})) ' + _PROSODY_INVITE),
    # (registration allowed: a contact-only invite fails on Prosody 0.12.0 to 0.12.4)
    "contact": _PROSODY_INVITES + (
        'if not require"core.usermanager".user_exists({inviter}, {host}) then error({inviter} '
        '.. "@" .. {host} .. " has no account: a contact invite needs its inviter") end '
        'local i = assert(m.create_contact({inviter}, true, {extra}, {ttl})) ' + _PROSODY_INVITE),
    "status": _PROSODY_INVITES + (
        'local i, e = m.get_account_invite_info({token}) return true, J(i and "valid" or e)'),
    "delete": _PROSODY_INVITES + 'm.delete_account_invite({token}) return true, J(true)',
    "create_user": _PROSODY_USERS + (
        'if um.user_exists({username}, {host}) then return true, J({{outcome = "taken"}}) end '
        'local ok, e = um.create_user({username}, {password}, {host}) ' + _PROSODY_REFUSED
        + _PROSODY_DONE),
    "set_password": _PROSODY_USERS + (
        'if not um.user_exists({username}, {host}) then return true, J({{outcome = "missing"}}) '
        'end local ok, e = um.set_password({username}, {password}, {host}, nil) '
        + _PROSODY_REFUSED + _PROSODY_DONE),
    "user_exists": _PROSODY_USERS + (
        'return true, J({{outcome = um.user_exists({username}, {host}) and "done" or "missing"}})'),
    # Each other's contacts (subscription both) and a roster push to each: Prosody 13's mod_roster
    # subscribe_both (its shell's roster:subscribe_both), else (0.12) what its
    # mod_invites_register does at a contact invite's registration.
    "befriend": _PROSODY_USERS + (
        'if not um.user_exists({inviter}, {host}) then return true, J({{outcome = "missing"}}) end '
        'local rm, a, b = require"core.rostermanager", {username} .. "@" .. {host}, '
        '{inviter} .. "@" .. {host} '
        'local r = require"core.modulemanager".get_module({host}, "roster") '
        'if r and r.subscribe_both then assert(r.subscribe_both(a, b)) else '
        'for _, p in ipairs({{{{{username}, {inviter}, a, b}}, {{{inviter}, {username}, b, a}}}}) '
        'do rm.set_contact_pending_out(p[1], {host}, p[4]) '
        'rm.set_contact_pending_in(p[2], {host}, p[3]) '
        'rm.subscribed(p[2], {host}, p[3]) '
        'rm.process_inbound_subscription_approval(p[1], {host}, p[4]) end end '
        'rm.roster_push({inviter}, {host}, a) rm.roster_push({username}, {host}, b) '
        + _PROSODY_DONE),
    # In the account's own storage, which Prosody deletes with the account.
    "account_mark": _PROSODY_USERS + (
        'if not um.user_exists({username}, {host}) then return true, J({{outcome = "missing"}}) '
        'end local s = require"core.storagemanager".open({host}, "invites_api") '
        'local d = s:get({username}) or {{}} '
        'if not d.mark and {new} then d.mark = {new} assert(s:set({username}, d)) end '
        'return true, J({{outcome = "done", mark = d.mark}})'),
    "hosts": ('local s = {{}} for n in pairs(prosody.hosts) do s[#s + 1] = n end '
              'return true, require"util.json".encode(s)'),
    "modules": ('local s = {{}} for n in pairs(require"core.modulemanager".get_modules({host})) do '
                's[#s + 1] = n end return true, require"util.json".encode(s)'),
}


def _lua_literal(value):
    """Return a value as Lua: a string, a number, nil, or a table of them (dict or tuple)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_lua_literal(v)}" for k, v in value.items() if v) + " }"
    if isinstance(value, tuple):
        return "{ " + ", ".join(map(_lua_literal, value)) + " }"
    return "nil" if value is None else str(value) if isinstance(value, int) else lua_string(value)


class ProsodyBackend(ServerBackend, AccountMaker):
    """Prosody 0.12+ through its admin socket: mod_invites mints, usermanager makes accounts."""

    name = "prosody"
    missing_is_final = False  # a command sent but unanswered may still run in Prosody later

    def __init__(self, config=None, socket=None, settings=DEFAULTS):
        super().__init__(settings)
        self.admin = ProsodyAdmin(socket or prosody_socket(config), settings)
        self.version = None

    @property
    def options(self):
        major = (self.version or "").split(".")[0]
        newer = major.isdigit() and int(major) >= 13
        return frozenset({"username", "ttl", "reset", "inviter"}
                         | ({"roles", "groups"} if newer else set()))

    def refusal_reason(self, option):
        return (f" on Prosody {self.version or '(version unknown)'}: roles and groups need "
                "Prosody 13")

    def lua(self, name, **values):
        """Run one of _PROSODY_LUA with values as Lua literals; return its answer (JSON's)."""
        import json
        code = _PROSODY_LUA[name].format(**{k: _lua_literal(v) for k, v in values.items()})
        text = self.admin.run(">" + code).partition("OK: ")[2].strip()
        try:
            return json.loads(text)
        except ValueError:
            raise BackendError(f"Prosody gave an answer we do not know: {text[:100]!r}") from None

    def fetch(self, host, ttl, uses, username, kind, roles, groups, inviter):
        if inviter and username:
            raise BadRequest("Prosody's contact invites cannot be bound to a username "
                             f"(this one is from {inviter}@{host})")
        try:
            if groups and "invites_groups" not in self.lua("modules", host=host):
                raise BadRequest(f"groups need mod_invites_groups on {host} (Prosody 13)")
            extra = {"roles": roles, "groups": groups} if roles or groups else None
            if inviter:  # Prosody's own contact invite: it makes the contact at registration
                return self.lua("contact", host=host, inviter=inviter, ttl=ttl, extra=extra)
            return self.lua(kind, host=host, username=username, ttl=ttl, extra=extra)
        except BackendError as e:
            self.fail(str(e).replace("Prosody refused: ", "answered "))

    def status(self, invite):
        try:
            state = self.lua("status", host=invite["host"], token=invite["token"])
        except Error:
            return "unknown", None
        # Prosody forgets an invite once used (or deleted there): gone, not revoked by us, is used.
        return {"valid": "valid", "token-expired": "expired", "token-invalid": "used"}.get(
            state, "unknown"), None

    def revoke(self, invite):
        self.lua("delete", host=invite["host"], token=invite["token"])

    # -- accounts (--accounts prosody): the password travels only on the socket, as a Lua literal

    def create(self, host, username, password):
        """Create username@host; raise Conflict (taken), BadRequest (password), BackendError."""
        taken = Conflict(f"{username}@{host} is taken; choose another name")
        self.answer("create_user", "taken", taken, host=host, username=username, password=password)

    def reset(self, host, username, password):
        """Set username@host's password; raise Conflict if there is no such account."""
        self.answer("set_password", "missing", Conflict(f"there is no account {username}@{host}"),
                    host=host, username=username, password=password)

    def exists(self, host, username):
        """Return whether username@host is an account; raise BackendError."""
        return self.answer("user_exists", "missing", False, host=host, username=username) is True

    def befriend(self, host, username, inviter):
        """Make username and inviter each other's contacts; raise Conflict if inviter is gone."""
        self.answer("befriend", "missing", Conflict(f"{inviter}@{host} has no account"),
                    host=host, username=username, inviter=inviter)

    def mark(self, host, username, new=None):
        """Return the account's mark (new: one to give it if it has none), or None if none."""
        answer = self.lua("account_mark", host=host, username=username, new=new)
        if isinstance(answer, dict) and answer.get("outcome") == "done":
            return str(answer.get("mark") or "none")
        return self.answer(None, "missing", None, answer=answer, host=host)

    def answer(self, name, word, meaning, answer=None, **values):
        """Run one of _PROSODY_LUA: True for the outcome "done", what word means (raised if an
        Error)."""
        answer = self.lua(name, **values) if answer is None else answer
        outcome = answer.get("outcome") if isinstance(answer, dict) else None
        if outcome == "refused":
            reason = str(answer.get("reason"))[:200]
            if "assword" in reason or "SASLprep" in reason:  # the server's check of the password
                raise BadRequest(f"the server refused the password: {reason}")
            raise BackendError(f"Prosody could not do it: {reason}")
        if outcome == "nohost":
            raise BackendError(f"{values['host']} is not a host of this Prosody")
        if outcome not in ("done", word):
            raise BackendError(f"Prosody gave an answer we do not know: {str(answer)[:100]!r}")
        if isinstance(meaning, Exception) and outcome == word:
            raise meaning
        return True if outcome == "done" else meaning

    def check(self):
        try:
            self.version = self.admin.run("server:version()").partition("OK: ")[2].strip() or None
            return None
        except Error as e:
            return ("prosody backend: cannot reach Prosody's admin shell through its socket "
                    f"({e}): is Prosody running with mod_admin_shell, and may this user open "
                    "the socket? (run as prosody, or in its group: see docs/backends.md)")

    def check_hosts(self, hosts):
        served = self.lua("hosts") if hosts else []
        warnings = [f"prosody backend: {host} is not a host of this Prosody: invites for it cannot "
                    "be made" for host in hosts if host not in served]
        for host in [h for h in hosts if h in served]:  # what the invitee's journey needs
            loaded = set(self.lua("modules", host=host))
            missing = [m for m in ("invites", "invites_register", "invites_page")
                       if m not in loaded]
            if missing:
                warnings.append(
                    f"prosody backend: {host} lacks mod_{', mod_'.join(missing)}: invites made "
                    "there cannot " + ("be made" if "invites" in missing
                                       else "be used from an app" if "invites_register" in missing
                                       else "have Prosody's page (ours is used)"))
        return warnings

    def check_accounts(self, hosts):
        """Return warnings about what making accounts for these hosts lacks."""
        problem = self.version is None and self.check()
        if problem:
            return [f"--accounts prosody: {problem}"]
        served = self.lua("hosts")
        return [f"--accounts prosody: {host} is not a host of this Prosody: sign-ups for it will "
                "fail" for host in hosts if host not in served]

    def describe(self):
        return (f"prosody backend{' ' + self.version if self.version else ''}, through its admin "
                f"socket {self.admin.path}")

    def describe_accounts(self):
        return "prosody"


class Accounts(AccountMaker):
    """Makes the accounts of built-in invites by running a program (--accounts command)."""

    # Its argv may hold {action} (create, reset, exists, mark or befriend), {username}, {host} and
    # {inviter} (befriend's; also $INVITES_API_INVITER); the password comes on its standard input,
    # never in its arguments. Exit status 0: done (exists: it does; mark: it printed the account's
    # mark; befriend: username and inviter are each other's contacts); 3: the name is taken
    # (reset, exists, mark: no such account; befriend: the inviter has none); else the server
    # failed (502). A mark is any text a later account of the
    # same name would not have (its creation time, say): a reset sets only its own's password.

    name = "command"
    missing_is_final = True  # after a timeout it and all it started are killed: missing stays so

    def __init__(self, argv, settings=DEFAULTS):
        self.template, self.timeout = list(argv), settings.backend_timeout

    def create(self, host, username, password):
        """Create username@host; raise Conflict (taken), BackendError or OutcomeUnknown."""
        if self.run("create", host, username, password)[0] == 3:
            raise Conflict(f"{username}@{host} is taken; choose another name")

    def reset(self, host, username, password):
        """Set username@host's password; raise Conflict if there is no such account."""
        if self.run("reset", host, username, password)[0] == 3:
            raise Conflict(f"there is no account {username}@{host}")

    def exists(self, host, username):
        """Return whether username@host exists; raise BackendError if the server cannot tell."""
        return self.run("exists", host, username, "")[0] == 0

    def befriend(self, host, username, inviter):
        """Make username and inviter each other's contacts; raise Conflict if inviter is gone."""
        if self.run("befriend", host, username, "", inviter)[0] == 3:
            raise Conflict(f"{inviter}@{host} has no account")

    def mark(self, host, username, new=None):
        """Return what tells username@host from a later account of its name (None: no account)."""
        status, output = self.run("mark", host, username, "")
        if status == 0 and not output.strip():
            raise BackendError("the accounts program printed no mark for the account")
        return output.strip()[:200] if status == 0 else None

    def describe_accounts(self):
        return "command"

    def run(self, action, host, username, password, inviter=""):
        """Run the program for one action; return its exit status (0 or 3, else raise), output."""
        argv = fill_placeholders(self.template, action=action, username=username, host=host,
                                 inviter=inviter)
        env = dict(os.environ, INVITES_API_INVITER=inviter) if inviter else None
        status, stdout, stderr = run_program(argv, "the accounts program", self.timeout,
                                             password.encode("utf-8") + b"\n", env)
        if status not in (0, 3):
            detail = redact((stderr or stdout).decode("utf-8", "replace")).strip()[:300]
            raise BackendError(f"the accounts program exited with status {status}: {detail}")
        return status, stdout.decode("utf-8", "replace")


# A list_invites row's fields, as the API's JSON names them (ejabberdctl prints them in this
# order, a tab between them, a row a line).
_EJABBERD_INVITE_FIELDS = ("token", "valid", "created_at", "expires", "type", "inviter", "invitee",
                           "account_name", "token_uri", "landing_page")


class EjabberdCtl:
    """ejabberd's commands through ejabberdctl: an Erlang VM per call, arguments in its argv."""

    # (visible to local users while it runs, passwords included: the API is better)
    display_name = "ejabberdctl"

    def __init__(self, ejabberdctl="ejabberdctl", settings=DEFAULTS):
        self.ejabberdctl, self.timeout = ejabberdctl, settings.backend_timeout

    def call(self, command, **args):
        """Run one command, its arguments in the given order; return (exit status, its answer:
        text, or for a listing what the API's JSON holds: list_invites' rows as dicts,
        registered_vhosts' names)."""
        argv = [";".join(v) if isinstance(v, list) else v for v in args.values()]  # (its lists)
        status, stdout, stderr = run_program([self.ejabberdctl, command, *argv],
                                             "ejabberdctl", self.timeout)
        text = (stdout + stderr).decode("utf-8", "replace")
        if status == 0 and command == "list_invites":  # (read here, once: the rest sees JSON's)
            rows = (line.split("\t") for line in text.splitlines())
            return status, [dict(zip(_EJABBERD_INVITE_FIELDS, row)) for row in rows
                            if len(row) == len(_EJABBERD_INVITE_FIELDS)]
        if status == 0 and command == "registered_vhosts":
            return status, text.split()
        return status, text

    def check(self):
        """Return why ejabberd cannot be used (it does not answer), or None."""
        code, output = self.call("status")
        if code:
            return f"ejabberd does not answer ejabberdctl: {redact(output).strip()[:200]}"
        return None

    def hosts(self):
        """Return the hosts ejabberd serves."""
        code, names = self.call("registered_vhosts")
        return names if code == 0 and isinstance(names, list) else []

    def describe(self):
        return f"through ejabberdctl {self.ejabberdctl} (an Erlang VM per call)"


class EjabberdApi(EjabberdCtl):
    """ejabberd's commands through its HTTP API (mod_http_api), on persistent connections."""

    # POST URL/COMMAND with the arguments as JSON, optionally with basic auth ("user@host:password")
    # or an OAuth token. Answers: (0, or the failure's status; the JSON value, a failure's text).
    display_name = "ejabberd's API"

    def __init__(self, url, settings=DEFAULTS, auth=None):
        from urllib.parse import urlsplit
        self._idle, self._lock = [], threading.Lock()  # (first: close() runs if the URL is refused)
        parts = urlsplit(url)
        if parts.username or parts.password:  # (a URL is shown in messages: no secret in it)
            raise Error("--ejabberd-api: put credentials in "
                        "--ejabberd-api-auth-file, not in the URL")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Error(f"--ejabberd-api {url!r}: expected http://HOST:PORT/api")
        self.url, self.timeout, self.parts = url, settings.backend_timeout, parts
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            self.headers["Authorization"] = ("Basic " + base64.b64encode(auth.encode()).decode()
                                             if ":" in auth else "Bearer " + auth)

    def call(self, command, **args):
        import http.client
        import json
        conn, sent = self._connection(), False
        try:
            conn.request("POST", f"{self.parts.path.rstrip('/')}/{command}", json.dumps(args),
                         self.headers)
            sent = True
            response = conn.getresponse()
            body = response.read(1 << 20)
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            why = (f"timed out after {self.timeout:g} s" if isinstance(e, TimeoutError)
                   else type(e).__name__)
            raise (OutcomeUnknown if sent else BackendError)(f"ejabberd's API {why}") from None
        with self._lock:
            self._idle.append(conn)
        try:
            value = json.loads(body or b"null")
        except ValueError:
            value = body.decode("utf-8", "replace")
        if response.status != 200:
            return response.status, str(value.get("message", value) if isinstance(value, dict)
                                        else value)
        if isinstance(value, int) and command != "status":  # (a command's result code)
            return value, str(value)
        return 0, value if isinstance(value, (list, dict)) else str(value)

    def close(self):
        """Close the idle connections."""
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()

    __del__ = close

    def _connection(self):
        """Return an idle connection that ejabberd has not closed, or a new one."""
        import http.client
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.sock is not None and not select.select([conn.sock], [], [], 0)[0]:
                    return conn
                conn.close()  # (closed by ejabberd, or an answer nobody asked for)
        factory = (http.client.HTTPSConnection if self.parts.scheme == "https"
                   else http.client.HTTPConnection)
        return factory(self.parts.hostname, self.parts.port, timeout=self.timeout)

    def check(self):
        try:
            code, output = self.call("status")
        except BackendError as e:
            return f"ejabberd's API at {self.url} does not answer: {e}"
        if code:
            return (f"ejabberd's API at {self.url} refused ({code}): {output.strip()[:200]} "
                    "(see api_permissions)")
        return None

    def describe(self):
        return f"through its HTTP API {self.url}"


def make_ejabberd(api=None, auth_file=None, ejabberdctl="ejabberdctl", settings=DEFAULTS):
    """Return ejabberd's commands' client: its HTTP API if a URL is given, else ejabberdctl."""
    if not api:
        return EjabberdCtl(ejabberdctl, settings)
    auth = None
    if auth_file:
        try:
            with open(auth_file) as f:
                auth = f.read().strip()
        except OSError as e:
            raise Error(f"--ejabberd-api-auth-file {auth_file!r}: {e.strerror}") from None
    return EjabberdApi(api, settings, auth)


class EjabberdBackend(ServerBackend, AccountMaker):
    """ejabberd through an EjabberdCtl or EjabberdApi: mod_invites (26.01+) mints, and accounts."""

    # Invites: generate_invite (and generate_invite_with_username, generate_reset_token of 26.07),
    # an invite's state from list_invites, delete_invite_by_token; ejabberd sets an invite's
    # lifetime itself (token_expire_seconds), each for one account. Accounts (23.01+): register,
    # and for resets check_account, change_password (mod_admin_extra) and a mark in the
    # account's private storage (mod_private, which ejabberd deletes with the account).

    name = "ejabberd"
    options = frozenset({"username", "reset"})
    missing_is_final = False

    def __init__(self, ejabberd, settings=DEFAULTS):
        super().__init__(settings)
        self.ejabberd = ejabberd
        self._listed = {}  # host: (when, its invites): a listing asks once a page, not an invite
        self._release = None

    def refusal_reason(self, option):
        return {"ttl": ": ejabberd gives every invite its own lifetime (mod_invites' "
                       "token_expire_seconds)",
                "uses": ": ejabberd's invites are for one account each",
                "inviter": ": ejabberd's API has no contact invites; use the built-in store "
                           "(--backend builtin) with --accounts ejabberd, whose sign-up makes "
                           "the contact",
                }.get(option, ": ejabberd's invites have no roles or groups")

    def call(self, command, **args):
        """Run one of ejabberd's commands; return its output, or raise BackendError."""
        # num_invites_exceeded answers 503.
        with self.slot():
            try:
                code, output = self.ejabberd.call(command, **args)
            except BackendError as e:
                self.fail(str(e))
        text = output if isinstance(output, str) else ""  # (a listing, or JSON's object)
        if "Virtual host not known" in text or "nknown host" in text:
            raise BackendError(f"{args.get('host')} is not a host of this ejabberd")
        if "num_invites_exceeded" in text:
            raise Unavailable("ejabberd refused: num_invites_exceeded (mod_invites keeps at most "
                              "1,000 invites of one inviter that are open or used; used ones go "
                              "with our purge)")
        if code != 0:
            self.fail(f"{command} failed ({code})", output.encode())
        return output

    def fetch(self, host, ttl, uses, username, kind, roles, groups, inviter):
        if kind == "reset":
            answer = self.call("generate_reset_token", username=username, host=host)
        elif username:
            answer = self.call("generate_invite_with_username", username=username, host=host)
        else:
            answer = self.call("generate_invite", host=host)
        return _answer_text(answer)  # (its URL or URI, for mint)

    def invites(self, host, fresh=False):
        """Return ejabberd's invites of host, {token: row}, at most 1 s old unless fresh."""
        when, listed = self._listed.get(host, (0, None))
        if fresh or listed is None or time.monotonic() - when > 1:
            rows = self.call("list_invites", host=host)
            listed = {row["token"]: row for row in rows if isinstance(row, dict) and "token" in row}
            self._listed[host] = (time.monotonic(), listed)
        return listed

    def status(self, invite):
        try:
            row = self.invites(invite["host"]).get(invite["token"])
        except Error:
            return "unknown", None
        if row is None:  # deleted or cleaned up in ejabberd: we cannot tell which
            return "unknown", None
        if row.get("invitee"):
            return "used", row["invitee"]
        return ("valid" if str(row.get("valid")).lower() == "true" else "expired"), None

    def revoke(self, invite):
        try:
            self.call("delete_invite_by_token", host=invite["host"], token=invite["token"])
        except BackendError:  # (26.01 has only expire_invite_by_token)
            self.call("expire_invite_by_token", host=invite["host"], token=invite["token"])

    def sweep(self, store):
        # Record the uses ejabberd saw of our invites, and delete there those we know are used or
        # revoked (they count towards mod_invites' cap until deleted).
        for host in store.backend_hosts(self.name):
            for token, row in self.invites(host, fresh=True).items():
                ours = invite_by_token(store, token)
                if ours is None or ours["backend"] != self.name:
                    continue
                if row["invitee"] and invite_status(ours) == "valid":
                    record_use(store, ours, row["invitee"])
                if row["invitee"] or invite_status(ours) in ("used", "revoked"):
                    self.call("delete_invite_by_token", host=host, token=token)

    def check(self):
        problem = self.ejabberd.check()
        return f"ejabberd backend: {problem}" if problem else None

    def check_hosts(self, hosts):
        served = self.ejabberd.hosts() if hosts else []
        return [f"ejabberd backend: {host} is not a host of this ejabberd: invites for it "
                "cannot be made" if host not in served else f"ejabberd backend: {host} lacks "
                "mod_invites (ejabberd 26.01 or newer): invites for it cannot be made"
                for host in hosts
                if host not in served or self.ejabberd.call("list_invites", host=host)[0] != 0]

    def describe(self):
        return f"ejabberd backend, {self.ejabberd.describe()}"

    # -- accounts (--accounts ejabberd) ---------------------------------------------------

    def create(self, host, username, password):
        code, output = self.ejabberd.call("register", user=username, host=host, password=password)
        if code != 0 and "already registered" in output:
            raise Conflict(f"{username}@{host} is taken; choose another name")
        self.raise_unless_ok(code, output, host)

    def reset(self, host, username, password):
        if not self.exists(host, username):
            raise Conflict(f"there is no account {username}@{host}")
        self.raise_unless_ok(*self.ejabberd.call("change_password", user=username, host=host,
                                                 newpass=password))

    def exists(self, host, username):
        code, output = self.ejabberd.call("check_account", user=username, host=host)
        if code in (401, 403):  # (only the API answers so)
            raise BackendError(f"ejabberd's API refused check_account ({code}): "
                               f"{redact(output).strip()[:200]} (see api_permissions)")
        if code not in (0, 1) or "nknown command" in output or "not found" in output.lower():
            # (no mod_admin_extra, or ejabberd is down): no answer
            self.raise_unless_ok(code or 1, output)
        return code == 0

    def befriend(self, host, username, inviter):
        """Make username and inviter each other's contacts (add_rosteritem both ways, which
        pushes each to the other's connected resources); raise Conflict if inviter is gone."""
        if not self.exists(host, inviter):
            raise Conflict(f"{inviter}@{host} has no account")
        # 23.01 names a group ("" none, ";" between several); 24.02 and later, a list of groups.
        group = {"groups": []} if self.release() >= 24 else {"group": ""}
        for user, contact in ((username, inviter), (inviter, username)):
            self.raise_unless_ok(*self.ejabberd.call(
                "add_rosteritem", localuser=user, localhost=host, user=contact, host=host,
                nick=contact, **group, subs="both"), host)

    def release(self):
        """Return ejabberd's major version (23, 24, 26...), asked once."""
        if self._release is None:
            found = re.search(r"ejabberd (\d+)\.", self.ejabberd.call("status")[1])
            self._release = int(found.group(1)) if found else 0
        return self._release

    def mark(self, host, username, new=None):
        if not self.exists(host, username):
            return None
        for attempt in ("read", "written"):
            code, output = self.ejabberd.call("private_get", user=username, host=host,
                                              element="invites-api", ns="urn:x-invites-api")
            found = re.search(r"<mark>([A-Za-z0-9_-]+)</mark>", _answer_text(output))
            if code == 0 and (found or new is None):
                return found.group(1) if found else "none"
            if code != 0 or attempt == "written":
                raise BackendError("ejabberd kept no mark for the "
                                   "account (is mod_private enabled?)")
            code, output = self.ejabberd.call("private_set", user=username, host=host, element=(
                f"<invites-api xmlns='urn:x-invites-api'><mark>{new}</mark></invites-api>"))

    def check_accounts(self, hosts):
        problem = self.ejabberd.check()
        if problem:
            return [f"--accounts ejabberd: {problem}"]
        try:
            self.exists(hosts[0] if hosts else "localhost", "invites-api-probe")
        except BackendError as e:
            return [f"--accounts ejabberd: {e}" if "refused" in str(e) else "--accounts ejabberd: "
                    "ejabberd lacks check_account and change_password (enable mod_admin_extra): "
                    "password resets cannot work"]
        return [f"--accounts ejabberd: {host} is not a host of this ejabberd: sign-ups for it will "
                "fail" for host in hosts if host not in self.ejabberd.hosts()]

    def describe_accounts(self):
        return f"ejabberd, {self.ejabberd.describe()}"

    def raise_unless_ok(self, code, output, host="that host"):
        """Raise BackendError (or BadRequest: the password refused) unless code is 0."""
        if code != 0 and ("Virtual host not known" in output or "nknown host" in output):
            raise BackendError(f"{host} is not a host of this ejabberd")
        if code != 0:
            lines = [line for line in redact(output).splitlines() if line.strip()
                     and "inet_config" not in line and "ERROR REPORT" not in line]
            if "password" in output.lower():
                raise BadRequest(f"the server refused the password: {' | '.join(lines)[:200]}")
            raise BackendError(f"{self.ejabberd.display_name} failed ({code}): "
                               f"{' | '.join(lines)[:300]}")


def _answer_text(answer):
    """Return the text of one of ejabberd's answers: a string, or the values of the API's object
    (private_get's element, an invite's URL), a space between them."""
    return " ".join(map(str, answer.values())) if isinstance(answer, dict) else str(answer)


def fill_placeholders(template, **values):
    """Return an argv template with each {name} in its elements replaced by values[name]."""
    argv = []
    for element in template:
        for name, value in values.items():
            element = element.replace(f"{{{name}}}", str(value))
        argv.append(element)
    return argv


def split_command(command, option, placeholders):
    """Return a command template's argv, split as a shell would (never run by one); raise Error."""
    import shlex
    try:
        argv = shlex.split(command or "")
    except ValueError as e:
        raise Error(f"{option} {command!r}: {e}") from None
    if not argv:
        raise Error(f"this needs {option} 'PROGRAM ARGS... {placeholders}'")
    return argv


def make_backend(name, accounts=None, prosody_config=None, prosody_socket=None, ejabberd=None,
                 command=None, settings=DEFAULTS):
    """Return the Backend called name, with who makes built-in invites' accounts; raise Error."""
    if name == "builtin":
        return Builtin(accounts)
    if name == "prosody":
        backend = ProsodyBackend(prosody_config, prosody_socket, settings)
    elif name == "ejabberd":
        backend = EjabberdBackend(ejabberd or EjabberdCtl(settings=settings), settings)
    elif name == "command":
        backend = CommandBackend(split_command(command, "--backend-command", "{host}"), settings)
    else:
        raise Error(f"unknown backend {name!r}: use builtin, prosody, ejabberd or command")
    backend.accounts = accounts  # (for built-in invites made before this backend was chosen)
    return backend


# ---------------------------------------------------------------------------
# Rendering: the invitee's pages, and QR codes (the encoder last)
# ---------------------------------------------------------------------------

# -- the invite page ---------------------------------------------------------


def load_apps(path):
    """Return the app list from a JSON file of {platform, name, url}; raise Error if bad."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            apps = json.load(f)
    except (OSError, ValueError) as e:
        raise Error(f"cannot read the app list {path!r}: {e}") from None
    if not isinstance(apps, list) or not all(
            isinstance(a, dict) and all(isinstance(a.get(k), str) and a[k]
                                        for k in ("platform", "name", "url"))
            and re.match(r"https?://", a["url"]) for a in apps):
        raise Error(f"the app list {path!r} must be a JSON array of "
                    '{"platform": ..., "name": ..., "url": "https://..."} objects')
    return tuple(apps)


_PAGE_STYLE = """
:root{color-scheme:light dark;--bg:#f3f4f6;--card:#fff;--text:#16181d;--muted:#4a5060;
--accent:#1a56c4;--on-accent:#fff;--line:#d5d8de}
@media (prefers-color-scheme:dark){:root{--bg:#111318;--card:#1d2027;--text:#eceef2;--muted:#b4b9c4;
--accent:#8ab4ff;--on-accent:#0b0d12;--line:#3a3f4a}}
*{box-sizing:border-box}
body{margin:0;padding:0 .75rem;background:var(--bg);color:var(--text);
font:17px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif}
header{padding:.75rem 1rem;font-weight:600;color:var(--muted);text-align:center}
main{max-width:34rem;margin:0 auto 2rem;padding:1.5rem 1.25rem;background:var(--card);
border-radius:12px;overflow-wrap:anywhere}
h1{font-size:1.5rem;line-height:1.25;margin:0 0 .75rem}
h2{font-size:1.1rem;margin:1.75rem 0 .5rem}
p{margin:.5rem 0}
.muted{color:var(--muted)}
.note{border-left:4px solid var(--accent);padding:.25rem .75rem;margin:1rem 0;white-space:pre-wrap}
a{color:var(--accent)}
a.button{display:block;text-align:center;padding:.9rem 1rem;margin:1.25rem 0;border-radius:8px;
background:var(--accent);color:var(--on-accent);text-decoration:none;font-weight:700;
font-size:1.1rem}
a.button:focus-visible,button:focus-visible,input:focus-visible{outline:3px solid var(--text);
outline-offset:2px}
figure{margin:.5rem auto;max-width:15rem}
figure svg{display:block;width:100%;height:auto;border-radius:4px}
figcaption{text-align:center;font-size:.9rem;color:var(--muted)}
.copy{display:flex;gap:.5rem}
.copy input{flex:1;min-width:0;padding:.6rem;border:1px solid var(--line);border-radius:6px;
background:var(--bg);color:var(--text);font:inherit;font-size:.9rem}
.copy button{padding:.6rem 1rem;border:0;border-radius:6px;background:var(--accent);
color:var(--on-accent);font:inherit;font-weight:600;cursor:pointer}
label{display:block;font-weight:600;margin-top:.75rem}
form input{display:block;width:100%;padding:.6rem;border:1px solid var(--line);border-radius:6px;
background:var(--bg);color:var(--text);font:inherit}
form span{display:block;font-size:.9rem}
form button{width:100%;padding:.9rem 1rem;border:0;border-radius:8px;background:var(--accent);
color:var(--on-accent);font:inherit;font-weight:700;font-size:1.1rem;cursor:pointer}
.error{border-left:4px solid #c62828;padding:.25rem .75rem}
ul{padding-left:1.25rem}
li{margin:.35rem 0}
"""


def render_page(title, body_html, site_name, nonce, script=""):
    """Return a complete, self-contained HTML page (inline CSS; a script with the nonce)."""
    import html
    script = f'<script nonce="{nonce}">{script}</script>' if script else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="referrer" content="same-origin">'
            f'<title>{html.escape(title)}</title><style nonce="{nonce}">{_PAGE_STYLE}</style>'
            f"</head><body><header>{html.escape(site_name)}</header><main>{body_html}</main>"
            f"{script}</body></html>\n")


def in_words(seconds):
    """Return a duration in words: "in 6 days", "in 3 hours", "in less than a minute"."""
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = seconds // length
            return f"in {count} {unit}{'s' if count != 1 else ''}"
    return "in less than a minute"


_COPY_SCRIPT = ("var b=document.getElementById('copy'),i=document.getElementById('link');"
                "b.hidden=false;b.addEventListener('click',function(){i.select();"
                "(navigator.clipboard?navigator.clipboard.writeText(i.value):Promise.reject())"
                ".then(function(){b.textContent='Copied'},"
                "function(){document.execCommand('copy');b.textContent='Copied'})})")


def render_invite_page(invite, page_url, site_name, apps, nonce, signup_url=None, in_apps=True):
    """Return the landing page of a valid invite."""
    # Who invites where, the main button (the app's xmpp: URI, or with signup_url our sign-up
    # form), its QR code, the link, apps. in_apps=False (a built-in invite on a server that
    # makes no accounts): no button, but where it is used.
    import html
    esc = html.escape
    host = esc(invite["host"])
    left = invite["expires_at"] - now()
    expires = time.strftime("%d %B %Y, %H:%M UTC", time.gmtime(invite["expires_at"])).lstrip("0")
    details = f"This invite expires {in_words(left)} ({esc(expires)})."
    if invite["uses_left"] > 1:
        details += f" It can create {invite['uses_left']} accounts."
    if invite["username"] and invite["type"] != "reset":
        details += f" It is for the address <strong>{esc(invite['username'])}@{host}</strong>."
    note = f'<p class="note">{esc(invite["note"])}</p>' if invite["note"] else ""
    app_list = render_app_list(apps)
    target, action = ((signup_url, "Create your account") if signup_url
                      else (invite["uri"], "Open in your XMPP app"))
    if invite["type"] == "reset":
        action = "Set a new password"
    if signup_url or in_apps:
        main = (f'<a class="button" href="{esc(target)}">{action}</a><h2>On another device?</h2>'
                f"<figure>{_invite_qr(target, invite['host'])}<figcaption>Scan this with your "
                f"{'phone' if signup_url else 'XMPP app'}</figcaption></figure>")
    else:  # nothing here makes the account: say where the invite is used, offer no path that fails
        main = ('<p class="note">You cannot create your account on this page. Whoever invited you '
                "has a sign-up page of their own where this invite is used: open the sign-up link "
                "they gave you, or ask them for it.</p>")
    heading = (f"Set a new password for {esc(invite['username'])}@{host}"
               if invite["type"] == "reset"
               else f"You have been invited to join {host}")
    inviter = inviter_jid(invite) if invite["type"] != "reset" else None
    if inviter:
        heading = f"{esc(inviter)} invited you to join {host}"
        main += render_already_have_account(invite, inviter)
    return render_page(f"Invite to {invite['host']}", (
        f"<h1>{heading}</h1>{note}"
        f'<p class="muted">{details}</p>{main}'
        f'<h2><label for="link">{"Or copy" if signup_url or in_apps else "Copy"} '
        "the link to this page</label></h2>"
        f'<p class="copy"><input id="link" readonly value="{esc(page_url)}">'
        f'<button id="copy" type="button" hidden>Copy</button></p>'
        f"<h2>No app yet?</h2>"
        + ("<p>Install one of these, then come back to this page and press the button above:</p>"
           if in_apps and not signup_url
           else "<p>To chat once your account exists, install one of these:</p>")
        + f"<ul>{app_list}</ul>"), site_name, nonce, _COPY_SCRIPT)


def render_already_have_account(invite, inviter):
    """Return a contact invite's part for people who have an XMPP account: add the inviter."""
    # The server's own contact invite (Prosody's) has a URI with its token, which the server
    # checks and approves at once (XEP-0401); ours cannot be checked there: the inviter approves.
    import html
    esc = html.escape
    if invite["uri"].startswith(f"xmpp:{inviter}?roster;"):
        uri, who = invite["uri"], "You are added to each other's contacts at once."
    else:
        uri, who = (f"xmpp:{inviter}?roster",
                    f"{esc(inviter)} will be asked to approve, and then you are each other's "
                    "contacts.")
    qr = _invite_qr(uri, invite["host"],
                    f"QR code to add {inviter} as a contact; scan it with an XMPP app")
    return (f"<h2>I already have an XMPP account</h2><p>Add {esc(inviter)} to your contacts from "
            f'your app: {who}</p><a class="button" href="{esc(uri)}">Add {esc(inviter)}</a>'
            f"<figure>{qr}<figcaption>Scan this with your XMPP app</figcaption></figure>")


def render_app_list(apps):
    """Return the <li>s of the apps, one per platform: "Android: Conversations, Monocles"."""
    import html
    platforms = {}
    for app in apps:
        platforms.setdefault(app["platform"], []).append(
            f'<a href="{html.escape(app["url"])}" rel="noreferrer">{html.escape(app["name"])}</a>')
    return "".join(f"<li><strong>{html.escape(p)}</strong>: {', '.join(links)}</li>"
                   for p, links in platforms.items())


def render_signup_page(invite, form_url, site_name, nonce, username="", error=None):
    """Return the sign-up form of a built-in invite (of a reset: the new password)."""
    # error: why the last try failed, shown above the form, which keeps the username.
    import html
    esc = html.escape
    reset = invite["type"] == "reset"
    bound = invite["username"]
    jid = f"{bound}@{invite['host']}" if bound else invite["host"]
    title = f"Set a new password for {jid}" if reset else f"Create your account on {invite['host']}"
    name_field = (f'<input id="user" name="user" value="{esc(bound)}" readonly '
                  'autocomplete="username">' if bound else
                  f'<input id="user" name="user" value="{esc(username)}" required '
                  'maxlength="64" autocomplete="username" autocapitalize="none" '
                  'spellcheck="false" pattern="[A-Za-z0-9._\\-]+">')
    return render_page(title, (
        f"<h1>{esc(title)}</h1>"
        + (f'<p class="error" role="alert">{esc(error)}</p>' if error else "")
        + f'<form method="post" action="{esc(form_url)}">'
        f'<input type="hidden" name="token" value="{esc(invite["token"])}">'
        f'<p><label for="user">Username</label>{name_field}'
        + ("" if bound else f'<span class="muted">Your address will be <em>name</em>@'
                            f'{esc(invite["host"])}: letters, digits, dots, dashes, '
                            "underscores</span>") + "</p>"
        '<p><label for="password">Password</label><input id="password" name="password" '
        'type="password" required minlength="10" autocomplete="new-password">'
        '<span class="muted">10 characters or more</span></p>'
        '<p><label for="password_confirm">Password again</label><input id="password_confirm" '
        'name="password_confirm" type="password" required minlength="10" '
        'autocomplete="new-password"></p>'
        f'<p><button type="submit">{"Set the password" if reset else "Create the account"}'
        "</button></p></form>"), site_name, nonce)


def render_signup_done(invite, username, site_name, apps, nonce, contact=None):
    """Return the page after a sign-up (or password reset): the new address and how to log in,
    and of a contact invite whether the inviter is in the newcomer's contacts (contact: made,
    failed or unknown)."""
    import html
    esc = html.escape
    jid = f"{username}@{invite['host']}"
    inviter = esc(inviter_jid(invite) or "")
    friends = {"made": f"<p><strong>{inviter}</strong>, who invited you, is in your contacts, "
                       "and you are in theirs.</p>",
               "failed": f"<p>We could not add <strong>{inviter}</strong>, who invited you, to "
                         "your contacts: add them in your app.</p>",
               "unknown": f"<p>We could not tell whether <strong>{inviter}</strong>, who invited "
                          "you, is in your contacts: if not, add them in your app.</p>",
               }.get(contact, "") if inviter else ""
    reset = invite["type"] == "reset"
    left = invite["uses_left"] if not reset and invite_status(invite) == "valid" else 0
    more = (f"<p>This invite can create {left} more account{'s' if left > 1 else ''}.</p>"
            if left else "")
    links = render_app_list(apps)
    first = "Your new password is set" if reset else f"Your account {esc(jid)} is ready"
    return render_page("Your account is ready", (
        f"<h1>{first}</h1>{more}{friends}"
        f"<p>Log in with an XMPP app as <strong>{esc(jid)}</strong> and your password.</p>"
        f'<a class="button" href="xmpp:{esc(jid)}">Open in your XMPP app</a>'
        f"<h2>No app yet?</h2><ul>{links}</ul>"), site_name, nonce)


_UNAVAILABLE = {
    "used": "This invite has already been used",
    "revoked": "This invite has been withdrawn",
    "expired": "This invite has expired",
    None: "We could not find this invite",
}


_ERROR_TITLES = {
    400: "This request cannot be used", 403: "This cannot be done from here",
    404: "We could not find this page", 405: "This page cannot be used that way",
    409: "This cannot be done", 410: "This invite is no longer valid",
    413: "This request is too large", 415: "This request cannot be used", 429: "Too many attempts",
    500: "Something went wrong on our side", 502: "The server could not do it just now",
    503: "The server is busy",
}


def render_error_page(status, message, site_name, nonce):
    """Return the page for an error a person sees: a heading for its status and its reason."""
    import html
    title = _ERROR_TITLES.get(status, "This cannot be done")
    sentence = message[:1].upper() + message[1:]
    sentence += "" if message.endswith((".", "?", "!")) else "."
    return render_page(title, f"<h1>{title}</h1><p>{html.escape(sentence)}</p>", site_name, nonce)


def render_unavailable_page(status, site_name, nonce):
    """Return the friendly page for a used, revoked, expired (status) or unknown (None) invite."""
    hint = ("Check that you opened the whole link. " if status is None else "") + \
        "Please ask the person who invited you for a new invite."
    return render_page("Invite not available", (
        f"<h1>{_UNAVAILABLE[status]}</h1><p>{hint}</p>"), site_name, nonce)


# -- QR codes (ISO/IEC 18004), byte mode, versions 1 to 40 ------------------

# Per error-correction level: (format bits, EC codewords per block, EC blocks), by version.
_QR_LEVELS = {
    "L": (1, (0, 7, 10, 15, 20, 26, 18, 20, 24, 30, 18, 20, 24, 26, 30, 22, 24, 28, 30, 28, 28, 28,
              28, 30, 30, 26, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30),
          (0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 6, 6, 6, 6, 7, 8, 8, 9, 9, 10, 12, 12, 12,
           13, 14, 15, 16, 17, 18, 19, 19, 20, 21, 22, 24, 25)),
    "M": (0, (0, 10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26, 26, 26,
              28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28),
          (0, 1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17, 17, 18, 20,
           21, 23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49)),
    "Q": (3, (0, 13, 22, 18, 26, 18, 24, 18, 22, 20, 24, 28, 26, 24, 20, 30, 24, 28, 28, 26, 30, 28,
              30, 30, 30, 30, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30),
          (0, 1, 1, 2, 2, 4, 4, 6, 6, 8, 8, 8, 10, 12, 16, 12, 17, 16, 18, 21, 20, 23, 23, 25, 27,
           29, 34, 34, 35, 38, 40, 43, 45, 48, 51, 53, 56, 59, 62, 65, 68)),
    "H": (2, (0, 17, 28, 22, 16, 22, 28, 26, 26, 24, 28, 24, 28, 22, 24, 24, 30, 28, 28, 26, 28, 30,
              24, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30),
          (0, 1, 1, 2, 4, 4, 4, 5, 6, 8, 8, 11, 11, 16, 16, 18, 16, 19, 21, 25, 25, 25, 34, 30,
           32, 35, 37, 40, 42, 45, 48, 51, 54, 57, 60, 63, 66, 70, 74, 77, 81)),
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
    """Return how many bytes a QR code of this version and level holds in byte mode."""
    # utf8: with the ECI header that marks the bytes as UTF-8.
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


def qr_matrix(data, level="M"):
    """Return the QR code of data as rows of booleans (True = dark), with no quiet zone."""
    return min(qr_masked(data, level), key=_qr_penalty)


def qr_masked(data, level="M"):
    """Return data's QR code under each of the eight masks; raise ValueError if it is too long."""
    # Byte mode (non-ASCII text is marked UTF-8 with an ECI header, so that readers do not guess
    # another charset) in the smallest version that fits.
    utf8 = isinstance(data, str) and not data.isascii()
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fmt, ec_len, blocks = _QR_LEVELS[level]
    for version in range(1, 41):
        if len(data) <= qr_capacity(version, level, utf8):
            break
    else:
        raise ValueError(f"{len(data)} bytes do not fit in a QR code at level {level}")
    # The bit stream: mode, length, bytes, terminator, padding.
    capacity = _qr_raw_modules(version) // 8 - ec_len[version] * blocks[version]
    bits = [0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0] if utf8 else []  # ECI mode, designator 26: UTF-8
    bits += [0, 1, 0, 0] + [(len(data) >> i) & 1
                            for i in reversed(range(8 if version < 10 else 16))]
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

    return [masked(n) for n in range(8)]


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
        padded = [False] * 4 + line + [False] * 4  # rule 3: finder-like patterns (quiet zone light)
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
def _invite_qr(uri, host, label=None):
    """Return an invite page's QR code of its xmpp: URI (about 15 ms of CPU to make)."""
    return qr_svg(qr_matrix(uri), label=label or "QR code of the invite for "
                                                 f"{host}; scan it with an XMPP app")


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
    """Return a QR matrix as terminal text: two module rows per line in Unicode half blocks."""
    # "█" is dark above and below, "▀" dark above, "▄" dark below, space light. With
    # colour, ANSI black on white, so it scans in dark terminals too.
    size = len(matrix) + 2 * quiet
    padded = ([[False] * size for _ in range(quiet)]
              + [[False] * quiet + list(row) + [False] * quiet for row in matrix]
              + [[False] * size for _ in range(quiet + 1)])
    chars = {(True, True): "\u2588", (True, False): "\u2580", (False, True): "\u2584",
             (False, False): " "}
    lines = ["".join(chars[top, bottom] for top, bottom in zip(padded[y], padded[y + 1]))
             for y in range(0, size, 2)]
    if colour:
        lines = [f"\x1b[30;47m{line}\x1b[0m" for line in lines]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Serving: the HTTP/1.1 machinery under the routes (framing, deadlines, connections, TLS, socket
# activation), and the serve loop with its background tasks
# ---------------------------------------------------------------------------
# RFC 9112's request line (origin form; HTTP/1.0 or 1.1) and field lines (a
# token, a colon, and no NUL, CR or LF; no obsolete folding): else 400.
_REQUEST_LINE_RE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (/[!-~]*) (HTTP/1\.[01])\r?\n\Z")
_HEADER_LINE_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00\r\n]*\r?\n\Z")
_HOST_HEADER_RE = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?\Z|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?\Z")
_FORWARDED_PAIR_RE = re.compile(r'(?i)\b(for|proto|host)=("[^"]*"|[^;,\s]*)')
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in list(range(32)) + [127]}
_date_cache = [0, ""]  # (second, Date header)


class StrictHTTP:
    """HTTP/1.1 framing for http.server.BaseHTTPRequestHandler: strict, bounded, deadlined."""

    # make_server mixes it (under the application's handler) into BaseHTTPRequestHandler, whose
    # loop, status lines and dates it keeps. In the order a request meets it:
    #   setup()               the TLS handshake, in the connection's thread, within the deadline
    #   handle_one_request()  one request; a connection taken back when the server is full
    #   parse_request()       RFC 9112: strict request and header lines and their limits (414,
    #                         431), one Host, Content-Length only (411), the body read in full
    #   respond()             every response: Content-Length, ASCII headers, response_headers;
    #                         the connection closes if the body was not read in full
    #   finish()              a lingering close
    # Override points: dispatch() answers one parsed request (self.command, path, headers, body,
    # client, scheme, authority); answered(code, seconds) sees each answer; log_line(text) logs.
    # trust_proxy: the one header a trusted reverse proxy sets ("x-forwarded-for", "forwarded").
    # The server (InviteServing) gives tls, idle_timeout, request_timeout and stopping.

    trust_proxy = None
    protocol_version = "HTTP/1.1"
    server_version = f"invites_api/{__version__}"
    disable_nagle_algorithm = True
    wbufsize = 65536  # a response leaves in one write, at respond()'s flush

    def setup(self):
        server = self.server
        self.tracked = server.tracked(self.request)
        self.deadline = None
        if server.tls is not None:  # ssl counts the timeout for the whole handshake
            self.request.settimeout(server.request_timeout)
            self.request = self.tracked.sock = server.tls.context.wrap_socket(
                self.request, server_side=True, do_handshake_on_connect=False)
            self.request.do_handshake()
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self))

    def finish(self):
        super().finish()
        # A lingering close (RFC 9112, 9.6): what the client still sends would turn the close into
        # a reset, which can destroy our last answer before the client has read it.
        import socket
        self.server.waiting(self.tracked)  # (a lingering connection makes room when full)
        try:
            socket.socket.shutdown(self.connection, socket.SHUT_WR)
            self.connection.settimeout(1)
            for _ in range(16):
                if not self.connection.recv(65536):
                    break
        except OSError:
            pass

    def handle_one_request(self):
        """Read, check and answer one request (http.server's handle() loops over this)."""
        self.command = self.path = self.headers = self.body = self.started = None
        self.requestline, self.request_version, self.close_connection = "", "HTTP/1.1", True
        self.response_headers = []  # (name, value)s every response to this request carries
        self.client = self.client_address[0]
        if self.client.startswith("::ffff:") and "." in self.client:  # IPv4 on a dual-stack socket
            self.client = self.client[7:]
        self.deadline = None
        self.server.waiting(self.tracked)
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            self.started = time.monotonic()
            if not self.raw_requestline:  # the client is done (or taken back before it sent a byte)
                if self.tracked.evicted and not self.tracked.served:
                    self.refuse(503, "busy")
                return
            if not self.parse_request():
                return  # answered; the connection closes
            if not self.server.handling(self.tracked):
                return self.refuse(503, "busy")
            self.dispatch()
            self.tracked.served += 1
        except OSError:  # the client went away or missed the deadline: no one to answer
            self.close_connection = True

    def parse_request(self):
        """Check the request line and header lines, read the body; return True, or answer 4xx."""
        # (after a 4xx the connection closes: where a next request would start is not known)
        line = self.raw_requestline
        self.requestline = line.decode("latin-1").rstrip("\r\n")
        if len(line) > MAX_REQUEST_LINE:
            return self.refuse(414, "request line too long")
        match = _REQUEST_LINE_RE.match(line)
        if not match:
            return self.refuse(400, "malformed request line" if line.endswith(b"\n")
                               else "request cut short")
        self.command, self.path, self.request_version = (p.decode("ascii") for p in match.groups())
        if self.path.startswith("//"):  # (as http.server: a path a client would take for a host)
            self.path = "/" + self.path.lstrip("/")
        headers = self.headers = self.MessageClass()  # http.client.HTTPMessage, as http.server's
        while True:
            field = self.rfile.readline(MAX_HEADER_LINE + 1)
            if field in (b"\r\n", b"\n"):
                break
            if len(field) > MAX_HEADER_LINE or len(headers) == MAX_HEADERS:
                return self.refuse(431, "request header fields too large")
            if not _HEADER_LINE_RE.match(field):
                return self.refuse(400, "malformed header line" if field.endswith(b"\n")
                                   else "request cut short")
            name, _, value = field.decode("latin-1").partition(":")
            headers[name] = value.strip()
        tokens = {t.strip().lower()
                  for t in ",".join(headers.get_all("Connection") or ()).split(",")}
        self.close_connection = ("close" in tokens or self.server.stopping
                                 or self.request_version == "HTTP/1.0"
                                 and "keep-alive" not in tokens)
        hosts = headers.get_all("Host") or []
        if len(hosts) > 1 or not hosts and self.request_version == "HTTP/1.1":
            return self.refuse(400, "exactly one Host header is required")
        if headers.get("Transfer-Encoding") is not None:
            return self.refuse(411, "send the body with Content-Length, not Transfer-Encoding")
        lengths = {v.strip()
                   for v in ",".join(headers.get_all("Content-Length") or ["0"]).split(",")}
        length = lengths.pop()
        if lengths or not re.fullmatch(r"[0-9]{1,12}", length):  # one value, ASCII digits
            return self.refuse(400, f"invalid Content-Length {length[:20]!r}")
        if int(length) > MAX_BODY:
            return self.refuse(413, f"request body over {MAX_BODY} bytes")
        try:
            host = hosts[0].strip() if hosts else ""
            self.client, self.scheme, self.authority = self.proxy_view(host)
        except BadRequest as e:
            return self.refuse(400, str(e))
        if int(length) and "100-continue" in (headers.get("Expect") or "").lower():
            self.send_response_only(100)
            self.end_headers()
            self.wfile.flush()
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            return self.refuse(400, "request body shorter than Content-Length")
        self.body = body
        return True

    def proxy_view(self, host):
        """Return (client address, scheme, authority) as the client sees them; raise BadRequest."""
        # With --trust-proxy they come from the one header the proxy sets (X-Forwarded-For's last
        # hop, -Proto, -Host), never from a Forwarded header a client may send through it, unless
        # the proxy sets Forwarded (--trust-proxy=forwarded).
        client, scheme = self.client, "https" if self.server.tls is not None else "http"
        mode, get = self.trust_proxy, self.headers.get_all
        if mode == "x-forwarded-for":
            hop = ",".join(get("X-Forwarded-For") or ()).split(",")[-1].strip()
            proto = ",".join(get("X-Forwarded-Proto") or ()).split(",")[-1].strip().lower()
            forwarded_host = ",".join(get("X-Forwarded-Host") or ()).split(",")[-1].strip()
        elif mode == "forwarded":
            pairs = {name.lower(): value.strip('"') for name, value in
                     _FORWARDED_PAIR_RE.findall(",".join(get("Forwarded") or ()).split(",")[-1])}
            hop, proto = pairs.get("for", ""), pairs.get("proto", "").lower()
            forwarded_host = pairs.get("host", "")
            hop = (hop[1:hop.find("]")] if hop.startswith("[")
                   else hop.partition(":")[0] if hop.count(":") == 1 else hop)
        if mode:
            client = hop[:64] or client
            scheme = proto if proto in ("http", "https") else scheme
            host = forwarded_host or host
        if host and not _HOST_HEADER_RE.match(host):
            raise BadRequest(f"invalid Host header {host[:100]!r}")
        return client, scheme, host

    def dispatch(self):
        """Answer one parsed request (the application's handler overrides this)."""
        self.respond(404, "not found\n")

    def refuse(self, status, reason):
        """Answer a request that cannot be served and close the connection; return False."""
        if self.tracked.evicted:  # taken back for a newer one (the server was full)
            status, reason = 503, "too many connections; try again"
        self.close_connection = True
        self.respond(status, reason + "\n", [("Retry-After", "1")] if status == 503 else ())
        return False

    def send_error(self, code, message=None, explain=None):
        """http.server's error answer, as ours: short plain text, and the connection closes."""
        self.refuse(code, message or self.responses.get(code, ("error",))[0].lower())

    def respond(self, status, body=b"", headers=(), content_type="text/plain; charset=utf-8"):
        """Send one complete response (every response goes through here)."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        if self.body is None or self.server.stopping:
            # A body not read in full: where the next request starts is unknown.
            self.close_connection = True
        self.connection.settimeout(self.server.idle_timeout)  # for a client that reads slowly
        self.send_response(status)  # logs it, then Server and Date
        for name, value in [*headers, *self.response_headers]:
            self.send_header(name, value if value.isascii() and value.isprintable()
                             else iri_to_uri(value))
        if status != 204:
            if body:  # (nosniff: no browser reads an error's text as HTML or script)
                self.send_header("Content-Type", content_type)
                self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:  # the client went away (or stopped reading): nothing more to say to it
            self.close_connection = True

    def version_string(self):
        return self.server_version

    def date_time_string(self, timestamp=None):
        """http.server's Date, formatted once a second (it is on every response)."""
        second = int(time.time() if timestamp is None else timestamp)
        if _date_cache[0] != second:
            _date_cache[:] = second, super().date_time_string(second)
        return _date_cache[1]

    def log_request(self, code="-", size="-"):
        """http.server's hook for each answer (called before it is sent): see answered()."""
        seconds = time.monotonic() - self.started if self.started is not None else 0.0
        self.answered(int(code), seconds)

    def answered(self, code, seconds):
        """Count or log one answer (the application's handler overrides this)."""

    def log_message(self, format, *args):
        """http.server's logging hook: every line goes to log_line."""
        self.log_line(format % args)

    def log_line(self, text):
        """Write one line of the log (the application's handler overrides this)."""
        sys.stderr.write(text + "\n")


class _DeadlineReader(io.RawIOBase):
    """A connection's socket as the raw stream under its rfile, reading to deadlines."""
    # Between requests a read waits up to the idle timeout; from a request's first byte, only
    # until that request's deadline, however the client spreads its bytes.

    def __init__(self, handler):
        self.handler = handler

    def readable(self):
        return True

    def readinto(self, buffer):
        handler = self.handler
        server = handler.server
        wait = (server.idle_timeout if handler.deadline is None
                else handler.deadline - time.monotonic())
        if wait <= 0:
            raise TimeoutError("the request took longer than --request-timeout")
        handler.connection.settimeout(wait)
        count = handler.connection.recv_into(buffer)
        if handler.deadline is None:
            handler.deadline = time.monotonic() + server.request_timeout
            server.reading(handler.tracked)
        return count


class _Connection:
    """What the server knows of one connection: whether it waits for a request, and since when."""

    __slots__ = ("sock", "waiting_since", "reading", "evicted", "served")

    def __init__(self, sock):
        self.sock = sock
        self.waiting_since = time.monotonic()
        self.reading = self.evicted = False
        self.served = 0


class InviteServing:
    """The server: http.server.ThreadingHTTPServer (a thread per connection) with a cap on
    connections, slow clients taken back when it is full, IPv6, and a clean stop.

    make_server mixes it into ThreadingHTTPServer. Its additions: process_request()
    (the cap), process_request_thread() (what a connection's thread leaves
    behind), service_actions() (refused sockets), stop_connections() (a stop).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # a burst is accepted and answered (or refused) fast, not dropped

    def __init__(self, app, handler_class, bind, port, tls=None, listen_socket=None):
        import socket
        settings = app.settings
        self.app, self.tls, self.max_connections = app, tls, settings.max_connections
        self.idle_timeout, self.request_timeout = settings.timeout, settings.request_timeout
        self.stopping = False
        self.connections = {}  # socket -> _Connection, under _lock
        self.lingering = []  # (when to close, socket) of refused connections
        self._lock = threading.Lock()
        if listen_socket is None:
            self.address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET
            super().__init__((bind, port), handler_class)
        else:
            self.address_family = listen_socket.family
            super().__init__(listen_socket.getsockname()[:2], handler_class,
                             bind_and_activate=False)
            self.socket = listen_socket
            self.server_address = listen_socket.getsockname()

    def server_bind(self):
        import socket
        import socketserver
        if self.address_family == socket.AF_INET6:  # "::" takes IPv4 too, where the system allows
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's, which asks DNS for our name
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def open_connections(self):
        return len(self.connections)

    # -- connections ----------------------------------------------------------

    def process_request(self, request, client_address):
        """Serve a new connection in a thread of its own, or refuse it."""
        # When full, in place of the connection that has waited longest for a request (idle, or
        # sending it slowly); when every one is busy answering, refuse it with 503 at once.
        with self._lock:
            room = len(self.connections) < self.max_connections or self._evict()
            if room:
                self.connections[request] = _Connection(request)
        if not room:
            return self._refuse(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.connections.pop(request, None)
            self.app.store.close()  # this thread's database connection, if it opened one

    def handle_error(self, request, client_address):
        """A connection's thread failed outside a request: log it if it is a bug."""
        # A failed handshake or a client gone is no news.
        if not isinstance(sys.exc_info()[1], OSError):
            import traceback
            self.app.log_line("internal error serving a "
                              f"connection:\n{traceback.format_exc().rstrip()}")

    def tracked(self, request):
        """Return a socket's _Connection (a fresh one, marked evicted, if it was taken back)."""
        with self._lock:
            tracked = self.connections.get(request)
        if tracked is None:
            tracked = _Connection(request)
            tracked.evicted = True
        return tracked

    def waiting(self, tracked):
        """The connection waits for its next request."""
        with self._lock:
            tracked.waiting_since, tracked.reading = time.monotonic(), False

    def reading(self, tracked):
        """The connection's next request has begun to arrive."""
        tracked.reading = True

    def handling(self, tracked):
        """The connection's request was read: return False if it was taken back meanwhile."""
        with self._lock:
            tracked.waiting_since = None
            return not tracked.evicted

    def _evict(self):
        # Under _lock. Take back the connection that has waited longest for a
        # request (idle, or sending it slowly); its thread answers and ends.
        import socket
        waiting = [(t.waiting_since, sock, t) for sock, t in self.connections.items()
                   if t.waiting_since is not None]
        if not waiting:
            return False
        _, sock, tracked = min(waiting, key=lambda w: w[0])
        del self.connections[sock]
        tracked.evicted = True
        try:  # (socket's own shutdown: on a TLS socket, ssl's would drop the TLS layer first)
            socket.socket.shutdown(tracked.sock, socket.SHUT_RD)
        except OSError:
            pass
        return True

    def _refuse(self, sock):
        # Refuse fast rather than queue behind a full house. Then linger: a
        # close with the client's request unread would reset the connection,
        # and the reset can destroy the 503 before the client reads it.
        import socket
        try:
            sock.setblocking(False)
            sock.send(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                      b"Content-Type: text/plain\r\nContent-Length: 21\r\nConnection: close\r\n"
                      b"\r\ntoo many connections\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return sock.close()
        self.lingering.append((time.monotonic() + 1, sock))

    def service_actions(self):
        """Close refused connections once their 503 had time to arrive."""
        while self.lingering and (self.lingering[0][0] < time.monotonic() or self.stopping):
            sock = self.lingering.pop(0)[1]
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            sock.close()

    def stop_connections(self, grace=SHUTDOWN_GRACE):
        """Stop serving: close idle connections, let requests under way finish."""
        # Those finish with Connection: close, for up to grace seconds.
        import socket
        self.stopping = True
        until = time.monotonic() + grace
        while True:
            with self._lock:
                for tracked in self.connections.values():
                    if tracked.waiting_since is not None and not tracked.reading:
                        try:
                            socket.socket.shutdown(tracked.sock, socket.SHUT_RD)
                        except OSError:
                            pass
                if not self.connections or time.monotonic() > until:
                    break
            time.sleep(0.02)
        self.service_actions()

    def server_close(self):
        self.stop_connections(grace=0)
        super().server_close()
        self.app.store.stop_group_commit()


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
            raise Error("cannot load the TLS certificate "
                        f"{self.cert!r} and key {self.key!r}: {e}") from None
        return context

    def reload(self):
        """Switch new connections to the files' current contents; keep the old on failure."""
        self.context = self.load()


def make_server(app, bind=DEFAULT_BIND, port=DEFAULT_PORT, tls=None, listen_socket=None):
    """Return a listening (not yet serving) HTTP server for app (its settings' limits); raise
    Error if it cannot."""
    # tls: a TLS for HTTPS. listen_socket: an already listening socket (from systemd) to serve
    # instead of binding bind:port.
    # http.server is imported only here, so that the key commands start fast.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(InviteRequests, StrictHTTP, BaseHTTPRequestHandler):
        pass

    class Server(InviteServing, ThreadingHTTPServer):
        pass

    try:
        server = Server(app, Handler, bind, port, tls, listen_socket)
    except OSError as e:
        raise Error(f"cannot listen on {bind}:{port}: {e.strerror}") from None
    app.store.start_group_commit()
    return server


NOTIFY_TIMEOUT = 60  # a notification is not urgent; a program that hangs is still stopped


def notify_use(argv, invite_id, username, host, log):
    """Run the --notify-command in the background (never a shell); log a failure."""
    # The username and the host are its last arguments; the invite's public id is in
    # $INVITES_API_INVITE (its token never leaves: the program may well log what it is given).
    def run():
        env = dict(os.environ, INVITES_API_INVITE=invite_id, INVITES_API_USERNAME=username,
                   INVITES_API_HOST=host)
        try:
            status = run_program([*argv, username, host], "--notify-command", NOTIFY_TIMEOUT,
                                 env=env)[0]
            failed = status and f"exited with status {status}"
        except BackendError as e:
            failed = str(e)
        if failed:
            log(f"--notify-command failed: {failed}")
    threading.Thread(target=run, daemon=True).start()


def start_purging(store, grace, app=None, every=3600):
    """Start a thread that purges old invites every hour, in small batches between requests."""
    def purge_forever():
        while True:
            try:
                deleted = purge_invites(store, grace, app.backend if app else BUILTIN)
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
    server.stop_connections(SHUTDOWN_GRACE)
    server.server_close()


# ---------------------------------------------------------------------------
# CLI: thin wrappers that print what the operations return
# ---------------------------------------------------------------------------

def _arg(parse, clear=None):
    """Wrap a ValueError-raising parser as an argparse type (a usage error, exit 2)."""
    # With clear (e.g. "never"), that word parses as CLEAR: remove the limit.
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
    given = {"expires_at": args.expires, "max_invites": args.max_invites, "max_ttl": args.max_ttl,
             "max_uses": args.max_uses, "inviter": args.inviter,
             "may_reset": None if args.allow_resets is None else int(args.allow_resets)}
    if args.rate is not None:  # (count, period), or CLEAR for both
        rate = (CLEAR, CLEAR) if args.rate is CLEAR else args.rate
        given["rate_count"], given["rate_period"] = rate
    return {name: None if value is CLEAR else value
            for name, value in given.items() if value is not None}


def cmd_create(args):
    """create HOST [NAME]: print a new key (and on stderr, which database holds it)."""
    store = open_store(args)
    _check_inviter(args)
    print(create_key(store, args.host, args.name, **_policy(args)))
    print(f"a key for {args.host}, in database {store.path}", file=sys.stderr)


def cmd_list(args):
    """list HOST: print the host's keys (and on stderr, how many, in which database)."""
    store = open_store(args)
    keys = list_keys(store, args.host)
    if args.json:
        _print_json(keys)
    for key in keys if not args.json else ():
        print(f"{key['id']}\t{key['name']}")
    print(f"{args.host}: {len(keys) or 'no'} "
          f"key{'' if len(keys) == 1 else 's'} in database {store.path}",
          file=sys.stderr)


def cmd_update(args):
    """update HOST KEY_ID: change a key's name or policy."""
    changes = _policy(args)
    if args.name is not None:
        changes["name"] = args.name
    if not changes:
        raise Error("nothing to change: give --name or a policy option (see --help)")
    store = open_store(args)
    _check_inviter(args)
    update_key(store, args.host, args.key_id, **changes)


def _check_inviter(args):
    """Refuse an --inviter the XMPP server says has no account; say so where none can tell."""
    if args.inviter in (None, CLEAR):
        return
    with contextlib.closing(_backend(args, settings_of(args))) as backend:
        told = check_inviter(backend, args.host, args.inviter)
    if not told:
        print(f"note: nothing here can tell whether {args.inviter}@{args.host} has an account "
              "(give --accounts or --backend prosody to ask); serve warns at start if not",
              file=sys.stderr)


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


def settings_of(args, **values):
    """Return the Settings the command line gives (every command's backend options, and
    values: serve's); the log is stderr."""
    return Settings(backend_timeout=args.backend_timeout,
                    backend_concurrency=args.backend_concurrency, log=sys.stderr, **values)


def _backend(args, settings, asking=False, accounts=True):
    """Return the Backend the command line names, with its --accounts; refuse idle options."""
    # asking (about invites made before): Prosody's unless another is named.
    wanted = getattr(args, "accounts", None) if accounts else None
    for option, value, needs in (
            ("--backend-command", args.backend_command, args.backend == "command"),
            ("--accounts-command", getattr(args, "accounts_command", None), wanted == "command"),
            ("--ejabberd-api", args.ejabberd_api, "ejabberd" in (args.backend, wanted)),
            ("--ejabberd-api-auth-file", args.ejabberd_api_auth_file, args.ejabberd_api)):
        if value and not needs and (accounts or option != "--accounts-command"):
            raise Error(f"{option} does nothing here: it is for " + {
                "--backend-command": "--backend command",
                "--accounts-command": "--accounts command",
                "--ejabberd-api": "--backend ejabberd or --accounts ejabberd",
                "--ejabberd-api-auth-file": "--ejabberd-api"}[option])
    name = "prosody" if asking and args.backend == "builtin" else args.backend
    backend = make_backend(name, None, args.prosody_config, args.prosody_socket,
                           _ejabberd(args, settings), args.backend_command, settings)
    if wanted == backend.name and wanted in ("prosody", "ejabberd"):
        backend.accounts = backend  # (one server, one connection to it)
    elif wanted == "prosody":
        backend.accounts = ProsodyBackend(args.prosody_config, args.prosody_socket, settings)
    elif wanted == "ejabberd":
        backend.accounts = EjabberdBackend(_ejabberd(args, settings), settings)
    elif wanted == "command":
        backend.accounts = Accounts(split_command(args.accounts_command, "--accounts-command",
                                                  "{action} {username} {host}"), settings)
    return backend


def _ejabberd(args, settings):
    """Return the client for ejabberd's commands that the command line asks for."""
    return make_ejabberd(args.ejabberd_api, args.ejabberd_api_auth_file, args.ejabberdctl,
                         settings)


def cmd_invites_create(args):
    """invites create HOST: mint one invite and print its page URL."""
    options = {name: value for name, value in (
        ("ttl", args.ttl), ("uses", args.uses), ("username", args.username), ("note", args.note),
        ("roles", args.roles), ("groups", args.groups), ("inviter", args.inviter))
        if value is not None}  # (None: not given)
    if args.reset is not None:
        if args.username is not None:
            raise Error("--reset USER names the account; give no --username")
        options.update(type="reset", username=args.reset)
    backend = _backend(args, settings_of(args),
                       accounts=args.reset is not None or bool(args.inviter))
    with contextlib.closing(backend):
        for warning in backend.start_warnings([]):
            print(f"warning: {warning}", file=sys.stderr)
        if args.inviter and not check_inviter(backend, args.host, args.inviter):
            print(f"note: nothing here can tell whether {args.inviter}@{args.host} has an "
                  "account (give --accounts or --backend prosody to ask)", file=sys.stderr)
        invite = create_invite(open_store(args), host=args.host, options=options, backend=backend)
    url = _cli_url(args, invite)
    if args.qr and re.match(r"https?://(127\.|localhost|\[::1\])", url):
        print(f"warning: the QR code is of {url}, which only this machine can open (a phone "
              "cannot): give --public-url or set INVITES_API_PUBLIC_URL", file=sys.stderr)
    if args.qr:
        print(qr_text(qr_matrix(invite["uri"] if args.qr == "uri" else url),
                      colour=sys.stdout.isatty()))
    _print_json(invite_info(invite, url)) if args.json else print(url)


def cmd_invites_list(args):
    """invites list HOST: print a page of the host's invites as an 80-column table."""
    # On stderr: how many there are, and how to see the next page.
    store, backend = open_store(args), _backend(args, settings_of(args), asking=True)
    status = None if args.all or args.status == "all" else args.status
    invites, total = list_invites(store, args.host, args.key and _key_id(args.key), status,
                                  args.limit, args.after)
    states = [invite_state(store, i, backend) for i in invites]
    if args.json:
        _print_json([invite_info(i, _cli_url(args, i), state) for i, state in zip(invites, states)])
    else:
        rows = [("ID", "EXPIRES", "USES", "STATUS", "KEY", "NOTE")]
        rows += [(i["id"], iso(i["expires_at"])[:10], f"{i['uses_left']}/{i['uses']}", state,
                  i["key_id"] or "(cli)", i["note"] or "") for i, state in zip(invites, states)]
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
        for row in rows:
            line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  "
            note = row[-1]
            if len(line) + len(note) > 80:
                note = note[:max(0, 79 - len(line))] + "…"
            print((line + note).rstrip())
    shown = (f"{args.host}: {total:,} {status + ' ' if status else ''}"
             f"invite{'' if total == 1 else 's'}")
    if len(invites) < total or args.after:
        shown += f", {len(invites):,} shown"
    more = total > len(invites) and len(invites) == args.limit and invites
    print(shown + (f"; next page: --after {invites[-1]['id']}" if more else ""), file=sys.stderr)


def cmd_invites_show(args):
    """invites show HOST ID: print one invite (by its id, or its whole token)."""
    store = open_store(args)
    invite, status = show_invite(store, args.invite, _backend(args, settings_of(args), asking=True),
                                 args.host)
    accounts = store.accounts(invite["id"])
    if any(a["action"] == "unconfirmed" for a in accounts) and not args.accounts:
        print("note: an account of this invite is unconfirmed: give --accounts to ask the server "
              "(its use comes back if it was never made)", file=sys.stderr)
    info = invite_info(invite, _cli_url(args, invite), status, accounts)
    if args.json:
        return _print_json(info)
    info["accounts"] = ", ".join(f"{a['jid']} ({a['action']} {a['at']})" for a in info["accounts"])
    for name, value in info.items():
        print(f"{name}: {'' if value is None else value}")


def cmd_invites_revoke(args):
    """invites revoke HOST ID: revoke an invite (by its id, or its whole token)."""
    revoke_invite(open_store(args), args.invite, host=args.host,
                  backend=_backend(args, settings_of(args), asking=True))


def cmd_invites_redeem(args):
    """invites redeem HOST TOKEN: use an invite once (exit 1 if it is no longer valid)."""
    invite = redeem_invite(open_store(args), args.token, args.host, args.username)
    if args.json:
        _print_json(invite_info(invite, _cli_url(args, invite)))


def cmd_serve(args):
    """serve: run the HTTP API until stopped."""
    for template, option in ((args.public_url, "--public-url"), (args.invite_url, "--invite-url")):
        if template and not re.match(r"https?://[^/?#\s]+", template.replace("{host}", "h")):
            raise Error(f"{option} {template!r} must start with "
                        "http:// or https:// and a host name")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise Error("--tls-cert and --tls-key go together")
    tls = TLS(args.tls_cert, args.tls_key) if args.tls_cert else None
    store = open_store(args)
    notify = args.notify_command and split_command(args.notify_command, "--notify-command", "")
    settings = settings_of(args, max_connections=args.max_connections, timeout=args.timeout,
                           request_timeout=args.request_timeout, public_url=args.public_url,
                           invite_url_template=args.invite_url, invite_ttl=args.invite_ttl,
                           site_name=args.site_name,
                           apps=load_apps(args.apps) if args.apps else None,
                           trust_proxy=args.trust_proxy, metrics_token=args.metrics_token,
                           notify=notify or None, access_log=not args.quiet)
    backend = _backend(args, settings)
    exposed = store.exposed()
    if exposed:
        print(f"warning: database {store.path} can be read by other users (its keys' hashes, its "
              f"invites): chmod 600 {' '.join(exposed)}", file=sys.stderr, flush=True)
    for warning in backend.start_warnings(store.key_hosts()) + inviter_warnings(
            backend, store.key_inviters()):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    app = App(store, backend, settings)
    server = make_server(app, args.bind, args.port, tls, systemd_socket())
    start_purging(store, args.purge_after, app)
    address, port = server.server_address[:2]
    said = [backend.describe()] + ([f"accounts made by {backend.accounts.describe_accounts()}"]
                                   if backend.accounts else [])
    said = "".join(f"; {clause}" for clause in said if clause)
    tail = "" if said else ("; its invites become accounts only through a sign-up site of your "
                            "own (the redeem API): --accounts makes them accounts on the invite's "
                            "page")
    serve(server, f"invites_api {__version__} serving on {'https' if tls else 'http'}://"
                  f"{f'[{address}]' if ':' in address else address}:{port}/invites_api (database "
                  f"{store.path}{said}){tail}")


def systemd_socket():
    """Return the listening socket systemd passed (LISTEN_PID/LISTEN_FDS, fd 3), or None."""
    import socket
    if (os.environ.get("LISTEN_PID") != str(os.getpid())
            or not re.fullmatch("[0-9]+", os.environ.get("LISTEN_FDS", ""))):
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
    "create": 'examples:\n  invites_api.py create example.com "My test key"\n'
              "  -> prints KEY_ID/SECRET; keep it, it is shown only once\n"
              '  invites_api.py create example.com "sign-up form" --rate 10/hour --expires 90d\n',
    "list": "example:\n  invites_api.py list example.com\n  "
            "invites_api.py list example.com --json\n",
    "update": "example:\n  invites_api.py update example.com "
              "t3XbXfBhZ0mJ --rate 100/day --expires never\n",
    "delete": "example:\n  invites_api.py delete example.com t3XbXfBhZ0mJ [--revoke-invites]\n",
    "invites": "examples:\n  invites_api.py invites create example.com --uses 5 --ttl "
               "2w --note 'choir'\n  invites_api.py invites list example.com --all\n",
    "invites create": "example:\n  invites_api.py invites create example.com "
                      "--username alice --ttl 1d\n  -> prints the invite page URL\n",
    "invites list": "example:\n  invites_api.py invites list example.com --all --json\n",
    "invites show": "example:\n  invites_api.py invites show example.com Vb0tJYx3kQ_a"
                    "   # an id as listed (or the whole token)\n",
    "invites revoke": "example:\n  invites_api.py invites revoke example.com Vb0tJYx3kQ_a"
                      "   # an id as listed (or the whole token)\n",
    "invites redeem": "example:\n  invites_api.py invites redeem example.com "
                      "Vb0tJ3r1aQ2kWn9Yc8dZt0Ls --username alice\n",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, told the terminal width so that it does not import shutil."""
    # (Python 3.13's argparse imports shutil for every parser it builds otherwise.)

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


def build_parser():
    """Return the argparse parser of every command."""
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
        sub = group.add_parser(name, parents=[common], help=help, description=help,
                               epilog=_EXAMPLES[full_name or name], formatter_class=formatter)
        sub.set_defaults(func=func)
        return sub

    def host_arg(sub):
        sub.add_argument("host", type=_arg(parse_host), metavar="HOST",
                         help="the XMPP domain, e.g. example.com")

    def backend_args(sub):
        sub.add_argument("--backend", choices=("builtin", "prosody", "ejabberd", "command"),
                         default="builtin",
                         help="who mints invites: this tool's own store "
                              "(default), Prosody, ejabberd or a program")
        sub.add_argument("--prosody-config", metavar="PATH",
                         help="prosody backend: Prosody's config file, where its admin socket is "
                              "found")
        sub.add_argument("--prosody-socket", metavar="PATH",
                         help="prosody backend: Prosody's admin socket (default: from the config)")
        sub.add_argument("--ejabberdctl", default="ejabberdctl", metavar="PATH",
                         help="ejabberd's ejabberdctl, where no --ejabberd-api is given")
        sub.add_argument("--ejabberd-api", metavar="URL",
                         help="ejabberd's HTTP API (mod_http_api), e.g. "
                              "http://127.0.0.1:5280/api: used instead of ejabberdctl "
                              "(no Erlang VM per call, no password in an argv)")
        sub.add_argument("--ejabberd-api-auth-file", metavar="PATH",
                         help="a file holding USER@HOST:PASSWORD (basic auth) or an "
                              "OAuth token, for an api_permissions that asks for one")
        sub.add_argument("--backend-command", metavar="TEMPLATE",
                         help="command backend: program and arguments, split like a shell would "
                              "but never run by one; {host}, {ttl}, {uses}, {username}, "
                              "{inviter} are filled in")
        sub.add_argument("--backend-timeout", type=_arg(parse_seconds), metavar="SECONDS",
                         default=DEFAULT_BACKEND_TIMEOUT,
                         help="kill a backend program after this (default "
                              f"{DEFAULT_BACKEND_TIMEOUT:g})")
        sub.add_argument("--backend-concurrency", type=_arg(parse_count), metavar="N",
                         default=DEFAULT_BACKEND_CONCURRENCY,
                         help="backend programs run at once (default "
                              f"{DEFAULT_BACKEND_CONCURRENCY})")

    def accounts_args(sub):
        sub.add_argument("--accounts", choices=("prosody", "ejabberd", "command"),
                         help="who creates the accounts built-in invites are used for, "
                              "from their sign-up page (/register?t=TOKEN), and says "
                              "which accounts exist (for resets): Prosody through its "
                              "admin socket, ejabberdctl, or --accounts-command")
        sub.add_argument("--accounts-command", metavar="TEMPLATE",
                         help="accounts command: program and arguments with {action} "
                              "(create, reset, exists, mark or befriend), {username}, {host}, "
                              "{inviter}; the password comes on its standard input; exit 3 "
                              "means the name is taken (reset, exists, mark: there is no such "
                              "account; befriend: the inviter has none)")

    def policy_args(sub, clear):
        none = " ('never' removes it)" if clear else ""
        sub.add_argument("--expires", type=_arg(parse_expiry, clear and "never"), metavar="WHEN",
                         help="the key stops working then: a duration "
                              f"(90d) or a UTC date (2027-01-31){none}")
        none = " ('none' removes it)" if clear else ""
        sub.add_argument("--max-invites", type=_arg(parse_count, clear and "none"), metavar="N",
                         help=f"total invites the key may ever make{none}")
        sub.add_argument("--rate", type=_arg(parse_rate, clear and "none"), metavar="N/PERIOD",
                         help=f"at most N invites per period, e.g. 10/hour, 100/day{none}")
        sub.add_argument("--max-ttl", type=_arg(parse_duration), metavar="DURATION",
                         help="longest invite lifetime a request may ask for (default 7d)")
        sub.add_argument("--max-uses", type=_arg(parse_count), metavar="N",
                         help="most uses a request may ask for per invite (default 1)")
        sub.add_argument("--allow-resets", action=argparse.BooleanOptionalAction, default=None,
                         help="the key may mint password-reset invites for existing accounts of "
                              "its host (default: it may not; --no-allow-resets takes it back)")
        sub.add_argument("--inviter", type=_arg(parse_username, clear and "none"), metavar="USER",
                         help="every invite the key mints is a contact invite from USER@HOST: "
                              "the newcomer and USER become each other's contacts at sign-up "
                              f"(USER must have an account){none}")
        backend_args(sub)  # (to ask the XMPP server whether the inviter has an account)
        accounts_args(sub)

    sub = command(commands, "serve", cmd_serve, "run the HTTP API")
    sub.add_argument("--bind", default=DEFAULT_BIND, metavar="ADDR",
                     help=f"address to listen on (default {DEFAULT_BIND}; 0.0.0.0 or :: for all)")
    sub.add_argument("--port", type=_arg(parse_port), default=DEFAULT_PORT,
                     help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    sub.add_argument("--public-url", metavar="URL",
                     default=os.environ.get("INVITES_API_PUBLIC_URL"),
                     help="start of invite page URLs, may contain {host} (default: "
                          "$INVITES_API_PUBLIC_URL, else the request's scheme and Host header)")
    sub.add_argument("--invite-url", metavar="TEMPLATE",
                     help="send Location to an external landing page instead; "
                          "placeholders {host}, {token}, {uri}")
    sub.add_argument("--invite-ttl", type=_arg(parse_duration), default=DEFAULT_INVITE_TTL,
                     metavar="DURATION", help="default invite lifetime, e.g. 12h, 7d, 1w2d "
                                              "(default 7d)")
    sub.add_argument("--purge-after", type=_arg(parse_duration), default=DEFAULT_PURGE_GRACE,
                     metavar="DURATION",
                     help="delete invites this long after they expired, were used up or revoked "
                          "(default 30d)")
    sub.add_argument("--max-connections", type=_arg(parse_count), default=DEFAULT_MAX_CONNECTIONS,
                     metavar="N",
                     help=f"simultaneous connections (default {DEFAULT_MAX_CONNECTIONS})")
    sub.add_argument("--timeout", type=_arg(parse_seconds), default=DEFAULT_TIMEOUT,
                     metavar="SECONDS",
                     help=f"close connections idle this long (default {DEFAULT_TIMEOUT:g})")
    sub.add_argument("--request-timeout", type=_arg(parse_seconds), default=DEFAULT_REQUEST_TIMEOUT,
                     metavar="SECONDS",
                     help="a request (and a TLS handshake) must arrive whole within this "
                          f"(default {DEFAULT_REQUEST_TIMEOUT:g})")
    sub.add_argument("--site-name", metavar="NAME",
                     help="shown at the top of invite pages (default: the host)")
    sub.add_argument("--apps", metavar="FILE.json",
                     help='the "No app yet?" list on invite pages: '
                          '[{"platform", "name", "url"}, ...]')
    sub.add_argument("--tls-cert", metavar="FILE",
                     help="serve HTTPS (TLS 1.2+) with this certificate chain; SIGHUP reloads it")
    sub.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    sub.add_argument("--trust-proxy", nargs="?", const="x-forwarded-for",
                     choices=("x-forwarded-for", "forwarded"),
                     help="behind a reverse proxy: take the client address, scheme and host "
                          "from the header it sets: X-Forwarded-For (its last hop), -Proto, "
                          "-Host; or with =forwarded, Forwarded (off: they could be forged)")
    sub.add_argument("--metrics-token", metavar="TOKEN",
                     default=os.environ.get("INVITES_API_METRICS_TOKEN"),
                     help="require Authorization: Bearer TOKEN for "
                          "/metrics (default: $INVITES_API_METRICS_TOKEN)")
    sub.add_argument("--busy-timeout", type=_arg(parse_seconds), default=BUSY_TIMEOUT,
                     metavar="SECONDS",
                     help="how long a write waits for another process's "
                          f"lock before 503 (default {BUSY_TIMEOUT:g})")
    accounts_args(sub)
    sub.add_argument("--notify-command", metavar="TEMPLATE",
                     help="run after each use of an invite on the sign-up page, with "
                          "the username and the host added as arguments and the "
                          "invite's id in $INVITES_API_INVITE (to tell the inviter)")
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
                     help="a JSON array with id, name, host, created_at, "
                          "last_used_at, invites_created and the key's policy")

    sub = command(commands, "update", cmd_update, "change a key's name or policy")
    host_arg(sub)
    sub.add_argument("key_id", metavar="KEY_ID", help="the id `list` shows")
    sub.add_argument("--name", type=_arg(parse_key_name), help="a new name")
    policy_args(sub, clear=True)

    sub = command(commands, "delete", cmd_delete, "revoke a key at once")
    host_arg(sub)
    sub.add_argument("key_id", metavar="KEY_ID", help="the id `list` shows (the part before the /)")
    sub.add_argument("--revoke-invites", action="store_true",
                     help="also revoke the pending invites the "
                          "key made (they stay valid otherwise)")

    invites = commands.add_parser(
        "invites", help="create, list, show, revoke or redeem invites",
        description="Manage invites directly, without HTTP.", epilog=_EXAMPLES["invites"],
        formatter_class=formatter)
    actions = invites.add_subparsers(dest="action", required=True, metavar="ACTION")
    url_help = ("start of the printed invite URLs, may contain {host} (default: "
                f"$INVITES_API_PUBLIC_URL, else http://{DEFAULT_BIND}:{DEFAULT_PORT})")

    sub = command(actions, "create", cmd_invites_create, "mint one invite and print its page URL",
                  "invites create")
    host_arg(sub)
    sub.add_argument("--ttl", metavar="DURATION", help="lifetime (default 7d)")
    sub.add_argument("--uses", metavar="N", help="how many accounts it may create (default 1)")
    sub.add_argument("--username", help="the only username it may register")
    sub.add_argument("--roles", metavar="ROLE,...",
                     help="roles the new account gets (Prosody 13: prosody:member...)")
    sub.add_argument("--groups", metavar="GROUP,...",
                     help="groups it joins (Prosody 13 with mod_invites_groups)")
    sub.add_argument("--reset", metavar="USER",
                     help="a password-reset invite for this account instead (a day unless --ttl): "
                          "set on the sign-up page of serve --accounts, or made by the prosody "
                          "backend; the account must exist, which --accounts or the backend tells")
    sub.add_argument("--note", help="a note for yourself, shown on the invite (200 characters)")
    sub.add_argument("--inviter", type=_arg(parse_username), metavar="USER",
                     help="a contact invite from USER@HOST: the newcomer and USER become each "
                          "other's contacts at sign-up (USER must have an account)")
    sub.add_argument("--public-url", metavar="URL", help=url_help)
    sub.add_argument("--json", action="store_true", help="print the invite as JSON")
    sub.add_argument("--qr", nargs="?", const="url", choices=("url", "uri"),
                     help="also print a QR code to scan from the screen: of the page URL (a phone "
                          "camera opens it), or with --qr=uri of the xmpp: URI (for an XMPP app)")
    backend_args(sub)
    accounts_args(sub)

    sub = command(actions, "list", cmd_invites_list,
                  "list a host's invites (pending ones unless --all)", "invites list")
    host_arg(sub)
    sub.add_argument("--status", default="valid",
                     choices=("valid", "used", "expired", "revoked", "all"),
                     help="only the invites of this status (default valid: the pending ones)")
    sub.add_argument("--all", action="store_true", help="invites of any status (--status all)")
    sub.add_argument("--limit", type=_arg(parse_limit), default=DEFAULT_LIST_LIMIT, metavar="N",
                     help=f"show at most N (default {DEFAULT_LIST_LIMIT}); stderr says how many "
                          "there are and how to see the next page")
    sub.add_argument("--after", metavar="ID",
                     help="the page after this invite (its id, as the last page ended)")
    sub.add_argument("--key", metavar="KEY_ID", help="only the invites this key made")
    sub.add_argument("--public-url", metavar="URL", help=url_help)
    sub.add_argument("--json", action="store_true", help="a JSON array")
    backend_args(sub)

    sub = command(actions, "show", cmd_invites_show, "show one invite", "invites show")
    host_arg(sub)
    sub.add_argument("invite", metavar="ID", help="its id (as listed), or its whole token")
    sub.add_argument("--public-url", metavar="URL", help=url_help)
    sub.add_argument("--json", action="store_true", help="print the invite as JSON")
    backend_args(sub)
    accounts_args(sub)

    sub = command(actions, "revoke", cmd_invites_revoke, "revoke an invite at once",
                  "invites revoke")
    host_arg(sub)
    sub.add_argument("invite", metavar="ID", help="its id (as listed), or its whole token")
    backend_args(sub)

    sub = command(actions, "redeem", cmd_invites_redeem,
                  "use an invite once; exit 1 if it is not valid", "invites redeem")
    host_arg(sub)
    sub.add_argument("token", metavar="TOKEN", help="its whole token (the invitee's)")
    sub.add_argument("--username", help="the username being registered (checked if the invite "
                                        "has one)")
    sub.add_argument("--public-url", metavar="URL", help=url_help)
    sub.add_argument("--json", action="store_true", help="print the used invite as JSON")
    return parser


def main(argv=None):
    """Run the command line; return the exit code (0 ok, 1 failed, 2 usage)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
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
