"""Key store (private keys, permissions, rotation), key directory (public keys, JSON file,
compacted topic on the real broker) and the ``keys`` commands."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

# Parties through constants (the county's organisations: tests/county.py).
from county import CHARITY, DWP, HUB, POLICE, RESEARCH, SCHOOL
from county import HEALTH_VISITING as HEALTH

from referral_broker.cli.main import cli
from referral_broker.config import Settings
from referral_broker.errors import KeyNotFoundError, KeyStorePermissionError, RevokedKeyError, SealingError
from referral_broker.sealing import KeyDirectory, KeyStatus, KeyStore
from referral_broker.sealing.directory import KeyEntry, load_topic, publish
from referral_broker.sealing.keystore import KEY_VALIDITY_S

NOW = 1_790_000_000.0


def test_new_store_is_private(tmp_path: Path) -> None:
    store = KeyStore.create(tmp_path / "keys", HEALTH, now=NOW)
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert store.root.stat().st_mode & 0o777 == 0o700
    files = list(store.root.glob("*.json")) + list(store.root.glob("*.key"))
    assert len(files) == 2
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600
    pair = store.active(NOW)
    assert pair.key_id.startswith(f"{HEALTH}.") and pair.status is KeyStatus.ACTIVE
    assert "signing" not in repr(pair) and "encryption" not in repr(pair)


@pytest.mark.parametrize(
    ("target", "mode"),
    [("keys", 0o755), ("party", 0o750), ("ring", 0o640), ("key", 0o604)],
)
def test_loose_permissions_are_refused_at_load(tmp_path: Path, target: str, mode: int) -> None:
    keys_dir = tmp_path / "keys"
    store = KeyStore.create(keys_dir, HEALTH, now=NOW)
    path = {
        "keys": keys_dir,
        "party": store.root,
        "ring": store.root / "keyring.json",
        "key": store.root / f"{store.active(NOW).key_id}.key",
    }[target]
    path.chmod(mode)
    with pytest.raises(KeyStorePermissionError, match="accessible by group or others") as info:
        KeyStore.open(keys_dir, HEALTH)
    assert str(path) in str(info.value) and "chmod" in str(info.value)


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    store = KeyStore.create(keys_dir, HEALTH, now=NOW)
    key_file = store.root / f"{store.active(NOW).key_id}.key"
    elsewhere = tmp_path / "elsewhere.key"
    key_file.rename(elsewhere)
    key_file.symlink_to(elsewhere)
    with pytest.raises(KeyStorePermissionError, match="symbolic link"):
        KeyStore.open(keys_dir, HEALTH)


def test_second_init_is_refused(tmp_path: Path) -> None:
    KeyStore.create(tmp_path / "keys", HEALTH, now=NOW)
    with pytest.raises(Exception, match="already exists"):
        KeyStore.create(tmp_path / "keys", HEALTH, now=NOW)


def test_rotate_retire_revoke_destroy(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    store = KeyStore.create(keys_dir, SCHOOL, now=NOW)
    first = store.active(NOW)
    new, retired = store.rotate(now=NOW + 10)
    assert [p.key_id for p in retired] == [first.key_id]
    reopened = KeyStore.open(keys_dir, SCHOOL)
    assert reopened.active(NOW + 20).key_id == new.key_id
    assert reopened.get(first.key_id).status is KeyStatus.RETIRED  # still opens old messages
    with pytest.raises(SealingError, match="active key"):
        reopened.destroy(new.key_id)
    reopened.destroy(first.key_id)
    with pytest.raises(KeyNotFoundError, match=f"does not hold key {first.key_id}"):
        KeyStore.open(keys_dir, SCHOOL).get(first.key_id)
    assert not (reopened.root / f"{first.key_id}.key").exists()
    reopened.revoke(new.key_id, now=NOW + 30)
    with pytest.raises(RevokedKeyError, match=f"key {new.key_id} of {SCHOOL} is revoked"):
        KeyStore.open(keys_dir, SCHOOL).active(NOW + 40)
    # a revoked key of one's own still opens what was already sealed to it
    assert KeyStore.open(keys_dir, SCHOOL).get(new.key_id).status is KeyStatus.REVOKED


def _entry(store: KeyStore) -> KeyEntry:
    return store.public_entries()[-1]


def test_directory_file_round_trip_and_public_keys_only(tmp_path: Path) -> None:
    """The file holds root-signed records; loading verifies them against the anchor, and a
    private field is refused even under a valid root signature."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from referral_broker.sealing.trust import RootKey

    root = RootKey(Ed25519PrivateKey.generate())
    stores = [KeyStore.create(tmp_path / "keys", p, now=NOW) for p in (HEALTH, POLICE)]
    directory = KeyDirectory()
    for s in stores:
        assert directory.accept(root.sign(_entry(s).to_json(), signed_at=NOW), root.anchor, where="t") is not None
    path = tmp_path / "directory.json"
    directory.save_file(path)
    again = KeyDirectory.load_file(path, root.anchor)
    assert [e.to_json() for e in again.entries()] == [e.to_json() for e in directory.entries()]
    assert again.refused == []
    # an in-memory entry with no root signature cannot be saved
    with pytest.raises(SealingError, match="not signed by the council's root"):
        KeyDirectory([_entry(stores[0])]).save_file(tmp_path / "unsigned.json")
    # under another anchor nothing verifies: every record refused, none fatal
    stranger = RootKey(Ed25519PrivateKey.generate()).anchor
    assert [r.category for r in KeyDirectory.load_file(path, stranger).refused] == ["signature", "signature"]
    doc = json.loads(path.read_text())
    leaky = dict(doc["records"][0]["entry"], signing_private="AAAA")
    doc["records"][0] = root.sign(leaky, signed_at=NOW)
    path.write_text(json.dumps(doc))
    loaded = KeyDirectory.load_file(path, root.anchor)
    assert len(loaded) == 1
    [refused] = loaded.refused
    assert refused.category == "malformed" and "unknown entry fields signing_private" in refused.reason


