"""Attacks on the files `doai up` trusts in DOAI_HOME and in shared folders (review of wave 3).

A local user who can plant a file where `doai up` will open it must not make it write elsewhere
(a symlink as the lock file), and a folder another user prepared (a home, the runtime folder
under /tmp that holds PostgreSQL's trust socket) is refused before anything is put in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from doai import embedded
from doai.embedded import EmbeddedError, ensure_runtime_dir
from doai.servers import hold_home


def _tree(folder: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under `folder`: mode and content (a symlink: its target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path.relative_to(folder))] = (st.st_mode, os.readlink(path))
        elif path.is_file():
            out[str(path.relative_to(folder))] = (st.st_mode, path.read_bytes())
        else:
            out[str(path.relative_to(folder))] = (st.st_mode, b"")
    return out


def test_a_symlink_planted_as_the_lock_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    victim = tmp_path / "victim.txt"  # stands for ~/.bashrc or any file the operator can write
    victim.write_text("precious\n", encoding="utf-8")
    (home / "doai-up.lock").symlink_to(victim)
    before_home, before_victim = _tree(home), (victim.stat().st_mode, victim.read_bytes())

    with pytest.raises(EmbeddedError, match=r"doai-up.lock .*a symlink is refused"), hold_home(home):
        pytest.fail("hold_home went on with a symlinked lock file")

    assert (victim.stat().st_mode, victim.read_bytes()) == before_victim, "the symlink's target was written"
    assert _tree(home) == before_home


def test_the_lock_file_is_private_and_holds_our_pid(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with hold_home(home):
        lock = home / "doai-up.lock"
        assert lock.read_text(encoding="utf-8") == str(os.getpid())
        assert lock.stat().st_mode & 0o077 == 0


def test_a_home_writable_by_every_user_is_refused_and_nothing_is_put_in_it(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(0o777)
    with pytest.raises(EmbeddedError, match=r"writable by every user \(mode 777\)"), hold_home(home):
        pytest.fail("hold_home went on in a world-writable home")
    assert list(home.iterdir()) == []
    assert home.stat().st_mode & 0o7777 == 0o777


def test_a_home_of_another_user_is_refused_and_nothing_is_put_in_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "theirs"
    home.mkdir()
    owner = home.stat().st_uid
    # We cannot chown without root; instead we are someone else than the folder's owner.
    monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)
    with pytest.raises(EmbeddedError, match=rf"belongs to another user \(uid {owner}\)"), hold_home(home):
        pytest.fail("hold_home went on in another user's home")
    assert list(home.iterdir()) == []


def test_a_runtime_folder_prepared_by_another_user_is_refused(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """/tmp/doai-runtime-<uid> made in advance by someone else: PostgreSQL's socket must not go there."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    uid = os.getuid()
    planted = tmp_path / f"doai-runtime-{uid}"
    planted.mkdir()
    planted.chmod(0o777)
    (planted / "bait").write_text("x", encoding="utf-8")
    before = _tree(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: planted.stat().st_uid + 4242)  # the folder is not ours
    with pytest.raises(EmbeddedError, match="not a folder of this user"):
        ensure_runtime_dir()
    assert "XDG_RUNTIME_DIR" not in os.environ
    assert _tree(tmp_path) == before, "the planted folder was changed (chmod) or written"


def test_a_runtime_folder_that_is_a_symlink_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (tmp_path / f"doai-runtime-{os.getuid()}").symlink_to(elsewhere)
    before = _tree(tmp_path)
    with pytest.raises(EmbeddedError, match="not a folder of this user"):
        ensure_runtime_dir()
    assert "XDG_RUNTIME_DIR" not in os.environ
    assert _tree(tmp_path) == before


def test_our_own_runtime_folder_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    ensure_runtime_dir()
    path = Path(os.environ["XDG_RUNTIME_DIR"])
    assert path == tmp_path / f"doai-runtime-{os.getuid()}"
    assert path.stat().st_mode & 0o7777 == 0o700
    embedded.own_folder(path)  # accepted


