"""Tiny dependency-free PNG encoder used by the simulator's fake screens.

``make_png`` returns a real, valid PNG (8-bit RGB, no interlace) of exactly the
requested size. The picture is a simple pattern derived from ``seed``: a
vertical colour gradient (in bands) with a contrasting side bar and a "status bar" band,
so two different seeds give visibly different images and the same seed always
gives the same bytes.
"""

from __future__ import annotations

import functools
import random
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Upper bound on each side, to keep the simulator fast whatever it is asked for.
MAX_SIDE = 4096
#: The vertical gradient's number of bands (rows within a band are equal).
GRADIENT_BANDS = 32


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


@functools.lru_cache(maxsize=8192)
def make_png(width: int, height: int, seed: int) -> bytes:
    """Return the bytes of a valid ``width`` x ``height`` RGB PNG derived from ``seed``.

    Sizes are clamped to ``1..MAX_SIDE``. Callers that emulate a phone screen
    should pass a scaled-down size (the simulator uses a quarter of the
    phone's resolution) to keep files small and writes fast.
    """
    width = max(1, min(int(width), MAX_SIDE))
    height = max(1, min(int(height), MAX_SIDE))
    rng = random.Random(seed)
    top = [rng.randrange(256) for _ in range(3)]
    bottom = [rng.randrange(256) for _ in range(3)]
    bar = bytes(255 - c for c in top)
    status = bytes(rng.randrange(64) for _ in range(3))
    bar_w = max(1, width // rng.randint(4, 8))
    status_h = max(1, height // 24)

    # The gradient is drawn in at most GRADIENT_BANDS bands of equal rows, each built once and repeated by
    # bytes multiplication: the fleet benchmark renders hundreds of screens at the same instant in threads
    # beside the node agent, and a Python loop per scanline held the GIL for most of each render.
    body_h = height - status_h
    bands = min(GRADIENT_BANDS, body_h)
    parts = [(b"\x00" + status * width) * status_h]  # filter type 0 (None) per scanline
    for band in range(bands):
        first, end = band * body_h // bands, (band + 1) * body_h // bands
        t = band / max(1, bands - 1)
        colour = bytes(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        parts.append((b"\x00" + colour * (width - bar_w) + bar * bar_w) * (end - first))
    raw = b"".join(parts)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 1))  # level 1: the fleet benchmark renders thousands per wave
        + _chunk(b"IEND", b"")
    )
