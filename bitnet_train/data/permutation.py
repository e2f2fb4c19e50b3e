"""A seeded random permutation of range(n) that is computed, never stored.

An epoch's order over a corpus of n training blocks must cost no memory: `torch.randperm(n)`
holds 8 bytes a block, which for 2B4T's 4T tokens in 4,096-token blocks is 7.8 GB on every rank,
rebuilt at every epoch and on every resume. Here position i of the order is computed on demand,
as format-preserving encryption does: a Feistel network is a bijection of [0, 4^h) whatever its
round function, and cycle-walking (encrypting again until the value falls below n) restricts it
to a bijection of [0, n). Since 4^h < 4n, a position takes fewer than four walks on average.

Six rounds of a 64-bit mixing hash make the order indistinguishable from a random one for
training purposes (Luby-Rackoff: four rounds of a random function already give a strong
pseudo-random permutation), and it depends only on (n, seed): any rank, resuming anywhere, reads
the same order.
"""
import numpy as np
import torch

ROUNDS = 6
GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: spreads consecutive seeds apart
MASK64 = (1 << 64) - 1


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, a bijective 64-bit hash (uint64 arithmetic wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)  # the smallest 4^h >= n
        self.mask = np.uint64((1 << self.half_bits) - 1)
        first = np.array([(seed * GOLDEN) & MASK64], dtype=np.uint64)
        self.keys = mix64(first + np.arange(1, ROUNDS + 1, dtype=np.uint64) * np.uint64(GOLDEN))

    def encrypt(self, x: np.ndarray) -> np.ndarray:
        """One pass of the Feistel network over [0, 4^h)."""
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (mix64(right ^ key) & self.mask)
        return (left << h) | right

    def take(self, start: int, count: int) -> torch.Tensor:
        """Positions start .. start+count-1 of the order: `count` distinct elements of range(n)."""
        if not 0 <= start <= start + count <= self.n:
            raise IndexError(f"positions {start}..{start + count} of a permutation of {self.n}")
        y = self.encrypt(np.arange(start, start + count, dtype=np.uint64))
        outside = y >= self.n
        while outside.any():  # cycle-walking: each chain re-enters [0, n) after < 4 steps on average
            y[outside] = self.encrypt(y[outside])
            outside = y >= self.n
        return torch.from_numpy(y.astype(np.int64))
