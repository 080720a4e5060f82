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
    def __init__(self, cfg: Config, path: str | Path | None = None, resume: bool = False):
        if path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
        self.path = Path(path)
        self._tb, self._tb_wanted, self._purge = None, cfg.run.tensorboard, None
        if resume:
            if not (self.path / "checkpoints" / "latest").is_file():
                raise FileNotFoundError(f"--resume {self.path}: no checkpoints/latest in that run folder")
            saved = (self.path / "config.yaml").read_text()
            if saved != dump_config(cfg):
                raise ValueError(f"--resume {self.path}: the config differs from the run's config.yaml; "
                                 "resume with the run's own config (rlaif-ray train RUN/config.yaml --resume RUN)")
            return
        (self.path / "rollouts").mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)
        (self.path / "config.yaml").write_text(dump_config(cfg))

    def latest_checkpoint(self) -> tuple[str, dict]:
        name = (self.path / "checkpoints" / "latest").read_text().strip()
        ck = self.path / "checkpoints" / name
        state = json.loads((ck / "trainer_state.json").read_text())
        state.pop("optimizer_meta", None)
        return str(ck), state

    def truncate_after(self, step: int) -> None:
        """Forget what a dead driver recorded after the checkpointed step, so the resumed
        record continues without a gap or a repeat (TensorBoard too: purge_step)."""
        self._purge = step + 1
        for name in ("metrics.jsonl", "winrate.jsonl"):
            path = self.path / name
            if path.is_file():
                keep = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
                path.write_text("".join(line + "\n" for line in keep))
        for f in [*(self.path / "rollouts").glob("step_*.parquet"), *(self.path / "eval").glob("step_*.parquet")]:
            if int(f.stem.split("_")[1]) > step:
                f.unlink()
        for d in (self.path / "checkpoints").glob("step_*"):
            if int(d.name.split("_")[1]) > step:
                import shutil

                shutil.rmtree(d)

    def read_json(self, name: str) -> dict:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else {}

    def log_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self._scalars("train", row, row["step"])

    def log_winrate(self, row: dict) -> None:
        """Held-out win rate against the initial policy, one line per evaluation."""
        with open(self.path / "winrate.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self._scalars("eval", row, row["step"])

    def log_judgements(self, rows: list[dict], step: int) -> None:
        from .evaluate import JUDGEMENTS

        (self.path / "eval").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=JUDGEMENTS), self.path / "eval" / f"step_{step:06d}.parquet")

    def _scalars(self, prefix: str, row: dict, step: int) -> None:
        """TensorBoard event files in RUN/tensorboard (optional dependency: without the
        `tensorboard` package, metrics.jsonl alone; said once)."""
        if self._tb is None and self._tb_wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path / "tensorboard"), purge_step=self._purge)
            except ImportError:
                self._tb_wanted = False
                print("note: tensorboard is not installed (pip install tensorboard); metrics.jsonl only")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

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
