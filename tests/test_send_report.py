"""What a send reports, row by row, in flat memory (issue 20, goal 4: a 100k-row batch sent
with flat memory): each batch is classified from the outbox once delivered, and the report
keeps 25 bytes a row (``SentList``), so a send's memory does not grow with the file."""

from __future__ import annotations

import copy
import gc
import tracemalloc
import uuid

from county import SCHOOL
from test_router import read_all, referrals_from

from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.parties import all_parties
from referral_broker.producers.checked import check_referrals
from referral_broker.producers.intake import Sent, SentList
from referral_broker.producers.outbox import referral_message_id
from referral_broker.producers.sending import PartnerSender
from referral_broker.sealing.key_admin import init_parties


def test_a_sent_list_reads_back_what_was_appended_in_25_bytes_a_row() -> None:
    rows = [Sent(str(uuid.uuid4()), n % 7 + 1, "t.intake") for n in range(1000)]
    odd = [Sent("ABC-not-a-uuid", 2, "t.intake"), Sent(str(uuid.uuid4()).upper(), 3, "t.other")]
    kept = SentList(rows + odd)
    assert len(kept) == 1002 and kept == rows + odd and list(kept) == rows + odd
    assert kept[-1] == odd[-1] and kept[1:3] == rows[1:3] and kept[0] in kept
    assert kept != rows and SentList() == [] and not SentList()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        big = SentList(Sent(str(uuid.uuid4()), 1, "t.intake") for _ in range(20_000))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(big) == 20_000
    assert held / 20_000 < 40, f"{held / 20_000:.0f} bytes a row"  # a list of Sent: some 300


def test_a_referral_twice_in_one_send_goes_once_and_the_report_says_so(topics: Settings, kafka_bootstrap: str) -> None:
    """Across batches (500 a batch) and within one, and with part of the file kept by an
    earlier send: each referral version is produced once and reported once as delivered,
    every other row of it as already sent."""
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    records = referrals_from(SCHOOL, 1100, seed=61)
    records[700] = copy.deepcopy(records[3])  # a later batch repeats a row of the first
    records[5] = copy.deepcopy(records[4])  # the same batch repeats a row
    records[1050] = copy.deepcopy(records[120])  # repeats a row the earlier send kept
    sender = PartnerSender(topics, kafka_bootstrap, SCHOOL)
    earlier = sender.send_checked(records[100:200])
    assert len(earlier.delivered) == 100 and not earlier.queued and not earlier.already_sent

    report = sender.send_checked(records)
    distinct = {referral_message_id(str(r["referral_id"]), int(r["version"])) for r in records}
    assert len(distinct) == 1097
    delivered = [referral_message_id(s.referral_id, s.version) for s in report.delivered]
    assert len(delivered) == len(set(delivered)) == 997  # the 1,097 less the 100 sent before
    assert len(report.already_sent) == 100 + 3 and not report.queued and report.earlier == 0
    assert sorted(delivered + [referral_message_id(s.referral_id, s.version) for s in earlier.delivered]) == sorted(
        distinct
    )
    intake = read_all(topics, kafka_bootstrap, topic_name(topics, "intake", SCHOOL))
    assert len(intake) == 1097 and len({r.key for r in intake}) == 1097

    again = sender.send_checked(records)
    assert not again.delivered and len(again.already_sent) == 1100 and not again.queued


def test_a_send_holds_the_same_memory_for_a_longer_file(topics: Settings, kafka_bootstrap: str) -> None:
    """Live traced memory after each delivered batch of a 1,000-row and a 5,000-row send (the
    most of it, garbage collected first: a peak also counts cyclic garbage not yet collected,
    which depends on the whole test process, not on the send), after a warm-up that fills the
    sealer's bounded caches (1,024 entries): the longer one may hold its report's 25 bytes a
    row more, not the ~900 a row the per-file lists held before."""
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    sender = PartnerSender(topics, kafka_bootstrap, SCHOOL)
    sender.send_checked(referrals_from(SCHOOL, 1500, seed=70))  # connections, keys, caches: warm
    held = {}
    for rows, seed in ((1000, 71), (5000, 72)):
        # checked before, as a file's records are: validating a dict normalises it in place,
        # and what that adds to the caller's own records is not the send's
        records = list(check_referrals(referrals_from(SCHOOL, rows, seed=seed)))
        live: list[int] = []

        def measure(n: int, live: list[int] = live) -> None:
            gc.collect()
            live.append(tracemalloc.get_traced_memory()[0])

        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            report = sender.send_checked(iter(records), progress=measure)
        finally:
            tracemalloc.stop()
        assert len(report.delivered) == rows and len(live) >= rows // 500
        held[rows] = max(live) - base
        del records, report
    grown = (held[5000] - held[1000]) / 4000
    assert grown < 150, f"{grown:.0f} bytes a row more for the longer file (held {held})"
