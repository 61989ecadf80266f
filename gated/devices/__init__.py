"""Scanner input and gate relays.

``Scanner`` reads codes from a serial scanner into a stream of ``ScanEvent``;
``make_relay`` returns the ``Relay`` driver configured for a lane.
"""

from gated.devices.framing import Code, Framer, Rejected, RejectReason, ScanEvent
from gated.devices.relay import Relay, make_relay
from gated.devices.scanner import Scanner, ScannerState

__all__ = [
    "Code",
    "Framer",
    "RejectReason",
    "Rejected",
    "Relay",
    "ScanEvent",
    "Scanner",
    "ScannerState",
    "make_relay",
]
