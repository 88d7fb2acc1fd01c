"""Exclusive locks on a file beside what they guard (run directories, pruned model directories).

`fcntl.flock`: the kernel releases the lock when its process dies, so a killed writer never leaves a lock
that blocks forever. Locks belong to an open file description: two `acquire` calls, from two processes or two
threads of one process, exclude each other. The lock file stays where it is after release (unlinking it would
let a waiter hold a lock on a file nobody else can open any more).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def acquire(path: Path, wait: bool) -> int | None:
    """The descriptor holding an exclusive lock on `path` (created if missing), with this process id written
    into it; None when another holder has it and `wait` is False. With `wait`, block until it is free."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def release(fd: int) -> None:
    os.close(fd)  # closing the last descriptor of the open file releases the flock


@contextlib.contextmanager
def held(path: Path, wait: bool) -> Iterator[bool]:
    """Hold the lock on `path` for the block; yields False (holding nothing) when it is busy and not `wait`."""
    fd = acquire(path, wait)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            release(fd)
