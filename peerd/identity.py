"""A peer's long-lived identity: one RSA key that is both its libp2p peer id and its DHT signing key.

Using the same key for both is what lets every node check that a DHT record claiming to come from
peer X was really signed by X (see ``swarm/validation.py``): the peer id is a hash of the public key
that the record's owner marker carries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

__all__ = [
    "IdentityError",
    "IdentityInUse",
    "IdentityLock",
    "load_or_create_identity",
    "lock_identity",
    "peer_id_of_public_key",
    "public_key_of_owner_marker",
]

_SHA2_256_MULTIHASH_PREFIX = bytes([0x12, 0x20])


class IdentityError(Exception):
    """The identity file exists but cannot be used (wrong format, unsafe permissions)."""


class IdentityInUse(IdentityError):
    """Another running daemon holds this identity key (two daemons must never share a peer id)."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path, self.holder = path, holder
        super().__init__(
            f"identity key {path} is in use by another peerd daemon ({holder}); two daemons with one key "
            f"look like one peer that contradicts itself. Give this one its own key: --identity {path.parent}/"
            f"<name>.key"
        )


class IdentityLock:
    """An exclusive lock on an identity key, held for a daemon's lifetime (``release()`` ends it).

    The lock is ``flock`` on a ``<key>.lock`` file beside the key: the kernel drops it when the
    process dies, however it dies, so a restarted peer (same key, same peer id) never finds a
    stale lock. The file records the holder's pid, so the refusal can say who holds it.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock


def lock_identity(path: Path) -> IdentityLock:
    """Lock the identity key at ``path`` for this process; raise IdentityInUse if another holds it."""
    path = path.expanduser()
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        raise IdentityInUse(path, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return IdentityLock(path, fd)


def _write_new_key(path: Path, blob: bytes) -> None:
    """Write a new key atomically: a full disk or a crash leaves no file, or a whole one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        # link, not rename: two daemons started at once must not both write (and disagree on) the key
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def load_or_create_identity(path: Path) -> RSAPrivateKey:
    """Load the libp2p RSA identity at ``path``, creating it (mode 0600) on first run.

    The file holds a libp2p ``PrivateKey`` protobuf, the format p2pd reads with ``-id``, so the
    daemon keeps the same peer id across restarts.
    """
    path = path.expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
        _write_new_key(path, blob)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise IdentityError(f"identity file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")
    try:
        proto = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise IdentityError(f"identity file {path} holds a non-RSA key; delete it to make a new one")
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)
        private_key.__setstate__({"_private_key": proto.data})
    except IdentityError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise IdentityError(
            f"identity file {path} is not a libp2p RSA key ({detail}); put the right key back, or delete "
            "the file to start with a new identity (a new peer id)"
        ) from exc
    return private_key


def peer_id_of_public_key(public_key: RSAPublicKey) -> str:
    """The base58 libp2p peer id of an RSA public key (sha2-256 multihash of its protobuf form)."""
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = _SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(encoded).digest()
    return str(base58.b58encode(digest).decode())


def public_key_of_owner_marker(marker: bytes) -> RSAPublicKey:
    """Parse the ``ssh-rsa ...`` bytes inside an ``[owner:...]`` marker; raises ValueError if invalid."""
    try:
        return RSAPublicKey.from_bytes(marker)
    except Exception as exc:
        raise ValueError(f"bad owner public key: {exc}") from exc
