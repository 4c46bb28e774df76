"""The storage seam's contract tests (tests/unit/test_storage_seam.py), run against the
object-store backend: the same test functions, with ``storage`` opened on a bucket of the
test server instead of a local directory. The local-only ones (symlinks planted in a
directory, a temporary's folder) are not brought in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from unit.test_storage_seam import (  # collected here again, with this module's fixture
    test_a_committed_checkpoint_reads_back_through_the_seam,
    test_a_second_writer_is_refused_and_tools_see_the_first,
    test_retention_hides_and_deletes_but_keeps_the_newest,
)

from aiockpt.storage import CheckpointStorage, open_storage

__all__ = [
    "test_a_committed_checkpoint_reads_back_through_the_seam",
    "test_a_second_writer_is_refused_and_tools_see_the_first",
    "test_retention_hides_and_deletes_but_keeps_the_newest",
]


@pytest.fixture
def storage(s3_url: str) -> Iterator[CheckpointStorage]:
    backend = open_storage(s3_url, durable=True)
    backend.open()
    yield backend
    backend.close()
