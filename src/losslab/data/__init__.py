"""Datasets: one LightningDataModule design for in-memory tensors and for image folders."""

from losslab.data.datamodule import ImageDataModule, InMemoryDataModule
from losslab.data.disjoint import (
    Cars196DataModule,
    ClassDisjointDataModule,
    CUB200DataModule,
    StanfordOnlineProductsDataModule,
)
from losslab.data.folder import FolderDataModule
from losslab.data.multilabel import MosaicDataModule, MultiLabelFolderDataModule

__all__ = [
    "CUB200DataModule",
    "Cars196DataModule",
    "ClassDisjointDataModule",
    "FolderDataModule",
    "ImageDataModule",
    "InMemoryDataModule",
    "MosaicDataModule",
    "MultiLabelFolderDataModule",
    "StanfordOnlineProductsDataModule",
]
