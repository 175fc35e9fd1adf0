"""Per-host bearer tokens: mint, revoke, and check them against a file of hashes.

The tokens file holds only the SHA-256 of each token (lower-case hex of the token's
UTF-8 bytes), never a token. add_host/remove_host rewrite it atomically (mode 0600)
under an flock on `<tokens_file>.lock`; a running TokenStore sees changes within a
second, without a restart. The format, one table per host:

    [hosts.lab-07]
    sha256 = "<64 hex digits>"
    created_at = "2026-11-23T18:00:00+00:00"
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import tomli_w

from episode_common.config_loading import ConfigError
from episode_common.durable import atomic_write
from episode_common.wire import is_valid_id
from receiver.errors import Forbidden, InvalidId, Unauthorized
from receiver.ids import check_id

log = logging.getLogger(__name__)

TOKEN_BYTES = 32  # 256 bits from the OS's CSPRNG
CHECK_INTERVAL_SECONDS = 1.0
REALM_HEADER = {"WWW-Authenticate": 'Bearer realm="episode-ingest"'}

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_FILE_HEADER = (
    "# episode-ingest tokens file, maintained by `episode-receiver add-host` / `remove-host`.\n"
    "# It holds only the SHA-256 of each host's token; the token itself is never stored.\n"
)

# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns); atomic_write always makes a new inode.
Signature = tuple[int, int, int, int, int]
_MISSING: Signature = (-1, -1, -1, -1, -1)
_NEVER_READ: Signature = (-2, -2, -2, -2, -2)


@dataclass(frozen=True)
class HostToken:
    host_id: str
    sha256: str  # lower-case hex
    created_at: str  # ISO 8601, UTC

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256)


class HostHasToken(ValueError):
    """add_host without rotate for a host that already has a token."""

    def __init__(self, host_id: str, created_at: str) -> None:
        super().__init__(
            f"host {host_id} already has a token (created {created_at}); rotate=True replaces it"
        )
        self.host_id = host_id
        self.created_at = created_at


def hash_token(token: str) -> str:
    """The stored form of a token: SHA-256 of its UTF-8 bytes, lower-case hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def read_tokens(path: Path) -> dict[str, HostToken]:
    """The hosts in a tokens file, by host id; a missing file has none. ConfigError if bad."""
    return _read(path)[1]


def add_host(path: Path, host_id: str, *, rotate: bool = False) -> str:
    """Mint a token for host_id, store its hash, return the token (the only copy)."""
    _check_host(host_id)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with _locked(path):
        hosts = read_tokens(path)
        old = hosts.get(host_id)
        if old is not None and not rotate:
            raise HostHasToken(host_id, old.created_at)
        created_at = datetime.now(UTC).isoformat(timespec="seconds")
        hosts[host_id] = HostToken(host_id, hash_token(token), created_at)
        _write(path, hosts)
    log.info("%s token for host %s in %s", "rotated" if old else "minted", host_id, path)
    return token


def remove_host(path: Path, host_id: str) -> bool:
    """Revoke host_id's token; False (and nothing written) when it had none."""
    with _locked(path):
        hosts = read_tokens(path)
        if hosts.pop(host_id, None) is None:
            return False
        _write(path, hosts)
    log.info("revoked token of host %s in %s", host_id, path)
    return True


class TokenStore:
    """Checks `Authorization: Bearer <token>` against the tokens file, reloaded on change."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        check_interval: float = CHECK_INTERVAL_SECONDS,
    ) -> None:
        self.path = path
        self._clock = clock
        self._check_interval = check_interval
        self._hosts: tuple[HostToken, ...] = ()
        self._signature = _NEVER_READ
        self._next_check = float("-inf")
        self._last_failure: object = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Initial load: a missing file means no hosts yet; a bad one raises ConfigError."""
        with self._lock:
            signature, hosts = _read(self.path)
            self._install(signature, hosts)
            self._next_check = self._clock() + self._check_interval

    def authorize(self, host_id: str, authorization: str | None) -> None:
        """Pass for host_id's own token; Unauthorized (401) or Forbidden (403) otherwise."""
        owner = self._identify(authorization)
        if owner != host_id:
            log.warning("token of host %s presented for host %r: 403", owner, host_id)
            raise Forbidden("this token belongs to another host")

    def authorize_any(self, authorization: str | None) -> None:
        """Pass for any host's valid token (protected read endpoints); Unauthorized otherwise."""
        self._identify(authorization)

    def _identify(self, authorization: str | None) -> str:
        token = _bearer_token(authorization)
        self._refresh()
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        # Constant time with respect to the secret: (1) we compare SHA-256 digests, not tokens,
        # so even a leaky comparison would only reveal how the hash of the *guess* relates to
        # the stored hash, which a guesser cannot steer toward it; (2) compare_digest does not
        # stop at the first differing byte; (3) every entry is compared, with no early exit,
        # so the time depends on the number of hosts, never on which one (or how much) matched.
        owner: str | None = None
        for entry in self._hosts:
            if hmac.compare_digest(presented, entry.digest):
                owner = entry.host_id
        if owner is None:
            raise Unauthorized("unknown token", headers=REALM_HEADER)
        return owner

    def _refresh(self) -> None:
        """Reload the file when its stat changed; at most one stat per check_interval."""
        now = self._clock()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self._check_interval
            try:
                current = _stat_signature(self.path)
            except OSError as error:
                self._keep_last_good(f"cannot stat: {error.strerror}", ("stat", error.errno))
                return
            if current == self._signature:
                return
            try:
                signature, hosts = _read(self.path)
            except ConfigError as error:
                self._keep_last_good(error.problem, current, current)
                return
            if signature != _MISSING and signature[2] == 0 and self._hosts:
                # A zero-byte file is what a non-atomic writer leaves mid-write; our own
                # writer never produces one. Revoking every host for that would make their
                # shippers park episodes as fatal (401), so treat it as not yet valid.
                self._keep_last_good("empty file (a write in progress?)", signature, signature)
                return
            self._install(signature, hosts)

    def _keep_last_good(
        self, problem: str, failure: object, signature: Signature | None = None
    ) -> None:
        """Log a broken file once per distinct failure; keep serving the last good set."""
        if failure != self._last_failure:
            log.error(
                "tokens file %s: %s; keeping the last good set of %d hosts",
                self.path,
                problem,
                len(self._hosts),
            )
        self._last_failure = failure
        if signature is not None:
            self._signature = signature  # read it again only once it changes again

    def _install(self, signature: Signature, hosts: dict[str, HostToken]) -> None:
        verb = "loaded" if self._signature == _NEVER_READ else "reloaded"
        self._hosts = tuple(hosts.values())  # one reference swap: readers need no lock
        self._signature = signature
        self._last_failure = None
        if signature == _MISSING:
            log.warning("tokens file %s does not exist: no host may upload", self.path)
        else:
            log.info("tokens file %s %s: %d hosts", self.path, verb, len(hosts))


