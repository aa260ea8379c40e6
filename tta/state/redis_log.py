"""Redis backend: one operation log per (deployment, owner), replayed by every replica.

Keys (the ``{...}`` hash tag keeps one owner's keys in one Redis Cluster slot):

- ``tta:{<deployment>.<owner>}:log``   a Stream of operations (fields ``u``: unique id, ``o``: bytes);
- ``tta:{<deployment>.<owner>}:snap``  a Hash: the latest snapshot (``data``), the stream ``offset``
  it includes and the ``epoch`` it belongs to;
- ``tta:{<deployment>.<owner>}:epoch`` a random token naming this incarnation of the log;
- ``tta:{<deployment>.<owner>}:snaplock`` a short lease: one replica writes each snapshot;
- ``tta:{<deployment>.<owner>}:rejected`` a Hash: the last snapshot a replica refused (``data``,
  ``offset``, ``epoch``, ``reason``, ``replica``, ``at``), kept for inspection (at most one
  snapshot on top of `memory_bound`; delete it when done).

Request path (one round trip, no lock): a Lua script checks the epoch and the snapshot offset,
appends this replica's queued operations (skipping any already in the log, so a retry after a
timeout never duplicates one) and returns every entry after the last one this replica applied.
The replica applies them in stream order, its own included, so every replica holds the same
state after the same prefix of the log.

Snapshots: after `every` operations one replica (the one that wins the lease) copies its state at
its current offset and, in a background thread, writes it and trims the stream behind it
(XTRIM MINID). Memory of one owner in Redis is therefore about one snapshot plus `every`
operations. A replica that starts, or finds itself behind the snapshot, loads the snapshot and
replays the tail.

Faults: every call has a short socket timeout (`StateConfig.timeout_ms`) and no retries; after a
failure the host stops calling Redis for a short, growing back-off, so requests answer at once
from the last known state (`commit`/`sync` return False). Operations made meanwhile are queued
(bounded by `max_pending`; beyond it the oldest are dropped and counted) and appended, in order,
when Redis answers again. A Redis that comes back empty (no epoch key) is re-seeded by the first
replica to notice, from its own state; the others adopt that snapshot. Nobody wipes itself.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from tta.state.config import mask_url
from tta.state.host import StateHost, as_rejection
from tta.state.ops import Op, decode, encode
from tta.state.schema import StateRejected
from tta.state.snapshot import dumps, loads, safe_name

log = logging.getLogger(__name__)

BATCH = 256  # stream entries per round trip
MAX_BACKOFF_S = 2.0
FIRST_BACKOFF_S = 0.1
SNAPSHOT_TIMEOUT_S = 30.0
LEASE_MS = 60_000

_CMP = """
local function cmp(a, b)
  local a1, a2 = string.match(a, '(%d+)-(%d+)')
  local b1, b2 = string.match(b, '(%d+)-(%d+)')
  a1, a2, b1, b2 = tonumber(a1), tonumber(a2), tonumber(b1), tonumber(b2)
  if a1 ~= b1 then if a1 < b1 then return -1 else return 1 end end
  if a2 ~= b2 then if a2 < b2 then return -1 else return 1 end end
  return 0
end
"""

# KEYS: log, epoch, snap. ARGV: my epoch, last applied id, batch size, then (uid, payload) pairs.
SYNC = _CMP + """
local epoch = redis.call('GET', KEYS[2])
if not epoch then return {'empty'} end
if epoch ~= ARGV[1] then return {'epoch'} end
local snap = redis.call('HGET', KEYS[3], 'offset') or '0-0'
if cmp(ARGV[2], snap) < 0 then return {'behind'} end
if #ARGV > 3 then
  local seen = {}
  for _, e in ipairs(redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], '+')) do
    local f = e[2]
    for i = 1, #f, 2 do if f[i] == 'u' then seen[f[i + 1]] = true end end
  end
  for i = 4, #ARGV, 2 do
    if not seen[ARGV[i]] then redis.call('XADD', KEYS[1], '*', 'u', ARGV[i], 'o', ARGV[i + 1]) end
  end
