"""The ``export`` job: a session's (presentations × sites) response matrix as a ``.npz`` file in
the blob store (``exports/session-<id>-job<job>.npz``), for analysis outside popcontrol."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.orm import Session

from server.errors import NotFound
from server.jobs.queue import Committer, JobError

if TYPE_CHECKING:
    from server.worker import JobContext


def export_handler(ctx: JobContext) -> Committer:
    """params: {session_id (default: the job's session), valid_only (default true)}."""
    from server.db.session import transaction
    from server.sessions.service import response_matrix

    session_id = ctx.params.get("session_id", ctx.job.session_id)
    if session_id is None:
        raise JobError("an export job needs a session: set params.session_id or the job's session")
    valid_only = bool(ctx.params.get("valid_only", True))
    ctx.progress(0.1, f"reading session {session_id}")
    try:
        with transaction(ctx.factory) as db:
            matrix = response_matrix(db, [int(session_id)], valid_only=valid_only)
    except NotFound as exc:
        raise JobError(exc.detail) from None
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        counts=matrix.counts,
        stimulus_ids=np.array(matrix.stimulus_ids, dtype="U64"),
        presentation_ids=np.array(matrix.presentation_ids, dtype="U36"),
        block_ids=np.array(matrix.block_ids, dtype=np.int64),
        site_ids=np.array(matrix.site_ids, dtype=np.int64),
    )
    relative = f"exports/session-{int(session_id)}-job{ctx.job.id}.npz"
    ctx.blobs.put_file(relative, buffer.getvalue())
    ctx.progress(0.9, f"wrote {relative}")

    def commit(db: Session) -> dict[str, Any]:
        return {
            "path": relative,
            "session_id": int(session_id),
            "n_presentations": len(matrix.presentation_ids),
            "n_sites": len(matrix.site_ids),
        }

    return commit
