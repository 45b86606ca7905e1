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

INDEX_NAME = "index.json"


class ScoreStore:
    def __init__(self, directory: Path, key: dict):
        self.directory, self.key = Path(directory), key
        self.index: dict[str, str] = {}  # table name -> file name
        index_path = self.directory / INDEX_NAME
        if index_path.is_file():
            stored = json.loads(index_path.read_text())
            if stored.get("key") == key:
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
        tmp = self.directory / f".{file_name}.tmp.npy"
        np.save(tmp, table)
        os.replace(tmp, self.directory / file_name)
        if self.index.get(name) != file_name:
            self.index[name] = file_name
            tmp_index = self.directory / f".{INDEX_NAME}.tmp"
            tmp_index.write_text(json.dumps({"key": self.key, "tables": self.index}, indent=1))
            os.replace(tmp_index, self.directory / INDEX_NAME)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
