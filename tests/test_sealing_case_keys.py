"""Crypto-shredding on the real broker: the council's case copies (district team, archive)
open until the case key is shredded, then never; other cases are unaffected; a legal hold
refuses the shred; every action is on the audit topic, signed, with ids and reasons only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_sealing_support import SCHEMA, World, make_world, needles, read_all, sample_referral, send_all

from referral_broker.audit_log import read_event_value
from referral_broker.cli.main import cli
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import (
    KeyNotFoundError,
    KeyStorePermissionError,
    LegalHoldError,
    SealingError,
    ShreddedError,
)
from referral_broker.sealing import (
    CaseKeyStore,
    DekCache,
    MessageSealer,
    case_journal,
    retention,
    verify_signed,
)
from referral_broker.sealing.directory import publish


@pytest.fixture
def world(topics: Settings, kafka_bootstrap: str) -> World:
    world = make_world(topics.keys_dir)
    publish(topics, kafka_bootstrap, [e for s in world.stores.values() for e in s.public_entries()])
    return world


def _case_copies(
    world: World, settings: Settings, case_id: str, n: int, sealer: MessageSealer | None = None
) -> list:
    """A district-team copy and an archive copy of one case, as the hub would write them."""
    sealer = sealer or world.sealer("council")
    common = {"referral_id": f"ref-{n:04d}", "referral_version": 1, "case_id": case_id}
    return [
        sealer.seal(
            sample_referral(n),
            SCHEMA,
            topic=topic_name(settings, "out", "district-fenland"),
            recipient="district-fenland",
            **common,
        ),
        sealer.seal(
            sample_referral(n),
            SCHEMA,
            topic=topic_name(settings, "archive"),
            recipient="council",
            kind="archive",
            **common,
        ),
    ]


def _audit_events(settings: Settings, bootstrap: str, world: World) -> list[dict]:
    events = []
    for record in read_all(settings, bootstrap, [topic_name(settings, "audit")]):
        headers = verify_signed(world.directory, record)  # signed by the hub, or this raises
        assert headers["rb-sender"] == b"council"
        events.append(read_event_value(record.value))
    return events


def test_shred_makes_one_case_unreadable_everywhere(
    topics: Settings, kafka_bootstrap: str, world: World
) -> None:
    # The router's sealer and the readers cache: one wrapped share (wrap mode 3) serves both
    # cases' copies to each recipient, and that must not outlive a shred.
    sealer = world.sealer("council", cache=DekCache(100, 300))
    send_all(
        topics,
        kafka_bootstrap,
        _case_copies(world, topics, "CASE-A", 1, sealer) + _case_copies(world, topics, "CASE-B", 2, sealer),
    )
    copies = read_all(
        topics,
        kafka_bootstrap,
        [topic_name(topics, "out", "district-fenland"), topic_name(topics, "archive")],
    )
    assert len(copies) == 4
    for recipient in ("district-fenland", "council"):
        mine = [dict(r.headers) for r in copies if dict(r.headers)["rb-recipient"] == recipient.encode()]
        wraps = [h["rb-dek"] for h in mine]
        assert len(wraps) == 2 and wraps[0] != wraps[1] and wraps[0][-80:] == wraps[1][-80:]
    reader = {
        "district-fenland": world.opener("district-fenland", cache=DekCache(100, 300)),
        "council": world.opener("council", cache=DekCache(100, 300)),
    }

    def open_copy(record):
        return reader[dict(record.headers)["rb-recipient"].decode()].open(record)

    assert {open_copy(r).case_id for r in copies} == {"CASE-A", "CASE-B"}

    done = retention.shred(topics, kafka_bootstrap, "CASE-A")
    assert done["case_id"] == "CASE-A"
    for record in copies:
        if dict(record.headers)["rb-case"] == b"CASE-A":
            with pytest.raises(ShreddedError, match="case CASE-A was shredded at"):
                open_copy(record)
        else:
            assert open_copy(record).record == sample_referral(2)
    # The recipient's own private key alone is not enough, and nothing reseals the case.
    fresh = CaseKeyStore.open(topics.keys_dir)
    with pytest.raises(ShreddedError):
        fresh.key_for("CASE-A")
    with pytest.raises(ShreddedError, match="case CASE-A was shredded"):
        retention.shred(topics, kafka_bootstrap, "CASE-A")
    assert not list(fresh.root.glob("CASE-A*"))
    events = _audit_events(topics, kafka_bootstrap, world)
    assert [e["type"] for e in events] == ["retention.case_shredded"]
    assert events[0]["case_id"] == "CASE-A" and events[0]["case_key_id"] == done["case_key_id"]
    raw_events = json.dumps(events).encode()
    assert not [s for s in needles(sample_referral(1)) if s in raw_events]


def test_a_held_case_cannot_be_shredded(topics: Settings, kafka_bootstrap: str, world: World) -> None:
    send_all(topics, kafka_bootstrap, _case_copies(world, topics, "CASE-H", 3))
    retention.hold(topics, kafka_bootstrap, "CASE-H", "Family court proceedings FC-2026-001 (synthetic)")
    with pytest.raises(
        LegalHoldError, match=r"case CASE-H is under legal hold since .* \(reason: Family court"
    ):
        retention.shred(topics, kafka_bootstrap, "CASE-H")
    (district_copy,) = read_all(topics, kafka_bootstrap, [topic_name(topics, "out", "district-fenland")])
    assert world.opener("district-fenland").open(district_copy).record == sample_referral(3)
    retention.release(topics, kafka_bootstrap, "CASE-H")
    retention.shred(topics, kafka_bootstrap, "CASE-H")
    with pytest.raises(ShreddedError):
        world.opener("district-fenland").open(district_copy)
    assert [e["type"] for e in _audit_events(topics, kafka_bootstrap, world)] == [
        "retention.hold_placed",
        "retention.shred_refused",
        "retention.hold_released",
        "retention.case_shredded",
    ]


def test_retention_commands(topics: Settings, kafka_bootstrap: str, world: World) -> None:
    CaseKeyStore.open(topics.keys_dir).key_for("CASE-C")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": topics.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": topics.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(topics.paths_data_dir),
    }
    runner = CliRunner()
    held = runner.invoke(
        cli, ["retention", "hold", "--case", "CASE-C", "--reason", "audit query 7", "--json"], env=env
    )
    assert held.exit_code == 0, held.output
    assert json.loads(held.output)["reason"] == "audit query 7"
    refused = runner.invoke(cli, ["retention", "shred", "--case", "CASE-C"], env=env)
    assert isinstance(refused.exception, LegalHoldError) and refused.exception.exit_code == 57
    assert runner.invoke(cli, ["retention", "release", "--case", "CASE-C"], env=env).exit_code == 0
    shred = runner.invoke(cli, ["retention", "shred", "--case", "CASE-C", "--json"], env=env)
    assert shred.exit_code == 0, shred.output
    assert json.loads(shred.output)["case_id"] == "CASE-C"
    unknown = runner.invoke(cli, ["retention", "shred", "--case", "CASE-NONE"], env=env)
    assert isinstance(unknown.exception, KeyNotFoundError)


def test_district_team_copies_must_use_a_case_key(tmp_path: Path) -> None:
    world = make_world(tmp_path / "keys")
    with pytest.raises(SealingError, match="district team district-fenland must be sealed under a case key"):
        world.sealer().seal(
            sample_referral(),
            SCHEMA,
            topic="t",
            recipient="district-fenland",
            referral_id="ref-0001",
            referral_version=1,
        )


def _journal_slots(store: CaseKeyStore) -> dict[str, list[bytes]]:
    """Every journal of the store, as its raw 128-byte slots."""
    out = {}
    for path in sorted((store.root / "journals").iterdir()):
        data = path.read_bytes()
        out[path.name] = [data[i : i + case_journal.SLOT] for i in range(0, len(data), case_journal.SLOT)]
    return out


def test_case_store_rules(tmp_path: Path) -> None:
    store = CaseKeyStore.open(tmp_path / "keys")
    case_key_id, key = store.key_for("CASE-1")
    assert store.key_for("CASE-1") == (case_key_id, key)
    assert store.lookup("CASE-1", case_key_id) == key
    other_id, _ = store.key_for("CASE-2")
    with pytest.raises(KeyNotFoundError, match=f"case key {other_id} is not a key of case CASE-1"):
        CaseKeyStore.open(tmp_path / "keys").lookup("CASE-1", other_id)  # a header naming another case's key
    with pytest.raises(KeyNotFoundError, match=r"case-key journal 00000000\.journal does not exist"):
        store.lookup("CASE-1", "j00000000.0")
    with pytest.raises(KeyNotFoundError, match="is not in its journal"):
        store.lookup("CASE-1", case_key_id.split(".")[0] + ".7")
    with pytest.raises(KeyNotFoundError, match="no key for case CASE-1"):
        store.lookup("CASE-1", "j../../x.0")  # not a journal id: the store-from-before's file, absent
    with pytest.raises(SealingError, match="malformed case id"):
        store.key_for("../council/keyring")
    with pytest.raises(SealingError, match="needs a reason"):
        store.hold("CASE-1", "   ")
    with pytest.raises(SealingError, match="not under legal hold"):
        store.release("CASE-1")
    (journal,) = (store.root / "journals").iterdir()
    assert journal.stat().st_mode & 0o777 == 0o600
    assert (store.root / "journals").stat().st_mode & 0o777 == 0o700
    # an interrupted shred (tombstone written, key left) is finished by the next shred
    slot = _journal_slots(store)[journal.name][0]
    done = store.shred("CASE-1")
    assert _journal_slots(store)[journal.name][0] == b"X" + bytes(case_journal.SLOT - 1)
    with open(journal, "r+b") as fh:
        fh.write(slot)  # as if the process had died between the tombstone and the overwrite
    assert store.shred("CASE-1") == done
    assert _journal_slots(store)[journal.name][0] == b"X" + bytes(case_journal.SLOT - 1)
    assert store.lookup("CASE-2", other_id)  # the other case's key, beside it, is untouched
    journal.chmod(0o644)
    with pytest.raises(KeyStorePermissionError, match="accessible by group or others"):
        CaseKeyStore.open(tmp_path / "keys").lookup("CASE-2", other_id)


def test_case_keys_are_read_and_created_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    """A router SIGSTOPped inside a shred or a hold holds the store's lock; sealing must not
    wait for it (it did: every other router stalled, so no takeover could complete)."""
    import threading

    from referral_broker.sealing.keystore import locked

    store = CaseKeyStore.open(tmp_path / "keys")
    known = store.key_for("CASE-OLD")
    got: dict[str, tuple[str, bytes]] = {}

    def seal_for(case: str) -> threading.Thread:
        worker = threading.Thread(target=lambda: got.__setitem__(case, store.key_for(case)), daemon=True)
        worker.start()
        return worker

    with locked(store.root):
        for case in ("CASE-OLD", "CASE-NEW"):
            worker = seal_for(case)
            worker.join(timeout=10)
            assert not worker.is_alive(), f"{case}: stalled behind the lock"
        assert CaseKeyStore.open(tmp_path / "keys").lookup("CASE-NEW", got["CASE-NEW"][0]) == got["CASE-NEW"][1]
    assert got["CASE-OLD"] == known and got["CASE-NEW"][1] != known[1]
    assert store.key_for("CASE-NEW") == got["CASE-NEW"]


def test_routers_making_keys_for_the_same_cases_at_once_each_key_opens_and_a_shred_destroys_all(
    tmp_path: Path,
) -> None:
    """Processes sharing the store, each making keys for the same new cases at once: each
    appends to a journal of its own (0600), every key opens by its id in any process, and a
    shred destroys every key of the case, whichever process made it."""
    import multiprocessing

    store = CaseKeyStore.open(tmp_path / "keys")
    cases = [f"CASE-R{i}" for i in range(200)]
    ctx = multiprocessing.get_context("spawn")  # not fork: the test process runs client threads
    with ctx.Pool(4) as pool:
        results = pool.starmap(_create_all, [(store.root.parent.parent, cases)] * 4)
    journals = sorted((store.root / "journals").iterdir())
    assert len(journals) == 4 and all(j.stat().st_mode & 0o777 == 0o600 for j in journals)
    assert all(j.stat().st_size == 200 * case_journal.SLOT for j in journals)
    for case in cases:
        made = {r[case] for r in results}
        assert len(made) == 4, f"{case}: {len(made)} keys"
        for case_key_id, key in made:
            assert store.lookup(case, case_key_id) == key
    victim = cases[7]
    assert sorted(store.check_shreddable(victim).split(", ")) == sorted(r[victim][0] for r in results)
    fresh = CaseKeyStore.open(tmp_path / "keys")  # another process: opens before the shred
    done = store.shred(victim)
    assert sorted(done.case_key_id.split(", ")) == sorted(r[victim][0] for r in results)
    for r in results:
        with pytest.raises(ShreddedError, match=f"case {victim} was shredded"):
            fresh.lookup(victim, r[victim][0])
        slot = int(r[victim][0].split(".")[1])
        tag = r[victim][0][1:].split(".")[0]
        assert _journal_slots(store)[f"{tag}.journal"][slot] == b"X" + bytes(case_journal.SLOT - 1)
        assert r[victim][1] not in (store.root / "journals" / f"{tag}.journal").read_bytes()
    assert all(fresh.lookup(cases[8], r[cases[8]][0]) == r[cases[8]][1] for r in results)
    assert not fresh.has_key(victim) and fresh.has_key(cases[8])


def test_an_inbox_seals_under_the_routers_key_of_the_case_and_writes_none(tmp_path: Path) -> None:
    """A district team's inbox (its volume may be mounted read-only) seals its statuses and
    texts under a key the router made for the case, found in the router's journal; it never
    appends one, and a case with no key is a clear error, not a new key."""
    router = CaseKeyStore.open(tmp_path / "keys")
    made = router.key_for("CASE-I")
    journals = sorted(p.name for p in (router.root / "journals").iterdir())
    inbox = CaseKeyStore.open(tmp_path / "keys", makes_keys=False)
    assert inbox.key_for("CASE-I") == made and inbox.key_for("CASE-I") == made
    with pytest.raises(KeyNotFoundError, match=r"no key for case CASE-NONE .*does not make case keys"):
        inbox.key_for("CASE-NONE")
    later = router.key_for("CASE-LATER")  # appended after the inbox first read the journal
    assert CaseKeyStore.open(tmp_path / "keys", makes_keys=False).key_for("CASE-LATER") == later
    assert inbox.key_for("CASE-LATER") == later
    assert sorted(p.name for p in (router.root / "journals").iterdir()) == journals
    router.shred("CASE-I")
    with pytest.raises(ShreddedError, match="CASE-I was shredded"):
        inbox.key_for("CASE-I")
    # a store from before the journals, opened by an inbox before any router ran: no folder made
    old = tmp_path / "old"
    CaseKeyStore.open(old)
    (old / "council" / "cases" / "journals").rmdir()
    CaseKeyStore.open(old, makes_keys=False).check()
    assert not (old / "council" / "cases" / "journals").exists()


def test_a_failed_append_is_never_read_as_a_key_and_the_next_key_starts_a_new_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short write (a full disk) leaves a torn tail: the append raises, the journal is
    given up (its earlier keys still open), no scan takes the tail for a key, and the next
    key goes to a new journal. A write that fails outright raises too."""
    import errno

    store = CaseKeyStore.open(tmp_path / "keys")
    before = store.key_for("CASE-W")
    real_write = case_journal.os.write
    monkeypatch.setattr(case_journal.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    with pytest.raises(SealingError, match=r"short write \(7 of 128 bytes\)"):
        store.key_for("CASE-T")

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(case_journal.os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.key_for("CASE-F")
    monkeypatch.setattr(case_journal.os, "write", real_write)
    after = store.key_for("CASE-T")
    assert after[0].split(".")[0] != before[0].split(".")[0]  # a new journal
    reader = CaseKeyStore.open(tmp_path / "keys")
    assert reader.lookup("CASE-W", before[0]) == before[1] and reader.lookup("CASE-T", after[0]) == after[1]
    assert reader.has_key("CASE-T") and not reader.has_key("CASE-F")
    assert reader.check_shreddable("CASE-T") == after[0]  # the torn tail is no key of CASE-T
    sizes = sorted(len(b"".join(slots)) for slots in _journal_slots(store).values())
    assert sizes[-1] == case_journal.SLOT + 7  # the torn one, and the failed write added nothing


def test_a_forked_child_appends_to_a_journal_of_its_own(tmp_path: Path) -> None:
    """A journal has one appender, which counts its slots: a child forked from a process that
    made keys must not append to its parent's journal (both would hand out the same slot)."""
    import os

    store = CaseKeyStore.open(tmp_path / "keys")
    parent = store.key_for("CASE-P")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: file operations only, then out
        try:
            os.write(write_end, store.key_for("CASE-C")[0].encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 100).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    after = store.key_for("CASE-Q")
    assert child_id.split(".")[0] != parent[0].split(".")[0]
    assert after[0] == parent[0].split(".")[0] + ".1"  # the parent's journal goes on
    reader = CaseKeyStore.open(tmp_path / "keys")
    assert reader.has_key("CASE-C") and reader.lookup("CASE-P", parent[0]) == parent[1]
    assert reader.lookup("CASE-Q", after[0]) == after[1]


def test_keys_of_a_journal_given_up_that_cannot_be_synced_fail_the_next_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's keys already sealed into messages live in the journal a short write gives
    up; if they cannot be fsynced then, the batch's sync() must fail (its transaction must not
    commit messages naming keys a power cut could lose), once."""
    import errno

    store = CaseKeyStore.open(tmp_path / "keys")
    store.defer_durability()
    store.key_for("CASE-B1")
    real_write = case_journal.os.write
    monkeypatch.setattr(case_journal.os, "write", lambda fd, data: real_write(fd, bytes(data[:9])))

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(case_journal.os, "fsync", failing_fsync)
    with pytest.raises(SealingError, match="short write"):
        store.key_for("CASE-B2")
    monkeypatch.undo()
    with pytest.raises(SealingError, match=r"not made durable \(Input/output error\)"):
        store.sync()
    store.key_for("CASE-B3")
    assert store.sync() == 1  # a new journal, synced as usual


def _create_all(keys_dir: Path, cases: list[str]) -> dict[str, tuple[str, bytes]]:
    store = CaseKeyStore.open(keys_dir)
    return {case: store.key_for(case) for case in cases}


def test_a_key_created_as_its_case_is_shredded_is_destroyed_and_refused(tmp_path: Path) -> None:
    """The race a lock used to close: a router holds no key of a case in memory (a shred in
    another process just wrote its tombstone) and makes a key. The tombstone is checked after
    the key is made, so it meets it, destroys the key it made and refuses the case."""
    store = CaseKeyStore.open(tmp_path / "keys")
    case_key_id, _ = store.key_for("CASE-S")
    CaseKeyStore.open(tmp_path / "keys").shred("CASE-S")  # another process: this store held the key
    for attempt in range(2):
        with pytest.raises(ShreddedError, match=f"case CASE-S was shredded .*case key {case_key_id} destroyed"):
            store.key_for("CASE-S")
        # the first is refused by the check of the key kept in memory (nothing made); the
        # second makes one, meets the tombstone and destroys it
        (slots,) = _journal_slots(store).values()
        assert len(slots) == 1 + attempt
        assert set(slots) == {b"X" + bytes(case_journal.SLOT - 1)}


def test_a_key_kept_in_memory_is_checked_against_its_tombstone_at_every_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The district-team and archive copies of one referral use one case key; a shred in
    another process is still refused at the very next use, and a key is not kept past
    ``KNOWN_S`` (a shred by this store forgets it at once)."""
    from referral_broker.sealing import case_keys

    store = CaseKeyStore.open(tmp_path / "keys")
    other = CaseKeyStore.open(tmp_path / "keys")
    reads: list[str] = []
    real_read = case_journal.CaseJournals.read

    def counting_read(self: case_journal.CaseJournals, case_key_id: str) -> object:
        reads.append(case_key_id)
        return real_read(self, case_key_id)

    monkeypatch.setattr(case_journal.CaseJournals, "read", counting_read)
    first = store.key_for("CASE-K")
    assert store.key_for("CASE-K") == first and store.lookup("CASE-K", first[0]) == first[1]
    assert reads == []  # made here, never read back
    assert other.lookup("CASE-K", first[0]) == first[1] and other.lookup("CASE-K", first[0]) == first[1]
    assert other.key_for("CASE-K") == first  # the key it just read: no second key for the case
    assert reads == [first[0]]  # the other store read it once
    other.shred("CASE-K")
    assert "CASE-K" not in other._known
    with pytest.raises(ShreddedError, match="CASE-K was shredded"):
        store.key_for("CASE-K")
    assert "CASE-K" not in store._known
    with pytest.raises(ShreddedError):
        store.lookup("CASE-K", first[0])
    # past KNOWN_S a key is forgotten: the next seal makes another, and the first still opens
    kept = store.key_for("CASE-T")
    clock = [case_keys.time.monotonic() + case_keys.KNOWN_S + 1]
    monkeypatch.setattr(case_keys.time, "monotonic", lambda: clock[0])
    later = store.key_for("CASE-T")
    assert later[0] != kept[0] and store.lookup("CASE-T", kept[0]) == kept[1]
    assert sorted(store.check_shreddable("CASE-T").split(", ")) == sorted([kept[0], later[0]])


def test_a_store_from_before_the_journals_keeps_its_case_key_files(tmp_path: Path) -> None:
    """Case keys written one file per case by an older version still open their messages and
    are shredded with the case's journal keys; a key file met half destroyed reads as
    shredded, a damaged one is its own error, and so is a damaged journal slot."""
    import base64

    store = CaseKeyStore.open(tmp_path / "keys")
    old_key = bytes(range(32))
    path = store.root / "CASE-Z.key"
    doc = {"case_id": "CASE-Z", "case_key_id": "0123456789ab", "created_at": "2025-01-02T03:04:05Z"}
    path.write_text(json.dumps(doc | {"key": base64.b64encode(old_key).decode()}))
    path.chmod(0o600)
    assert store.lookup("CASE-Z", "0123456789ab") == old_key
    with pytest.raises(KeyNotFoundError, match="has key 0123456789ab, not 0123456789ac"):
        store.lookup("CASE-Z", "0123456789ac")
    assert store.key_for("CASE-Z") == ("0123456789ab", old_key)  # the key it just read
    new = CaseKeyStore.open(tmp_path / "keys").key_for("CASE-Z")  # a later message: a journal key
    assert store.has_key("CASE-Z")
    assert store.check_shreddable("CASE-Z") == f"0123456789ab, {new[0]}"
    zeroes = bytes(path.stat().st_size)
    done = store.shred("CASE-Z")
    assert done.case_key_id == f"0123456789ab, {new[0]}" and not path.exists()
    path.write_bytes(zeroes)  # the moment between destroy_file's overwrite and its unlink
    path.chmod(0o600)
    fresh = CaseKeyStore.open(tmp_path / "keys")
    with pytest.raises(ShreddedError, match="CASE-Z was shredded"):
        fresh.lookup("CASE-Z", "0123456789ab")
    assert fresh.shred("CASE-Z") == done and not path.exists()  # the interrupted destroy, finished
    # a damaged key file of a live case is still its own error
    (store.root / "CASE-M.key").write_bytes(b"not json")
    (store.root / "CASE-M.key").chmod(0o600)
    with pytest.raises(SealingError, match=r"case key file .*CASE-M\.key is malformed"):
        fresh.lookup("CASE-M", "0123456789ab")
    # a journal slot with one byte changed is never taken for a key
    case_key_id, key = store.key_for("CASE-D")
    journal = store.root / "journals" / f"{case_key_id[1:].split('.')[0]}.journal"
    data = bytearray(journal.read_bytes())
    at = data.index(key)
    data[at] ^= 1
    journal.write_bytes(bytes(data))
    with pytest.raises(KeyNotFoundError, match=f"case key {case_key_id} is destroyed or damaged"):
        CaseKeyStore.open(tmp_path / "keys").lookup("CASE-D", case_key_id)


def test_new_case_keys_become_durable_together_at_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's batch: new case keys are appended at once (readable by any process) but
    made durable by one fdatasync at sync() before its Kafka commit; a shred still takes
    effect at once, synced or not; without deferral every new key is durable on its own."""
    synced: list[str] = []
    real_fsync, real_fdatasync = case_journal.os.fsync, case_journal.os.fdatasync

    def counting(kind: str, real: object) -> object:
        return lambda fd: (synced.append(kind), real(fd))[1]  # type: ignore[operator]

    monkeypatch.setattr(case_journal.os, "fsync", counting("fsync", real_fsync))
    monkeypatch.setattr(case_journal.os, "fdatasync", counting("fdatasync", real_fdatasync))
    store = CaseKeyStore.open(tmp_path / "keys")
    store.key_for("CASE-PLAIN")
    assert synced == ["fdatasync", "fsync"] and store.unsynced == 0  # the journal, then its new name
    store.key_for("CASE-PLAIN-2")
    assert synced == ["fdatasync", "fsync", "fdatasync"]
    synced.clear()

    store.defer_durability()
    keys = {case: store.key_for(case) for case in ("CASE-A", "CASE-B", "CASE-C")}
    assert store.key_for("CASE-A") == keys["CASE-A"]  # the same key for the referral's copies
    assert synced == [] and store.unsynced == 3
    other = CaseKeyStore.open(tmp_path / "keys")
    assert other.lookup("CASE-B", keys["CASE-B"][0]) == keys["CASE-B"][1]  # readable at once
    other.shred("CASE-C")  # before the sync: gone now
    with pytest.raises(ShreddedError):
        store.key_for("CASE-C")
    synced.clear()  # the shred's own (its tombstone, the overwrite)
    assert store.sync() == 3 and store.unsynced == 0
    assert synced == ["fdatasync"]  # one for the batch
    synced.clear()
    assert store.sync() == 0 and synced == []  # nothing new: no syscall


def test_a_shred_is_one_file_and_a_store_from_before_keeps_its_tombstones(tmp_path: Path) -> None:
    """Tombstones are one file per case (checking one costs a stat, not a parse of every
    shredded case); the single shredded.json of an older store is still honoured, read again
    when another (older) process changes it, and a shred in one process is refused at once by
    a store another process has open."""
    store = CaseKeyStore.open(tmp_path / "keys")
    other = CaseKeyStore.open(tmp_path / "keys")  # another router's view of the same folder
    store.key_for("CASE-NEW")
    store.key_for("CASE-LATER")
    assert other.shredded("CASE-NEW") is None
    done = store.shred("CASE-NEW")
    tombstone = store.root / "shredded" / "CASE-NEW.json"
    assert tombstone.stat().st_mode & 0o777 == 0o600
    assert json.loads(tombstone.read_text()) == {
        "case_id": "CASE-NEW", "case_key_id": done.case_key_id, "shredded_at": done.shredded_at
    }
    assert not (store.root / "shredded.json").exists()  # the old single file is never written
    with pytest.raises(ShreddedError, match="CASE-NEW"):
        other.key_for("CASE-NEW")  # at once, in the other store
    assert other.shredded("CASE-NEW") == done

    # a store from before: its tombstones live in shredded.json, and its case keys are gone
    legacy = {"CASE-OLD": {"case_key_id": "0123456789ab", "shredded_at": "2025-01-02T03:04:05Z"}}
    (store.root / "shredded.json").write_text(json.dumps(legacy))
    (store.root / "shredded.json").chmod(0o600)
    with pytest.raises(ShreddedError, match="CASE-OLD was shredded at 2025-01-02T03:04:05Z"):
        other.key_for("CASE-OLD")
    with pytest.raises(ShreddedError):
        other.lookup("CASE-OLD", "0123456789ab")
    assert other.key_for("CASE-LATER")  # other cases still seal
    # an older process shreds CASE-LATER the old way (it rewrites shredded.json): seen at once
    legacy["CASE-LATER"] = {"case_key_id": "ba9876543210", "shredded_at": "2025-02-03T04:05:06Z"}
    replacement = store.root / ".shredded.json.tmp"
    replacement.write_text(json.dumps(legacy))
    replacement.chmod(0o600)
    replacement.replace(store.root / "shredded.json")
    with pytest.raises(ShreddedError, match="CASE-LATER"):
        other.key_for("CASE-LATER")
    with pytest.raises(ShreddedError):
        store.hold("CASE-OLD", "court order")  # a shredded case cannot be held


def test_checking_for_a_tombstone_does_not_read_every_tombstone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a large legacy shredded.json, sealing for a live case parses it once, not once per
    key lookup (it cost 47 ms a referral at 10,000 shredded cases)."""
    from referral_broker.sealing import case_keys

    store = CaseKeyStore.open(tmp_path / "keys")
    legacy = {f"OLD-{n}": {"case_key_id": "0123456789ab", "shredded_at": "2025-01-02T03:04:05Z"} for n in range(5000)}
    (store.root / "shredded.json").write_text(json.dumps(legacy))
    (store.root / "shredded.json").chmod(0o600)
    parsed: list[int] = []
    real_loads = case_keys.json.loads

    def counting_loads(text: str | bytes) -> object:
        doc = real_loads(text)
        if isinstance(doc, dict) and "OLD-0" in doc:
            parsed.append(len(doc))
        return doc

    monkeypatch.setattr(case_keys.json, "loads", counting_loads)
    for n in range(50):
        store.key_for(f"CASE-{n}")
        store.key_for(f"CASE-{n}")
    assert parsed == [5000]
    with pytest.raises(ShreddedError):
        store.key_for("OLD-4999")
