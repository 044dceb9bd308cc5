"""Where shared memory comes from: the checks that a manifest's storages are its producer's own.

Note [the trust model]
    Who may hand a trainer a manifest: anyone who can write the JSON it reads. That is the engine it
    started (``LocalEngine``, over a private socket), a vLLM worker (``collective_rpc``), whatever answers
    at a ``vllm serve`` URL, or any caller of ``Manifest.from_json``. A manifest is data, never code
    (no pickle), so the worst it can do is make the trainer *map memory*: read-write and shared, since
    the trainer's optimizer writes through the mapping. So the question is which memory.

    What a manifest can reach, after these checks:
      * ``shm``: only a POSIX shared-memory object that the named producer process holds open *now*, that
        torch created in that process (``/dev/shm/torch_<producer pid>_...``), that is already unlinked
        (nobody can open it by name), and that lives on a tmpfs (never a file on disk). The producer must
        be alive, of this boot, and (when the manifest says) started when the manifest says. Every check
        runs on the descriptor that is then mapped, not on a path that could change in between; the
        manifest's inode and size are compared too, but never trusted alone.
      * ``cuda_ipc``: only legacy CUDA IPC handles (torch's ``'c'`` type; never an expandable segment,
        whose handle names a pid and fds the consumer would pull from that process), whose ref-counter
        file is the named producer's own torch file in /dev/shm (that file is opened and written by torch
        when the handle is opened), within that file's slots, on the GPU whose UUID the manifest names.
        The memory handle itself is opaque: CUDA opens only handles of live allocations, and we cannot
        tell whose. A forged manifest can therefore pair a real producer's ref-counter file with another
        process's handle on the same GPU; it cannot reach host files.
    What stays reachable by design: the producer's own shared memory, whole (Note [the whole segment is
    shared] in :mod:`ipcbridge.transports.cuda_ipc`). A trainer trusts the engine it attaches to with its
    weights; it need not trust a URL, a log file or a manifest copied from elsewhere with anything else.
    ``/proc/<pid>/fd`` is only readable by the producer's own user (and root), so a manifest never
    reaches memory the trainer's user could not open itself: these checks stop a confused deputy, the
    trainer writing where nobody meant it to, not a privilege escalation.

Refusals are ``BridgeError`` naming the storage and the fix; they happen before anything is mapped, and
leave nothing open (:func:`ipcbridge.handles.open_manifest` checks every storage before mapping any).
"""

from __future__ import annotations

import functools
import logging
import os
import re

from ipcbridge.errors import BridgeError

logger = logging.getLogger(__name__)

#: Where the kernel says how a process started: ``/proc/<pid>/stat`` field 22, clock ticks since boot.
_STARTTIME_FIELD = 22
#: The name torch gives a shared-memory object (``NewProcessWideShmHandle``: ``/torch_<pid>_<random>_<n>``).
TORCH_SHM_NAME = re.compile(r"/torch_(?P<pid>\d+)_\d+_\d+")
#: What ``/proc/<pid>/fd/<fd>`` of an unlinked one of those says it is.
_UNLINKED_SHM_TARGET = re.compile(r"/dev/shm/torch_(?P<pid>\d+)_\d+_\d+ \(deleted\)")


def boot_id() -> str:
    """This machine's boot id, or ``""`` where the kernel does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or ``None`` if it is not running (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and parentheses.
    rest = stat[stat.rfind(")") + 2:].split()
    if not rest or rest[0] in ("Z", "X"):  # a zombie holds no file descriptors any more
        return None
    try:
        return int(rest[_STARTTIME_FIELD - 3])
    except (IndexError, ValueError):
        return None


def check_boot(pid: int, producer_boot: str, hostname: str) -> None:
    """The manifest's producer ran on this machine, since its last boot. A manifest without a boot id is
    refused wherever this machine has one: an empty field must not switch the check off."""
    here = boot_id()
    if here and producer_boot != here:
        raise BridgeError(
            f"the manifest comes from another machine or boot (producer {hostname}, pid {pid}, boot id "
            f"{producer_boot!r}); memory can only be shared on one machine: use the NCCL fallback across machines"
        )


def check_alive(pid: int, start_time: int) -> None:
    """The manifest's producer is running (and, if the manifest says when it started, it is that very
    process, not a later one with the same pid)."""
    started = process_start_time(pid)
    if started is None:
        raise BridgeError(
            f"the manifest's producer, process {pid}, is not running: the engine has exited. Start it again and "
            "attach to a fresh manifest (engine.manifest())"
        )
    if start_time and started != start_time:
        raise BridgeError(
            f"process {pid} is not the manifest's producer: it started at tick {started}, the producer at "
            f"{start_time} (the producer exited and its pid was reused). Attach to a fresh manifest"
        )


def storage_pid(pid: int, producer: int, where: str) -> None:
    """A storage names the manifest's producer as the process that holds it."""
    if pid != producer:
        raise BridgeError(
            f"{where} names process {pid}, but the manifest's producer is process {producer}: a manifest may only "
            "map its producer's own memory. It was not written by ipcbridge.export; ask the engine for a fresh one"
        )


def torch_shm_target(target: str, producer: int) -> bool:
    """``target`` (a ``/proc/.../fd`` link) is an unlinked torch shared-memory object made by ``producer``."""
    m = _UNLINKED_SHM_TARGET.fullmatch(target)
    return m is not None and int(m["pid"]) == producer


def torch_shm_name(name: str) -> int | None:
    """The creating pid of a torch shared-memory name (``/torch_<pid>_<n>_<n>``), or ``None`` if not one."""
    m = TORCH_SHM_NAME.fullmatch(name)
    return None if m is None else int(m["pid"])


@functools.cache
def _tmpfs_devices_cached() -> frozenset[int]:
    return tmpfs_devices()


def tmpfs_devices() -> frozenset[int]:
    """The device numbers (``st_dev``) of every tmpfs mounted in this mount namespace."""
    devices: set[int] = set()
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        fields, _, fs = line.partition(" - ")
        parts = fields.split()
        if len(parts) > 2 and fs.split(" ", 1)[0] == "tmpfs":
            major, _, minor = parts[2].partition(":")
            if major.isdigit() and minor.isdigit():
                devices.add(os.makedev(int(major), int(minor)))
    return frozenset(devices)


def on_tmpfs(st_dev: int) -> bool:
    """``st_dev`` is a tmpfs: shared memory, never a file on disk. Mounts seldom change, so the table is
    read once and again only when a device is not in it."""
    if st_dev in _tmpfs_devices_cached():
        return True
    _tmpfs_devices_cached.cache_clear()
    return st_dev in _tmpfs_devices_cached()
