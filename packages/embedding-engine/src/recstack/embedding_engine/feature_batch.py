"""The batch's features that read one physical table: :class:`FeatureBatch`.

A lookup needs the ids of all the features reading a physical table concatenated, and the
pooled features' bag lengths concatenated; only a few features (sequences, weighted bags)
need a :class:`~recstack.core.JaggedTensor` of their own. Building one per feature costs a
kernel (its offsets rebased to zero) and some host time per feature, which adds up with
dozens of features merged into one table. :class:`FeatureBatch` reads the ids and lengths
as views of the :class:`~recstack.core.KeyedJaggedTensor`'s buffers (no copy when the
features sit in one run of keys, as a feature engine lays them out) and builds a feature's
JaggedTensor only when asked.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from recstack.core import JaggedTensor, KeyedJaggedTensor

__all__ = ["FeatureBatch"]


class FeatureBatch(Mapping[str, JaggedTensor]):
    """Features ``names`` of ``kjt`` (the first ``num_pooled`` of them pooled), a mapping
    from name to JaggedTensor made on first access.

    Args:
        kjt: the batch.
        names: the features, in the lookup's order (pooled, then sequence).
        num_pooled: how many of ``names`` are pooled.

    Attributes:
        ids: each feature's ids, int64 views of the KJT's values, in ``names`` order.
        sizes: each feature's id count (host ints).
        keys: ``ids`` concatenated (a view when the features are consecutive keys).
        pooled_lengths: int64 ``[num_pooled * B]``, the pooled features' bag lengths,
            feature-major (a view when they are consecutive keys).

    Examples:
        >>> kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, 3]),
        ...                         lengths=torch.tensor([1, 1, 0, 1]))
        >>> fb = FeatureBatch(kjt, ["a", "b"], 2)
        >>> fb.keys.tolist(), fb.pooled_lengths.tolist(), fb["b"].values.tolist()
        ([1, 2, 3], [1, 1, 0, 1], [3])
    """

    def __init__(self, kjt: KeyedJaggedTensor, names: Sequence[str], num_pooled: int) -> None:
        self._kjt = kjt
        self._names = tuple(names)
        self._made: dict[str, JaggedTensor] = {}
        index = [kjt.key_index(n) for n in self._names]
        self._index = dict(zip(self._names, index, strict=True))
        opk = kjt.offset_per_key()
        values = kjt.values()
        spans = [(opk[k], opk[k + 1]) for k in index]
        self.sizes = [b - a for a, b in spans]
        if _consecutive(index):
            # One conversion of the whole run (a view when the ids are int64 already).
            lo = spans[0][0]
            self.keys = values[lo : spans[-1][1]].to(torch.int64)
            self.ids = [self.keys[a - lo : b - lo] for a, b in spans]
        else:
            self.ids = [values[a:b].to(torch.int64) for a, b in spans]
            self.keys = torch.cat(self.ids) if self.ids else values[:0].to(torch.int64)
        lengths, b = kjt.lengths(), kjt.stride()
        pooled = index[:num_pooled]
        if _consecutive(pooled):
            self.pooled_lengths = lengths[pooled[0] * b : (pooled[-1] + 1) * b]
        else:
            parts = [lengths[k * b : (k + 1) * b] for k in pooled]
            self.pooled_lengths = torch.cat(parts) if parts else lengths[:0]

    def __getitem__(self, name: str) -> JaggedTensor:
        jt = self._made.get(name)
        if jt is None:
            if name not in self._index:
                raise KeyError(f"FeatureBatch: no feature {name!r}; it has {list(self._names)}")
            jt = self._made[name] = self._kjt[name]
        return jt

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _consecutive(index: Sequence[int]) -> bool:
    """Whether ``index`` is non-empty and ascends by one."""
    return bool(index) and all(b == a + 1 for a, b in zip(index, index[1:], strict=False))