end
return {'ok', snap, redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], '+', 'COUNT', ARGV[3])}
"""

# KEYS: log, epoch, snap. ARGV: expected current epoch ('' = none), new epoch, snapshot bytes.
SEED = """
local cur = redis.call('GET', KEYS[2]) or ''
if cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('HSET', KEYS[3], 'data', ARGV[3], 'offset', '0-0', 'epoch', ARGV[2])
return 1
"""

# KEYS: log, epoch, snap. ARGV: epoch, offset, snapshot bytes.
SNAPSHOT = _CMP + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local cur = redis.call('HGET', KEYS[3], 'offset')
if cur and cmp(ARGV[2], cur) <= 0 then return 0 end
redis.call('HSET', KEYS[3], 'data', ARGV[3], 'offset', ARGV[2], 'epoch', ARGV[1])
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[2])
return 1
"""

_clients: dict[tuple[str, float], redis.Redis] = {}
_clients_lock = threading.Lock()


def client(url: str, timeout_s: float) -> redis.Redis:
    """One connection pool per (URL, timeout) per process; no retries (the host has its own back-off)."""
    key = (url, timeout_s)
    with _clients_lock:
        if key not in _clients:
            kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                                      "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
            password = state_password()
            if password and not urlparse(url).password:
                kwargs["password"] = password
            _clients[key] = redis.Redis.from_url(url, **kwargs)
        return _clients[key]


