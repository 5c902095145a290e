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
from referral_broker.errors import KeyNotFoundError, LegalHoldError, SealingError, ShreddedError
from referral_broker.sealing import CaseKeyStore, DekCache, MessageSealer, retention, verify_signed
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


def test_case_store_rules(tmp_path: Path) -> None:
    store = CaseKeyStore.open(tmp_path / "keys")
    case_key_id, key = store.key_for("CASE-1")
    assert store.key_for("CASE-1") == (case_key_id, key)
    assert store.lookup("CASE-1", case_key_id) == key
    with pytest.raises(KeyNotFoundError, match="not 000000000000"):
        store.lookup("CASE-1", "000000000000")
    with pytest.raises(SealingError, match="malformed case id"):
        store.key_for("../council/keyring")
    with pytest.raises(SealingError, match="needs a reason"):
        store.hold("CASE-1", "   ")
    with pytest.raises(SealingError, match="not under legal hold"):
        store.release("CASE-1")
    assert (store.root / "CASE-1.key").stat().st_mode & 0o777 == 0o600
    # an interrupted shred (tombstone written, key file left) is finished by the next shred
    done = store.shred("CASE-1")
    (store.root / "CASE-1.key").write_bytes(b"{}")
    (store.root / "CASE-1.key").chmod(0o600)
    assert store.shred("CASE-1") == done
    assert not (store.root / "CASE-1.key").exists()


def test_case_keys_are_read_and_created_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    """A router SIGSTOPped inside a shred, a hold or an older version's key creation holds the
    store's lock; sealing must not wait for it (it did: every other router stalled, so no
    takeover could complete)."""
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
    assert got["CASE-OLD"] == known and got["CASE-NEW"][1] != known[1]
    assert store.key_for("CASE-NEW") == got["CASE-NEW"]
    assert [p.name for p in store.root.iterdir() if p.name.endswith(".tmp")] == []


def test_routers_racing_to_create_one_case_key_all_get_the_same_key(tmp_path: Path) -> None:
    """Processes sharing the store, each creating the same new cases at once: one key per
    case, the same in every process, the file whole and 0600 from the start."""
    import multiprocessing

    store = CaseKeyStore.open(tmp_path / "keys")
    cases = [f"CASE-R{i}" for i in range(200)]
    ctx = multiprocessing.get_context("spawn")  # not fork: the test process runs client threads
    with ctx.Pool(4) as pool:
        results = pool.starmap(_create_all, [(store.root.parent.parent, cases)] * 4)
    for case in cases:
        seen = {r[case] for r in results}
        assert len(seen) == 1, f"{case}: {len(seen)} different keys"
        assert store.key_for(case) == seen.pop()
        assert (store.root / f"{case}.key").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in store.root.iterdir() if p.name.endswith(".tmp")] == []


