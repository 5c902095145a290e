"""The router's delivery ledger on the real broker: entries kept in a private file, not in the
router's memory (a 1M-referral backfill must not grow it), read back by another router with
their signatures checked, and this router's own entries not verified a second time."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid

import pytest
from county import GP, POLICE, SCHOOL
from test_sealing_support import send_all

from referral_broker.config import Settings
from referral_broker.consumers import delivery_ledger
from referral_broker.consumers.delivery_ledger import DeliveryLedger
from referral_broker.consumers.router import Router
from referral_broker.identity import load_identity
from referral_broker.parties import HUB
from referral_broker.sealing.envelope import sign_messages


def test_entries_live_in_a_private_file_and_come_back_verified_only_to_another_router(
    county: Settings, kafka_bootstrap: str
) -> None:
    hub = load_identity(county, kafka_bootstrap, HUB)
    mine = DeliveryLedger(county, kafka_bootstrap, hub)
    other = DeliveryLedger(county, kafka_bootstrap, hub)
    try:
        mine.catch_up()
        other.catch_up()
        ids = [str(uuid.uuid4()) for _ in range(40)]
        messages = [mine.record(rid, 1, POLICE, {SCHOOL}) for rid in ids]
        messages.append(mine.record(ids[0], 2, POLICE, {SCHOOL, GP}))  # a second version adds up
        send_all(county, kafka_bootstrap, sign_messages(hub.keystore, messages))  # as the router's batch
        mine.commit()

        assert len(mine) == 40 and not mine._pending

        mine.catch_up()  # its own 41 entries come back byte for byte: not verified again
        other.catch_up()  # another router reads them with the hub's signature checked
        files = list((county.paths_data_dir / "router").glob("delivery-ledger-*.sqlite"))
        assert len(files) == 2  # one per ledger, nothing shared
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
        assert (mine.verified, mine.refused) == (0, 0)
        assert (other.verified, other.refused) == (41, 0)
        for ledger in (mine, other):
            first = ledger.lookup(ids[0])
            assert first is not None and first.referrer == POLICE
            assert first.versions == {1: {SCHOOL}, 2: {SCHOOL, GP}}
            assert ledger.lookup(ids[-1]) is not None and len(ledger) == 40
        assert mine.lookup(str(uuid.uuid4())) is None
    finally:
        mine.close()
        other.close()
    assert not list((county.paths_data_dir / "router").glob("delivery-ledger-*.sqlite"))


def test_own_entries_that_land_after_a_catch_up_are_still_not_verified_again(
    county: Settings, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit returns before its markers reach the ledger's partitions, so a catch-up can end
    short of entries this router just committed; they come back at the next one, and are still
    its own (not verified again; a router without signatures, as the bench's, would refuse them).
    Only entries unseen for OWN_GRACE_S are given up on."""
    hub = load_identity(county, kafka_bootstrap, HUB)
    mine = DeliveryLedger(county, kafka_bootstrap, hub)
    try:
        mine.catch_up()
        ids = [str(uuid.uuid4()) for _ in range(12)]
        messages = sign_messages(hub.keystore, [mine.record(rid, 1, POLICE, {SCHOOL}) for rid in ids])
        mine.commit()
        mine.catch_up()  # committed, not yet on the topic: this catch-up ends short of them
        send_all(county, kafka_bootstrap, messages)
        mine.catch_up()
        assert (mine.verified, mine.refused) == (0, 0) and not mine._own
        assert all(mine.lookup(rid) is not None for rid in ids)

        late = sign_messages(hub.keystore, [mine.record(str(uuid.uuid4()), 1, POLICE, {SCHOOL})])
        mine.commit()
        monkeypatch.setattr(delivery_ledger, "OWN_GRACE_S", -1.0)  # as if committed long ago
        mine.catch_up()
        assert not mine._own  # given up on
        send_all(county, kafka_bootstrap, late)
        mine.catch_up()
        assert (mine.verified, mine.refused) == (1, 0)  # read as anyone's entry: verified
    finally:
        mine.close()


def test_a_starting_router_reads_the_ledger_before_its_first_batch(county: Settings, kafka_bootstrap: str) -> None:
    """Read in the first batch, the ledger (with the registry and the audit chain's heads)
    held up the partitions just assigned for a second or more; a router reads it on starting,
    before it joins the group, so even one that is handed nothing to route has read it."""
    hub = load_identity(county, kafka_bootstrap, HUB)
    writer = DeliveryLedger(county, kafka_bootstrap, hub)
    try:
        writer.catch_up()
        entries = [writer.record(str(uuid.uuid4()), 1, POLICE, {SCHOOL}) for _ in range(5)]
        send_all(county, kafka_bootstrap, sign_messages(hub.keystore, entries))
        writer.commit()
    finally:
        writer.close()
    router = Router(county, kafka_bootstrap, instance="read-ahead")
    stats = router.run(stop_when_idle=2)
    assert stats.consumed == 0 and stats.batches == 0
    assert router._ledger is not None and router._ledger.verified >= 5
    assert router._audit_chain is not None and router._audit_chain._committed is not None


