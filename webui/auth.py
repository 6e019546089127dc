"""Who may do what: users, API tokens and their roles.

Three roles, each including the one before it:

* ``viewer``   reads everything (status, connections, events, audit, metrics);
* ``operator`` also acts on traffic: fail over, migrate, reset, drain/maint/ready;
* ``admin``    also changes the configuration and manages API tokens.

Credentials come from the ``[api]`` section of the configuration::

    [api]
    token_file = "/etc/appliance/token"    # the original single token: an admin token

    [[api.user]]                           # panel logins
    name = "alice"
    role = "operator"
    password_hash = "scrypt$16384$8$1$<salt hex>$<hash hex>"   # appliance-hash-password

    [[api.tokens]]                         # REST API tokens (plural: `token` is the single one)
    name = "grafana"
    role = "viewer"
    sha256 = "<hex digest of the token>"   # or token = "..." (plain, at least 16 characters)

Passwords are kept only as scrypt hashes (stdlib ``hashlib.scrypt``), tokens
only as SHA-256 digests (a token is 32 random bytes: a fast hash is enough,
nothing to brute-force).  An admin may create tokens at run time; the token is
returned once, kept as its digest, and lives until the appliance restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.credentials import ROLES, TokenConfig, UserConfig, role_at_least, token_digest

SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt, digest = stored.split("$")
        if algo != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(digest) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a user (panel login) or a token (REST)."""

    name: str
    role: str
    via: str            # "token" | "session"

    def can(self, needed: str) -> bool:
        return role_at_least(self.role, needed)


# --- the runtime store ---------------------------------------------------------------

@dataclass
class TokenEntry:
    name: str
    role: str
    sha256: str
    source: str                     # "config" | "runtime" | "legacy"
    created: float = field(default_factory=time.time)
    created_by: str | None = None

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "source": self.source, "created": self.created,
                "created_by": self.created_by}


class AuthStore:
    """Checks tokens and passwords; holds the tokens an admin created."""

    def __init__(self, legacy_token: str = "", users: tuple[UserConfig, ...] = (),
                 tokens: tuple[TokenConfig, ...] = ()) -> None:
        self.users = {u.name: u for u in users}
        self.tokens: dict[str, TokenEntry] = {}
        if legacy_token:
            self.tokens["api-token"] = TokenEntry("api-token", "admin", token_digest(legacy_token), "legacy")
        for t in tokens:
            self.tokens[t.name] = TokenEntry(t.name, t.role, t.sha256, "config")
        self._dummy = hash_password(secrets.token_hex(8))   # equal work for unknown users

    @classmethod
    def from_api_config(cls, api: Any) -> "AuthStore":
        return cls(getattr(api, "token", ""), tuple(getattr(api, "users", ()) or ()),
                   tuple(getattr(api, "tokens", ()) or ()))

    def by_token(self, token: str) -> Principal | None:
        d = token_digest(token)
        found = None
        for t in self.tokens.values():          # compare every one: no early exit on a match
            if hmac.compare_digest(t.sha256, d):
                found = t
        return Principal(found.name, found.role, "token") if found else None

    def by_password(self, name: str, password: str) -> Principal | None:
        u = self.users.get(name)
        ok = check_password(password, u.password_hash if u else self._dummy)
        return Principal(u.name, u.role, "session") if (u and ok) else None

    def create_token(self, name: str, role: str, by: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if name in self.tokens:
            raise KeyError(f"a token named {name!r} exists already")
        token = secrets.token_urlsafe(32)
        self.tokens[name] = TokenEntry(name, role, token_digest(token), "runtime", created_by=by)
        return token

    def revoke_token(self, name: str) -> TokenEntry:
        entry = self.tokens.get(name)
        if entry is None:
            raise LookupError(f"no token named {name!r}")
        del self.tokens[name]
        return entry

    def list_tokens(self) -> list[dict[str, Any]]:
        return [t.public() for t in self.tokens.values()]

    def list_users(self) -> list[dict[str, Any]]:
        return [{"name": u.name, "role": u.role} for u in self.users.values()]


def main() -> None:
    """``appliance-hash-password``: print the scrypt hash of a password read from the terminal (or stdin)."""
    import getpass
    import sys

    # never from the command line: it would show in the process list
    pw = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if len(pw) < 8:
        raise SystemExit("appliance-hash-password: use at least 8 characters")
    print(hash_password(pw))


if __name__ == "__main__":
    main()
