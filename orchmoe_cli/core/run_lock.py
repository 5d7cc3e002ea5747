"""Exclusive ownership of a run directory, so two runs never interleave checkpoints in it."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from orchmoe_cli.core.checkpoint import clean_stale
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import disk_error

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


class RunLock:
    """Exclusive ownership of a run directory, so two runs never interleave checkpoints in it.

    ``<run_dir>/.lock`` is created with O_EXCL and holds pid, host and start time. A lock left by a
    dead process on this host is taken over with a warning; on other hosts liveness cannot be checked.
    """

    def __init__(self, run_dir: str | Path, field: str = "output.dir") -> None:
        self.run_dir = Path(run_dir)
        self.field = field  # the recipe field that chose the directory, named in the "in use" line
        self.path = self.run_dir / ".lock"
        self._content = ""

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock (or a stale one) and clear temp dirs a killed run left; raises if the run is live."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat()
        self._content = json.dumps({"pid": os.getpid(), "host": host, "started": started}, allow_nan=False)
        if not self._try_create():
            owner = self._read_owner()
            if owner is not None:  # None: its owner released it meanwhile
                self._refuse_if_live(owner)
                log.warning("taking over %s from orchmoe run pid %s, which is no longer running",
                            self.path, owner["pid"])
                self.path.unlink(missing_ok=True)
            if not self._try_create():
                raise OrchmoeError(f"{self.run_dir} is in use by another orchmoe run that started just now; "
                                   f"wait for it or choose another {self.field}")
        clean_stale(self.run_dir)
        return self

    def refuse_if_in_use(self) -> None:
        """Raise the "in use" line when a live run holds the lock, without taking it: a check that runs before an
        error about the directory's contents, which a run still starting has not written yet."""
        owner = self._read_owner()
        if owner is not None:
            self._refuse_if_live(owner)

    def _refuse_if_live(self, owner: dict[str, Any]) -> None:
        host = socket.gethostname()
        if owner["host"] != host or _pid_alive(owner["pid"]):
            where = "" if owner["host"] == host else f" on {owner['host']}"
            raise OrchmoeError(f"{self.run_dir} is in use by another orchmoe run (pid {owner['pid']}{where}); "
                               f"wait for it or choose another {self.field}")

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._content and self.path.read_text(encoding="utf-8") == self._content:  # not one taken from us
                self.path.unlink()

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise disk_error(self.path, exc) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self._content)
        except OSError as exc:  # never leave an empty lock that would block the next run
            self.path.unlink()
            raise disk_error(self.path, exc) from None
        return True

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
            return {"pid": int(owner["pid"]), "host": str(owner["host"])}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise OrchmoeError(f"{self.path}: unreadable run lock; if no other orchmoe run uses {self.run_dir}, "
                               "delete it and run the command again") from None
