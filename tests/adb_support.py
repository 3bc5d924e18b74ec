"""A small adb *server* (host protocol over TCP) with scripted devices, for driver tests.

It speaks the smart-socket protocol the real adb server speaks to clients:
4-hex-digit length + command, answered `OKAY` / `FAIL` + length-prefixed
message; `host:version`, `host:devices[-l]`, `host:transport:<serial>` then
`shell:<command>` whose output streams until the socket closes. No phone can
be attached on this machine, so this stands in for the adb server + phones;
the driver itself (adbutils) is the real client.
"""

from __future__ import annotations

import asyncio
import shlex
from dataclasses import dataclass, field

from services.simulator.png import make_png


@dataclass
class FakePhone:
    serial: str
    state: str = "device"
    model: str = "Pixel_7"
    commands: list[str] = field(default_factory=list)
    hang: bool = False


class FakeAdbServer:
    def __init__(self, phones: list[FakePhone]) -> None:
        self.phones = {p.serial: p for p in phones}
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FakeAdbServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @staticmethod
    def _block(text: str | bytes) -> bytes:
        data = text.encode() if isinstance(text, str) else text
        return f"{len(data):04x}".encode() + data

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        phone: FakePhone | None = None
        try:
            while True:
                size = await reader.readexactly(4)
                command = (await reader.readexactly(int(size, 16))).decode()
                if command == "host:version":
                    writer.write(b"OKAY" + self._block("0027"))  # 39: plain host:transport
                elif command in ("host:devices", "host:devices-l"):
                    lines = [
                        f"{p.serial}\t{p.state}" + (f" model:{p.model} device:{p.model.lower()}"
                                                    if command.endswith("-l") else "")
                        for p in self.phones.values()
                    ]
                    writer.write(b"OKAY" + self._block("\n".join(lines) + "\n"))
                elif command.startswith("host:transport:"):
                    phone = self.phones.get(command.removeprefix("host:transport:"))
                    if phone is None:
                        writer.write(b"FAIL" + self._block(f"device '{command[15:]}' not found"))
                    else:
                        writer.write(b"OKAY")
                        await writer.drain()
                        continue
                elif command.startswith("shell:") and phone is not None:
                    line = command.removeprefix("shell:")
                    phone.commands.append(line)
                    writer.write(b"OKAY")
                    await writer.drain()
                    if phone.hang:
                        await asyncio.sleep(3600)
                    writer.write(self._run(phone, line))
                else:
                    writer.write(b"FAIL" + self._block(f"unknown command {command!r}"))
                await writer.drain()
                break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _run(phone: FakePhone, line: str) -> bytes:
        argv = shlex.split(line)
        if argv[:2] == ["screencap", "-p"]:
            return make_png(64, 128, seed=7)
        if argv[:1] == ["echo"]:
            return (" ".join(argv[1:]) + "\n").encode()
        if argv[:2] == ["getprop", "ro.product.model"]:
            return f"{phone.model}\n".encode()
        if argv[:2] == ["getprop", "ro.build.version.release"]:
            return b"14\n"
        if argv[:2] == ["dumpsys", "battery"]:
            return b"Current Battery Service state:\n  AC powered: false\n  level: 87\n  scale: 100\n"
        if argv[:1] == ["monkey"] and "missing.app" in argv:
            return b"** No activities found to run, monkey aborted.\n"
        return b""
