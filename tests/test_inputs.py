"""Example and verification inputs (bnfold/inputs.py): dtypes, values, batch sizes, scale."""

from __future__ import annotations

import torch

from bnfold.inputs import SCALE, parse_shape, random_batches, verification_batches


def test_scalar_input_shape():
    """Issue 13: a 0-dimensional input is ``--input-shape scalar`` (not ``1``)."""
    assert parse_shape("scalar") == () and parse_shape("1,3,8,8") == (1, 3, 8, 8)


def test_random_batches_follow_each_inputs_dtype_and_values():
    """Issue 13: a float input and an int64 input each keep their dtype; integer inputs
    take only the values the user's data holds (a sample rate of 8000 or 16000)."""
    import numpy as np

    ((x, sr),) = random_batches(
        [(2, 4), (2,)], ["float32", "int64"], 1, values=[None, np.array([8000, 16000])]
    )
    assert x.dtype == torch.float32 and sr.dtype == torch.int64
    assert set(sr.tolist()) <= {8000, 16000}


def test_verification_feeds_scaled_and_other_batch_sizes():
    """Issue 13: verification feeds a batch scaled by 100 and, for a dynamic batch axis, one
    of another batch size; the report's lines say so."""
    example = [torch.randn(2, 3, 4, 4), torch.randint(0, 10, (2, 5))]
    batches, fed = verification_batches(example, 2, seed=0, other_batch=3)
    sizes = [b[0].shape[0] for b in batches]
    assert sizes == [2, 2, 3]
    scaled = batches[1]
    assert torch.equal(scaled[0], batches[0][0] * SCALE)
    assert torch.equal(scaled[1], batches[0][1])  # integers are never scaled
    assert [b[1].dtype for b in batches] == [torch.int64] * 3
    assert any("scaled by 100" in f for f in fed) and any("batch size 3" in f for f in fed)
    static, _ = verification_batches(example, 2, seed=0, other_batch=None)
    assert [b[0].shape[0] for b in static] == [2, 2, 2]


def test_user_data_alone_is_enough():
    """Issue 13: with --verify-batches 0 the user's data (and its scaled copy) is fed."""
    real = [[torch.randn(4, 3), torch.tensor([16000] * 4)]]
    batches, fed = verification_batches(real[0], 0, seed=0, real=real, other_batch=5)
    assert fed[0].startswith("--inputs")
    assert batches[0] is real[0] and len(batches) == 3
    assert batches[2][0].shape[0] == 5 and set(batches[2][1].tolist()) == {16000}
