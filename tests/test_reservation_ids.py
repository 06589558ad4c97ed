"""Reservation ids: unique across threads, and across a fork (holds live in shared stores)."""

from __future__ import annotations

import os
import threading

import pytest

from iron_runtime_state.core import new_reservation_id


def test_ids_are_unique_across_threads() -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        ids = [new_reservation_id() for _ in range(2000)]
        with lock:
            seen.extend(ids)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 16_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in seen)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_repeats_its_parents_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.write(write, " ".join(new_reservation_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    child_ids = set(os.read(read, 1024).decode().split())
    os.waitpid(pid, 0)
    os.close(read)
    parent_ids = {new_reservation_id() for _ in range(3)}
    assert len(child_ids) == 3
    assert not child_ids & parent_ids  # the child's generator was reseeded, not copied
