import pytest
import torch

torch.set_num_threads(1)

TINY = {"model": "vgg11_bn_compact", "split": "conv5", "dataset": "fashion-mnist", "train_subset": 64,
        "test_subset": 64, "batch_size": 16, "test_batch_size": 32, "threads": 1}


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)