def _bearer_token(authorization: str | None) -> str:
    if authorization is None or not authorization.strip():
        raise Unauthorized("missing Authorization header", headers=REALM_HEADER)
    parts = authorization.split(None, 1)
    if parts[0].lower() != "bearer":
        raise Unauthorized("expected Authorization: Bearer <token>", headers=REALM_HEADER)
    token = parts[1].strip() if len(parts) == 2 else ""
    if not token:
        raise Unauthorized("empty bearer token", headers=REALM_HEADER)
    return token


def _check_host(host_id: str) -> None:
    try:
        check_id("host id", host_id)
    except InvalidId as error:
        raise ValueError(f"{error.detail} (got {host_id!r})") from None


def _signature_of(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stat_signature(path: Path) -> Signature:
    try:
        return _signature_of(path.stat())
    except FileNotFoundError:
        return _MISSING


def _read(path: Path) -> tuple[Signature, dict[str, HostToken]]:
    """Parse the file; the signature comes from fstat of the same open file, so it matches."""
    source = str(path)
    try:
        with path.open("rb") as handle:
            st = os.fstat(handle.fileno())
            raw = handle.read()
    except FileNotFoundError:
        return _MISSING, {}
    except OSError as error:
        raise ConfigError(source, None, f"cannot read tokens file: {error.strerror}") from None
    signature = _signature_of(st)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(source, None, f"not UTF-8 text (byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(source, None, f"invalid TOML: {error}") from None
    return signature, _parse(data, source)


def _parse(data: dict[str, object], source: str) -> dict[str, HostToken]:
    for key in data:
        if key != "hosts":
            raise ConfigError(source, key, "unknown key")
    hosts = data.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError(source, "hosts", "expected a table of hosts")
    result: dict[str, HostToken] = {}
    owners: dict[str, str] = {}
    for host_id, entry in hosts.items():
        where = f"hosts.{host_id}"
        if not is_valid_id(host_id):
            raise ConfigError(source, where, "not a valid host id")
        if not isinstance(entry, dict):
            raise ConfigError(source, where, "expected a table with sha256 and created_at")
        for key in entry:
            if key not in ("sha256", "created_at"):
                raise ConfigError(source, f"{where}.{key}", "unknown key")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ConfigError(source, f"{where}.sha256", "expected 64 hex digits")
        digest = digest.lower()
        if digest in owners:
            # One token must never open two hosts.
            raise ConfigError(source, f"{where}.sha256", f"same as hosts.{owners[digest]}.sha256")
        owners[digest] = host_id
        created_at = entry.get("created_at")
        if isinstance(created_at, datetime):
            created_at = created_at.isoformat()
        if not isinstance(created_at, str):
            raise ConfigError(source, f"{where}.created_at", "expected an ISO 8601 date-time")
        result[host_id] = HostToken(host_id, digest, created_at)
    return result


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive flock on <path>.lock: concurrent add-host runs must not lose entries."""
    fd = os.open(path.with_name(f"{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write(path: Path, hosts: dict[str, HostToken]) -> None:
    table = {
        host_id: {"sha256": entry.sha256, "created_at": entry.created_at}
        for host_id, entry in sorted(hosts.items())
    }
    data = (_FILE_HEADER + tomli_w.dumps({"hosts": table})).encode()
    try:
        before = path.stat()
    except FileNotFoundError:
        before = None
    atomic_write(path, data, mode=0o600)
    if before is not None and os.geteuid() == 0:
        # root running add-host must not leave a root-owned 0600 file that the receiver's
        # service user can no longer read: keep the previous owner.
        if (before.st_uid, before.st_gid) != (0, 0):
            os.chown(path, before.st_uid, before.st_gid)
