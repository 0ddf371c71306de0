"""Moving a request's state from a prefill replica to a decode replica.

The narrow interface. Sending: `StateStream` builds a request's frames from its state (entries
while the prefill runs, the rest at its end) and `ChannelSender` sends them in order on a
`PairChannel`; `finish` sends the last ones and frees the state. Receiving: `Landing` holds the reservations of a decode replica and runs one
receive loop per channel. `send_state` / `recv_state` move a whole state at once. The state is
read and written only through PagedRequestState's transfer methods (entry_counts, entry_rows,
tail, prepare_import, import_piece).
"""

from .channel import PairChannel, TransferError
from .landing import Landing
from .stream import ChannelSender, StateStream, finish
from .transfer import recv_state, send_state

__all__ = ["PairChannel", "TransferError", "Landing", "ChannelSender", "StateStream", "finish", "send_state", "recv_state"]
