"""Datasets: one LightningDataModule design for in-memory tensors and for image folders."""

from losslab.data.datamodule import ImageDataModule, InMemoryDataModule
from losslab.data.folder import FolderDataModule
from losslab.data.multilabel import MosaicDataModule, MultiLabelFolderDataModule

__all__ = [
    "FolderDataModule", "ImageDataModule", "InMemoryDataModule", "MosaicDataModule", "MultiLabelFolderDataModule",
]
