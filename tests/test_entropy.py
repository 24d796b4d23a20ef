"""The entropy-coded uplink (dtype ec, issue 24): the coder's round trip at every budget, the torch and numpy
paths byte-identical, bad strings and other tables refused, and a trained model's frozen tables used by
eval and by a real server."""
import json

import numpy as np
import pytest
import torch

from splitprune.cli import main
from splitprune.compression.codec import ChannelCodec, TensorSpec, decode_tensor
from splitprune.compression.tables import count_symbols, read_tables, table_entry
from splitprune.errors import ProtocolError
from splitprune.proto import pb
from splitprune.training.checkpoint import read_meta, read_tensors
from splitprune.wire.codec import encode_values
from splitprune.wire.entropy import EC_LEVELS, fit_tables, tables_digest

C, H, W = 16, 3, 3


def _tables(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return fit_tables((rng.dirichlet(np.full(EC_LEVELS + 1, 0.3), size=C) * 5000).astype(np.int64))


def _values(n: int, k: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).beta(0.5, 2.0, size=(n, k, H, W)).astype(np.float32)


@pytest.mark.parametrize("prefix", [False, True])
def test_round_trip_at_every_budget_and_the_numpy_and_torch_paths_agree(prefix):
    tables = _tables()
    spec = TensorSpec(C, H, W, tables=tables)
    for k in range(1, C + 1):
        values = _values(8, k, seed=k)
        channels = np.arange(k) if prefix else np.sort(np.random.default_rng(k).choice(C, k, replace=False))
        numpy_msg = encode_values(values, None if prefix else channels, C, pb.EC, prefix, tables)
        torch_msg = ChannelCodec("ec", tables).compress(torch.from_numpy(values),
                                                       None if prefix else torch.from_numpy(channels), C, prefix)
        assert numpy_msg.SerializeToString() == torch_msg.SerializeToString()
        decoded = decode_tensor(pb.EncodedTensor.FromString(numpy_msg.SerializeToString()), spec)
        expected = np.clip(np.rint(values * EC_LEVELS), 0, EC_LEVELS) / EC_LEVELS
        assert np.array_equal(decoded.values.numpy(), expected.astype(np.float32))
        assert decoded.channels.tolist() == channels.tolist() and decoded.prefix == (prefix and k < C)


def test_one_string_per_batch_and_fewer_bytes_than_int4_on_skewed_values():
    tables = _tables()
    values = np.zeros((256, 4, H, W), np.float32)
    values[:, :, 0, 0] = 1.0
    counts = count_symbols([torch.from_numpy(np.repeat(values, 4, axis=1)[:, :C])], C, (EC_LEVELS,))[EC_LEVELS]
    skewed = fit_tables(counts)
    ec = encode_values(values, np.arange(4), C, pb.EC, False, skewed)
    int4 = encode_values(values, np.arange(4), C, pb.INT4)
    assert len(ec.data) % 4 == 0 and len(ec.data) < len(int4.data) / 5  # 0.50 bits per symbol: 576 B + a word
    assert ec.tables == tables_digest(skewed) != tables_digest(tables)


def test_bad_strings_other_tables_and_values_out_of_range_are_refused():
    tables = _tables()
    spec = TensorSpec(C, H, W, tables=tables)
    msg = encode_values(_values(64, 4), np.arange(4), C, pb.EC, False, tables)
    data = msg.data
    for bad in (data[:-4], data[:4], data + b"\0\0\0\0", bytes(len(data)), data[:3],
                data[:9] + bytes([data[9] ^ 0x40]) + data[10:]):
        msg.data = bad
        with pytest.raises(ProtocolError, match="entropy-coded string"):
            decode_tensor(msg, spec)
    msg.data = data
    with pytest.raises(ProtocolError, match="other entropy tables"):
        decode_tensor(msg, TensorSpec(C, H, W, tables=_tables(seed=5)))
    with pytest.raises(ProtocolError, match="no entropy tables"):
        decode_tensor(msg, TensorSpec(C, H, W))
    msg.shape[0] = 65  # announces more symbols than the string holds
    with pytest.raises(ProtocolError, match="entropy-coded string"):
        decode_tensor(msg, spec)
    with pytest.raises(ProtocolError, match=r"values in \[0, 1\]"):
        encode_values(_values(2, 2) * 3, np.arange(2), C, pb.EC, False, tables)
    with pytest.raises(ProtocolError, match="needs the model's entropy tables"):
        encode_values(_values(2, 2), np.arange(2), C, pb.EC)


def test_a_trained_model_keeps_its_tables_and_evaluates_with_them(exported, tmp_path, capsys):
    run, _ = exported
    meta = read_meta(run)
    channels = meta["wire_shape"][0]
    tables = read_tables(meta, channels)  # one set per grid, counted at the end of training
    assert sorted(tables) == [3, 7, 15] and all(t.shape == (channels, L + 1) for L, t in tables.items())
    assert table_entry(tables[15])["tables"] == tables[15].tolist()
    results = {}
    for dtype in ("int4", "ec", "ec3"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", "--checkpoint", str(run), "--dtype-up", dtype, "--test-subset", "64", "--out",
                     str(out)]) == 0
        results[dtype] = json.loads(out.read_text())
    assert results["ec3"]["bytes_per_sample"] < results["ec"]["bytes_per_sample"] < results["int4"]["bytes_per_sample"]
    assert abs(results["ec"]["test_accuracy"] - results["int4"]["test_accuracy"]) <= 0.1
    capsys.readouterr()
    assert main(["train", "--method", "ca", "--dtype-up", "ec", "--epochs", "1", "--train-subset", "16",
                 "--out", str(tmp_path / "never")]) == 2
    assert "--dtype-up ec codes with the entropy tables a trained model holds" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_the_rate_term_pulls_values_to_likelier_levels_and_learns_the_histogram():
    from splitprune.compression.prior import GridPrior

    prior = GridPrior(2)
    with torch.no_grad():
        prior.logits[:, 0] = 4.0                       # level 0 is by far the likeliest in both channels
    kept = torch.full((4, 2, 3, 3), 0.5 / EC_LEVELS, requires_grad=True)  # between levels 0 and 1
    prior.eval()                                        # no noise: the gradient's sign is exact
    bits = prior.bits(kept, None)
    bits.backward()
    assert bits.item() > 0 and (kept.grad > 0).all()    # moving up costs bits: the term pulls towards level 0
    assert prior.logits.grad[:, 0].lt(0).all()           # and makes the levels in use likelier
    prior.train()
    g = torch.Generator().manual_seed(0)
    noisy = prior.bits(torch.full((4, 2, 3, 3), 7 / EC_LEVELS), torch.tensor([1, 0]), g)
    assert torch.isfinite(noisy) and noisy.item() > 0


