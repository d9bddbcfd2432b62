"""Train one LossLab experiment: ``python scripts/train.py [group=choice ...] [key=value ...]``."""

from losslab.train import main

if __name__ == "__main__":
    main()
