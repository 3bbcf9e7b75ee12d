"""The results database (SQLite, default <cache>/results.sqlite): one row per finished run.

A run is stored under its key (iqa.heads.training.config.run_key: config, recipe, trainer version, data
fingerprint and rows), so a grid re-run skips what is finished and anything that could change a
result trains afresh. Frozen-head, LoRA and full fine-tuning runs share the table through the
`regime` field. The schema is versioned (`PRAGMA user_version`); columns are read and written by name.
"""

import errno
import json
import os
import sqlite3
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from iqa.errors import IqaError

RESULTS_FILE = "results.sqlite"

SCHEMA_VERSION = 1  # PRAGMA user_version; 0: before versioning (keys without the recipe)
COLUMNS = ("key", "fingerprint_id", "regime", "config", "status", "best_epoch", "best_srcc", "best_plcc",
           "last_srcc", "last_plcc", "diverged_epoch", "curves", "gates", "finished_at")
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    fingerprint_id TEXT NOT NULL,
    regime TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    best_epoch INTEGER,
    best_srcc REAL,
    best_plcc REAL,
    last_srcc REAL,
    last_plcc REAL,
    diverged_epoch INTEGER,
    curves TEXT NOT NULL,
    gates TEXT,
    finished_at TEXT NOT NULL
)
"""


class ResultsDBError(IqaError, ValueError):
    """A results database this version cannot read safely."""


WRITE_TRIES = 3  # a full disk: write tries before the runs are spilled beside the database
SPILL = "pending"  # <db>.pending-<pid>-<id>.jsonl: finished runs waiting to be imported


class ResultsSpilled(OSError):
    """The database was full; the finished runs were saved beside it and are imported on the next run."""

    def __init__(self, spill: Path, count: int):
        super().__init__(errno.ENOSPC, f"the disk is full: {count} finished runs saved to {spill}; "
                                       "free space and run the same command again (they are imported, not retrained)")
        self.spill = spill


def _disk_full(error: Exception) -> bool:
    return getattr(error, "errno", None) == errno.ENOSPC or "disk is full" in str(error)


def default_db(cache: Path) -> Path:
    return Path(cache) / RESULTS_FILE


class ResultsDB:
    """Runs by key (iqa.heads.training.config.run_key). A database of an older schema is migrated on open
    (version 0's rows keep their old keys, which no current config produces, so they stay readable in
    tables but are never re-served as finished); a newer one is refused."""

    def __init__(self, path: Path, read_only: bool = False):
        """`read_only` (results, report, export): the file is opened read-only, and one that is not an iqa
        results database of a known schema is refused; nothing is created, migrated or imported."""
        self.path, self.read_only = Path(path), read_only
        if not read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ResultsDBError(f"cannot write a results database under {self.path.parent}: "
                                     f"{error.strerror or error}; give `db` a writable place") from None
        try:
            with self._connect() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise ResultsDBError(
                        f"{self.path} has schema version {version}, newer than this iqa's {SCHEMA_VERSION}; "
                        f"upgrade iqa or pass another `db`"
                    )
                tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "runs" not in tables and (tables or read_only):  # someone else's database: not a byte written
                    raise ResultsDBError(f"{self.path} is not an iqa results database (no runs table); pass another --db")
                if not read_only:
                    db.execute(SCHEMA)
                columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
                missing = [c for c in COLUMNS if c not in columns]
                if missing:
                    raise ResultsDBError(
                        f"{self.path} is not an iqa results database (no column {missing[0]}); pass another `db`"
                    )
                if version < SCHEMA_VERSION and not read_only:
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            if _disk_full(error):
                raise
            raise ResultsDBError(f"{self.path} is not a usable results database ({error}); move it away to start "
                                 "a new one, or give `db` another path") from None
        if not read_only:
            self._import_spilled()

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        return sqlite3.connect(self.path, timeout=60)

    def finished_keys(self) -> set[str]:
        with self._connect() as db:
            return {key for (key,) in db.execute("SELECT key FROM runs")}

    def record(self, runs: list[tuple[str, dict, str, object]]) -> None:
        """Store (key, config, fingerprint_id, RunResult) rows in one transaction: all or none."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = [
            (
                key, fp, config["regime"], json.dumps(config, sort_keys=True), r.status,
                r.best_epoch, r.best_srcc, r.best_plcc, r.last_srcc, r.last_plcc, r.diverged_epoch,
                json.dumps(r.curves), json.dumps(r.gates) if r.gates is not None else None, now,
            )
            for key, config, fp, r in runs
        ]
        for attempt in range(WRITE_TRIES):
            try:
                return self._write(rows)
            except (sqlite3.OperationalError, OSError) as error:
                if not _disk_full(error):
                    raise
                if attempt + 1 < WRITE_TRIES:
                    time.sleep(0.5 * (attempt + 1))  # space may come back (a cleanup elsewhere)
        raise ResultsSpilled(self._spill(rows), len(rows))

    def _write(self, rows: list[tuple]) -> None:
        with self._connect() as db:
            db.executemany(
                f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows
            )

    def _spill(self, rows: list[tuple]) -> Path:
        """Finished runs the database could not take, as JSON lines beside it: a small file often
        fits where SQLite's journal does not, and the next ResultsDB on this path imports it."""
        spill = self.path.with_name(f"{self.path.name}.{SPILL}-{os.getpid()}-{uuid.uuid4().hex}.jsonl")
        try:
            spill.write_text("".join(json.dumps(list(row), default=float) + "\n" for row in rows))
        except OSError as error:
            spill.unlink(missing_ok=True)
            raise OSError(error.errno, f"the disk is full: {len(rows)} finished runs could not be saved "
                                       f"to {self.path} nor beside it; free space and run again") from None
        return spill

    def _import_spilled(self) -> None:
        for spill in sorted(self.path.parent.glob(f"{self.path.name}.{SPILL}-*.jsonl")):
            try:
                rows = [tuple(json.loads(line)) for line in spill.read_text().splitlines() if line]
            except ValueError:
                continue  # half a file from a crash mid-spill: its runs train again
            self._write(rows)
            spill.unlink()

    def runs(self) -> list[dict]:
        """Every stored run as its config merged with its outcome (curves and gates decoded)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            out = []
            for row in db.execute(f"SELECT {', '.join(COLUMNS)} FROM runs ORDER BY rowid"):
                run = dict(row)
                config = json.loads(run.pop("config"))
                run["curves"] = json.loads(run["curves"])
                run["gates"] = json.loads(run["gates"]) if run["gates"] else None
                out.append({**config, **run})
            return out
