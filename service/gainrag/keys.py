"""API keys: a JSON-lines file of named, hashed keys with per-key limits.

One object per line (blank lines and ``#`` comments are skipped)::

    {"name": "web", "sha256": "<hex>", "rate": 5, "burst": 10, "max_in_flight": 8,
     "can_refresh": false, "revoked": false}

Only ``name`` and ``sha256`` are required; the limits default to the ``GAINRAG_API__KEY_*``
settings. The file holds hashes, never keys: ``gainrag keys add NAME`` prints a new key once and
appends its hash. The file is re-read when it changes (a rotated Kubernetes secret), at most
once per second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gainrag.errors import ConfigurationError

log = logging.getLogger(__name__)

KEY_PREFIX = "grag_"  # recognisable in secret scanners and config diffs
_HEX = frozenset("0123456789abcdef")


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex sha256 stored for ``key`` (keys are random, so an unsalted hash is enough)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One line of the keys file; ``None`` limits take the settings' defaults."""

    name: str
    sha256: str
    rate: float | None = None
    burst: int | None = None
    max_in_flight: int | None = None
    can_refresh: bool = False
    can_write: bool = False  # may add and delete documents (/v1/documents)
    revoked: bool = False

    def to_json(self) -> str:
        """The line for the keys file (defaults left out)."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(data, separators=(", ", ": "))


def _record(data: Any, where: str) -> KeyRecord:
    if not isinstance(data, dict):
        raise ConfigurationError(f"{where}: expected a JSON object")
    unknown = set(data) - set(KeyRecord.__dataclass_fields__)
    if unknown:
        raise ConfigurationError(f"{where}: unknown field(s) {sorted(unknown)}")
    name, digest = data.get("name"), data.get("sha256")
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{where}: 'name' must be a non-empty string")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        raise ConfigurationError(f"{where}: 'sha256' must be 64 lower-case hex digits")
    rec = KeyRecord(**data)
    for field, value in (
        ("rate", rec.rate),
        ("burst", rec.burst),
        ("max_in_flight", rec.max_in_flight),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
        ):
            raise ConfigurationError(f"{where}: '{field}' must be a positive number")
    for flag in ("can_refresh", "can_write", "revoked"):
        if not isinstance(getattr(rec, flag), bool):
            raise ConfigurationError(f"{where}: '{flag}' must be true or false")
    return rec


def load_keys(path: Path) -> list[KeyRecord]:
    """Parse a keys file; a malformed line is a configuration error (fail closed)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the API keys file {path}: {exc.strerror}") from exc
    records: list[KeyRecord] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise ConfigurationError(f"{path}:{n}: not valid JSON") from exc
        records.append(_record(data, f"{path}:{n}"))
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{path}: key names must be unique")
    return records


def append_key(path: Path, record: KeyRecord) -> None:
    """Add a record to the keys file (created with owner-only permissions)."""
    if path.exists() and any(r.name == record.name for r in load_keys(path)):
        raise ConfigurationError(f"{path}: a key named {record.name!r} exists already")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.touch(mode=0o600)
    with path.open("a") as f:
        f.write(record.to_json() + "\n")


class KeyStore:
    """The keys of a file, reloaded when the file changes.

    A reload that fails keeps the last good keys (and logs), so a half-written secret does not
    lock every client out.
    """

    def __init__(self, path: Path, *, check_every_s: float = 1.0) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self._records = load_keys(path)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_every_s:
            return
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            if stamp is None or stamp == self._stamp:
                return
            try:
                self._records = load_keys(self.path)
            except ConfigurationError as exc:
                log.error("API keys file not reloaded, keeping the previous keys: %s", exc.message)
                return
            finally:
                self._stamp = stamp
            log.info("API keys reloaded: %d keys", len(self._records))

    def lookup(self, key: str) -> KeyRecord | None:
        """The record whose hash matches ``key``, compared in constant time against every one."""
        self._maybe_reload()
        digest = hash_key(key).encode()
        found = None
        for rec in self._records:  # no early exit: timing does not tell which record matched
            if secrets.compare_digest(digest, rec.sha256.encode()):
                found = rec
        return found
