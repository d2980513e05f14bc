"""The seeded init drawn in row chunks (`longtrain.model.sharded_init.normal_rows`) is
`torch.randn` of the whole tensor, value for value, and leaves the generator where one call
would: what lets a sharded start keep one chunk instead of a full tensor."""

import pytest
import torch

from longtrain.model.sharded_init import normal_rows


@pytest.mark.parametrize(
    "shape",
    [(1000, 48), (4099, 32), (61, 32), (97, 24), (33, 7), (5, 3)],
    ids=str,
)
def test_row_chunks_equal_one_draw(shape):
    one = torch.Generator().manual_seed(7)
    want = torch.randn(shape, generator=one) * 0.02
    chunked = torch.Generator().manual_seed(7)
    # 256 elements per chunk: every shape of 256+ elements is drawn in several pieces.
    pieces = list(normal_rows(chunked, torch.Size(shape), 0.02, chunk_elements=256))
    if shape[0] * shape[1] % 16 == 0 and shape[0] * shape[1] > 256:
        assert len(pieces) > 1
    assert [start for start, _ in pieces] == sorted({start for start, _ in pieces})
    assert torch.equal(torch.cat([rows for _, rows in pieces]), want)
    # The next draw continues the same stream.
    assert torch.equal(torch.randn(9, generator=chunked), torch.randn(9, generator=one))
