"""Test-only fault: imported into one test's own worker (``celery worker -I
tests.integration.poison``), never by the product. Every Klaviyo bulk import for the list named
by ``SEGOPS_TEST_POISON_LIST`` kills the process that sends it, as an OOM kill would."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from segops_sync.klaviyo.client import KlaviyoClient
from segops_sync.klaviyo.models import BulkImportJob, ProfileInput

_real = KlaviyoClient.create_bulk_import_job


def _poisoned(self: KlaviyoClient, profiles: Sequence[ProfileInput], list_id: str) -> BulkImportJob:
    if list_id == os.environ.get("SEGOPS_TEST_POISON_LIST"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(self, profiles, list_id)


KlaviyoClient.create_bulk_import_job = _poisoned  # type: ignore[method-assign]
