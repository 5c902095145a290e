"""Trust II, the key directory proves itself (issue 15, attacks 1-3), on the real broker.

The attacker can write the ``keys`` topic (the ACLs of Trust I are not in these tests: the
directory must hold on its own). Attack records are written with a plain kafka-python
producer, as an attacker would, never through the project's own publishing code.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from county import FORMAT, HUB, POLICE, SCHOOL, in_county
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from kafka import KafkaProducer

from referral_broker.cli.main import cli
from referral_broker.cluster.clients import build_consumer, drain
from referral_broker.cluster.topics import ensure_topics, topic_name
from referral_broker.config import Settings
from referral_broker.errors import (
    ConfigError,
    KeyNotFoundError,
    RevokedKeyError,
    SealingError,
    SignatureError,
)
from referral_broker.identity import load_directory, load_identity
from referral_broker.parties import all_parties
from referral_broker.sealing import KeyDirectory, KeyStatus, KeyStore, key_admin, trust
from referral_broker.sealing.directory import REVOKED_PREFIX, SEEN_REVOCATIONS, load_topic
from referral_broker.sealing.envelope import H_RECIPIENT_KEY
from referral_broker.sealing.keystore import KEY_VALIDITY_S
from referral_broker.sealing.timefmt import to_iso

HOUR = 3600.0


# -- the attacker's tools ----------------------------------------------------------------------
def attacker_writes(
    settings: Settings, bootstrap: str, topic: str, records: list[tuple[str, bytes | None]]
) -> None:
    """Produce raw records (None: a tombstone) with a plain kafka-python producer, no project
    code in the path. The attacker can connect (whatever credentials the cluster wants): the
    directory must hold when the perimeter does not."""
    from referral_broker.cluster.security import client_security

    producer = KafkaProducer(
        bootstrap_servers=bootstrap, **client_security(settings, bootstrap).kafka_kwargs()
    )
    try:
        for key, value in records:
            producer.send(topic, key=key.encode("ascii"), value=value)
        producer.flush()
    finally:
        producer.close()


def raw_public(private: Any) -> str:
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def forged_entry(party: str, *, not_before: float, key_id: str | None = None) -> dict[str, Any]:
    """An entry for ``party`` whose private keys the attacker holds."""
    return {
        "key_id": key_id or f"{party}.{os.urandom(6).hex()}",
        "party": party,
        "status": "active",
        "signing_public": raw_public(Ed25519PrivateKey.generate()),
        "encryption_public": raw_public(X25519PrivateKey.generate()),
        "not_before": to_iso(not_before),
        "not_after": to_iso(not_before + KEY_VALIDITY_S),
    }


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode("utf-8")


def raw_records(settings: Settings, bootstrap: str, topic: str) -> list[Any]:
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    try:
        return [r for batch in drain(consumer, idle_s=2) for r in batch]
    finally:
        consumer.close()


def referrals(count: int, seed: int) -> list[dict[str, Any]]:
    from referral_broker.schemas.synth import synthetic_referrals

    out = []
    for record in synthetic_referrals(count, seed=seed):
        record = copy.deepcopy(record)
        record["referrer"]["partner"] = FORMAT[SCHOOL]
        out.append(in_county(record))
    return out


def cli_env(settings: Settings, bootstrap: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": settings.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir),
    }


@pytest.fixture
def county(topics: Settings, kafka_bootstrap: str) -> Settings:
    """Every party's keys, made an hour ago, certified by the root (made here) and published."""
    key_admin.init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap, now=time.time() - HOUR)
    return topics


def active_key(settings: Settings, party: str) -> str:
    return KeyStore.open(settings.keys_dir, party).active().key_id