def test_key_id_must_belong_to_its_party(tmp_path: Path) -> None:
    doc = _entry(KeyStore.create(tmp_path / "keys", HEALTH, now=NOW)).to_json()
    doc["party"] = POLICE
    with pytest.raises(SealingError, match=f"is not a key of party {POLICE}"):
        KeyEntry.from_json(doc)


def test_revocation_is_final_and_named(tmp_path: Path) -> None:
    store = KeyStore.create(tmp_path / "keys", POLICE, now=NOW)
    active = _entry(store)
    directory = KeyDirectory([active])
    revoked = store.revoke(active.key_id, now=NOW + 5).public_entry()
    directory.merge(revoked)
    directory.merge(active)  # a stale "active" copy read later cannot un-revoke
    assert directory.get(active.key_id).status is KeyStatus.REVOKED
    with pytest.raises(RevokedKeyError, match=f"key {active.key_id} of {POLICE} is revoked"):
        directory.encryption_key_for(POLICE, NOW + 10)
    with pytest.raises(RevokedKeyError, match=f"revoked key {active.key_id}"):
        directory.signer(active.key_id, POLICE, NOW + 1, NOW + 10)


def test_a_used_directory_pickles_and_finds_keys_by_party(tmp_path: Path) -> None:
    """A file-pool worker is sent the sender's directory (pickled) after the sender verified
    with it, so an entry holds no key object; lookups by party follow every merge."""
    stores = {p: KeyStore.create(tmp_path / "keys", p, now=NOW) for p in (POLICE, HEALTH)}
    directory = KeyDirectory(_entry(s) for s in stores.values())
    police = _entry(stores[POLICE])
    directory.signer(police.key_id, POLICE, NOW + 1, NOW + 10)  # its public key object built
    copied = pickle.loads(pickle.dumps(directory))
    assert [e.to_json() for e in copied.entries()] == [e.to_json() for e in directory.entries()]
    assert copied.encryption_key_for(POLICE, NOW + 10).key_id == police.key_id
    assert [e.party for e in copied.entries(HEALTH)] == [HEALTH]
    copied.merge(stores[POLICE].revoke(police.key_id, now=NOW + 5).public_entry())
    assert [e.status for e in copied.entries(POLICE)] == [KeyStatus.REVOKED]
    with pytest.raises(RevokedKeyError):
        copied.encryption_key_for(POLICE, NOW + 10)
    assert directory.get(police.key_id).status is KeyStatus.ACTIVE  # the original is its own


def test_validity_window(tmp_path: Path) -> None:
    entry = _entry(KeyStore.create(tmp_path / "keys", DWP, now=NOW))
    directory = KeyDirectory([entry])
    assert directory.encryption_key_for(DWP, NOW + 1).key_id == entry.key_id
    with pytest.raises(KeyNotFoundError, match="no key valid at"):
        directory.encryption_key_for(DWP, NOW + KEY_VALIDITY_S + 1)
    with pytest.raises(KeyNotFoundError, match="no active key"):
        directory.encryption_key_for(CHARITY, NOW)


