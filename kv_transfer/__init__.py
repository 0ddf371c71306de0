"""Moving a request's state from a prefill replica to a decode replica.

The narrow interface: `send_state` / `recv_state` over a `PairChannel`; the state itself is read
and written through `PagedRequestState.export_layer` / `import_layer` (workers/paged_state.py).
"""

from .channel import PairChannel, TransferError
from .transfer import recv_state, send_state

__all__ = ["PairChannel", "TransferError", "send_state", "recv_state"]
