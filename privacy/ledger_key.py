"""The plant's ledger key: a secret only the plant holds, which MACs its ledger and journal.

A file of 64 hex digits (32 random bytes), mode 0600, created on the plant's first DP round (default
`<ledger>.key`, node config `ledger-key`). It is its own secret rather than one derived from the SuperNode's
private key: the ClientApp never sees that key (Flower gives it to the SuperNode process only), simulation and
`--insecure` plants have none, and the anchor's revocation and expiry make a plant replace it, while a ledger
must outlive every node key the plant ever had. Each use derives a sub-key from the secret, the purpose and the
plant id, so a MAC made for one plant (or for the journal) never verifies as another's.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from maxfl.atomic import fsync_dir
from maxfl.errors import ConfigError

log = logging.getLogger(__name__)

SECRET_BYTES = 32


class LedgerKey:
    """The key file at `path`; read once, created only by `create()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._secret: bytes | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def _load(self) -> bytes:
        if self._secret is None:
            try:
                text = self.path.read_text(encoding="ascii").strip()
                secret = bytes.fromhex(text)
            except FileNotFoundError:
                raise ConfigError(f"the ledger key {self.path} is missing: restore it from backup (a new key cannot verify the "
                                  f"ledger and journal the old one wrote)") from None
            except (OSError, UnicodeDecodeError, ValueError):
                secret = b""
            if len(secret) < SECRET_BYTES:
                raise ConfigError(f"the ledger key {self.path} is not a maxfl ledger key ({2 * SECRET_BYTES} hex digits): "
                                  f"restore the plant's own key file")
            if self.path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("ledger key %s is readable by other users; chmod 600 it", self.path)
            self._secret = secret
        return self._secret

    def create(self) -> None:
        """A fresh random secret, written 0600 (refuses to replace an existing key)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(SECRET_BYTES) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(self.path.parent)
        log.warning("created the privacy ledger key %s: back it up with the ledger (without it the ledger cannot be verified)", self.path)

    def mac(self, purpose: str, plant_id: str, payload: bytes) -> str:
        sub_key = hmac.new(self._load(), f"maxfl/{purpose}/{plant_id}".encode(), hashlib.sha256).digest()
        return hmac.new(sub_key, payload, hashlib.sha256).hexdigest()

    def key_id(self, purpose: str, plant_id: str) -> str:
        """A short public name of the sub-key: tells 'written with another key' from 'edited'."""
        return self.mac(purpose, plant_id, b"key-id")[:16]