def test_as_root_postgresql_reaches_its_data_without_making_parent_folders_listable(tmp_path: Path) -> None:
    """As root the server runs as the OS user `pgserver`, which must pass through the folders above its data.

    pgserver's own helper gave every folder up to `/` g+rx,o+rx: a home under /root made /root (and
    its 0644 files) listable and readable by every local user. Only g+x,o+x (pass through) is given now.
    Without root there is no other user: the folders stay as they were.
    """
    private = tmp_path / "private"  # stands for /root
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    (private / "notes.txt").write_text("root's\n", encoding="utf-8")
    home = private / "home"
    with hold_home(home):
        pg = embedded.EmbeddedPostgres(home / "pg", password_file=home / "keys" / "postgres.password")
        try:
            pg.start()
            assert pg.pid is not None and embedded.our_server(pg.pid, "postgres", pg.data_dir) is not None
        finally:
            pg.stop()
    root = os.geteuid() == 0
    assert private.stat().st_mode & 0o777 == (0o711 if root else 0o700), oct(private.stat().st_mode)
    assert home.stat().st_mode & 0o777 == (0o711 if root else 0o700), oct(home.stat().st_mode)
    assert (private / "notes.txt").read_text(encoding="utf-8") == "root's\n"


def test_a_data_folder_too_deep_for_a_socket_name_still_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data folder whose socket path passes 100 characters gets its socket in a short folder.

    CI's pytest folders are that deep. As root, that folder was made inside root's 0700 runtime folder,
    which the server's user (`pgserver`) cannot pass: "could not open lock file … Permission denied".
    The parts must reach the server through the URI `start` returns, and the socket folder is private.
    """
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    (tmp_path / "runtime").mkdir(mode=0o700)
    deep = tmp_path / ("d" * 60) / ("e" * 40) / "pg"
    assert len(str(deep / ".s.PGSQL.65535")) >= 100
    pg = embedded.EmbeddedPostgres(deep)
    try:
        uri = pg.start()
        host = Path(uri.split("host=")[1].split("&")[0])
        assert host != deep and (host / f".s.PGSQL.{pg.port}").exists()
        assert pg.socket_note is None  # the usual folder: nothing to say
        assert host.stat().st_mode & 0o777 == 0o700
        assert _select_one(uri) == 1
        assert (host.stat().st_uid, host.parent) == (_server_uid(), tmp_path / "runtime" if os.geteuid() else
                                                     Path(tempfile.gettempdir()))
        pg.stop()
        assert not host.exists(), "the socket folder outlived the server"
        assert pg.start() == uri, "a restart serves the same URI"
        assert _select_one(uri) == 1
    finally:
        pg.stop()


@pytest.fixture
def shared() -> Iterator[Path]:
    """A short folder under /tmp: it stands for /tmp (as root: the temp folder) or XDG_RUNTIME_DIR (not root).

    Short, because a temp folder whose socket path would pass 100 characters is not used (as root, /tmp is);
    pytest's own folders are that deep on CI.
    """
    base = Path(tempfile.mkdtemp(prefix="doai-t-", dir="/tmp"))
    base.chmod(0o700)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _deep_pg(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[embedded.EmbeddedPostgres, Path]:
    """A data folder too deep for a socket name, and where its socket folder will be made (as root and not)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(base))
    pg = embedded.EmbeddedPostgres(tmp_path / ("d" * 60) / ("e" * 40) / "pg")
    name = f"doai-pg-{hashlib.sha256(str(pg.data_dir).encode()).hexdigest()[:10]}"
    assert len(str(base / name / ".s.PGSQL.65535")) < 100
    return pg, base / name


def _select_one(uri: str) -> int:
    """`select 1` over `uri` (the server answers through the socket folder the URI names)."""
    async def one() -> int:
        conn = await asyncpg.connect(uri)
        try:
            return int(await conn.fetchval("select 1"))
        finally:
            await conn.close()

    return asyncio.run(one())


