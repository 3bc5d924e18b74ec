"""Artifact keys become names every filesystem accepts (node PCs are Windows machines), one-to-one."""

from __future__ import annotations

from pathlib import Path, PurePath, PureWindowsPath
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.local_names import local_path, local_segment
from services.node.artifacts import LocalArtifactStore

WINDOWS_FORBIDDEN = set('<>:"/\\|?*')


def windows_accepts(name: str) -> bool:
    stem = name.partition(".")[0].upper()
    return (bool(name) and not any(c in WINDOWS_FORBIDDEN or ord(c) < 32 for c in name)
            and not name.endswith((".", " "))
            and stem not in {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)})


def test_a_wifi_serial_maps_to_a_windows_name_and_ordinary_keys_stay_as_they_are() -> None:
    assert local_segment("192.168.0.5:5555") == "192.168.0.5%3A5555"
    key = "dQw4w9WgXcQ/node-A1/192.168.0.5:5555/0b6c1c9e-0000-4000-8000-000000000000/1739012345.png"
    assert local_path(key) == PurePath("dQw4w9WgXcQ", "node-A1", "192.168.0.5%3A5555",
                                       "0b6c1c9e-0000-4000-8000-000000000000", "1739012345.png")
    assert local_segment("ABC123") == "ABC123"
    assert str(PureWindowsPath(*local_path(key).parts)).count(":") == 0


@pytest.mark.parametrize("name", ["CON", "nul", "com1.png", "LPT9", "trailing.", "trailing ", "a%3Ab", "tab\there"])
def test_reserved_and_trailing_names_are_escaped(name: str) -> None:
    mapped = local_segment(name)
    assert windows_accepts(mapped), mapped
    assert unquote(mapped) == name


@pytest.mark.parametrize("bad", ["", ".", ".."])
def test_empty_and_dot_segments_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        local_segment(bad)


@given(st.text(min_size=1, max_size=40).filter(lambda s: s not in (".", "..")))
def test_every_segment_maps_to_an_accepted_name_and_back(segment: str) -> None:
    mapped = local_segment(segment)
    assert windows_accepts(mapped), mapped
    assert unquote(mapped) == segment  # one-to-one: two keys never share a local name


@given(st.text(min_size=1, max_size=20).filter(lambda s: s not in (".", "..")),
       st.text(min_size=1, max_size=20).filter(lambda s: s not in (".", "..")))
def test_different_segments_never_collide(a: str, b: str) -> None:
    if a != b:
        assert local_segment(a) != local_segment(b)


async def test_the_local_store_keeps_the_conventional_key_and_writes_a_windows_safe_path(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    source = tmp_path / "shot.png"
    source.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    key = "vid/node-A1/192.168.0.5:5555/0b6c1c9e-0000-4000-8000-000000000000/1739012345.png"
    first = await store.put(key, source, "image/png")
    second = await store.put(key, source, "image/png")  # the same second: both kept
    assert first.key == key
    assert second.key == key.replace("1739012345.png", "1739012345-1.png")
    on_disk = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*.png"))
    assert on_disk == [f"vid/node-A1/192.168.0.5%3A5555/0b6c1c9e-0000-4000-8000-000000000000/{name}"
                       for name in ("1739012345-1.png", "1739012345.png")]
    assert all(":" not in part for path in on_disk for part in path.split("/"))