def test_directory_on_the_compacted_topic(topics: Settings, kafka_bootstrap: str, tmp_path: Path) -> None:
    stores = {p: KeyStore.create(topics.keys_dir, p, now=NOW) for p in (HUB, HEALTH)}
    publish(topics, kafka_bootstrap, [e for s in stores.values() for e in s.public_entries()])
    health_old = stores[HEALTH].active(NOW).key_id
    new, retired = stores[HEALTH].rotate(now=NOW + 60)
    publish(topics, kafka_bootstrap, [new.public_entry(), *(p.public_entry() for p in retired)])
    directory = load_topic(topics, kafka_bootstrap)
    assert len(directory) == 3
    assert directory.get(health_old).status is KeyStatus.RETIRED
    assert directory.encryption_key_for(HEALTH, NOW + 120).key_id == new.key_id
    # nothing private went to Kafka
    from test_sealing_support import read_all

    from referral_broker.cluster.topics import topic_name

    raw = b"".join(r.value or b"" for r in read_all(topics, kafka_bootstrap, [topic_name(topics, "keys")]))
    party_keys = [f for f in topics.keys_dir.rglob("*.key") if f.parent.name != "_root"]
    assert len(party_keys) == 3
    for key_file in party_keys:
        material = json.loads(key_file.read_text())
        assert material["signing_private"].encode() not in raw
        assert material["encryption_private"].encode() not in raw
    # nor the root's private key, which signed every record
    from referral_broker.sealing.trust import open_root, verify_record

    root = open_root(topics)
    body = b"".join(root.private_pem().splitlines()[1:-1])
    assert body not in raw and body[:40] not in raw
    records = read_all(topics, kafka_bootstrap, [topic_name(topics, "keys")])
    assert all(verify_record(root.anchor, json.loads(r.value))["key_id"] == r.key.decode() for r in records)


def _env(settings: Settings, bootstrap: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": settings.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir),
    }


def test_keys_commands(topics: Settings, kafka_bootstrap: str, tmp_path: Path) -> None:
    runner = CliRunner()
    env = _env(topics, kafka_bootstrap)

    def run(*args: str) -> object:
        result = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    created = run("keys", "init", "--party", HEALTH, "--party", HUB, "--json")
    assert {e["party"] for e in created} == {HEALTH, HUB}
    health_key = next(e["key_id"] for e in created if e["party"] == HEALTH)
    rotated = run("keys", "rotate", "--party", HEALTH, "--json")
    assert [e["status"] for e in rotated] == ["active", "retired"]
    revoked = run("keys", "revoke", "--key-id", health_key, "--json")
    assert revoked["status"] == "revoked"
    listed = run("keys", "list", "--party", HEALTH, "--write-file", str(tmp_path / "dir.json"), "--json")
    assert {(e["key_id"], e["status"], e["held_here"]) for e in listed} == {
        (health_key, "revoked", True),
        (rotated[0]["key_id"], "active", True),
    }
    from_file = run("keys", "list", "--from-file", str(tmp_path / "dir.json"), "--json")
    assert len(from_file) == 3
    again = run("keys", "init", "--all", "--json")  # idempotent for existing stores
    assert {e["party"] for e in again} >= {HEALTH, HUB, RESEARCH}
    human = runner.invoke(cli, ["keys", "list"], env=env, catch_exceptions=False)
    assert "private key here" in human.output and health_key in human.output


def test_keys_error_is_one_line(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = {
        **os.environ,
        "REFERRAL_BROKER_DATA_DIR": str(tmp_path),
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", "keys", "rotate", "--party", HEALTH],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == KeyNotFoundError.exit_code == 51, proc.stderr
    assert proc.stderr.strip().startswith(f"Error: no key store for {HEALTH}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_revoking_a_key_held_elsewhere_uses_its_published_entry(settings: Settings) -> None:
    """A partner's lost laptop: the hub revokes the key from the directory entry alone."""
    from referral_broker.sealing import key_admin

    elsewhere = KeyStore.create(settings.paths_data_dir / "partner-machine", CHARITY, now=NOW)
    entry = _entry(elsewhere)
    revoked = key_admin.revoke(
        settings, entry.key_id, bootstrap=None, directory=KeyDirectory([entry]), now=NOW + 5
    )
    assert revoked.status is KeyStatus.REVOKED and revoked.revoked_at == NOW + 5
    assert KeyDirectory.load_local(settings).get(entry.key_id).status is KeyStatus.REVOKED
    KeyStore.create(settings.keys_dir, HUB, now=NOW)  # the folder the file created is private
    assert KeyStore.open(settings.keys_dir, HUB).party == HUB
