"""`python -m mtlsparse [overrides]`: one training run (or a sweep with `-m`)."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

EXIT_CODES = {"ConfigError": 2, "NonFiniteLossError": 3}  # expected failures: message, no traceback

log = logging.getLogger("mtlsparse")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra task: train, test and write metrics.json into the Hydra run dir."""
    from mtlsparse.config import check_slurm_tasks
    from mtlsparse.train import run  # heavy imports after Hydra has parsed the command line

    hydra_cfg = HydraConfig.get()
    try:
        check_slurm_tasks(cfg)  # under hydra/launcher=slurm: one task per Lightning device
        metrics = run(cfg, hydra_cfg.runtime.output_dir)
    except Exception as err:
        # the job log gets the reason, so `mtlsparse report` can list the failed job with it
        log.error("%s: %s", type(err).__name__, err, exc_info=type(err).__name__ not in EXIT_CODES)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the other jobs of the sweep still run; Hydra exits non-zero at the end
        sys.exit(EXIT_CODES.get(type(err).__name__, 1))
    return metrics.get("test/mean_acc")


if __name__ == "__main__":
    main()
