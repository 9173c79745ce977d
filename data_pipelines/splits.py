"""Deterministic, person-disjoint, stratified train/val/test splits.

Every person (or patient) goes to exactly one split, so no face is seen in training and testing.
Within each stratum (an age bin of the person's first photo, or the survival event), persons are
ordered by a keyed hash of their id and cut at the cumulative fractions: the assignment depends only
on the set of persons, their strata and the seed, never on the input order, and each stratum is
split in the requested proportions (to within one person).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Hashable, Mapping

from fahr.boundary import InputError

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
AGE_BIN_EDGES = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 200)


def age_bin(age: float) -> int:
    """Index of the decade bin of ``age`` (years): 0 for [0, 10), ..., 9 for >= 90."""
    for i, upper in enumerate(AGE_BIN_EDGES[1:]):
        if age < upper:
            return i
    raise InputError(f"age {age} out of range")


def _rank_key(person_id: str, seed: str) -> str:
    return hashlib.sha256(f"{seed}\x00{person_id}".encode()).hexdigest()


def split_persons(
    strata: Mapping[str, Hashable], fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: str = "fahr",
) -> dict[str, str]:
    """Assign each person to a split.

    Args:
        strata: person id -> stratum (e.g. ``age_bin(first age)`` or ``event``); use one constant
            stratum for no stratification.
        fractions: split name -> fraction; must sum to 1. Order matters only for the names.
        seed: changes the assignment as a whole.

    Returns: person id -> split name.
    """
    if abs(sum(fractions.values()) - 1.0) > 1e-9 or any(f < 0 for f in fractions.values()):
        raise InputError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    by_stratum: dict[Hashable, list[str]] = defaultdict(list)
    for person, stratum in strata.items():
        by_stratum[stratum].append(person)
    out: dict[str, str] = {}
    for persons in by_stratum.values():
        persons.sort(key=lambda p: _rank_key(p, seed))
        ends = split_ends(len(persons), fractions)
        for rank, p in enumerate(persons):
            out[p] = split_at(rank, ends)
    return out


def split_ends(n: int, fractions: Mapping[str, float]) -> list[tuple[str, int]]:
    """[(split name, end)] for a stratum of ``n`` persons ranked by :func:`rank_key`: the persons of
    rank ``[previous end, end)`` go to that split (the cumulative fractions, rounded; the last ends at n)."""
    names, ends, cumulative = list(fractions), [], 0.0
    for i, name in enumerate(names):
        cumulative += fractions[name]
        ends.append((name, n if i == len(names) - 1 else int(round(cumulative * n))))
    return ends


def split_at(rank: int, ends: list[tuple[str, int]]) -> str:
    """The split of the person of ``rank`` (0-based, within its stratum) given :func:`split_ends`."""
    start = 0
    for name, end in ends:
        if start <= rank < end:
            return name
        start = max(start, end)
    raise AssertionError(f"rank {rank} beyond the stratum's {ends[-1][1]} persons")


def rank_key(person_id: str, seed: str) -> str:
    """The keyed hash (SHA-256 hex of seed and id) that orders a stratum's persons; being uniform, its
    leading digits also cut the persons into ranges (buckets) whose order is the persons' order."""
    return _rank_key(person_id, seed)


def assert_person_disjoint(assignments: Mapping[str, str], record_persons: Mapping[str, str]) -> None:
    """Raise if any person's records were written to more than one split.

    Args:
        assignments: record id -> split it was written to.
        record_persons: record id -> person id.
    """
    seen: dict[str, str] = {}
    for record, split in assignments.items():
        person = record_persons[record]
        if seen.setdefault(person, split) != split:
            raise AssertionError(f"a person has records in both {seen[person]!r} and {split!r}")
