"""Room in shared memory for the channels of process-isolated instances.

Each channel is a sparse segment in ``/dev/shm`` whose sender reserves the pages a message
reaches before writing it (see ``csrc/apportion/shm_channel.hpp``): a message that the
filesystem cannot hold fails that request with an ``OSError`` (``ENOSPC``) instead of a SIGBUS.
This module words those errors and the warning given when a model's instances start on a
``/dev/shm`` too small for the largest messages.
"""

from __future__ import annotations

import errno
import os

__all__ = ["SHM_DIR", "free_bytes", "no_room_error", "no_space_error", "space_note"]

SHM_DIR = "/dev/shm"

_ADVICE = ("give it more room (Docker: `docker run --shm-size=1g ...`; Kubernetes: an emptyDir "
           "with medium: Memory mounted on /dev/shm), free space there, or send smaller messages")


def free_bytes(path: str = SHM_DIR) -> int | None:
    """Bytes free for an unprivileged writer on the filesystem at ``path``; None if unknown."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _size(n: int | None) -> str:
    if n is None or n < 0:
        return "an unknown amount"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def no_space_error(model: str, instance: int, what: str, nbytes: int, free: int | None) -> OSError:
    """The error for a message of ``nbytes`` that shared memory could not hold (nothing was
    sent; the worker process and the channel are unaffected). ``what``: "request" or "result"."""
    return OSError(errno.ENOSPC,
                   f"model {model!r} instance {instance}: the {what} ({_size(nbytes)}, {nbytes} bytes) does "
                   f"not fit in shared memory: {SHM_DIR} has {_size(free)} free; this {what} failed, the "
                   f"model keeps serving. The worker process's channel needs that much of {SHM_DIR}: {_ADVICE}")


def no_room_error(model: str, instance: int, cause: str, free: int | None) -> OSError:
    """The error for a worker process that could not start because its channel's segment could
    not be created in shared memory (``cause``: the channel's own words)."""
    return OSError(errno.ENOSPC,
                   f"model {model!r} instance {instance}: cannot create the shared-memory channel to its worker "
                   f"process ({cause}); {SHM_DIR} has {_size(free)} free: {_ADVICE}")


def space_note(model: str, instances: int, message_bytes: int, free: int | None) -> str | None:
    """Why ``/dev/shm`` (``free`` bytes) cannot hold the largest message (``message_bytes``) in
    both directions for each of ``instances`` instances at once; None when it can or is unknown."""
    need = 2 * message_bytes * instances
    if free is None or free >= need:
        return None
    return (f"model {model!r}: {SHM_DIR} has {_size(free)} free, but the largest request and result "
            f"({_size(message_bytes)} each way) of its {instances} worker process(es) need {_size(need)}; "
            f"messages that do not fit will fail with OSError (ENOSPC). To serve them, {_ADVICE}")
