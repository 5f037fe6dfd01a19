"""Task files: upload a new version, roll back to an older one. Both are audited."""

from __future__ import annotations

from typing import Any

from ..exceptions import NotFound
from .base import OperationsBase


class FileOperations(OperationsBase):
    def put_file(
        self, actor: str, name: str, data: bytes, *, keep: int, max_bytes: int | None = None
    ) -> dict[str, Any]:
        """Store ``data`` as the new latest version of ``name`` (see :meth:`Store.put_file`:
        ValidationError for a bad name, size or archive). ``created`` False: the bytes are
        the latest version already, nothing is stored or audited."""
        try:
            before = self.store.latest_file(name)["sha256"]
        except NotFound:
            before = None
        meta = self.store.put_file(name, data, uploaded_by=actor, keep=keep, max_bytes=max_bytes)
        if meta["created"]:
            self.store.add_audit(
                actor,
                "file.upload",
                f"file:{name}",
                {"sha256": before} if before else None,
                {"sha256": meta["sha256"], "size": meta["size"]},
            )
        return meta

    def rollback_file(self, actor: str, name: str, sha256: str, *, keep: int) -> dict[str, Any]:
        """Make the stored version ``sha256`` of ``name`` the latest again (a new upload of
        its bytes). NotFound: no such version; Conflict: it is the latest already."""
        meta = self.store.rollback_file(name, sha256, actor, keep=keep)
        self.store.add_audit(
            actor,
            "file.rollback",
            f"file:{name}",
            {"sha256": meta["rolled_back_from"]},
            {"sha256": meta["sha256"], "size": meta["size"]},
        )
        return meta
