"""Scores written as they complete, so an interrupted benchmark resumes where it stopped.

`<out>/scores/` holds one `.npy` table per (item file, condition, intervention
set) and `index.json` naming them. A table's rows stay NaN until scored (as in
`evaluation.runner.Scorer`), and every chunk of requests is written as soon as it
is scored (atomically: a table is either its old or its new version). A rerun into
the same directory reads the tables back and scores only the NaN rows.

Scores are valid only for what produced them, so `index.json` records a `key`:
the model fingerprint, dtype, prompt style and prompts, and each intervention
set's artifact versions. A store whose key differs is set aside (renamed), never
mixed in. Plain numpy files and JSON: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lingosteer.files import atomic_path, write_text_atomic

INDEX_NAME = "index.json"


class ScoreStore:
    def __init__(self, directory: Path, key: dict):
        # Compared as JSON reads it back (a tuple in `key` is a list in index.json).
        self.directory, self.key = Path(directory), json.loads(json.dumps(key))
        self.index: dict[str, str] = {}  # table name -> file name
        index_path = self.directory / INDEX_NAME
        if index_path.is_file():
            stored = json.loads(index_path.read_text())
            if stored.get("key") == self.key:
                self.index = stored["tables"]
            else:
                aside = self.directory.with_name(f"{self.directory.name}.stale-{_digest(stored.get('key'))}")
                os.replace(self.directory, aside)
                print(f"bench: {self.directory} held scores of another model, prompt or intervention; "
                      f"moved to {aside}", flush=True)
        self.directory.mkdir(parents=True, exist_ok=True)

    def load(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """The stored table `name`, or a fresh NaN table when there is none (or it does not fit)."""
        if name in self.index:
            table = np.load(self.directory / self.index[name])
            if table.shape == shape:
                return table
        return np.full(shape, np.nan)

    def save(self, name: str, table: np.ndarray) -> None:
        file_name = f"{_digest(name)}.npy"
        with atomic_path(self.directory / file_name, suffix=".npy") as tmp:
            np.save(tmp, table)
        if self.index.get(name) != file_name:
            self.index[name] = file_name
            index = {"key": self.key, "tables": self.index}
            write_text_atomic(self.directory / INDEX_NAME, json.dumps(index, indent=1))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
