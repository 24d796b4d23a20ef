"""Entropy tables per channel and position of the cut (`--ec-prior position`, issue 24): the coder's round trip at
every budget, numpy and torch alike, fewer bytes where values depend on the position, tables that do not fit
the tensor refused, and the rate term's prior per position (a trained model's tables through export to the
device package: tests/test_device.py)."""
import json

import numpy as np
import pytest
import torch

from splitprune.compression.codec import ChannelCodec, TensorSpec, decode_tensor
from splitprune.compression.prior import GridPrior
from splitprune.compression.tables import count_symbols
from splitprune.config import make_config
from splitprune.errors import ProtocolError, UserError
from splitprune.proto import pb
from splitprune.wire.codec import encode_values
from splitprune.wire.entropy import MAX_ENTRIES, MAX_FREQUENCY, check_tables, decode_symbols, encode_symbols, fit_tables

C, H, W, L = 6, 3, 3, 7


def _position_values(n: int, k: int, seed: int = 1) -> np.ndarray:
    """Values whose distribution depends on the position: bright in the centre, dark at the border."""
    rng = np.random.default_rng(seed)
    centre = np.zeros((H, W), np.float32)
    centre[1, 1] = 1.0
    return np.clip(rng.normal(0.1 + 0.8 * centre, 0.08, size=(n, k, H, W)), 0, 1).astype(np.float32)


def _tables(values: np.ndarray, positions: int) -> np.ndarray:
    return fit_tables(count_symbols([torch.from_numpy(values)], C, (L,), positions)[L])


@pytest.mark.parametrize("prefix", [False, True])
def test_round_trip_at_every_budget_and_the_numpy_and_torch_paths_agree(prefix):
    tables = _tables(_position_values(512, C), H * W)
    assert tables.shape == (C, H * W, L + 1)
    spec = TensorSpec(C, H, W, tables={L: tables})
    for k in range(1, C + 1):
        values = _position_values(5, k, seed=k)
        channels = np.arange(k) if prefix else np.sort(np.random.default_rng(k).choice(C, k, replace=False))
        numpy_msg = encode_values(values, None if prefix else channels, C, pb.EC, prefix, tables)
        torch_msg = ChannelCodec("ec7", {L: tables}).compress(
            torch.from_numpy(values), None if prefix else torch.from_numpy(channels), C, prefix)
        assert numpy_msg.SerializeToString() == torch_msg.SerializeToString()
        decoded = decode_tensor(pb.EncodedTensor.FromString(numpy_msg.SerializeToString()), spec)
        assert np.array_equal(decoded.values.numpy(), (np.clip(np.rint(values * L), 0, L) / L).astype(np.float32))


def test_position_tables_code_position_dependent_values_in_fewer_bytes_and_equal_rows_change_nothing():
    values = _position_values(256, C)
    channel, position = _tables(values, 1), _tables(values, H * W)
    assert channel.shape == (C, L + 1) and (position.sum(axis=1) - channel).max() <= H * W  # the same counts (+1s)
    q = np.clip(np.rint(values * L), 0, L).astype(np.int32)
    rows = np.arange(C)
    assert len(encode_symbols(q, position, rows)) < 0.8 * len(encode_symbols(q, channel, rows))
    repeated = np.repeat(channel[:, None, :], H * W, axis=1)  # every position under its channel's table
    assert encode_symbols(q, repeated, rows) == encode_symbols(q, channel, rows)


def test_tables_that_do_not_fit_the_tensor_or_the_limits_are_refused():
    tables = _tables(_position_values(64, C), H * W)
    q = np.zeros((2, 2, 2, 2), np.int32)  # a 2x2 cut under tables for 3x3
    with pytest.raises(ProtocolError, match="per position of a 9-position cut, the tensor has 2x2"):
        encode_symbols(q, tables, np.arange(2))
    data = encode_symbols(np.zeros((2, 2, H, W), np.int32), tables, np.arange(2))
    with pytest.raises(ProtocolError, match="9-position cut"):
        decode_symbols(data, (2, 2, 2, 2), tables, np.arange(2))
    for bad in (np.ones((C, 0, L + 1), np.int64), np.ones((C + 1, H * W, L + 1), np.int64),
                np.ones((C, MAX_ENTRIES // C + 1, 2), np.int64), np.ones((C, H * W, L + 1, 1), np.int64)):
        with pytest.raises(ValueError, match="entropy tables must be"):
            check_tables(bad, C)
    with pytest.raises(UserError, match="ec_prior"):
        make_config({"ec_prior": "pixel"})
    from splitprune.manifest import MAX_MANIFEST_BYTES
    largest = json.dumps({"codec": {"ec_tables": {"tables": np.full((1, 1, MAX_ENTRIES), MAX_FREQUENCY).tolist()}}},
                         indent=2)  # as export writes it
    assert MAX_MANIFEST_BYTES >= (1 << 20) + len(largest)  # an exported model's tables fit its manifest


def test_the_rate_term_per_position_equals_the_channel_one_when_positions_agree_and_learns_each_position():
    channel, position = GridPrior(2, L), GridPrior(2, L, positions=H * W)
    torch.manual_seed(0)
    with torch.no_grad():
        channel.logits.normal_()
        position.logits.copy_(channel.logits[:, None, :].expand(-1, H * W, -1))
    channel.eval()
    position.eval()
    kept = torch.rand(4, 2, H, W)
    assert torch.allclose(channel.bits(kept, None), position.bits(kept, None))
    one = kept[:, 1:]
    assert torch.allclose(channel.bits(one, torch.tensor([1])), position.bits(one, torch.tensor([1])))
    centre = torch.zeros(4, 2, H, W)
    centre[:, :, 1, 1] = 1.0                          # level L at the centre, 0 elsewhere
    position.bits(centre, None).backward()
    grad = position.logits.grad                       # [2, 9, L+1]: each position learns its own level
    assert (grad[:, 4, L] < 0).all() and (grad[:, 0, 0] < 0).all() and (grad[:, 4, 0] > 0).all()
    with pytest.raises(ValueError, match="9 positions cannot code a 2x2 cut"):
        position.bits(torch.rand(1, 2, 2, 2), None)


def test_a_cut_too_large_for_tables_per_position_is_refused_before_training(tmp_path, capsys):
    from splitprune.cli import main
    from splitprune.training.halves import Geometry, ec_positions

    assert ec_positions("position", Geometry((512, 3, 3), (512, 3, 3))) == 9
    assert ec_positions(make_config({}).ec_prior, Geometry((512, 12, 12), (512, 12, 12))) == 1
    with pytest.raises(UserError, match="a 512x12x12 cut needs 1,179,648 table entries, more than 262,144"):
        ec_positions("position", Geometry((512, 12, 12), (512, 12, 12)))
    # without a rate term too: the tables are counted at the end of training, the size is checked at its start
    assert main(["train", "--method", "ca", "--input-size", "96", "--ec-prior", "position", "--epochs", "1",
                 "--train-subset", "16", "--out", str(tmp_path / "never")]) == 2
    assert "a 512x12x12 cut needs 1,179,648 table entries" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
