"""Artifact keys become names every filesystem accepts (node PCs are Windows machines), one-to-one."""

from __future__ import annotations

from pathlib import PurePath, PureWindowsPath
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.node.local_names import local_path, local_segment

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
