"""Helpers shared by several test files."""

import hashlib
import json


def db_row(config: dict, fingerprint_id: str, result) -> tuple:
    """A (key, config, fingerprint_id, result) row for ResultsDB.record, keyed by the config itself."""
    key = hashlib.sha256(json.dumps([config, fingerprint_id], sort_keys=True).encode()).hexdigest()
    return key, config, fingerprint_id, result
