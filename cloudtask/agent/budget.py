"""What a call of the agent loop to MongoDB may cost, and what its failure looks like.

Every MongoDB call made by the agent loop (and by the recipes it calls) runs under
``pymongo.timeout(CALL_BUDGET)`` (a few under a multiple of it), so the loop never waits
longer for a server that does not answer. ``STORE_ERRORS`` are what such a call raises when
MongoDB did not answer or refused: the loop says so and goes on, trying again at a later step.
"""

from __future__ import annotations

from pymongo.errors import PyMongoError

from ..exceptions import CloudTaskError

CALL_BUDGET = 2.0  # seconds any one MongoDB call of the agent loop may take
STORE_ERRORS = (CloudTaskError, PyMongoError)
