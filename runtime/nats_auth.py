"""NATS trust material: operator, accounts and user JWTs (decentralized auth, NATS's own mechanism).

Layout of a trust folder (`doai nats-auth init --dir DIR`, or `DOAI_HOME/nats-auth` under
`doai up`); every file 0600, the folder 0700:

| file | what | who needs it |
|---|---|---|
| `operator.jwt` | the operator (self-signed; lists its signing key) | nats-server |
| `operator.nk` | operator identity seed | nobody at run time: keep it offline |
| `operator-signing.nk` | operator signing key: signs account JWTs (revocations) | backend |
| `sys.jwt`, `sys.nk` | the system account | nats-server / offline |
| `sys-user.creds` | a user of the system account: pushes account JWT updates | backend |
| `account.jwt` | the DOAI account as created (JetStream on, no revocations) | nats-server (preload) |
| `account.nk` | DOAI account identity seed | nobody at run time: keep it offline |
| `account-signing.nk` | DOAI account signing key: signs user JWTs (enrollment) | backend |
| `backend.creds`, `aggregator.creds`, `tap.creds` | the central roles' users | each its own |
| `nats-auth.conf` | the server's `operator` / `resolver` block (include it) | nats-server |

The server runs a `full` account resolver: the backend pushes a new DOAI account
JWT (with revocations) over `$SYS.REQ.CLAIMS.UPDATE` and nats-server applies it
without a restart or reload. Adding a node needs no server change at all: its
user JWT is signed by the account signing key, which the account JWT lists.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nkeys
from nats_jwt.nkeys_ext import Decode, create_account_pair, create_operator_pair, create_user_pair
from nats_jwt.v2.account_claims import AccountClaims
from nats_jwt.v2.operator_claims import OperatorClaims
from nats_jwt.v2.types import Permission, ResponsePermission
from nats_jwt.v2.user_claims import UserClaims

from contracts.ids import is_node_id
from contracts.subjects import (
    AGGREGATOR_DURABLE,
    CMD_STREAM,
    EVT_STREAM,
    node_durable,
    node_inbox_prefix,
    role_inbox_prefix,
)
from runtime.nats_creds import format_creds, write_secret

ACCOUNT_NAME = "DOAI"
SYS_ACCOUNT_NAME = "SYS"
# The central roles with a fixed identity; nodes each get their own (`node`), and `admin` has no
# limits (tests and break-glass only: never give it to a running part).
ROLES = ("backend", "aggregator", "tap", "node", "admin")
CENTRAL_ROLES = ("backend", "aggregator", "tap")

_USER_KEY = re.compile(r"^U[A-Z2-7]{55}$")


class TrustError(RuntimeError):
    """Trust material missing or invalid; the message says which file."""


@dataclass(frozen=True)
class Grants:
    """What a NATS user may publish and subscribe to (allow lists; everything else is denied)."""

    pub: list[str]
    sub: list[str]


def grants(role: str, node_id: str | None = None) -> Grants | None:
    """The permissions of a role (None: unrestricted, `admin` only).

    Nodes fetch and ack only their own durable consumer (`$JS.API.CONSUMER.MSG.NEXT`,
    `$JS.ACK`), read its info, publish their own events, and receive replies only on their
    own inbox prefix. They cannot create, change or delete any stream or consumer.
    """
    if role == "node":
        if node_id is None or not is_node_id(node_id):
            raise ValueError(f"a node identity needs a valid node id, got {node_id!r}")
        durable = node_durable(node_id)
        return Grants(
            pub=[
                f"doai.evt.{node_id}.>",
                f"$JS.API.CONSUMER.MSG.NEXT.{CMD_STREAM}.{durable}",
                f"$JS.API.CONSUMER.INFO.{CMD_STREAM}.{durable}",
                f"$JS.ACK.{CMD_STREAM}.{durable}.>",
            ],
            sub=[f"{node_inbox_prefix(node_id)}.>"],
        )
    if role == "backend":
        return Grants(pub=["doai.cmd.>", "$JS.API.>"], sub=[f"{role_inbox_prefix('backend')}.>"])
    if role == "aggregator":
        return Grants(
            pub=[
                f"$JS.API.CONSUMER.MSG.NEXT.{EVT_STREAM}.{AGGREGATOR_DURABLE}",
                f"$JS.API.CONSUMER.INFO.{EVT_STREAM}.{AGGREGATOR_DURABLE}",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{EVT_STREAM}.{AGGREGATOR_DURABLE}",
                f"$JS.API.CONSUMER.CREATE.{EVT_STREAM}.{AGGREGATOR_DURABLE}",
                f"$JS.API.CONSUMER.CREATE.{EVT_STREAM}.{AGGREGATOR_DURABLE}.>",
                f"$JS.API.STREAM.INFO.{EVT_STREAM}",
                f"$JS.ACK.{EVT_STREAM}.{AGGREGATOR_DURABLE}.>",
            ],
            sub=[f"{role_inbox_prefix('aggregator')}.>"],
        )
    if role == "tap":
        return Grants(
            pub=[
                "$JS.API.INFO",
                "$JS.API.STREAM.NAMES",
                "$JS.API.STREAM.LIST",
                "$JS.API.STREAM.INFO.*",
                "$JS.API.CONSUMER.NAMES.*",
                "$JS.API.CONSUMER.LIST.*",
                "$JS.API.CONSUMER.INFO.*.*",
            ],
            sub=["doai.evt.>", f"{role_inbox_prefix('tap')}.>"],
        )
    if role == "admin":
        return None
    raise ValueError(f"unknown NATS role {role!r} (one of {', '.join(ROLES)})")


def inbox_prefix(role: str, node_id: str | None = None) -> str:
    """The inbox prefix a client of this role must connect with (`inbox_prefix=`)."""
    if role == "node":
        assert node_id is not None
        return node_inbox_prefix(node_id)
    if role == "admin":
        return "_INBOX"
    return role_inbox_prefix(role)


def is_user_public_key(value: str) -> bool:
    """A well-formed user nkey public key (`U...`, checksum included)."""
    if not _USER_KEY.match(value):
        return False
    try:
        Decode(nkeys.PREFIX_BYTE_USER, value.encode())
    except ValueError:
        return False
    return True


def _seed(kp: nkeys.KeyPair) -> str:
    seed: bytes = kp.seed
    return seed.decode()


def _public(kp: nkeys.KeyPair) -> str:
    key: bytes = kp.public_key
    return key.decode()


def _load_seed(path: Path) -> nkeys.KeyPair:
    try:
        return nkeys.from_seed(path.read_bytes().strip())
    except FileNotFoundError:
        raise TrustError(f"NATS trust material incomplete: {path} is missing") from None
    except Exception as exc:
        raise TrustError(f"{path} is not an nkey seed: {exc}") from None


def _jwt_payload(token: str) -> dict[str, Any]:
    import base64

    body = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return data


def jwt_subject(token: str) -> str:
    """The `sub` (the public key) of a JWT, unverified."""
    return str(_jwt_payload(token)["sub"])


class NatsTrust:
    """One trust folder: the server's config block, user JWTs, the account JWT with revocations."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    # -- creating and loading -------------------------------------------------------

    @classmethod
    def ensure(cls, directory: Path) -> NatsTrust:
        """Load the trust folder, creating it first when it does not exist yet."""
        trust = cls(directory)
        if not (directory / "operator.jwt").exists():
            trust.create()
        return trust

    def create(self) -> None:
        """Make a new operator, system account, DOAI account (with signing keys) and the central users."""
        if (self.dir / "operator.jwt").exists():
            raise TrustError(f"{self.dir} already holds NATS trust material; refusing to overwrite it")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.chmod(0o700)
        operator, operator_signing = create_operator_pair(), create_operator_pair()
        sys_account, account, account_signing = create_account_pair(), create_account_pair(), create_account_pair()
        oc = OperatorClaims(_public(operator), "doai")
        oc.nats.signing_keys.append(_public(operator_signing))
        oc.nats.system_account = _public(sys_account)
        sc = AccountClaims(_public(sys_account), SYS_ACCOUNT_NAME)
        files = {
            "operator.nk": _seed(operator),
            "operator-signing.nk": _seed(operator_signing),
            "sys.nk": _seed(sys_account),
            "account.nk": _seed(account),
            "account-signing.nk": _seed(account_signing),
            "operator.jwt": oc.encode(operator),
            "sys.jwt": sc.encode(operator),
        }
        for name, text in files.items():
            write_secret(self.dir / name, text + "\n")
        write_secret(self.dir / "account.jwt", self.account_jwt({}, signer=operator) + "\n")
        sys_user = create_user_pair()
        uc = UserClaims(_public(sys_user), "doai-sys")
        write_secret(self.dir / "sys-user.creds", format_creds(uc.encode(sys_account), _seed(sys_user)))
        for role in CENTRAL_ROLES:
            write_secret(self.dir / f"{role}.creds", self.new_user_creds(role))

    def _read(self, name: str) -> str:
        path = self.dir / name
        try:
            return path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise TrustError(f"NATS trust material incomplete: {path} is missing") from None

    @property
    def operator_jwt(self) -> str:
        return self._read("operator.jwt")

    @property
    def system_account(self) -> str:
        return jwt_subject(self._read("sys.jwt"))

    @property
    def account(self) -> str:
        """The DOAI account's public key."""
        return jwt_subject(self._read("account.jwt"))

    def creds_path(self, role: str) -> Path:
        """A central role's credentials file (`backend`, `aggregator`, `tap`, or `sys-user`)."""
        return self.dir / f"{role}.creds"

    # -- users ------------------------------------------------------------------------

    def user_jwt(self, public_key: str, role: str, node_id: str | None = None) -> str:
        """A user JWT for `public_key` with the role's permissions, signed by the account signing key."""
        if not is_user_public_key(public_key):
            raise ValueError("not a NATS user public key")
        name = f"node-{node_id}" if role == "node" else role
        uc = UserClaims(public_key, name)
        uc.nats.issuer_account = self.account
        granted = grants(role, node_id)
        if granted is not None:
            uc.nats.pub = Permission(allow=list(granted.pub))
            uc.nats.sub = Permission(allow=list(granted.sub))
            uc.nats.resp = ResponsePermission()
        token: str = uc.encode(_load_seed(self.dir / "account-signing.nk"))
        return token

    def new_user_creds(self, role: str, node_id: str | None = None) -> str:
        """A new key pair and its JWT, as the text of a `.creds` file (the seed is inside: 0600)."""
        kp = create_user_pair()
        return format_creds(self.user_jwt(_public(kp), role, node_id), _seed(kp))

    # -- the account JWT and revocations ------------------------------------------------

    def account_jwt(self, revocations: dict[str, datetime], signer: nkeys.KeyPair | None = None) -> str:
        """The DOAI account JWT: JetStream on, the account signing key, and these revoked user keys.

        A revocation entry revokes every JWT of that user key issued at or before its time.
        """
        account = _load_seed(self.dir / "account.nk") if (self.dir / "account.nk").exists() else None
        account_public = _public(account) if account is not None else self.account
        ac = AccountClaims(account_public, ACCOUNT_NAME)
        # A JSON list, as nats-server reads it (nats-jwt's SigningKeys would serialise as an object).
        ac.nats.signing_keys = [_public(_load_seed(self.dir / "account-signing.nk"))]
        limits = ac.nats.limits
        limits.disk_storage = -1
        limits.streams = -1
        limits.consumer = -1
        # A plain mapping: nats-jwt's RevocationList (a dataclass over dict) serialises as {}.
        ac.nats.revocations = {key: int(when.timestamp()) for key, when in revocations.items()}
        token: str = ac.encode(signer or _load_seed(self.dir / "operator-signing.nk"))
        return token

    # -- the server -------------------------------------------------------------------

    def server_config(self, resolver_dir: str) -> str:
        """The `operator` / `system_account` / `resolver` block of nats-server's config.

        `full` resolver: account JWTs are kept in `resolver_dir` and updated at run time by
        `$SYS.REQ.CLAIMS.UPDATE` (signed by the operator's signing key); on a cluster every server
        answers that update, and the servers sync their JWTs every `interval`. The two accounts are
        preloaded so a fresh server knows them.
        """
        return "\n".join([
            "# NATS decentralized auth for doai (generated by `doai nats-auth init`; no secrets in here).",
            f'operator: "{self.operator_jwt}"',
            f'system_account: "{self.system_account}"',
            "resolver: {",
            "  type: full",
            f"  dir: {json.dumps(resolver_dir)}",
            "  allow_delete: false",
            # On a cluster the servers compare their account JWTs this often: a server that was down when a
            # node was revoked learns it from the others within this time of rejoining (docs/scaling.md).
            '  interval: "5s"',
            '  timeout: "5s"',
            "}",
            "resolver_preload: {",
            f'  {self.system_account}: "{self._read("sys.jwt")}"',
            f'  {self.account}: "{self._read("account.jwt")}"',
            "}",
            "",
        ])


async def push_account_jwt(nc: Any, token: str, timeout_s: float = 5.0) -> None:
    """Send an account JWT to nats-server's `full` resolver (`nc`: a system-account connection).

    Raises `TrustError` when the server refuses it.
    """
    reply = await nc.request("$SYS.REQ.CLAIMS.UPDATE", token.encode(), timeout=timeout_s)
    try:
        answer = json.loads(reply.data)
    except ValueError:
        raise TrustError(f"unexpected answer to the account update: {reply.data[:200]!r}") from None
    error = answer.get("error")
    if error:
        raise TrustError(f"nats-server refused the account update: {error}")


def revocation_time(when: datetime | None = None) -> datetime:
    """Revocations cover JWTs issued at or before this second (JWT times are whole seconds)."""
    return (when or datetime.now(UTC)).replace(microsecond=0)
