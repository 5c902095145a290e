"""The send path and the partner outbox on the real broker: a bad file is refused before any
connection, a file sent twice is sent once, messages in doubt after a crash are found on the
topic instead of sent again, an unreachable cluster queues everything and a flush delivers it
once, and a sender killed mid-file loses and duplicates nothing when resumed.

Counts are read back from the intake topic with ``read_committed`` (``build_consumer``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from county import CHARITY, POLICE, SCHOOL

from referral_broker.adapters import example_file
from referral_broker.cluster.clients import Record, build_consumer, build_producer, drain
from referral_broker.cluster.runtime import LocalBroker
from referral_broker.cluster.topics import ensure_topics, topic_name
from referral_broker.config import Settings, load_settings
from referral_broker.errors import DeliveryPendingError, PartnerInputError
from referral_broker.identity import load_identity
from referral_broker.organisations import Registry, load_file
from referral_broker.organisations import publish as publish_orgs
from referral_broker.parties import HUB, all_parties, use_registry
from referral_broker.producers.checked import check_file
from referral_broker.producers.hub_seal import REFERRAL_KIND, HubSealer
from referral_broker.producers.outbox import Entry, Outbox, outbox_path, referral_message_id
from referral_broker.producers.sending import OutboxDrain, PartnerSender, flush_outbox
from referral_broker.sealing.key_admin import init_parties

CLI = [sys.executable, "-m", "referral_broker.cli.main"]
COUNT = 2000


def cli_env(settings: Settings, bootstrap: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": settings.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir),
        **extra,
    }


def run(env: dict[str, str], *args: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def read_intake(settings: Settings, bootstrap: str, party: str) -> list[Record]:
    """Every committed record of ``party``'s intake topic."""
    consumer = build_consumer(settings, bootstrap, [topic_name(settings, "intake", party)], group_id=None)
    try:
        return [r for batch in drain(consumer, idle_s=2) for r in batch]
    finally:
        consumer.close()


def intake_keys(settings: Settings, bootstrap: str, party: str) -> Counter[str]:
    """How many times each referral id is on ``party``'s intake topic (read_committed)."""
    return Counter((r.key or b"").decode() for r in read_intake(settings, bootstrap, party))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keyed(topics: Settings, kafka_bootstrap: str) -> Settings:
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    return topics


@pytest.fixture
def synth_file(keyed: Settings, kafka_bootstrap: str, tmp_path: Path) -> Path:
    out = tmp_path / "referrals.jsonl"
    made = run(cli_env(keyed, kafka_bootstrap), "synth", "--count", str(COUNT), "--seed", "11", "--out", str(out))
    assert made.returncode == 0, made.stderr
    return out


def file_ids(path: Path) -> list[str]:
    return [json.loads(line)["referral_id"] for line in path.read_text().splitlines() if line.strip()]


def bad_schools_file(tmp_path: Path) -> Path:
    lines = example_file("schools").read_text().splitlines()
    upn = lines[0].split(",").index("UPN")
    row = lines[1].split(",")
    row[upn] = "A801200005001"  # wrong check letter
    bad = tmp_path / "schools.csv"
    bad.write_text("\n".join([*lines, ",".join(row)]) + "\n")
    return bad


