import numpy as np
import pytest
import torch

from actcache.dtypes import from_storage, storage_dtype, to_float32, to_storage


@pytest.mark.parametrize("logical", ["bfloat16", "float16", "float32"])
def test_round_trip_is_bit_exact(logical):
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[logical]
    x = torch.randn(64, 16).to(tdt)
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -65504.0]).to(tdt)
    a = to_storage(x)
    assert a.dtype == storage_dtype(logical)
    back = from_storage(a, logical)
    assert back.dtype == tdt
    assert torch.equal(back.view(torch.int16 if logical != "float32" else torch.int32),
                       x.view(torch.int16 if logical != "float32" else torch.int32))
    np.testing.assert_array_equal(to_float32(a, logical), x.float().numpy())


def test_bf16_stored_as_uint16_bits():
    x = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert to_storage(x).tolist() == [0x3F80, 0xC000]
