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