def _server_uid() -> int:
    """The uid PostgreSQL runs as: `pgserver` as root, else us."""
    if os.geteuid() != 0:
        return os.geteuid()
    import pwd

    from pgserver.utils import ensure_user_exists

    ensure_user_exists("pgserver")
    return pwd.getpwnam("pgserver").pw_uid


@pytest.mark.parametrize("planted", ["symlink", "another_users_folder", "server_users_folder_open_to_all",
                                     "parent_writable_by_all"])
def test_a_socket_folder_planted_in_advance_is_left_as_it_was_and_not_used(
        tmp_path: Path, shared: Path, monkeypatch: pytest.MonkeyPatch, planted: str) -> None:
    """The short socket folder's name is guessable (a digest of the data folder's path), in a shared place.

    As root, a symlink planted there had its target chowned to `pgserver` (/etc, ~/.ssh, …) before it
    was refused, and a folder of another user was chowned and adopted (what it held stayed); then a
    planted name kept doai from starting at all. Now what is planted is left untouched and the socket goes
    into a folder of a random name (made with O_EXCL, 0700), said in the start's notes. A parent any user
    can write into (TMPDIR, no sticky bit) lets them swap any folder after it was checked: refused, nothing
    started.
    """
    pg, path = _deep_pg(tmp_path, shared, monkeypatch)
    victim = tmp_path / "victim"  # stands for /etc or /root/.ssh
    victim.mkdir(mode=0o700)
    (victim / "authorized_keys").write_text("root's\n", encoding="utf-8")
    if planted != "parent_writable_by_all":
        shared.chmod(0o1777)  # as /tmp is: anyone can make the guessable name, nobody can rename ours
    if planted == "symlink":
        path.symlink_to(victim)
    elif planted == "parent_writable_by_all":
        path.parent.chmod(0o777)
    else:
        path.mkdir()
        path.chmod(0o777)
        (path / ".s.PGSQL.5432.lock").write_text("1\n", encoding="utf-8")
        if planted == "server_users_folder_open_to_all":
            os.chown(path, _server_uid(), -1)
        elif os.geteuid() == 0:
            os.chown(path, 4242, 4242)
            path.chmod(0o700)  # private, but not ours: refused for its owner alone (not also for its mode)
        else:  # we cannot chown without root; instead we are someone else than the folder's owner
            owner = path.stat().st_uid
            real = os.geteuid
            monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)
    before = _tree(shared), victim.stat(), _tree(victim), _owner_mode(path), _owner_mode(path.parent)

    host: Path | None = None
    try:
        if planted == "parent_writable_by_all":
            with pytest.raises(EmbeddedError, match="another local user may have prepared it") as refused:
                pg.start()
            assert str(path.parent) in str(refused.value)
            assert pg.pid is None and not (pg.data_dir / "postmaster.pid").exists(), "PostgreSQL was started"
        else:
            if planted == "another_users_folder" and os.geteuid() != 0:
                monkeypatch.setattr(os, "geteuid", real)  # the server and its folder are ours again
            uri = pg.start()
            host = Path(uri.split("host=")[1].split("&")[0])
            assert host.parent == shared and host.name.startswith("doai-pg-") and host != path
            assert (host.stat().st_uid, host.stat().st_mode & 0o777) == (_server_uid(), 0o700)
            assert pg.socket_note is not None and str(path) in pg.socket_note and str(host) in pg.socket_note

            assert _select_one(uri) == 1
    finally:
        pg.stop()
    if host is not None:
        assert not host.exists(), "the socket folder outlived the server"
    assert (victim.stat().st_uid, victim.stat().st_mode) == (before[1].st_uid, before[1].st_mode), \
        "the symlink's target was handed to the server's user"
    assert _tree(victim) == before[2]
    assert _tree(shared) == before[0], "the planted folder was written"
    assert (_owner_mode(path), _owner_mode(path.parent)) == before[3:], "the planted folder was chowned or chmodded"


def _owner_mode(path: Path) -> tuple[int, int, int] | None:
    if not os.path.lexists(path):
        return None
    st = path.lstat()
    return st.st_uid, st.st_gid, st.st_mode
