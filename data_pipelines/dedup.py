"""Exact and near-duplicate photos, found before splitting.

Exact duplicates share a SHA-256 of their bytes; near duplicates (re-encoded, resized, lightly
edited copies) have 64-bit perceptual hashes (pHash: DCT of a 32x32 greyscale image, top-left 8x8
coefficients against their median) within a small Hamming distance. Candidate pairs come from
multi-index hashing (8 bytes of the hash; with a threshold below 8, near duplicates share at least
one byte exactly), so the search stays near-linear instead of all-pairs.

Aligned face crops all share one layout, so the 64-bit pHash alone also pairs different people:
on 4,000 UTKFace crops, 176 pairs lie within 6 bits, and 69 of them are different photos (grey
32x32 correlation < 0.9; e.g. a 1-year-old and a 16-year-old). A candidate pair is therefore
confirmed with a finer 255-bit pHash (top-left 16x16 DCT coefficients, DC dropped): on those pairs
every different photo was >= 46 bits apart and 94 of the 97 copies (correlation >= 0.95) <= 40.

Policy: within a group of duplicates of one person, the first record (input order) is kept and the
others are rejected (``duplicate:exact`` / ``duplicate:near``); a group spanning several persons is
rejected entirely (``duplicate:conflicting_persons``): nobody can tell whose face it is, and keeping
one copy could put the same face in two splits.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from fahr.boundary import InputError

PHASH_THRESHOLD = 6  # bits out of 64
CONFIRM_THRESHOLD = 40  # bits out of 255 (see the module docstring)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def _dct32(image: np.ndarray) -> np.ndarray:
    """2-D DCT (32, 32) of the 32x32 greyscale version of an (H, W, 3) or (H, W) uint8 image."""
    from PIL import Image

    grey = Image.fromarray(image).convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    return _DCT32 @ np.asarray(grey, dtype=np.float64) @ _DCT32.T


def _bits(values: np.ndarray) -> int:
    return int.from_bytes(np.packbits(values).tobytes(), "big")


def phash(image: np.ndarray, coeffs: np.ndarray | None = None) -> int:
    """64-bit perceptual hash of an (H, W, 3) or (H, W) uint8 image."""
    low = (_dct32(image) if coeffs is None else coeffs)[:8, :8].flatten()
    return _bits(low > np.median(low[1:]))  # the DC term would dominate the median


def phash256(image: np.ndarray, coeffs: np.ndarray | None = None) -> int:
    """255-bit perceptual hash (top-left 16x16 DCT coefficients without DC, against their median):
    the finer check that confirms a near-duplicate candidate pair."""
    low = (_dct32(image) if coeffs is None else coeffs)[:16, :16].flatten()[1:]
    return _bits(low > np.median(low))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def fingerprint(data: bytes, image: np.ndarray | None = None) -> tuple[str, int | None, int | None]:
    """(SHA-256 hex of ``data``, 64-bit pHash, 255-bit pHash) of a photo; the pHashes are None
    without a decoded ``image``."""
    sha = hashlib.sha256(data).hexdigest()
    if image is None:
        return sha, None, None
    coeffs = _dct32(image)
    return sha, phash(image, coeffs), phash256(image, coeffs)


class Deduplicator:
    """Collect (record id, person id, bytes, pHash), then :meth:`decide` which records to reject."""

    def __init__(self, threshold: int = PHASH_THRESHOLD, confirm_threshold: int = CONFIRM_THRESHOLD) -> None:
        if not 0 <= threshold < 8:
            raise InputError("threshold must be in [0, 8) for multi-index hashing to find every pair")
        if not 0 <= confirm_threshold <= 255:
            raise InputError("confirm_threshold must be in [0, 255] (bits of the 255-bit pHash)")
        self.threshold = threshold
        self.confirm_threshold = confirm_threshold
        self._ids: list[str] = []
        self._persons: list[str] = []
        self._sha: list[str] = []
        self._phash: list[int | None] = []
        self._fine: list[int | None] = []

    def add(self, record_id: str, person_id: str, data: bytes, image: np.ndarray | None = None) -> None:
        """Register a record; ``image`` (decoded) enables near-duplicate detection for it."""
        self.add_fingerprint(record_id, person_id, fingerprint(data, image))

    def add_fingerprint(self, record_id: str, person_id: str, fp: tuple[str, int | None, int | None]) -> None:
        """Register a record by its :func:`fingerprint` (computed anywhere, e.g. in worker processes)."""
        sha, coarse, fine = fp
        self._ids.append(record_id)
        self._persons.append(person_id)
        self._sha.append(sha)
        self._phash.append(coarse)
        self._fine.append(fine)

    def _groups(self) -> tuple[list[list[int]], dict[int, str]]:
        """Groups (>= 2 records, sorted indices) of duplicates, and how each later member joined."""
        parent = list(range(len(self._ids)))
        kind: dict[int, str] = {}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def union(i: int, j: int, how: str) -> None:  # i < j: j is the later record
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
            kind.setdefault(j, how)

        first_by_sha: dict[str, int] = {}
        for i, sha in enumerate(self._sha):
            if sha in first_by_sha:
                union(first_by_sha[sha], i, "exact")
            else:
                first_by_sha[sha] = i
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, h in enumerate(self._phash):
            if h is None:
                continue
            for byte in range(8):
                buckets[(byte, (h >> (8 * byte)) & 0xFF)].append(i)
        for members in buckets.values():
            for a_pos, i in enumerate(members):
                for j in members[a_pos + 1:]:
                    if (find(i) != find(j) and hamming(self._phash[i], self._phash[j]) <= self.threshold
                            and hamming(self._fine[i], self._fine[j]) <= self.confirm_threshold):
                        union(i, j, "near")
        groups: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self._ids)):
            groups[find(i)].append(i)
        return [sorted(m) for m in groups.values() if len(m) > 1], kind

    def decide(self) -> dict[str, str]:
        """Record id -> rejection reason, for every record to drop (kept records are absent)."""
        groups, kind = self._groups()
        rejected: dict[str, str] = {}
        for members in groups:
            if len({self._persons[i] for i in members}) > 1:
                for i in members:
                    rejected[self._ids[i]] = "duplicate:conflicting_persons"
                continue
            for i in members[1:]:
                rejected[self._ids[i]] = f"duplicate:{kind.get(i, 'near')}"
        return rejected
