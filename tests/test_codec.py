import numpy as np
import pytest
import torch

from splitprune.compression import ChannelCodec, TensorSpec, decode_labels, encode_labels
from splitprune.training.link import parse_message
from splitprune.errors import ProtocolError
from splitprune.proto import pb


def _kept(n=16, k=4, h=4, w=4, seed=0):
    return torch.rand(n, k, h, w, generator=torch.Generator().manual_seed(seed))


def _round_trip(codec: ChannelCodec, kept, channels, num_channels):
    """What the receiver decodes of a message as it travels (serialized, parsed back)."""
    sent = codec.compress(kept, channels, num_channels).SerializeToString()
    return codec.decompress(parse_message(pb.EncodedTensor, sent))


@pytest.mark.parametrize("dtype,tolerance", [("fp32", 0.0), ("fp16", 1e-3), ("int8", 1 / 255 / 2 + 1e-6),
                                             ("int4", 1 / 15 / 2 + 1e-6)])
def test_round_trip_restores_values_within_the_dtype_precision(dtype, tolerance):
    kept = _kept()
    channels = torch.tensor([3, 17, 200, 511])
    decoded = _round_trip(ChannelCodec(dtype), kept, channels, 512)
    assert decoded.values.shape == kept.shape
    assert torch.equal(decoded.channels, channels)
    assert (decoded.values - kept).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype,value_bytes", [("fp32", 4), ("fp16", 2), ("int8", 1), ("int4", 0.5)])
def test_message_size_is_the_kept_values_plus_a_small_header(dtype, value_bytes):
    n, k = 16, 4
    data = ChannelCodec(dtype).compress(_kept(n, k), torch.tensor([0, 1, 2, 3]), 512).SerializeToString()
    payload = int(n * k * 16 * value_bytes)
    extra = 2 * k + (8 * k if dtype.startswith("int") else 0)
    assert payload + extra <= len(data) <= payload + extra + 24


def test_b4_fp16_costs_128_bytes_per_sample_plus_the_header():
    data = ChannelCodec("fp16").compress(_kept(16, 4), torch.tensor([1, 2, 3, 4]), 512).SerializeToString()
    assert 128 * 16 < len(data) < 128 * 16 + 32


def test_all_channels_travel_without_indices():
    full = torch.rand(2, 512, 4, 4)
    msg = ChannelCodec("fp32").compress(full, None, 512)
    assert msg.channels == b""
    assert len(msg.data) == 2 * 512 * 16 * 4
    decoded = ChannelCodec.decompress(msg)
    assert torch.equal(decoded.values, full)
    assert torch.equal(decoded.dense(), full)


def test_dense_scatters_kept_channels_into_zeros():
    kept = _kept(2, 2)
    decoded = _round_trip(ChannelCodec("fp32"), kept, torch.tensor([1, 5]), 8)
    dense = decoded.dense()
    assert dense.shape == (2, 8, 4, 4)
    assert torch.equal(dense[:, 1], kept[:, 0]) and torch.equal(dense[:, 5], kept[:, 1])
    assert dense[:, [0, 2, 3, 4, 6, 7]].abs().sum() == 0


def test_int8_is_exact_for_constant_channels_and_handles_negative_gradients():
    grads = torch.randn(8, 3, 4, 4) * 1e-4
    grads[:, 1] = -2.5
    decoded = _round_trip(ChannelCodec("int8"), grads, torch.tensor([0, 1, 2]), 3)
    assert torch.all(decoded.values[:, 1] == -2.5)
    span = (grads[:, 0].max() - grads[:, 0].min()).item()
    assert (decoded.values[:, 0] - grads[:, 0]).abs().max().item() <= span / 255 / 2 + 1e-9


def test_encoder_refuses_non_finite_values():
    bad = _kept()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ProtocolError, match="non-finite"):
        ChannelCodec("fp16").compress(bad, torch.tensor([0, 1, 2, 3]), 512)


def _message(**changes):
    msg = ChannelCodec("fp16").compress(_kept(2, 2), torch.tensor([0, 1]), 8)
    for key, value in changes.items():
        if key == "shape":
            del msg.shape[:]
            msg.shape.extend(value)
        else:
            setattr(msg, key, value)
    return msg


@pytest.mark.parametrize("changes,match", [
    ({"shape": [2, 8, 4]}, "4 dims"),
    ({"shape": [0, 8, 4, 4]}, "invalid tensor shape"),
    ({"channels": np.array([1, 0], "<u2").tobytes()}, "ascending"),
    ({"channels": np.array([0, 9], "<u2").tobytes()}, "below 8"),
    ({"channels": b"\x00"}, "odd byte count"),
    ({"data": b"\x00" * 10}, "holds 10 bytes"),
    ({"dtype": 9}, "unknown tensor dtype"),
    ({"data": np.full(2 * 2 * 16, np.inf, "<f2").tobytes()}, "non-finite"),
])
def test_decoder_rejects_malformed_messages_with_a_clear_error(changes, match):
    with pytest.raises(ProtocolError, match=match):
        ChannelCodec.decompress(_message(**changes))


def test_decoder_checks_the_session_spec():
    spec = TensorSpec(8, 4, 4, max_batch=1, max_kept=1)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        ChannelCodec.decompress(_message(), spec)
    with pytest.raises(ProtocolError, match="budget is 1"):
        ChannelCodec.decompress(_message(), TensorSpec(8, 4, 4, max_kept=1))
    with pytest.raises(ProtocolError, match="cut shape"):
        ChannelCodec.decompress(_message(), TensorSpec(16, 4, 4))
    with pytest.raises(ProtocolError, match="not allowed"):
        ChannelCodec.decompress(_message(), TensorSpec(8, 4, 4, dtypes=(pb.FP32,)))


def test_garbage_bytes_are_a_protocol_error():
    with pytest.raises(ProtocolError, match="malformed"):
        parse_message(pb.EncodedTensor, b"\xff\xff\xff\xff")


def test_labels_round_trip_compactly():
    y = torch.tensor([0, 9, 3, 3])
    msg = encode_labels(y)
    assert msg.width == 1 and len(msg.data) == 4
    assert torch.equal(decode_labels(msg, 4, 10), y)
    wide = encode_labels(torch.tensor([0, 999]))
    assert wide.width == 2 and torch.equal(decode_labels(wide, 2, 1000), torch.tensor([0, 999]))
    with pytest.raises(ProtocolError, match="out of range"):
        decode_labels(msg, 4, 5)
    with pytest.raises(ProtocolError, match="expected 3 labels"):
        decode_labels(msg, 3, 10)


def test_int4_packs_two_values_per_byte_and_pads_odd_counts():
    kept = torch.tensor([0.0, 1.0, 0.6]).view(1, 1, 1, 3)
    msg = ChannelCodec("int4").compress(kept, None, 1)
    assert len(msg.data) == 2
    decoded = ChannelCodec.decompress(msg)
    assert torch.allclose(decoded.values, torch.tensor([0.0, 1.0, 9 / 15]).view(1, 1, 1, 3))
    msg.data = msg.data + b"\x00"
    with pytest.raises(ProtocolError, match="need 2"):
        ChannelCodec.decompress(msg)
