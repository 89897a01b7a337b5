"""Ids: the ULID layout (48-bit millisecond time, 80 random bits) in Crockford base32, from a pooled CSPRNG."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from parley import ids
from parley.ids import new_id

ID_PATTERN = re.compile(r"[0-9abcdefghjkmnpqrstvwxyz]{26}")


def decode(identifier: str) -> int:
    """The 130-bit value of an id, one character at a time (the plain reading of the layout)."""
    value = 0
    for char in identifier:
        value = value << 5 | ids._ALPHABET.index(char)
    return value


def test_an_id_is_26_crockford_characters_carrying_the_millisecond_it_was_made() -> None:
    before = time.time_ns() // 1_000_000
    identifier = new_id()
    after = time.time_ns() // 1_000_000
    assert ID_PATTERN.fullmatch(identifier)
    value = decode(identifier)
    assert value >> 128 == 0  # the two spare leading bits stay zero
    assert before <= value >> 80 <= after


def test_the_random_part_is_the_pool_bytes_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = bytes(range(1, 41))  # four ids' worth
    monkeypatch.setattr(ids.os, "urandom", lambda size: pool)
    ids._forget_pool()
    try:
        randoms = [decode(new_id()) & (1 << 80) - 1 for _ in range(4)]
    finally:
        ids._forget_pool()
    assert randoms == [int.from_bytes(pool[start:start + 10], "big") for start in range(0, 40, 10)]


def test_ids_sort_by_creation_time_across_milliseconds() -> None:
    earlier = new_id()
    time.sleep(0.002)
    assert new_id() > earlier


def test_ids_made_on_many_threads_at_once_are_all_distinct() -> None:
    made: list[list[str]] = [[] for _ in range(8)]

    def make(into: list[str]) -> None:
        into.extend(new_id() for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(bucket,)) for bucket in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [identifier for bucket in made for identifier in bucket]
    assert len(set(every)) == len(every) == 40_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_its_parents_pool() -> None:
    new_id()  # the parent's pool now holds bytes for the next 408 ids
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.close(read_end)
        os.write(write_end, new_id().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    parent_id = new_id()
    assert (decode(child_id) & (1 << 80) - 1) != (decode(parent_id) & (1 << 80) - 1)
