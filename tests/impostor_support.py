"""An impostor on a NATS port: it speaks a server's first line (INFO) in clear and records what the dialer says.

The attack tests use it where a client or a route would dial a server that is down (or a port someone else
took): a dialer that answers the INFO with CONNECT gives its credentials away.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


class Impostor:
    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.received: list[bytes] = []
        self.dialed = asyncio.Event()
        self.heard = asyncio.Event()  # the dialer hung up (or said nothing for 3 s): all it said is in `received`

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.dialed.set()
        writer.write(b"INFO " + json.dumps(self.info).encode() + b"\r\n")
        await writer.drain()
        try:
            while chunk := await asyncio.wait_for(reader.read(4096), 3):
                self.received.append(chunk)
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()
            self.heard.set()

    async def listen(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._answer, "127.0.0.1", port, reuse_address=True)
