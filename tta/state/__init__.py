"""Stream state that outlives a request: bounded queues, snapshots, and one state per deployment.

- `queues`: `ClassQueues`, bounded per-class queues (per-class and total caps on every insert);
- `snapshot`: the snapshot format (`dumps`/`loads`, checksummed) and atomic snapshot files;
- `ops`: operations, the unit of change, and their wire form;
- `host`: the seam. An owner (`StateOwner`: `apply(op)`, `snapshot()`, `restore(state)`) gets a
  `StateHost` from `open_host(name, owner)`; backends: `process` (state in the worker),
  `file` (snapshot files, one worker process), `redis_log` (an operation log that any number of
  replicas apply in order);
- `stream`: `StreamStateMixin`, the stream methods' side of the seam;
- `config`: which backend, from `configure(...)` or the environment (``TTA_STATE_URL``, ...);
- `schema`: validation of everything that enters the state (imports, snapshots, log operations):
  owners declare their fields, a refusal (`StateRejected`) leaves the state unchanged, and
  `on_rejected` listeners count it.
"""

from tta.state.config import StateConfig, configure, current_config, mask_url
from tta.state.host import HostStats, Rejection, StateHost, StateOwner, on_rejected, open_host
from tta.state.ops import Op
from tta.state.queues import ClassQueues, Entry, Policy
from tta.state.schema import StateRejected
from tta.state.snapshot import StateStore, check_meta, dumps, loads, loads_with_generation
from tta.state.stream import STATE_UNAVAILABLE, StreamStateMixin

__all__ = [
    "STATE_UNAVAILABLE", "ClassQueues", "Entry", "HostStats", "Op", "Policy", "Rejection", "StateConfig",
    "StateHost", "StateOwner", "StateRejected", "StateStore", "StreamStateMixin", "check_meta", "configure", "current_config", "dumps", "loads",
    "loads_with_generation", "mask_url", "on_rejected", "open_host",
]