def test_a_file_left_by_a_dead_router_is_removed_and_a_live_ones_kept(county: Settings, kafka_bootstrap: str) -> None:
    folder = county.paths_data_dir / "router"
    folder.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = folder / f"delivery-ledger-{int(dead.stdout)}-abcd1234.sqlite"  # its router was SIGKILLed
    live = folder / "delivery-ledger-1-abcd1234.sqlite"  # pid 1 is always running
    orphan.write_bytes(b"")
    live.write_bytes(b"")
    ledger = DeliveryLedger(county, kafka_bootstrap, load_identity(county, kafka_bootstrap, HUB))
    try:
        assert len(ledger) == 0  # the ledger's own file is made now
        assert not orphan.exists() and live.exists()
        assert len(list(folder.glob(f"delivery-ledger-{os.getpid()}-*.sqlite"))) == 1
    finally:
        ledger.close()
        live.unlink()


def _on_partition_0(count: int, partitions: int) -> list[str]:
    """Referral ids whose entries the producer's default partitioner puts on partition 0."""
    from kafka.partitioner.default import murmur2

    ids: list[str] = []
    while len(ids) < count:
        rid = str(uuid.uuid4())
        if (murmur2(rid.encode()) & 0x7FFFFFFF) % partitions == 0:  # kafka-python's keyed choice
            ids.append(rid)
    return ids


def test_own_committed_entries_are_passed_over_unread_and_anothers_between_them_read(
    county: Settings, kafka_bootstrap: str
) -> None:
    """A catch-up seeks past this router's own committed entries when they are all that lies
    before the partition's end (its runs, each followed by one commit marker), instead of
    fetching them back; another writer's entry among them, or an aborted transaction, and it
    reads the partition as before: the other's entry is verified and applied."""
    from referral_broker.cluster.clients import build_consumer, build_producer

    hub = load_identity(county, kafka_bootstrap, HUB)
    mine, other = DeliveryLedger(county, kafka_bootstrap, hub), DeliveryLedger(county, kafka_bootstrap, hub)
    probe = build_consumer(county, kafka_bootstrap, [mine.topic], group_id=None)
    partitions = len(probe.assignment())
    probe.close()
    ids = iter(_on_partition_0(40, partitions))
    producers = [build_producer(county, kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}") for _ in range(2)]

    def transaction(ledger: DeliveryLedger, producer: int, n: int, *, commit: bool = True) -> list[str]:
        written = [next(ids) for _ in range(n)]
        p = producers[producer]
        p.begin()
        for m in sign_messages(hub.keystore, [ledger.record(rid, 1, POLICE, {SCHOOL}) for rid in written]):
            ledger.sent(m, m.send(p))
        if commit:
            p.commit()
            ledger.commit()
        else:
            p.flush()  # on the partition, then aborted: records and a marker the catch-up reads past
            p.abort()
            ledger.abort()
        return written

    def caught_up(ledger: DeliveryLedger) -> None:
        # a commit returns before its markers are on the partition: once the last stable offset
        # is the high watermark, every transaction is decided and marked, and one catch-up reads
        # to there (an earlier one could end between two of them, which is as correct)
        deadline = time.monotonic() + 10
        while True:
            stable = committed.end_offsets(list(committed.assignment()))
            if stable == everything.end_offsets(list(everything.assignment())):
                break
            assert time.monotonic() < deadline, "transactions not marked within 10 s"
            time.sleep(0.05)
        ledger.catch_up()
        assert not ledger._own

    committed = build_consumer(county, kafka_bootstrap, [mine.topic], group_id=None)
    everything = build_consumer(county, kafka_bootstrap, [mine.topic], group_id=None, isolation_level="read_uncommitted")
    try:
        mine.catch_up()
        first = transaction(mine, 0, 5) + transaction(mine, 0, 3)  # two runs, each with its marker
        caught_up(mine)
        assert (mine.skipped, mine.verified) == (8, 0) and not mine._runs[0]
        assert all(mine.lookup(rid) is not None for rid in first)

        # another router's entries between two of mine: read, verified, applied
        transaction(mine, 0, 4)
        theirs = transaction(other, 1, 2)
        transaction(mine, 0, 4)
        caught_up(mine)
        assert (mine.skipped, mine.verified) == (8, 2)
        assert all(mine.lookup(rid) is not None for rid in theirs)
        # an aborted transaction of mine before a committed one: read as before, nothing of it applied
        aborted = transaction(mine, 0, 3, commit=False)
        after = transaction(mine, 0, 2)
        caught_up(mine)
        assert (mine.skipped, mine.verified) == (8, 2)
        assert all(mine.lookup(rid) is None for rid in aborted) and all(mine.lookup(rid) for rid in after)
        # and alone again: passed over, to the partition's end
        transaction(mine, 0, 3)
        caught_up(mine)
        assert (mine.skipped, mine.verified, mine.refused) == (11, 2, 0)
        tp = next(tp for tp in mine._consumer.assignment() if tp.partition == 0)
        assert mine._consumer.position(tp) == committed.end_offsets([tp])[tp]
    finally:
        for c in (committed, everything, *producers):
            c.close()
        mine.close()
        other.close()
