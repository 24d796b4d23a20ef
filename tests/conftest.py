import pytest
import torch

torch.set_num_threads(1)

TINY = {"model": "vgg11_bn_compact", "split": "conv5", "dataset": "fashion-mnist", "train_subset": 64,
        "test_subset": 64, "batch_size": 16, "test_batch_size": 32, "threads": 1}


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A tiny trained ca model (B=2; run folder) and its device half exported at budgets 1 and 2."""
    from splitprune.cli import main

    root = tmp_path_factory.mktemp("exported")
    run, out = root / "run", root / "export"
    assert main(["train", "--method", "ca", "--budget", "2", "--epochs", "1", "--train-subset", "32",
                 "--test-subset", "16", "--threads", "1", "--quiet", "--out", str(run)]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--budget", "1,2",
                 "--check-images", "32"]) == 0
    return run, out
