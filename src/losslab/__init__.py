"""LossLab: compare training objectives on image benchmarks."""

__version__ = "0.1.0"
