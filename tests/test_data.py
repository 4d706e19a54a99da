"""ClientData batching: every sample once per pass, and no trailing batch of one sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcl_bench.data import ClientData, Preprocess, TensorSource


def _view(n: int) -> ClientData:
    source = TensorSource(torch.zeros(n + 3, 3, 4, 4, dtype=torch.uint8), np.arange(n + 3) % 2)
    return ClientData(source, np.arange(3, n + 3), "train", Preprocess(input_size=4), "cpu")


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n,bs,sizes", [
    (3 * 8 + 1, 8, [8, 8, 9]),      # k * bs + 1: the single sample joins the last full batch
    (8 + 1, 8, [9]),
    (3 * 8, 8, [8, 8, 8]),          # nothing left over: unchanged
    (3 * 8 + 2, 8, [8, 8, 8, 2]),   # two left over: a batch of its own
    (1, 8, [1]),                    # a set of one sample in all
    (5, 1, [1] * 5),                # batch size 1 asks for batches of one
])
def test_batches_fold_a_trailing_single_sample_into_the_previous_batch(n, bs, sizes, shuffle):
    view = _view(n)
    batches = list(view.batches(bs, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == sizes
    seen = np.concatenate([b.index.numpy() for b in batches])
    assert sorted(seen) == list(view.indices)  # every sample exactly once
