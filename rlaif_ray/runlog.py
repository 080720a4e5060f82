"""The run folder: resolved config, metrics.jsonl, Parquet of every scored rollout,
checkpoints (safetensors) and a summary."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .config import Config, dump_config


class RunFolder:
    def __init__(self, cfg: Config, path: str | Path | None = None):
        if path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
        self.path = Path(path)
        (self.path / "rollouts").mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)
        (self.path / "config.yaml").write_text(dump_config(cfg))

    def log_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def log_rollouts(self, batch: pa.RecordBatch, step: int) -> None:
        table = pa.Table.from_batches([batch])
        logp_sum = pa.array([float(sum(x)) for x in batch.column("behaviour_logprobs").to_pylist()], pa.float32())
        table = table.append_column("behaviour_logprob_sum", logp_sum)
        table = table.append_column("step_trained", pa.array([step] * batch.num_rows, pa.int64()))
        pq.write_table(table, self.path / "rollouts" / f"step_{step:06d}.parquet")

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step_{step:06d}"

    def mark_checkpoint(self, step: int) -> None:
        (self.path / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")

    def write_json(self, name: str, data: dict) -> None:
        (self.path / name).write_text(json.dumps(data, indent=1))


def read_rollouts(run_dir: str | Path) -> pa.Table:
    return pq.read_table(Path(run_dir) / "rollouts")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