def test_without_hard_links_case_keys_are_created_under_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data folder on a file system that refuses hard links still gets its case keys (the
    store's lock decides who creates one); nothing is left behind."""
    import errno

    from referral_broker.sealing import keystore

    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(keystore.os, "link", no_links)
    store = CaseKeyStore.open(tmp_path / "keys")
    first = store.key_for("CASE-L")
    assert store.key_for("CASE-L") == first
    assert not keystore.create_private(store.root / "CASE-L.key", b"{}")  # exists: not replaced
    assert store.key_for("CASE-L") == first
    assert (store.root / "CASE-L.key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in store.root.iterdir() if p.is_file()) == [".lock", "CASE-L.key"]


def test_a_key_file_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short writes are carried on to the end; a write that fails (a full disk) raises and
    leaves neither the key file nor its temporary behind."""
    import errno

    from referral_broker.sealing import keystore

    real_write = keystore.os.write
    monkeypatch.setattr(keystore.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    store = CaseKeyStore.open(tmp_path / "keys")
    key = store.key_for("CASE-W")
    assert CaseKeyStore.open(tmp_path / "keys").key_for("CASE-W") == key  # read back whole

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keystore.os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.key_for("CASE-F")
    assert sorted(p.name for p in store.root.iterdir() if p.is_file()) == ["CASE-W.key"]


def _create_all(keys_dir: Path, cases: list[str]) -> dict[str, tuple[str, bytes]]:
    store = CaseKeyStore.open(keys_dir)
    return {case: store.key_for(case) for case in cases}


def test_a_key_created_as_its_case_is_shredded_is_destroyed_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a lock used to close: a router finds no key file (a shred in another process
    destroyed it just after writing its tombstone) and creates a key. The tombstone is checked
    after the key is made, so it meets it, destroys the key it made and refuses the case."""
    from referral_broker.sealing import case_keys

    store = CaseKeyStore.open(tmp_path / "keys")
    case_key_id, _ = store.key_for("CASE-S")
    CaseKeyStore.open(tmp_path / "keys").shred("CASE-S")  # another process: this store held the key
    made: list[bool] = []
    real_create = case_keys.create_private
    monkeypatch.setattr(
        case_keys, "create_private", lambda *a, **k: (made.append(real_create(*a, **k)), made[-1])[1]
    )
    for attempt in range(2):
        with pytest.raises(ShreddedError, match=f"case CASE-S was shredded .*case key {case_key_id} destroyed"):
            store.key_for("CASE-S")
        assert not (store.root / "CASE-S.key").exists()
        # the first is refused by the check of the key kept in memory (nothing made); the
        # second finds no key file, makes one, meets the tombstone and destroys it
        assert made == [True] * attempt
    assert [p.name for p in store.root.iterdir() if p.name.endswith(".tmp")] == []


def test_a_key_kept_in_memory_is_checked_against_its_tombstone_at_every_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The district-team and archive copies of one referral read the case key once, not twice;
    a shred in another process is still refused at the very next use, and a key is not kept
    past ``KNOWN_S`` (a shred by this store forgets it at once)."""
    from referral_broker.sealing import case_keys

    store = CaseKeyStore.open(tmp_path / "keys")
    other = CaseKeyStore.open(tmp_path / "keys")
    reads: list[str] = []
    real_read = case_keys.read_private
    def counting_read(path: Path) -> bytes:
        data = real_read(path)
        reads.append(Path(path).name)
        return data

    monkeypatch.setattr(case_keys, "read_private", counting_read)
    first = store.key_for("CASE-K")
    assert store.key_for("CASE-K") == first and store.lookup("CASE-K", first[0]) == first[1]
    assert [r for r in reads if r.endswith(".key")] == []  # made here, never read back
    assert other.key_for("CASE-K") == first and other.key_for("CASE-K") == first
    assert [r for r in reads if r.endswith(".key")] == ["CASE-K.key"]  # the other store read it once
    other.shred("CASE-K")
    assert "CASE-K" not in other._known
    with pytest.raises(ShreddedError, match="CASE-K was shredded"):
        store.key_for("CASE-K")
    assert "CASE-K" not in store._known
    with pytest.raises(ShreddedError):
        store.lookup("CASE-K", first[0])
    # past KNOWN_S a key is read from disk again
    kept = store.key_for("CASE-T")
    clock = [case_keys.time.monotonic() + case_keys.KNOWN_S + 1]
    monkeypatch.setattr(case_keys.time, "monotonic", lambda: clock[0])
    reads.clear()
    assert store.key_for("CASE-T") == kept and reads[-1] == "CASE-T.key"


def test_a_key_read_while_it_is_being_destroyed_is_refused_as_shredded(tmp_path: Path) -> None:
    """destroy_file zeroes the key before unlinking it; a lock-free reader that meets the zeroes
    must say the case is shredded (its tombstone came first), not that the file is malformed."""
    store = CaseKeyStore.open(tmp_path / "keys")
    store.key_for("CASE-Z")
    path = store.root / "CASE-Z.key"
    zeroes = bytes(path.stat().st_size)
    store.shred("CASE-Z")
    path.write_bytes(zeroes)  # the moment between destroy_file's overwrite and its unlink
    path.chmod(0o600)
    with pytest.raises(ShreddedError, match="CASE-Z was shredded"):
        store.key_for("CASE-Z")
    # a damaged key file of a live case is still its own error (to a store that reads it)
    store.key_for("CASE-M")
    (store.root / "CASE-M.key").write_bytes(b"not json")
    with pytest.raises(SealingError, match=r"case key file .*CASE-M\.key is malformed"):
        CaseKeyStore.open(tmp_path / "keys").key_for("CASE-M")


def test_new_case_keys_become_durable_together_at_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's batch: new case keys are written at once (readable, 0600) but fsynced as one
    group by sync() before its Kafka commit; a shred still takes effect at once, synced or not;
    without deferral every new key is durable on its own (two fsyncs) as before."""
    import os

    from referral_broker.sealing import keystore

    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(keystore.os, "fsync", counting_fsync)
    store = CaseKeyStore.open(tmp_path / "keys")
    store.key_for("CASE-PLAIN")
    assert len(synced) == 2 and store.unsynced == 0  # the file, then its folder
    synced.clear()

    store.defer_durability()
    keys = {case: store.key_for(case) for case in ("CASE-A", "CASE-B", "CASE-C")}
    assert store.key_for("CASE-A") == keys["CASE-A"]  # read back at once, same key
    assert synced == [] and store.unsynced == 3
    assert all((store.root / f"{c}.key").stat().st_mode & 0o777 == 0o600 for c in keys)
    assert store.lookup("CASE-B", keys["CASE-B"][0]) == keys["CASE-B"][1]
    store.shred("CASE-C")  # before the sync: gone now, and the sync skips it
    with pytest.raises(ShreddedError):
        store.key_for("CASE-C")
    synced.clear()
    assert store.sync() == 2 and store.unsynced == 0
    assert len(synced) == 3  # CASE-A, CASE-B, then the folder once
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
