"""One daemon per identity key: the key file is locked while in use, and created atomically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peerd.identity import IdentityInUse, load_or_create_identity, lock_identity, peer_id_of_public_key


def test_a_second_lock_on_the_same_key_is_refused_naming_the_holder(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    held = lock_identity(key)
    try:
        with pytest.raises(IdentityInUse) as info:
            lock_identity(key)
        assert f"pid {os.getpid()}" in str(info.value)
        assert "--identity" in str(info.value)  # says what to do next
    finally:
        held.release()
    lock_identity(key).release()  # free again once released


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    code = (
        "import sys, time; from pathlib import Path; from peerd.identity import lock_identity; "
        f"lock_identity(Path({str(key)!r})); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(IdentityInUse, match=f"pid {holder.pid}"):
            lock_identity(key)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    deadline = time.monotonic() + 10
    while True:  # the kernel drops a flock when its last descriptor closes, at process exit
        try:
            lock_identity(key).release()
            break
        except IdentityInUse:
            assert time.monotonic() < deadline, "lock outlived its process"
            time.sleep(0.05)


def test_a_new_key_is_written_whole_and_stays_stable(tmp_path: Path) -> None:
    key = tmp_path / "sub" / "identity.key"
    first = peer_id_of_public_key(load_or_create_identity(key).get_public_key())
    assert key.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in key.parent.iterdir()] == ["identity.key"]  # no temporary file left behind
    again = peer_id_of_public_key(load_or_create_identity(key).get_public_key())
    assert again == first


def test_a_first_start_on_a_full_disk_leaves_no_key_behind(tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    key = tmp_path / "identity.key"

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left"):
            load_or_create_identity(key)
    assert list(tmp_path.iterdir()) == []  # neither the key nor its temporary file
    load_or_create_identity(key)  # space is back: the next start just works
    assert [p.name for p in tmp_path.iterdir()] == ["identity.key"]


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (b"\x00garbage", 0o600, "is not a libp2p RSA key"),
        (b"", 0o600, "delete the file to start with a new identity"),  # e.g. left by an old non-atomic write
        (None, 0o644, "chmod 600"),
    ],
)
def test_a_corrupt_or_loose_key_file_is_one_clear_line(tmp_path: Path, content, mode, message, capsys) -> None:
    from peerd.cli.main import main
    from tests.helpers.tiny_model import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", num_layers=1)
    key = tmp_path / "identity.key"
    if content is None:
        load_or_create_identity(key)
    else:
        key.write_bytes(content)
    key.chmod(mode)
    capsys.readouterr()
    assert main(["bootstrap", "--new-swarm", "--identity", str(key), "--model", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(key) in err, err
