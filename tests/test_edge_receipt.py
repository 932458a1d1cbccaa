"""The durable loss receipt (edge/receipt.py): preallocated, rewritten in place in two slots,
so a torn or damaged slot leaves the other; bound to one install."""

from __future__ import annotations

from pathlib import Path

from slmops.edge.receipt import SIZE, LossReceipt


def test_receipt_counts_in_place_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "loss_receipt.bin"
    r = LossReceipt(path)
    r.open("a" * 32)
    assert path.stat().st_size == SIZE  # its space is taken at once, never grown later
    for n in (3, 4, 5):
        r.add(n)
    r.close()
    assert path.stat().st_size == SIZE
    again = LossReceipt(path)
    again.open("a" * 32)
    assert again.lost == 12
    again.close()


def test_a_damaged_slot_falls_back_to_the_other(tmp_path: Path) -> None:
    path = tmp_path / "loss_receipt.bin"
    r = LossReceipt(path)
    r.open("a" * 32)
    r.add(7)  # one slot says 7
    r.add(1)  # the other says 8
    r.close()
    raw = bytearray(path.read_bytes())
    newest = 0 if raw[512:516] != b"SLRC" else 512  # the slot written last holds generation 3
    for off in (0, 512):
        if raw[off : off + 4] == b"SLRC" and int.from_bytes(raw[off + 8 : off + 16], "little") == 3:
            newest = off
    raw[newest + 20] ^= 0xFF  # a torn write: its checksum no longer matches
    path.write_bytes(bytes(raw))
    again = LossReceipt(path)
    again.open("a" * 32)
    assert again.lost == 7  # the previous count, not 0 and not garbage
    again.close()


def test_a_receipt_of_another_install_restarts_at_what_the_database_reported(tmp_path: Path) -> None:
    path = tmp_path / "loss_receipt.bin"
    r = LossReceipt(path)
    r.open("a" * 32)
    r.add(9)
    r.close()
    other = LossReceipt(path)
    other.open("b" * 32, floor=0)  # a new database (a new install): its own count from 0
    assert (other.install, other.lost) == ("b" * 32, 0)
    other.close()
    same = LossReceipt(path)
    same.open("b" * 32, floor=4)  # the database says 4 were reported: never below that
    assert same.lost == 4
    same.close()


def test_an_early_receipt_counts_in_its_length_and_moves_into_a_slot_exactly_once(tmp_path: Path) -> None:
    """A start on a full disk: no page can be reserved, so the count is the file's length
    (sparse: no data block). Across a restart it goes on; when the database opens it moves
    into a slot of the new install; a crash between the slot write and the shrink still
    reads the slot, never the length again."""
    path = tmp_path / "loss_receipt.bin"
    r = LossReceipt(path)
    r.open_early()
    assert (r.early, r.lost, r.install) == (True, 0, "")
    r.add(5)
    r.close()
    assert path.stat().st_blocks == 0  # no data block was needed
    again = LossReceipt(path)
    again.open_early()  # a second start, the disk still full
    again.add(2)
    assert again.lost == 7
    again.open("b" * 32, floor=0)  # the database opened: a new install
    assert (again.early, again.lost, again.install) == (False, 7, "b" * 32)
    assert path.stat().st_size == SIZE
    again.add(1)
    again.close()
    big = path.stat().st_size
    with path.open("r+b") as f:  # as if killed after the slot write, before the shrink
        f.truncate(big + (1 << 21))
    last = LossReceipt(path)
    last.open("b" * 32, floor=0)
    assert last.lost == 8
    last.close()
    reserved = LossReceipt(path)
    reserved.open_early()  # a later start on a full disk keeps counting in the slots
    assert (reserved.early, reserved.lost, reserved.install) == (False, 8, "b" * 32)
    reserved.close()