def state_password() -> str | None:
    """TTA_STATE_PASSWORD, else the file TTA_STATE_PASSWORD_FILE names (a mounted Kubernetes Secret:
    no password in the environment). Read per new connection pool, so a rotated file is picked up."""
    if os.environ.get("TTA_STATE_PASSWORD"):
        return os.environ["TTA_STATE_PASSWORD"]
    path = os.environ.get("TTA_STATE_PASSWORD_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise ValueError(f"TTA_STATE_PASSWORD_FILE {path} cannot be read: {exc}") from exc


def key_prefix(deployment: str, owner: str) -> str:
    return f"tta:{{{safe_name(deployment)}.{safe_name(owner)}}}"


def memory_bound(snapshot_bytes: int, op_bytes: int, every: int) -> int:
    """Upper bound of the Redis memory one owner uses (its snapshot, log and keys), in bytes.

    `snapshot_bytes`: the owner's snapshot at full capacity (its caps bound it); `op_bytes`: its
    largest operation. The log holds at most the `every` operations since the last snapshot plus
    those appended while the next one is written (bounded by another `every`); a snapshot being
    replaced briefly exists twice. Per-entry and per-key overheads are generous constants.
    """
    return 2 * snapshot_bytes + 2 * every * (op_bytes + 128) + 65_536


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisHost(StateHost):
    mode = "redis"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert self.config.url
        prefix = key_prefix(self.config.deployment, self.name)
        self.prefix = prefix
        self.keys = [f"{prefix}:log", f"{prefix}:epoch", f"{prefix}:snap"]
        self.lease_key = f"{prefix}:snaplock"
        self.redis = client(self.config.url, self.config.timeout_ms / 1000.0)
        self._slow = client(self.config.url, SNAPSHOT_TIMEOUT_S)
        self._sync_script = self.redis.register_script(SYNC)
        self._seed_script = self.redis.register_script(SEED)
        self._snapshot_script = self._slow.register_script(SNAPSHOT)
        self.epoch = ""
        self.last_id = "0-0"
        self.snap_offset = "0-0"
        self.pending: OrderedDict[str, tuple[bytes, Op]] = OrderedDict()
        self._replica = uuid.uuid4().hex[:12]
        self._seq = 0
        self._down_until = 0.0
        self._backoff = FIRST_BACKOFF_S
        self._since_snapshot = 0
        self._my_snapshot = ""
        self._writer: threading.Thread | None = None
        self.last_error: str | None = None

    # --- request path -----------------------------------------------------------------------
    def _sync(self) -> bool:
        return self._exchange()

    def _commit(self, op: Op) -> bool:
        if not self.admit(op):  # what this replica refuses never reaches the others
            return self._exchange()
        self._seq += 1
        self.pending[f"{self._replica}-{self._seq}"] = (encode(op), op)
        while len(self.pending) > self.config.max_pending:
            self.pending.popitem(last=False)
            self.stats.dropped += 1
        return self._exchange()

    def _exchange(self) -> bool:
        """Send queued ops, apply the log up to its head; False (and back off) when Redis fails."""
        if time.monotonic() < self._down_until:
            self.stats.unavailable += 1
            return False
        try:
            self._catch_up()
        except (redis.RedisError, OSError, ValueError) as exc:
            self._down(exc)
            return False
        self._backoff = FIRST_BACKOFF_S
        if self.last_error is not None:
            log.info("%s: state backend %s reachable again", self.name, mask_url(self.config.url))
            self.last_error = None
        self._maybe_snapshot()
        return True

    def _catch_up(self) -> None:
        send = True
        for _ in range(10_000):  # bounded: each pass applies a batch or repairs the epoch
            args: list[Any] = [self.epoch, self.last_id, BATCH]
            if send:
                for uid, (payload, _op) in self.pending.items():
                    args += [uid, payload]
            reply = self._sync_script(keys=self.keys, args=args)
            status = _id(reply[0])
            if status == "empty":
                self._seed("")
                continue
            if status in ("epoch", "behind"):
                self._adopt()
                continue
            send = False
            offset, entries = _id(reply[1]), reply[2]
            if offset != self.snap_offset:  # a newer snapshot: count from it (ours was counted when taken)
                if offset != self._my_snapshot:
                    self._since_snapshot = 0
                self.snap_offset = offset
            for entry_id, fields in entries:
                self._apply_entry(_id(entry_id), fields)
            if len(entries) < BATCH:
                return
        raise redis.RedisError("log did not converge")

    def _apply_entry(self, entry_id: str, fields: Any) -> None:
        pairs = fields.items() if isinstance(fields, Mapping) else zip(fields[::2], fields[1::2], strict=True)
        fields = {_id(k): v for k, v in pairs}
        uid = _id(fields.get("u", b""))
        mine = self.pending.pop(uid, None)
        try:
            op = mine[1] if mine is not None else decode(fields["o"])
        except (KeyError, ValueError) as exc:  # every replica of this version skips it alike
            self.reject("log", StateRejected("entry", f"does not decode ({exc})"), entry_id, "skipped")
            op = None
        if op is not None:
            try:
                self._apply(op, "log", entry_id)
            except Exception as exc:  # noqa: BLE001 - the same code fails the same op on every replica: skip it
                log.exception("%s: log entry %s failed to apply; skipped", self.name, entry_id)
                self.reject("log", as_rejection(exc), entry_id, "failed to apply; skipped")
        self.last_id = entry_id
        self._since_snapshot += 1

    def _seed(self, expect: str) -> None:
        """Redis has no log for this owner (first start, or restarted empty): publish our state."""
        epoch = uuid.uuid4().hex
        data = dumps(self.owner.snapshot())
        if self._seed_script(keys=self.keys, args=[expect, epoch, data]):
            log.info("%s: seeded the state log at %s (epoch %s) from this replica's state",
                     self.name, mask_url(self.config.url), epoch[:8])
            self.epoch, self.last_id, self.snap_offset, self._since_snapshot = epoch, "0-0", "0-0", 0

    def _adopt(self) -> None:
        """Another incarnation of the log, or we fell behind its snapshot: load the snapshot, replay the tail."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self.keys[1])
            pipe.hgetall(self.keys[2])
            epoch, snap = pipe.execute()
        if epoch is None:
            return  # emptied meanwhile: the next pass seeds
        snap = {_id(k): v for k, v in (snap or {}).items()}
        if _id(snap.get("epoch", b"")) != _id(epoch) or "data" not in snap:
            self._seed(_id(epoch))  # a log without its snapshot (evicted keys): start a new incarnation
            return
        where = f"{self.prefix}:snap"
        fallback = f"starting empty and replaying the log after {_id(snap.get('offset', b'0-0'))}"
        try:
            state: dict[str, Any] | None = loads(snap["data"])
        except ValueError as exc:  # corrupt: the same refusal as one that does not validate
            self.refuse_snapshot(as_rejection(exc), where, lambda rejected: self._keep_rejected(snap, str(rejected)), fallback)
            state = None
        if state is None:
            self.owner.restore(None)
            self.stats.restored = False
        else:
            self.stats.restored = self._restore(state, where, lambda rejected: self._keep_rejected(snap, str(rejected)),
                                                fallback)
        self.epoch, self.last_id = _id(epoch), _id(snap["offset"])
        self.snap_offset, self._since_snapshot = self.last_id, 0

    def _keep_rejected(self, snap: Mapping[str, Any], reason: str) -> str:
        """Copy a refused snapshot to ``:rejected`` (the snapshot itself stays where it is)."""
        key = f"{self.prefix}:rejected"
        self.redis.hset(key, mapping={"data": snap.get("data", b""), "offset": snap.get("offset", b""),
                                      "epoch": snap.get("epoch", b""), "reason": reason[:500],
                                      "replica": self._replica, "at": f"{time.time():.3f}"})
        return key

    def _down(self, exc: BaseException) -> None:
        self.stats.unavailable += 1
        self._down_until = time.monotonic() + self._backoff
        self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)
        message = f"{type(exc).__name__}: {str(exc)[:200]}"
        if message != self.last_error:
            log.warning("%s: state backend %s unavailable (%s); answering from the last known state, %d op(s) "
                        "queued", self.name, mask_url(self.config.url), message, len(self.pending))
        self.last_error = message

    # --- snapshots --------------------------------------------------------------------------
    def _maybe_snapshot(self) -> None:
        if self._since_snapshot < self.config.snapshot_every() or (self._writer and self._writer.is_alive()):
            return
        self._since_snapshot = 0
        try:
            if not self.redis.set(self.lease_key, self._replica, nx=True, px=LEASE_MS):
                return  # another replica is writing this snapshot
        except (redis.RedisError, OSError):
            return
        state = _copied(self.owner.snapshot())  # at exactly self.last_id; written outside the request path
        self._my_snapshot = self.last_id
        self._writer = threading.Thread(target=self._write_snapshot, args=(state, self.epoch, self.last_id),
                                        name=f"tta-state-snapshot-{self.name}", daemon=True)
        self._writer.start()

    def _write_snapshot(self, state: dict[str, Any], epoch: str, offset: str) -> None:
        start = time.perf_counter()
        try:
            data = dumps(state)
            if self._snapshot_script(keys=self.keys, args=[epoch, offset, data]):
                self.stats.snapshots += 1
                self.stats.last_snapshot_ms = (time.perf_counter() - start) * 1000.0
                self.stats.last_snapshot_bytes = len(data)
        except (redis.RedisError, OSError) as exc:
            log.warning("%s: snapshot to %s failed: %s", self.name, mask_url(self.config.url), exc)
        finally:
            try:
                self._slow.delete(self.lease_key)
            except (redis.RedisError, OSError):
                pass

    def flush(self) -> None:
        """Nothing to do: the log is the durable copy (snapshots are taken every `every` operations)."""

    def wait_snapshot(self, timeout_s: float = 60.0) -> None:
        """Block until a background snapshot write finishes (tests, shutdown)."""
        writer = self._writer
        if writer is not None:
            writer.join(timeout_s)

    def close(self) -> None:
        self.wait_snapshot()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(url=mask_url(self.config.url), keys=self.prefix, epoch=self.epoch[:8], offset=self.last_id,
                   pending=len(self.pending), every=self.config.snapshot_every())
        if self.last_error:
            out["last_error"] = self.last_error
        return out


def _copied(state: Any) -> Any:
    """A deep copy of tensors (owners may mutate theirs in place after the snapshot is taken)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {k: _copied(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_copied(v) for v in state)
    return copy.copy(state)