def test_training_with_a_rate_term_lowers_the_coded_bytes(tmp_path):
    base = ["train", "--method", "ca", "--budget", "4", "--epochs", "1", "--train-subset", "64", "--test-subset",
            "32", "--threads", "1", "--quiet"]
    sizes = {}
    for rate in ("0", "3"):
        run = tmp_path / f"rate{rate}"
        assert main([*base, "--rate-lambda", rate, "--out", str(run)]) == 0
        assert main(["eval", "--checkpoint", str(run), "--dtype-up", "ec", "--test-subset", "32", "--out",
                     str(tmp_path / f"{rate}.json")]) == 0
        sizes[rate] = json.loads((tmp_path / f"{rate}.json").read_text())["bytes_per_sample"]
        assert ("device.prior.logits" in read_tensors(run / "checkpoint")) == (rate != "0")  # older keys kept
    assert sizes["3"] < sizes["0"], sizes


def test_a_run_trained_on_the_grid_sends_grid_values_and_ec3_reads_them_exactly(tmp_path):
    from splitprune.training.setup import load_checkpoint

    run = tmp_path / "grid"
    assert main(["train", "--method", "ca", "--budget", "4", "--epochs", "1", "--train-subset", "64",
                 "--test-subset", "32", "--threads", "1", "--quiet", "--train-grid", "3", "--out", str(run)]) == 0
    loaded = load_checkpoint(run, sides=("device",))
    worker = loaded.device
    assert worker.grid == 3 and loaded.cfg.train_grid == 3
    z = worker.infer_half(torch.rand(8, loaded.meta["in_channels"], 32, 32))
    channels = worker.kept_channels(4)
    kept, message = worker._encode(z, channels)
    sent = ChannelCodec.decompress(message).values
    assert torch.allclose(sent * 3, (sent * 3).round(), atol=1e-3)         # on the grid's 4 levels
    assert not torch.allclose(kept * 3, (kept * 3).round(), atol=1e-3)     # the values trained on are not
    tables = read_tables(read_meta(run / "checkpoint"), worker.channels)
    coded = ChannelCodec("ec3", tables).compress(sent, channels, worker.channels)
    spec = TensorSpec(worker.channels, *sent.shape[2:], tables=tables)
    assert torch.allclose(decode_tensor(coded, spec).values, sent, atol=1e-3)  # ec3 sends them as they are