# -- attack 1: forged entries for the hub and the police --------------------------------------
def test_forged_hub_and_police_entries_are_refused(county: Settings, kafka_bootstrap: str) -> None:
    real_hub, real_police = active_key(county, HUB), active_key(county, POLICE)
    keys_topic = topic_name(county, "keys")
    newer = time.time() - 60  # newer than the real keys: the old directory took the newest
    hub_forgery = forged_entry(HUB, not_before=newer)
    police_forgery = forged_entry(POLICE, not_before=newer)
    police_forgery_2 = forged_entry(POLICE, not_before=newer)
    attackers_root = trust.RootKey(Ed25519PrivateKey.generate())
    own_root = attackers_root.sign(police_forgery, signed_at=time.time())
    # a record claiming the pinned root's fingerprint, signed by the attacker
    claims_pinned = dict(
        attackers_root.sign(police_forgery_2, signed_at=time.time()),
        root=trust.load_anchor(county).fingerprint,  # type: ignore[union-attr]
    )
    before = dict(trust.REFUSED)
    attacker_writes(
        county,
        kafka_bootstrap,
        keys_topic,
        [
            (hub_forgery["key_id"], dumps(hub_forgery)),  # the unsigned format of before
            (police_forgery["key_id"], dumps(own_root)),
            (police_forgery_2["key_id"], dumps(claims_pinned)),
            ("council.000000000000", b"{not json"),
        ],
    )

    directory = load_directory(county, kafka_bootstrap)
    assert directory.encryption_key_for(HUB).key_id == real_hub
    assert directory.encryption_key_for(POLICE).key_id == real_police
    for forged in (hub_forgery, police_forgery, police_forgery_2):
        assert forged["key_id"] not in directory
    why = {r.key_id: r for r in directory.refused}
    assert why[hub_forgery["key_id"]].category == "unsigned"
    assert "not signed by the council's root" in why[hub_forgery["key_id"]].reason
    assert why[police_forgery["key_id"]].category == "signature"
    assert "signed by another root" in why[police_forgery["key_id"]].reason
    assert why[police_forgery_2["key_id"]].category == "signature"
    assert "does not verify" in why[police_forgery_2["key_id"]].reason
    assert why["council.000000000000"].category == "malformed"
    assert all(r.where.startswith(f"{keys_topic}/") for r in directory.refused)
    # the counter (the router's /metrics) counted them
    assert trust.REFUSED["unsigned"] >= before.get("unsigned", 0) + 1
    assert trust.REFUSED["signature"] >= before.get("signature", 0) + 2
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(trust.RefusalCollector())
    exposed = generate_latest(registry).decode()
    assert (
        f'referral_key_directory_refused_records_total{{reason="signature"}} {float(trust.REFUSED["signature"])}'
        in exposed
    )

    # A partner seals its intake to the real hub key, not the forged one.
    from referral_broker.producers.intake import IntakeSender

    with IntakeSender(county, kafka_bootstrap, SCHOOL) as sender:
        sent = sender.send_referrals(referrals(1, seed=41))
    assert len(sent) == 1
    [intake] = raw_records(county, kafka_bootstrap, topic_name(county, "intake", SCHOOL))
    assert dict(intake.headers)[H_RECIPIENT_KEY].decode() == real_hub
    # The hub seals to the real police key, and refuses a signature by the forged one.
    hub = load_identity(county, kafka_bootstrap, HUB)
    assert hub.directory.encryption_key_for(POLICE).key_id == real_police
    with pytest.raises(KeyNotFoundError, match="not in the key directory"):
        hub.directory.signer(police_forgery["key_id"], POLICE, time.time())

    # keys list shows each forged record as refused, with the reason (JSON and table).
    runner = CliRunner()
    env = cli_env(county, kafka_bootstrap)
    listed = runner.invoke(cli, ["keys", "list", "--json"], env=env, catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    refused = {r["key_id"]: r for r in rows if r["status"] == "refused"}
    assert refused[hub_forgery["key_id"]]["refused"] == "unsigned"
    assert refused[hub_forgery["key_id"]]["party"] == HUB
    assert "not signed by the council's root" in refused[hub_forgery["key_id"]]["reason"]
    assert refused[police_forgery["key_id"]]["refused"] == "signature"
    active = {r["key_id"] for r in rows if r["status"] == "active"}
    assert {real_hub, real_police} <= active and not active & set(refused)
    human = runner.invoke(cli, ["keys", "list", "--party", POLICE], env=env, catch_exceptions=False)
    assert human.exit_code == 0, human.output
    assert "Refused records (2)" in human.stdout
    assert police_forgery["key_id"] in human.stdout and "signed by another root" in human.stdout
    assert hub_forgery["key_id"] not in human.stdout  # --party filters refusals too


# -- attack 2: revoke, then tombstone and replay the old "active" record ----------------------
def test_revocation_is_final_after_tombstone_and_replay(county: Settings, kafka_bootstrap: str) -> None:
    police_key = active_key(county, POLICE)
    keys_topic = topic_name(county, "keys")
    [old_active] = [
        r for r in raw_records(county, kafka_bootstrap, keys_topic) if r.key == police_key.encode()
    ]
    key_admin.revoke(county, police_key, bootstrap=kafka_bootstrap)
    published = {r.key.decode() for r in raw_records(county, kafka_bootstrap, keys_topic)}
    assert REVOKED_PREFIX + police_key in published  # the revocation under its own message key

    first = load_topic(county, kafka_bootstrap)  # a reader sees the revocation ...
    assert first.get(police_key).status is KeyStatus.REVOKED
    memory = county.keys_dir / SEEN_REVOCATIONS
    assert stat.S_IMODE(memory.stat().st_mode) == 0o600  # ... and remembers it
    assert police_key in memory.read_text()

    # The attacker deletes both records of the revocation and replays the genuine old
    # "active" record, signed by the root back then.
    attacker_writes(
        county,
        kafka_bootstrap,
        keys_topic,
        [(police_key, None), (REVOKED_PREFIX + police_key, None), (police_key, old_active.value)],
    )
    directory = load_directory(county, kafka_bootstrap)
    assert directory.get(police_key).status is KeyStatus.REVOKED
    with pytest.raises(RevokedKeyError, match=f"key {police_key} of {POLICE} is revoked"):
        directory.encryption_key_for(POLICE)
    with pytest.raises(RevokedKeyError, match=f"revoked key {police_key}"):
        directory.signer(police_key, POLICE, time.time() - 60)
    mine = [r for r in directory.refused if r.key_id == police_key]
    assert sorted(r.category for r in mine) == ["replay", "tombstone", "tombstone"]
    [replay] = [r for r in mine if r.category == "replay"]
    assert "revocation is final" in replay.reason
    # the hub will not seal to the police any more
    hub = load_identity(county, kafka_bootstrap, HUB)
    with pytest.raises(RevokedKeyError):
        hub.directory.encryption_key_for(POLICE)

    # After compaction only the replayed "active" record is left under the key id, and the
    # tombstoned revocation is gone: the reader's memory keeps the key revoked.
    compacted = county.replace(kafka_topic_prefix=county.kafka_topic_prefix + "compacted.")
    ensure_topics(compacted, kafka_bootstrap, read_registry=False)
    latest: dict[str, bytes | None] = {}
    for record in raw_records(county, kafka_bootstrap, keys_topic):
        latest[record.key.decode()] = record.value
    survivors = [(k, v) for k, v in latest.items() if v is not None]
    assert (police_key, old_active.value) in survivors
    assert not any(k == REVOKED_PREFIX + police_key for k, _ in survivors)
    attacker_writes(county, kafka_bootstrap, topic_name(compacted, "keys"), survivors)
    after = load_topic(compacted, kafka_bootstrap)
    assert after.get(police_key).status is KeyStatus.REVOKED
    assert [r.category for r in after.refused if r.key_id == police_key] == ["replay"]


# -- attack 3: a colliding key id ----------------------------------------------------------------
def test_colliding_key_id_is_ignored_and_sends_and_routes_still_work(
    county: Settings, kafka_bootstrap: str
) -> None:
    from referral_broker.consumers.receiving import Received, receive
    from referral_broker.consumers.router import Router
    from referral_broker.producers.intake import IntakeSender

    real_hub, real_school = active_key(county, HUB), active_key(county, SCHOOL)
    keys_topic = topic_name(county, "keys")
    genuine = {r.key.decode(): json.loads(r.value) for r in raw_records(county, kafka_bootstrap, keys_topic)}
    # 1. the hub's key id with the attacker's public keys, unsigned
    unsigned = forged_entry(HUB, not_before=time.time() - 60, key_id=real_hub)
    # 2. the school's genuine signed record with its encryption key swapped
    swapped = copy.deepcopy(genuine[real_school])
    swapped["entry"]["encryption_public"] = raw_public(X25519PrivateKey.generate())
    # 3. a colliding entry the root itself signed (a mistake, or a stolen root): still refused,
    #    the first entry for a key id stays
    collision = trust.open_root(county).sign(
        forged_entry(SCHOOL, not_before=time.time() - 60, key_id=real_school), signed_at=time.time()
    )
    attacker_writes(
        county,
        kafka_bootstrap,
        keys_topic,
        [(real_hub, dumps(unsigned)), (real_school, dumps(swapped)), (real_school, dumps(collision))],
    )
    directory = load_directory(county, kafka_bootstrap)
    assert directory.get(real_hub).encryption_public == base64.b64decode(
        genuine[real_hub]["entry"]["encryption_public"]
    )
    assert directory.get(real_school).signing_public == base64.b64decode(
        genuine[real_school]["entry"]["signing_public"]
    )
    categories = sorted(r.category for r in directory.refused if r.key_id in (real_hub, real_school))
    assert categories == ["collision", "signature", "unsigned"]
    [clash] = [r for r in directory.refused if r.category == "collision"]
    assert "already exists with other public keys" in clash.reason and clash.key_id == real_school

    # Later sends and routes work: the school sends, the router routes, a team receives.
    records = referrals(3, seed=43)
    with IntakeSender(county, kafka_bootstrap, SCHOOL) as sender:
        sent = sender.send_referrals(records)
    assert len(sent) == 3
    stats = Router(county, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.routed == 3 and stats.dead_lettered == 0
    teams = {f"district-{r['district'].lower().replace('_', '-')}" for r in records}
    got = []
    for team in sorted(teams):
        got += [m for m in receive(county, kafka_bootstrap, team, stop_when_idle=2, group_id=None)]
    assert all(isinstance(m, Received) for m in got), got
    assert sorted(m.referral_id for m in got) == sorted(str(r["referral_id"]) for r in records)


# -- a party makes its own key; the hub certifies it ---------------------------------------------
def test_party_generates_and_hub_certifies(county: Settings, kafka_bootstrap: str, tmp_path: Path) -> None:
    """The private half never leaves the party's machine; the request proves possession."""
    hub_env = cli_env(county, kafka_bootstrap)
    partner = county.replace(paths_data_dir=tmp_path / "police-machine")
    partner_env = cli_env(partner, kafka_bootstrap)
    runner = CliRunner()

    def run(env: dict[str, str], *args: str) -> Any:
        result = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    # the partner pins the council's anchor (Trust I copies it into the enrolment folder)
    shown = run(hub_env, "keys", "root", "show", "--json")
    assert shown["root_key_here"] is True
    anchor_file = trust.anchor_path(partner)
    anchor_file.parent.mkdir(parents=True, mode=0o700)
    anchor_file.write_text(shown["public_key_pem"])
    assert run(partner_env, "keys", "root", "show", "--json")["fingerprint"] == shown["fingerprint"]
    refused = runner.invoke(cli, ["keys", "root", "init"], env=partner_env)
    assert isinstance(refused.exception, ConfigError) and "pins the trust anchor" in str(refused.exception)

    request_file = tmp_path / "police-key.json"
    made = run(partner_env, "keys", "generate", "--as", POLICE, "--public-out", str(request_file), "--json")
    new_key = made["key_id"]
    request = json.loads(request_file.read_text())
    assert "private" not in request_file.read_text() and request["entry"]["key_id"] == new_key
    # a request for another party's key, or one whose proof does not match, is refused
    with pytest.raises(SealingError, match=f"for {POLICE}, not {SCHOOL}"):
        key_admin.certify(county, SCHOOL, request, bootstrap=None)
    stolen = copy.deepcopy(request)
    stolen["entry"]["encryption_public"] = raw_public(X25519PrivateKey.generate())
    with pytest.raises(SignatureError, match="proof of possession"):
        key_admin.certify(county, POLICE, stolen, bootstrap=None)
    # the partner cannot certify itself
    with pytest.raises(ConfigError, match="does not hold the council's root signing key"):
        key_admin.certify(partner, POLICE, request, bootstrap=kafka_bootstrap)
    # nor publish a key of its own making; its key store is left as it was
    with pytest.raises(ConfigError, match="only the council publishes keys"):
        key_admin.rotate(partner, POLICE, bootstrap=kafka_bootstrap)
    assert active_key(partner, POLICE) == new_key

    old_police = active_key(county, POLICE)
    certified = run(hub_env, "keys", "certify", POLICE, "--public", str(request_file), "--json")
    assert [(e["key_id"], e["status"]) for e in certified] == [(new_key, "active"), (old_police, "retired")]
    directory = load_directory(county, kafka_bootstrap)
    assert directory.encryption_key_for(POLICE).key_id == new_key
    assert directory.get(old_police).status is KeyStatus.RETIRED
    # the hub never held the new private key; the partner did, and its reader trusts the entry
    assert not list(county.keys_dir.rglob(f"{new_key}.key"))
    assert (partner.keys_dir / POLICE / f"{new_key}.key").exists()
    assert load_topic(partner, kafka_bootstrap).get(new_key).status is KeyStatus.ACTIVE
    # certifying it again with other keys under the same id is a collision, refused
    again = copy.deepcopy(request)
    forged = forged_entry(POLICE, not_before=time.time() - 60, key_id=new_key)
    signer = Ed25519PrivateKey.generate()
    forged["signing_public"] = raw_public(signer)
    again = trust.key_request(forged, signer)
    with pytest.raises(SealingError, match="already exists with other public keys"):
        key_admin.certify(county, POLICE, again, bootstrap=kafka_bootstrap)


def test_root_key_commands(settings: Settings, tmp_path: Path) -> None:
    """keys root init makes the root and pins the anchor; refuses to overwrite; the export is
    the private half, 0600, and signs what the anchor verifies."""
    env = {"REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir)}
    runner = CliRunner()
    export = tmp_path / "offline" / "root.pem"
    export.parent.mkdir()
    made = runner.invoke(cli, ["keys", "root", "init", "--export", str(export), "--json"], env=env)
    assert made.exit_code == 0, made.output
    data = json.loads(made.stdout)
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    assert stat.S_IMODE(trust.root_path(settings).stat().st_mode) == 0o600
    anchor = trust.load_anchor(settings)
    assert anchor is not None and data["fingerprint"] == anchor.fingerprint
    assert "PRIVATE" not in data["public_key_pem"] and "PRIVATE" not in made.stdout
    offline = serialization.load_pem_private_key(export.read_bytes(), password=None)
    record = trust.RootKey(offline).sign({"key_id": "x"}, signed_at=time.time())  # type: ignore[arg-type]
    assert trust.verify_record(anchor, record) == {"key_id": "x"}
    again = runner.invoke(cli, ["keys", "root", "init"], env=env)
    assert isinstance(again.exception, ConfigError) and "refusing to overwrite" in str(again.exception)
    shown = runner.invoke(cli, ["keys", "root", "show"], env=env)
    assert shown.exit_code == 0 and anchor.fingerprint in shown.stdout and "PRIVATE" not in shown.stdout
    # a directory loaded with no anchor pinned trusts nothing (and says so)
    empty = KeyDirectory.from_json({"format": 2, "records": [record]}, None)
    assert len(empty) == 0 and [r.category for r in empty.refused] == ["no-anchor"]


def test_local_directory_copy_is_verified_too(settings: Settings) -> None:
    """The copy a sender seals with while the cluster is unreachable (<data>/keys/directory.json)
    holds root-signed records; an altered record in it is refused, the rest still load."""
    from referral_broker.sealing.directory import directory_file

    key_admin.init_parties(settings, [HUB, SCHOOL, POLICE], bootstrap=None)
    local = KeyDirectory.load_local(settings)
    assert len(local) == 3 and local.refused == []
    path = directory_file(settings)
    doc = json.loads(path.read_text())
    target = next(r for r in doc["records"] if r["entry"]["party"] == HUB)
    target["entry"]["encryption_public"] = raw_public(X25519PrivateKey.generate())
    path.write_text(json.dumps(doc))
    altered = KeyDirectory.load_local(settings)
    assert len(altered) == 2 and [r.category for r in altered.refused] == ["signature"]
    assert altered.refused[0].key_id == target["entry"]["key_id"]
    with pytest.raises(KeyNotFoundError):
        altered.encryption_key_for(HUB)


def test_a_refusal_never_repeats_what_a_record_says_verbatim() -> None:
    """Reasons quote only bounded, printable text: a signed-but-wrong record cannot put a
    newline or a long payload into logs and listings."""
    root = trust.RootKey(Ed25519PrivateKey.generate())
    entry = forged_entry(POLICE, not_before=time.time())
    entry["party"] = "Jane Doe\n1 High St " + "x" * 500
    entry["note\nJane"] = "?"
    directory = KeyDirectory()
    assert directory.accept(root.sign(entry, signed_at=time.time()), root.anchor, where="t") is None
    [refused] = directory.refused
    assert refused.category == "malformed" and refused.key_id == entry["key_id"]
    assert "\n" not in refused.reason and len(refused.reason) <= 200
