"""A worker process for the concurrency tests: runs ``export`` jobs with a handler that logs
which process ran which job. Usage: python -m tests.server.jobs.worker_proc URL LOG GO_FILE"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from server.config import Settings
from server.db.session import make_engine, make_sessionmaker
from server.jobs.queue import Committer
from server.stimuli.blobs import BlobStore
from server.worker import JobContext, WorkerConfig, run_worker


def main() -> None:
    url, log_path, go_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    log_path.with_suffix(".ready").touch()  # imports done
    deadline = time.monotonic() + 60
    while not go_file.exists():  # start together with the other worker
        if time.monotonic() > deadline:
            raise SystemExit("the go file never appeared")
        time.sleep(0.01)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def handler(ctx: JobContext) -> Committer:
        os.write(fd, f"{ctx.job.id}\n".encode())
        time.sleep(0.002)  # a little work, so the two workers interleave

        def commit(db: Session) -> dict[str, Any]:
            return {"pid": os.getpid()}

        return commit

    engine = make_engine(url)
    settings = Settings(database_url=url, _env_file=None)  # type: ignore[call-arg]
    config = WorkerConfig(kinds=("export",), lease_s=30, poll_s=0.05)
    ran = run_worker(
        make_sessionmaker(engine),
        BlobStore(Path(log_path).parent / "blobs"),
        settings,
        config,
        handlers={"export": handler},
        exit_when_idle=True,
    )
    os.close(fd)
    engine.dispose()
    print(ran)


if __name__ == "__main__":
    main()
