"""The cache directory on disk: its two files (never symlinks), its ``flock`` (opening holds
it shared, deleting the cache exclusively), and the file system it lies on (a network file
system is never written).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from diskcache_ocr.errors import CacheError

CACHE_FILES = ("data.mdb", "lock.mdb")


def check_cache_files(path: Path) -> None:
    """Refuse a cache directory whose files are symlinks or not regular files.

    NOTE: LMDB follows a symlink: a planted ``lock.mdb`` -> somebody's file would have its
    lock table written into that file, a ``data.mdb`` -> elsewhere the whole cache.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CacheError(f"{path}: cannot use the cache directory ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path}: the cache path exists and is not a directory")
    for name in CACHE_FILES:
        try:
            mode = os.lstat(path / name).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CacheError(f"{path / name}: cannot check the cache file ({exc.strerror})"
                             ) from None
        if not stat.S_ISREG(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise CacheError(f"{path / name}: the cache file is {kind}; refused (LMDB would "
                             "write through it). Remove that entry itself, not what it "
                             "points to")


# NOTE: LMDB opens ``lock.mdb`` first, then ``data.mdb``, and trusts the lock table's last
# transaction id to pick the data file's meta page. ``clear --all`` deletes both files: an
# open between the two deletions would pair the old lock table with a new data file, and a
# later one the new table with that file: two writers without a common lock on one file
# (records torn, and readers picking the wrong meta page). So opening holds the directory's
# lock shared, and the clear holds it exclusively while it deletes (``store/remove.py``): an
# open sees both old files or both new ones.
DIRECTORY_GONE = -2  # directory_lock: the directory was replaced or removed while it waited


def directory_lock(path: Path, *, exclusive: bool) -> int | None:
    """Lock the cache directory (``flock``, shared to open, exclusive to delete the cache);
    returns the descriptor to release, ``DIRECTORY_GONE`` when the directory was removed or replaced
    while it waited, or None where it cannot be locked (missing, unreadable, unsupported)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        st, now = os.fstat(fd), os.stat(path)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            os.close(fd)
            return DIRECTORY_GONE
    except FileNotFoundError:
        os.close(fd)
        return DIRECTORY_GONE
    except OSError:  # no flock on this file system: as before
        os.close(fd)
        return None
    return fd


def release_directory_lock(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


# Network and cluster file systems, by the type the kernel's mount table gives them. LMDB
# must not be written on one: its lock table is a shared memory map, coherent only among the
# processes of one machine, and its data file is written through a memory map too.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "gpfs",
    "beegfs", "9p", "afs", "ncpfs", "coda", "panfs", "pvfs2", "orangefs", "ocfs2", "gfs2",
    "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.ceph-fuse", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs", "fuse.beegfs", "fuse.lustre",
})


MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    # (the mount table writes a space, tab, newline and backslash in a path as \ooo octal)
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def network_filesystem(path: str | os.PathLike[str]) -> str | None:
    """The type of the network file system ``path`` (resolved) lies on, from the mount
    table (the mount nearest to it), or None on a local one or where the table cannot be
    read."""
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return None
    where = os.path.realpath(path)
    best, fstype = "", ""
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        if not sep or len(fields) < 5 or not tail:
            continue
        mount = _unescape(fields[4])
        inside = where == mount or where.startswith(mount.rstrip("/") + "/")
        # (the longest mount point holds the path; of two at one point the later, on top)
        if inside and len(mount) >= len(best):
            best, fstype = mount, tail.split(" ")[0]
    return fstype if fstype in NETWORK_FILESYSTEMS else None


__all__ = ["CACHE_FILES", "DIRECTORY_GONE", "MOUNTINFO", "NETWORK_FILESYSTEMS",
           "check_cache_files", "directory_lock", "network_filesystem",
           "release_directory_lock"]
