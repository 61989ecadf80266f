"""The latency floor: read CR-terminated lines from one tty, reply to each on another.

Each reply is the fixed 4-byte LCUS ON command. Run as
``python floor.py SCANNER_TTY RELAY_TTY``. It prints ``ready`` once both ttys
are open and exits when the scanner tty reports end of file or an error (the
benchmark closed its pty master). It does the least any gate controller must
do for a scan, so the daemon's latency can be shown as a ratio to it.
"""

from __future__ import annotations

import os
import sys

# The LCUS-1 ON command for channel 1, the same bytes the daemon sends.
REPLY = bytes([0xA0, 0x01, 0x01, 0xA2])


def main(scanner_path: str, relay_path: str) -> int:
    scanner = os.open(scanner_path, os.O_RDWR | os.O_NOCTTY)
    relay = os.open(relay_path, os.O_RDWR | os.O_NOCTTY)
    print("ready", flush=True)
    pending = b""
    while True:
        try:
            chunk = os.read(scanner, 4096)
        except OSError:
            return 0
        if not chunk:
            return 0
        pending += chunk
        while b"\r" in pending:
            _, _, pending = pending.partition(b"\r")
            os.write(relay, REPLY)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
