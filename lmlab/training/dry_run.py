"""`dry_run=true`: the checked config, the strategy and precision objects, the process
layout and the per-device memory estimate, printed; nothing is trained."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lmlab.config.redact import redacted
from lmlab.config.schema import to_yaml
from lmlab.parallel.memory import estimate, local_batch
from lmlab.parallel.specs import describe
from lmlab.training.build import build_task, check_schedule


def dry_run(cfg: DictConfig) -> dict[str, float]:
    """Prints what the run would be (secrets redacted, as in the run's files); returns the
    memory estimate in bytes per part."""
    console = Console()
    console.print(to_yaml(redacted(cfg)), markup=False, highlight=False)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    spec = describe(cfg.trainer)
    console.print(f"strategy:  {type(trainer.strategy).__name__} on "
                  f"{type(trainer.accelerator).__name__}\n"
                  f"precision: {type(trainer.precision_plugin).__name__} "
                  f"({cfg.trainer.get('precision', '32-true')})\n"
                  f"processes: {spec.world} ({spec.data_parallel} data-parallel x "
                  f"{spec.tensor_parallel} tensor-parallel), "
                  f"per-device batch {cfg.data.batch_size // spec.data_parallel}",
                  highlight=False)
    memory = estimate_memory(cfg)
    table = Table(title="memory per device, estimated", min_width=34)
    table.add_column("part")
    table.add_column("MiB", justify="right")
    for part, size in memory.items():
        table.add_row(part, f"{size / 2**20:.2f}")
    console.print(table)
    return memory


def estimate_memory(cfg: DictConfig) -> dict[str, float]:
    """`lmlab.parallel.memory.estimate` for the run's task, on one per-device batch."""
    data = instantiate(cfg.data)
    data.setup("fit")
    check_schedule(cfg, len(data.train_dataloader()))
    per_device = cfg.data.batch_size // describe(cfg.trainer).data_parallel
    batch = local_batch(next(iter(data.train_dataloader())), per_device)
    return estimate(cfg, build_task(cfg, data), batch)
