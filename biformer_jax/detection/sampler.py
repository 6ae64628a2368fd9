"""mmdetection 2.11's `RandomSampler` on fixed-size candidate sets, with JAX keys.

Ported from mmdet `core/bbox/samplers/random_sampler.py` and `base_sampler.py`: of the candidates
an assigner made positive (`gt_inds > 0`), at most `int(num * pos_fraction)` are drawn uniformly
without replacement (all of them when fewer); then `num - sampled positives` negatives
(`gt_inds == 0`) the same way (`neg_pos_ub >= 0` caps them at `neg_pos_ub * max(positives, 1)`).
`add_gt_as_proposals` (the RoI head's sampler) puts the ground-truth boxes in front of the
proposals, each assigned to itself; the caller does that (`maskrcnn.losses_from_outputs`).

Static shapes, and what they change: the draws are masks over every candidate (a uniform random
priority per candidate, the lowest ones win), so counts stay dynamic and shapes fixed;
`sampled_order` lists the sampled candidates positives first in `num` slots with a validity mask
(mmdet's `cat(pos_bboxes, neg_bboxes)`). The draw is not torch's `randperm`, so a run samples other
candidates than mmdet's with the same seed; the distribution is the same.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _choose(key: jax.Array, mask: jax.Array, k) -> jax.Array:
    """A uniformly random subset of min(k, sum(mask)) of mask's True entries, as a mask (k may be traced)."""
    priority = jnp.where(mask, jax.random.uniform(key, mask.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(priority))
    return mask & (rank < k)


@dataclasses.dataclass(frozen=True)
class RandomSampler:
    """`num` samples, `pos_fraction` of them positive at most (RPN: 256 / 0.5; RoI head: 512 / 0.25)."""

    num: int = 512
    pos_fraction: float = 0.25
    neg_pos_ub: int = -1
    add_gt_as_proposals: bool = True

    @property
    def num_expected_pos(self) -> int:
        return int(self.num * self.pos_fraction)

    def sample(self, key: jax.Array, gt_inds: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(M,) assigned `gt_inds` (-1 ignored, 0 negative, i + 1 positive) and (M,) bool `valid`
        -> (positives, negatives) sampled, (M,) bool masks."""
        key_pos, key_neg = jax.random.split(key)
        pos = _choose(key_pos, (gt_inds > 0) & valid, self.num_expected_pos)
        num_pos = jnp.sum(pos)
        num_neg = self.num - num_pos
        if self.neg_pos_ub >= 0:
            num_neg = jnp.minimum(num_neg, self.neg_pos_ub * jnp.maximum(num_pos, 1))
        neg = _choose(key_neg, (gt_inds == 0) & valid, num_neg)
        return pos, neg

    def sampled_order(self, pos: jax.Array, neg: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(num,) candidate indices: the sampled positives (ascending), then the negatives, then
        padding; and (num,) bool masks of the positive and the negative slots."""
        m = pos.shape[0]
        rank = jnp.where(pos, 0, jnp.where(neg, 1, 2)) * m + jnp.arange(m)
        order = jnp.argsort(rank)[: self.num]
        if order.shape[0] < self.num:
            order = jnp.concatenate([order, jnp.zeros((self.num - order.shape[0],), order.dtype)])
            filled = jnp.arange(self.num) < m
        else:
            filled = jnp.ones((self.num,), bool)
        return order.astype(jnp.int32), pos[order] & filled, neg[order] & filled
