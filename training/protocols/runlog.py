"""The append-only record of finished runs shared by the protocol runners and the toy benchmark."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training import distributed


class RunLog:
    """Append-only record of finished runs (``runs.jsonl``): what makes a reproduction resumable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["run_id"]] = row

    def __contains__(self, run_id: str) -> bool:
        return run_id in self.rows

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row["run_id"]] = row
        if distributed.is_main_process():  # under torchrun every process keeps the rows, rank 0 writes them
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
