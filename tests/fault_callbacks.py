"""Callbacks that inject faults into a run, for the resume tests (importable as ``_target_``)."""

from lightning.pytorch.callbacks import Callback


class CrashAfterEpoch(Callback):
    """Raises as epoch ``epoch + 1`` starts, once ``epoch`` and its checkpoint are complete, as a job
    killed during the next epoch would stop."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch + 1:
            raise RuntimeError(f"injected crash after epoch {self.epoch}")
