"""Logger factories for the ``logger`` group where Lightning's classes need a decision made at run time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger, WandbLogger


def wandb(save_dir: str, offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """Weights & Biases; offline unless an API key is available (``WANDB_API_KEY`` or a ``~/.netrc`` login)."""
    if offline is None:
        netrc = Path.home() / ".netrc"
        has_login = netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
        offline = not (os.environ.get("WANDB_API_KEY") or has_login)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)


def mlflow(save_dir: str, **kwargs: Any) -> MLFlowLogger:
    """MLflow with a file store under the run directory (``mlflow-skinny``, the ``mlflow`` extra)."""
    # MLflow 3 refuses new file stores unless asked; a per-run file store is what we want here.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(tracking_uri=Path(save_dir).resolve().as_uri(), **kwargs)