@pytest.mark.parametrize("configured", [True, False], ids=["cluster-configured", "local-broker"])
def test_a_bad_file_is_refused_before_any_connection(tmp_path: Path, configured: bool) -> None:
    """Nothing connects (and no local broker starts) until the whole file is known good: the
    'cluster' is a listening socket that would see any connection attempt."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    data, cache = tmp_path / "data", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env |= {"REFERRAL_BROKER_DATA_DIR": str(data), "REFERRAL_BROKER_CACHE_DIR": str(cache)}
    if configured:
        env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{port}"
    else:
        env["REFERRAL_BROKER_LOCAL_PORT"] = str(port)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"referral_id": "not even close"}\n{not json\n')
    try:
        started = time.monotonic()
        for args in (
            ("--as", SCHOOL, "--file", str(bad_schools_file(tmp_path))),
            ("--as", CHARITY, "--file", str(garbage), "--format", "canonical"),
        ):
            refused = run(env, "send", *args)
            assert refused.returncode == PartnerInputError.exit_code, refused.stderr
            assert "nothing sent" in refused.stderr and "Traceback" not in refused.stderr
        assert time.monotonic() - started < 60
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert not (data / "outbox").exists()
    assert not cache.exists() or not any(cache.rglob("*kafka*"))


def test_only_the_validating_readers_make_checked_referrals() -> None:
    """The sender skips validation only for a CheckedReferral, and only a reader that
    validated can make one; a plain dict is validated on its way in."""
    import copy

    from referral_broker.errors import ValidationError
    from referral_broker.producers.checked import CheckedReferral
    from referral_broker.producers.intake import as_checked
    from referral_broker.schemas.synth import synthetic_referrals

    good = copy.deepcopy(next(iter(synthetic_referrals(1, seed=3))))
    with pytest.raises(TypeError, match="validating readers"):
        CheckedReferral(good, str(good["referral_id"]), good["version"])
    with pytest.raises(TypeError, match="validating readers"):
        CheckedReferral(good, str(good["referral_id"]), good["version"], object())
    [checked] = as_checked([good])
    assert checked.record is good and list(as_checked([checked])) == [checked]
    bad = copy.deepcopy(good)
    bad["identifiers"]["nhs_number"] = "9434765918"  # wrong check digit
    with pytest.raises(ValidationError, match=r"identifiers\.nhs_number"):
        list(as_checked([bad]))


def test_raw_referrals_are_validated_against_one_compiled_schema() -> None:
    """A sender handed plain dicts (a partner's own code, the benchmarks) validates them all
    against one schema: each record used to load a fresh copy of it and compile a checker
    for that copy (about 2 ms a referral, and up to 1,024 compiled copies kept)."""
    import copy

    from referral_broker.errors import ValidationError
    from referral_broker.producers.intake import as_checked
    from referral_broker.schemas import validation
    from referral_broker.schemas.synth import synthetic_referrals

    records = [copy.deepcopy(r) for r in synthetic_referrals(40, seed=5)]
    validation._checkers_by_id.clear()
    checked = list(as_checked(records))
    assert [c.record for c in checked] == records
    assert len(validation._checkers_by_id) == 1
    # still each record on its own: the bad one is refused, and only when reached
    bad = copy.deepcopy(records[1])
    bad["identifiers"]["nhs_number"] = "9434765918"  # wrong check digit
    stream = as_checked([records[0], bad])
    assert next(stream).record is records[0]
    with pytest.raises(ValidationError, match=r"identifiers\.nhs_number"):
        next(stream)


def test_statuses_sealed_without_a_schema_share_one(keyed: Settings, kafka_bootstrap: str) -> None:
    """The inbox seals its statuses with no schema of its own: each used to get a fresh copy
    of the status schema, compiled again for validation (and kept, up to 1,024 copies)."""
    import uuid
    from datetime import UTC, datetime

    from referral_broker.producers.hub_seal import seal_status
    from referral_broker.schemas import validation

    sealer = load_identity(keyed, kafka_bootstrap, SCHOOL).sealer
    validation._checkers_by_id.clear()
    for _ in range(5):
        status = {
            "status_id": uuid.uuid4(),
            "referral_id": uuid.uuid4(),
            "version": 1,
            "from_party": SCHOOL,
            "to_party": POLICE,
            "status": "accepted",
            "reason": None,
            "at": datetime.now(UTC).replace(microsecond=0),
            "actor_role": "Synthetic role",
        }
        message = seal_status(sealer, keyed, status, party=SCHOOL)
        assert message.topic == topic_name(keyed, "status", SCHOOL)
    assert len(validation._checkers_by_id) == 1


def test_a_file_sent_twice_is_sent_once(keyed: Settings, kafka_bootstrap: str) -> None:
    env = cli_env(keyed, kafka_bootstrap)
    first = run(env, "send", "--as", POLICE, "--file", str(example_file("police")), "--json")
    assert first.returncode == 0, first.stderr
    sent = json.loads(first.stdout)
    assert len(sent["delivered"]) == 2 and sent["queued"] == [] and sent["already_sent"] == []
    again = run(env, "send", "--as", POLICE, "--file", str(example_file("police")), "--json")
    assert again.returncode == 0, again.stderr
    resent = json.loads(again.stdout)
    assert resent["delivered"] == [] and sorted(resent["already_sent"]) == sorted(sent["delivered"])
    assert intake_keys(keyed, kafka_bootstrap, POLICE) == Counter(sent["delivered"])
    # the file's referrals went out under one signature, each with its proof
    intake = read_intake(keyed, kafka_bootstrap, POLICE)
    assert len({dict(r.headers)["rb-signature"] for r in intake}) == 1
    assert all("rb-batch-proof" in dict(r.headers) for r in intake)
    status = run(env, "outbox", "status", "--as", POLICE, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"] == {"queued": 0, "delivered": 2}


def test_a_file_sent_again_is_not_sealed_again(
    keyed: Settings, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox already holds every row: the second send reports them already sent and
    seals none of them (sealing is the costly part of a send)."""
    sealed: list[str] = []
    seal = HubSealer.referral
    monkeypatch.setattr(HubSealer, "referral", lambda self, record, **kw: sealed.append(str(record["referral_id"])) or seal(self, record, **kw))
    sender = PartnerSender(keyed, kafka_bootstrap, POLICE)
    first = sender.send_file(example_file("police"))
    assert len(first.delivered) == len(sealed) == 2
    sealed.clear()
    again = sender.send_file(example_file("police"))
    assert len(again.already_sent) == 2 and not again.delivered and sealed == []


def test_a_status_is_sealed_once_and_sent_once(keyed: Settings, kafka_bootstrap: str) -> None:
    import datetime as dt
    import uuid

    status = {
        "status_id": uuid.uuid4(),
        "referral_id": uuid.uuid4(),
        "version": 1,
        "from_party": POLICE,
        "to_party": SCHOOL,
        "status": "accepted",
        "reason": None,
        "at": dt.datetime.now(dt.UTC).replace(microsecond=0),
        "actor_role": "Test practitioner",
    }
    sender = PartnerSender(keyed, kafka_bootstrap, POLICE)
    first = sender.send_status(status)
    assert sender.send_status(status) == first  # the same status id: kept once, produced once
    consumer = build_consumer(keyed, kafka_bootstrap, [topic_name(keyed, "status", POLICE)], group_id=None)
    try:
        keys = [r.key for batch in drain(consumer, idle_s=2) for r in batch]
    finally:
        consumer.close()
    assert keys == [str(status["referral_id"]).encode()]


def test_messages_in_doubt_after_a_crash_are_found_not_sent_again(
    keyed: Settings, kafka_bootstrap: str
) -> None:
    """A sender killed after Kafka acknowledged part of a batch but before the outbox recorded
    it: the next run finds those on the topic (from the recorded watermark) and sends only the
    rest. Set up exactly that state with the real outbox, sealer and broker."""
    party = POLICE
    checked = list(check_file(party, example_file("police")))
    identity = load_identity(keyed, kafka_bootstrap, party)
    sealer = HubSealer(identity.sealer, keyed, party)
    topic = sealer.intake_topic
    messages = [sealer.referral(c.record) for c in checked]
    consumer = build_consumer(keyed, kafka_bootstrap, [topic], group_id=None)
    try:
        end = consumer.end_offsets(list(consumer.assignment()))
    finally:
        consumer.close()
    with Outbox.open(keyed, party) as outbox:
        outbox.add(
            [
                Entry(m, referral_message_id(c.referral_id, c.version), REFERRAL_KIND, c.referral_id, c.version)
                for m, c in zip(messages, checked, strict=True)
            ]
        )
        outbox.set_watermark(topic, {tp.partition: offset for tp, offset in end.items()})
        outbox.mark_attempted([row.id for row in outbox.queued(limit=10)])
    producer = build_producer(keyed, kafka_bootstrap)
    try:
        messages[0].send(producer)  # acknowledged, then the sender "died"
        producer.flush()
    finally:
        producer.close()
    report = flush_outbox(keyed, kafka_bootstrap, party)
    assert report.found == 1 and report.queued == [] and report.error is None
    assert [rid for _, rid, _ in report.delivered] == [checked[1].referral_id]
    assert intake_keys(keyed, kafka_bootstrap, party) == Counter(c.referral_id for c in checked)


@pytest.mark.faults
@pytest.mark.timeout(110)
def test_cluster_unreachable_queues_everything_then_flush_delivers_once(
    keyed: Settings, kafka_bootstrap: str, synth_file: Path, tmp_path: Path
) -> None:
    config = tmp_path / "fast-fail.toml"
    config.write_text("[kafka]\nrequest_timeout_ms = 3000\n")
    down = cli_env(keyed, f"127.0.0.1:{closed_port()}", REFERRAL_BROKER_CONFIG=str(config))
    started = time.monotonic()
    queued = run(down, "send", "--as", CHARITY, "--file", str(synth_file), "--format", "canonical", "--json")
    assert queued.returncode == DeliveryPendingError.exit_code, queued.stderr
    assert f"0 delivered, {COUNT} queued" in queued.stderr and "Traceback" not in queued.stderr
    report = json.loads(queued.stdout)
    assert report["delivered"] == [] and report["rejected"] == []
    assert sorted(report["queued"]) == sorted(file_ids(synth_file))
    assert time.monotonic() - started < 60

    # The outbox: private to the user, sealed bytes only.
    path = outbox_path(keyed, CHARITY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stored = path.read_bytes()
    plain = set()  # values long enough never to match random bytes by chance
    for line in synth_file.read_text().splitlines():
        record = json.loads(line)
        plain |= {v for v in (record["child"]["given_name"], record["child"]["family_name"]) if len(v) >= 6}
        plain |= {c["detail"] for c in record["concerns"] if c.get("detail")}
    assert len(plain) > 20 and not [v for v in plain if v.encode() in stored]

    status = run(down, "outbox", "status", "--as", CHARITY, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"] == {"queued": COUNT, "delivered": 0}
    assert intake_keys(keyed, kafka_bootstrap, CHARITY) == Counter()

    up = cli_env(keyed, kafka_bootstrap)
    flushed = run(up, "outbox", "flush", "--as", CHARITY, "--json")
    assert flushed.returncode == 0, flushed.stderr
    assert sorted(json.loads(flushed.stdout)["delivered"]) == sorted(report["queued"])
    again = run(up, "outbox", "flush", "--as", CHARITY, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["delivered"] == []
    resent = run(up, "send", "--as", CHARITY, "--file", str(synth_file), "--format", "canonical", "--json")
    assert resent.returncode == 0, resent.stderr
    assert json.loads(resent.stdout)["delivered"] == [] and len(json.loads(resent.stdout)["already_sent"]) == COUNT
    on_topic = intake_keys(keyed, kafka_bootstrap, CHARITY)
    assert len(on_topic) == COUNT and set(on_topic) == set(report["queued"])
    assert max(on_topic.values()) == 1


def outbox_counts(path: Path) -> tuple[int, int]:
    """(delivered, attempted but unacknowledged) as the running sender has committed them."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        delivered = db.execute("SELECT count(*) FROM messages WHERE state = 'delivered'").fetchone()[0]
        in_doubt = db.execute("SELECT count(*) FROM messages WHERE state = 'queued' AND attempted = 1").fetchone()[0]
        return delivered, in_doubt
    except sqlite3.OperationalError:  # not created yet
        return 0, 0
    finally:
        db.close()


@pytest.mark.faults
@pytest.mark.timeout(110)
@pytest.mark.parametrize("resume", ["flush-then-send", "send"])
def test_sender_killed_mid_file_then_resumed_loses_and_duplicates_nothing(
    keyed: Settings, kafka_bootstrap: str, synth_file: Path, resume: str
) -> None:
    env = cli_env(keyed, kafka_bootstrap)
    path = outbox_path(keyed, CHARITY)
    args = ["send", "--as", CHARITY, "--file", str(synth_file), "--format", "canonical", "--json"]
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    delivered = in_doubt = 0
    try:
        # Kill while a batch is handed to the producer and not yet recorded as acknowledged
        # (the hardest moment), after at least one batch is through; at the latest at 75%.
        while time.monotonic() < deadline and proc.poll() is None:
            delivered, in_doubt = outbox_counts(path) if path.exists() else (0, 0)
            if (delivered >= 500 and in_doubt) or delivered >= COUNT * 3 // 4:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the sender finished before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    delivered, in_doubt = outbox_counts(path)
    assert 0 < delivered < COUNT, delivered
    partial = intake_keys(keyed, kafka_bootstrap, CHARITY)
    assert delivered <= len(partial) < COUNT and max(partial.values()) == 1

    # Handed to the producer, acknowledged, but never recorded: the resumed run must find these.
    acknowledged_unrecorded = len(partial) - delivered
    if resume == "flush-then-send":
        flushed = run(env, "outbox", "flush", "--as", CHARITY, "--json")
        assert flushed.returncode == 0, flushed.stderr
        assert json.loads(flushed.stdout)["found_already_delivered"] == acknowledged_unrecorded
    resent = run(env, *args)
    assert resent.returncode == 0, resent.stderr
    report = json.loads(resent.stdout)
    assert report["queued"] == [] and len(report["delivered"]) + len(report["already_sent"]) == COUNT
    if resume == "send":
        assert set(report["already_sent"]) == set(partial)

    on_topic = intake_keys(keyed, kafka_bootstrap, CHARITY)
    assert len(on_topic) == COUNT and set(on_topic) == set(file_ids(synth_file))
    duplicated = {rid: n for rid, n in on_topic.items() if n > 1}
    assert duplicated == {}


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker this test may kill: its own ports and run folder, the shared Kafka jars."""
    shared = load_settings(environ={})
    cache = tmp_path / "cache"
    cache.mkdir()
    jars = shared.paths_cache_dir / f"kafka-{shared.local_kafka_version}"
    (cache / jars.name).symlink_to(jars)
    port = closed_port()
    controller = closed_port()
    settings = load_settings(
        environ={}, local_port=port, local_controller_port=controller, paths_cache_dir=cache
    )
    broker = LocalBroker(settings)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(timeout_s=10)


@pytest.mark.faults
@pytest.mark.timeout(170)
def test_broker_killed_mid_file_then_flush_delivers_the_rest_once(
    own_broker: LocalBroker, tmp_path: Path
) -> None:
    """The cluster dies while a file is being sent: the sender reports 'N delivered, M queued'
    with its own exit code instead of a traceback; after the cluster is back, a flush delivers
    the queued ones once."""
    bootstrap = own_broker.bootstrap
    settings = load_settings(
        environ={},
        kafka_bootstrap_servers=bootstrap,
        kafka_topic_prefix="outage.",
        kafka_topic_profile="test",
        paths_data_dir=tmp_path / "data",
        kafka_request_timeout_ms=3000,
    )
    # a fresh cluster with only the sending organisation registered: few topics, so the broker
    # restarts quickly (the whole county's topics made the restart outlast the timeout here)
    sender = [org for org in load_file() if org.party == CHARITY]
    use_registry(Registry(sender))
    ensure_topics(settings, bootstrap, read_registry=False)
    publish_orgs(settings, bootstrap, sender)
    init_parties(settings, [HUB, CHARITY], bootstrap=bootstrap)  # the sender and the hub it seals for
    config = tmp_path / "fast-fail.toml"
    config.write_text("[kafka]\nrequest_timeout_ms = 3000\n")
    env = cli_env(settings, bootstrap, REFERRAL_BROKER_CONFIG=str(config))
    out = tmp_path / "referrals.jsonl"
    assert run(env, "synth", "--count", str(COUNT), "--seed", "12", "--out", str(out)).returncode == 0
    path = outbox_path(settings, CHARITY)
    args = ["send", "--as", CHARITY, "--file", str(out), "--format", "canonical", "--json"]
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and outbox_counts(path)[0] >= 500:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the sender finished before the broker could be killed"
        pid = own_broker.status().pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == DeliveryPendingError.exit_code, stderr
    assert "Traceback" not in stderr
    report = json.loads(stdout)
    delivered, queued = report["delivered"], report["queued"]
    assert len(delivered) >= 500 and queued and len(delivered) + len(queued) == COUNT
    assert f"{len(delivered)} delivered, {len(queued)} queued" in stderr

    own_broker.start()
    flushed = run(env, "outbox", "flush", "--as", CHARITY, "--json")
    assert flushed.returncode == 0, flushed.stderr
    result = json.loads(flushed.stdout)
    assert set(result["delivered"]) <= set(queued) and result["queued"] == []
    assert len(result["delivered"]) + result["found_already_delivered"] == len(queued)
    on_topic = intake_keys(settings, bootstrap, CHARITY)
    assert len(on_topic) == COUNT and set(on_topic) == set(file_ids(out))
    assert max(on_topic.values()) == 1


def test_a_background_drain_delivers_what_an_outage_left_queued(
    keyed: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    config = tmp_path / "fast-fail.toml"
    config.write_text("[kafka]\nrequest_timeout_ms = 3000\n")
    down = cli_env(keyed, f"127.0.0.1:{closed_port()}", REFERRAL_BROKER_CONFIG=str(config))
    native = example_file("schools")
    queued = run(down, "send", "--as", SCHOOL, "--file", str(native), "--json")
    assert queued.returncode == DeliveryPendingError.exit_code, queued.stderr
    ids = json.loads(queued.stdout)["queued"]
    assert ids and intake_keys(keyed, kafka_bootstrap, SCHOOL) == Counter()

    # a drain pointed at a cluster that is away backs off and keeps everything
    away = OutboxDrain(
        load_settings(config, environ={}, **_same_namespace(keyed)),
        f"127.0.0.1:{closed_port()}",
        SCHOOL,
    )
    assert away.tick() is False and away.failures == 1 and away.delivered == 0

    # the long-running form: `outbox flush --every`, against the cluster, stopped with SIGTERM
    proc = subprocess.Popen(
        [*CLI, "outbox", "flush", "--as", SCHOOL, "--every", "0.5"],
        env=cli_env(keyed, kafka_bootstrap),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(intake_keys(keyed, kafka_bootstrap, SCHOOL)) < len(ids):
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"{len(ids)} delivered while draining." in err
    on_topic = intake_keys(keyed, kafka_bootstrap, SCHOOL)
    assert set(on_topic) == set(ids) and max(on_topic.values()) == 1


def _same_namespace(settings: Settings) -> dict[str, object]:
    return {
        "kafka_topic_prefix": settings.kafka_topic_prefix,
        "kafka_topic_profile": settings.kafka_topic_profile,
        "paths_data_dir": settings.paths_data_dir,
    }
