"""Where the compiler writes: the file names of a packed set, refusing an existing output, the staging folder and its leftovers,
and file-system errors turned into messages that name the path and the fix.

Staging. A run writes everything into ``DIR/.NAME.tmp-PID@HOST-XXXXXXXX`` next to the output
(``NAME`` = the prefix's base name, ``PID@HOST`` the writing process) and renames the finished
files out of it; the folder is removed at the end, whatever happened. A run killed hard (SIGKILL,
node failure, out of memory) leaves it behind. At start, a run looks for leftovers of *its own
prefix* and:

* removes those whose process is gone (same host, PID not running): they can only be garbage;
* reports, and keeps, those of a process still running on this host (another run writing the
  same prefix right now), those of another host (a shared file system: no way to tell) and
  those in the old name format without PID: the warning names them and says how to remove them.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shutil
import socket
import tempfile

from megatron_sft.data.reports import CompileError

logger = logging.getLogger("megatron_sft")

_WRITE_ERRNOS = {errno.ENOSPC: "no space left on", errno.EDQUOT: "disk quota exceeded on",
                 errno.EROFS: "read-only file system at", errno.EACCES: "permission denied writing",
                 errno.EPERM: "permission denied writing", errno.ENOTDIR: "not a folder:",
                 errno.EEXIST: "not a folder:"}


PART_NAMES = ("tokens", "loss_mask", "provenance")
"""The indexed parts of a packed file set (dtypes in ``indexed``)."""


def part_prefix(prefix: str | os.PathLike, part: str) -> str:
    """``PREFIX_tokens`` etc.: the Megatron path prefix of one indexed part."""
    return f"{os.fspath(prefix)}_{part}"


def meta_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.meta.json"


def report_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.report.json"


def indexed_paths(prefix: str | os.PathLike) -> list[str]:
    """The six .bin/.idx paths of a packed file set."""
    return [part_prefix(prefix, part) + ext for part in PART_NAMES for ext in (".bin", ".idx")]


def output_paths(prefix: str | os.PathLike) -> list[str]:
    """Every file of a packed file set; ``meta.json`` last (it is published last)."""
    return indexed_paths(prefix) + [report_path(prefix), meta_path(prefix)]


def existing_outputs(prefix: str) -> list[str]:
    """Files of the packed file set ``prefix`` that exist already."""
    return [p for p in output_paths(prefix) if os.path.lexists(p)]


def refuse_existing_output(prefix: str, overwrite: bool) -> None:
    """CompileError when files of ``prefix`` exist and ``overwrite`` is off."""
    if overwrite:
        return
    found = existing_outputs(prefix)
    if found:
        raise CompileError(f"--output-prefix {prefix} exists already ({', '.join(found[:3])}"
                           f"{', ...' if len(found) > 3 else ''}): pass --overwrite to replace it, or choose "
                           "another --output-prefix")


def _staging_pattern(prefix: str) -> str:
    return f".{os.path.basename(prefix)}.tmp-"


def make_staging_dir(prefix: str) -> str:
    """A new staging folder for ``prefix`` in its directory, named after this process."""
    out_dir = os.path.dirname(os.path.abspath(prefix))
    owner = f"{os.getpid()}@{socket.gethostname()}-"
    return tempfile.mkdtemp(prefix=_staging_pattern(prefix) + owner, dir=out_dir)


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_staging(prefix: str) -> list[str]:
    """Remove leftover staging folders of ``prefix`` whose process is gone; warn about the others.
    Returns the folders removed."""
    out_dir = os.path.dirname(os.path.abspath(prefix))
    start = _staging_pattern(prefix)
    owned = re.compile(re.escape(start) + r"(\d+)@(.+)-[^-]+$")
    host = socket.gethostname()
    removed, kept = [], []
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), glob.escape(start) + "*"))):
        match = owned.match(os.path.basename(path))
        if match and match.group(2) == host and not _process_running(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            continue
        why = ("process still running: another run writing the same prefix?" if match and match.group(2) == host
               else f"written on host {match.group(2)}" if match else "from an older version")
        kept.append(f"{path} ({why})")
    if removed:
        logger.warning("removed %d staging folder(s) of interrupted runs for %s: %s", len(removed), prefix,
                       ", ".join(removed))
    if kept:
        logger.warning("staging folder(s) of other runs for %s left alone: %s; remove them yourself once no "
                       "run writes %s", prefix, "; ".join(kept), prefix)
    return removed


def write_error(err: OSError, prefix: str) -> CompileError | None:
    """A CompileError naming the path and the fix for a file-system error while writing ``prefix``
    (disk full, quota, read-only, permission), or None for any other OSError."""
    what = _WRITE_ERRNOS.get(err.errno)
    if what is None:
        return None
    path = err.filename or os.path.dirname(os.path.abspath(prefix))
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there or choose an --output-prefix on a larger file system"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "a file stands where the output folder should be: choose another --output-prefix"
    else:
        fix = "choose an --output-prefix in a folder you can write to"
    return CompileError(f"{what} {path} while writing --output-prefix {prefix}: {fix} (nothing was published; "
                        "the partial output was removed)")
