"""Who may change or read the adaptation state: the admin credential for privileged actions.

`reset`, `import`, `export` and `feedback` (also on the drift reference, ``"method": "drift"``)
wipe, replace, leak (export returns other clients' cached image features) or poison what a
deployment learned, so the inference credential is not enough: the request must also carry
``X-TTA-Admin-Token: <credential>``, one of

- TorchServe's *management* key (token authorization on, the default): read from the frontend's
  ``key_file.json`` (rotations picked up), which the TorchServe adapter finds as the working
  directory of its parent process, or from ``TTA_TS_KEY_FILE``;
- an admin token from the environment (``TTA_ADMIN_TOKEN``), a file such as a mounted
  Kubernetes Secret (``TTA_ADMIN_TOKEN_FILE`` or ``admin_token_file`` in the config), the way
  to go where TorchServe's token authorization is off.

No header: 401. A wrong one, or none configured at all: 403. `state` (counts only) stays open.
Every privileged attempt is logged on the ``tta.audit`` logger: action, method, outcome, which
kind of credential matched and the client hints (forwarded-for, user agent), never a secret.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta.errors import BadRequest

PRIVILEGED = frozenset({"reset", "import", "export", "feedback"})
ADMIN_HEADER = "x-tta-admin-token"
KEY_FILE_NAME = "key_file.json"

audit = logging.getLogger("tta.audit")


class Unauthorized(BadRequest):
    """No admin credential on a privileged action (401)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unauthorized")


class Forbidden(BadRequest):
    """A wrong admin credential, or privileged actions disabled (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="forbidden")


@dataclass
class AdminAuth:
    """The credentials that unlock privileged actions; files are re-read when they change."""

    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    key_file: Path | None = None
    _cache: dict[Path, tuple[float, str | None]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                    key_file: Path | str | None = None) -> AdminAuth:
        """Environment first (TTA_ADMIN_TOKEN, TTA_ADMIN_TOKEN_FILE, TTA_TS_KEY_FILE), then config."""
        config = config or {}
        environ = os.environ if environ is None else environ
        token = environ.get("TTA_ADMIN_TOKEN") or None
        token_file = environ.get("TTA_ADMIN_TOKEN_FILE") or config.get("admin_token_file")
        key = environ.get("TTA_TS_KEY_FILE") or key_file
        return cls(token=token.strip() if token else None, token_file=Path(token_file) if token_file else None,
                   key_file=Path(key) if key else None)

    def credentials(self) -> list[tuple[str, str]]:
        """(kind, secret) pairs valid now."""
        out = []
        if self.token:
            out.append(("admin_token", self.token))
        if self.token_file is not None and (secret := self._read(self.token_file, _plain)):
            out.append(("admin_token_file", secret))
        if self.key_file is not None and (secret := self._read(self.key_file, _management_key)):
            out.append(("management_key", secret))
        return out

    def _read(self, path: Path, parse: Any) -> str | None:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached[0] == mtime:
                return cached[1]
        try:
            secret = parse(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            secret = None
        with self._lock:
            self._cache[path] = (mtime, secret)
        return secret

    def authorize(self, action: str, method: str | None, headers: Mapping[str, str]) -> str | None:
        """None for open actions; the matching credential kind for privileged ones, else raise."""
        if action not in PRIVILEGED:
            return None
        given = (headers.get(ADMIN_HEADER) or "").strip()
        if not given:
            raise missing_credential(action, method, headers)
        hints = _client_hints(headers)
        valid = self.credentials()
        for kind, secret in valid:
            if hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8")):
                _audit(action, method, "allowed", kind, hints)
                return kind
        _audit(action, method, "denied", "invalid" if valid else "none_configured", hints)
        if not valid:
            raise Forbidden(f"action '{action}' is disabled: this deployment has no admin credential "
                            f"(set TTA_ADMIN_TOKEN or TTA_ADMIN_TOKEN_FILE, or keep TorchServe's token "
                            f"authorization on and send its management key)")
        raise Forbidden(f"the admin credential is not valid for action '{action}'")

    def record(self, action: str, method: str | None, outcome: str, kind: str | None,
               headers: Mapping[str, str]) -> None:
        """Log how an allowed privileged action ended (ok / client_error / server_error)."""
        if action in PRIVILEGED:
            _audit(action, method, outcome, kind or "-", _client_hints(headers))


def missing_credential(action: str, method: Any, headers: Mapping[str, str]) -> Unauthorized:
    """The 401 for a privileged action without the header, logged (also used before decoding)."""
    _audit(action, method, "denied", "missing", _client_hints(headers))
    return Unauthorized(f"action '{action}' changes or reveals the adaptation state: send the admin "
                        f"credential in the X-TTA-Admin-Token header")


def _plain(text: str) -> str | None:
    return text.strip() or None


def _management_key(text: str) -> str | None:
    key = json.loads(text)["management"]["key"]
    return str(key) if key else None


def _client_hints(headers: Mapping[str, str]) -> str:
    """Who asked, as far as a worker can tell (proxies' forwarded-for, the user agent); truncated."""
    parts = []
    for name in ("x-forwarded-for", "x-real-ip", "user-agent", "x-request-id"):
        value = headers.get(name)
        if value:
            parts.append(f"{name}={_printable(value)[:80]}")
    return " ".join(parts) or "-"


def _printable(value: str) -> str:
    return "".join(c if c.isprintable() and c not in "\r\n" else "?" for c in value)


def _audit(action: str, method: str | None, outcome: str, credential: str, client: str) -> None:
    audit.info("privileged action=%s method=%s outcome=%s credential=%s client=%s",
               action, _printable(str(method))[:40], outcome, credential, client)


def torchserve_key_file() -> Path | None:
    """TorchServe writes key_file.json into its working directory, which is the working directory
    of this worker's parent (the frontend) process; None where that cannot be read."""
    candidate = Path(f"/proc/{os.getppid()}/cwd") / KEY_FILE_NAME
    try:
        return candidate.resolve(strict=True)
    except OSError:
        return None
