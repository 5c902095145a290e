"""Key administration: what ``referral-broker keys ...`` does, as functions a partner system or
the demo can call from Python.

Each change is made in the party's local key store first, then the public entry is **signed by
the council's root key** (:mod:`.trust`), recorded in the JSON directory file
(``<keys_dir>/directory.json``) and published on the ``keys`` topic (public halves only), so a
crash in between leaves a key that is usable here and simply not yet known to others, never a
published key without its private half.

In production a party makes its key pair on its own machine (``keys generate --as PARTY
--public-out FILE``: the private half stays in its key store) and hands FILE to the hub, which
checks the proof of possession and signs and publishes the entry (``keys certify PARTY --public
FILE``). Locally (tests, the demo) every party lives on one machine: :func:`init_parties` makes
the root when there is none and certifies each party's entry itself.

This module must never return, print or publish a private key; everything it hands back is a
:class:`~referral_broker.sealing.directory.KeyEntry` (public halves) or plain metadata.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from referral_broker.config import Settings
from referral_broker.errors import ConfigError, KeyNotFoundError, SealingError
from referral_broker.parties import all_parties, get_party
from referral_broker.sealing import directory as key_directory
from referral_broker.sealing import trust
from referral_broker.sealing.directory import KeyDirectory, KeyEntry, KeyStatus, party_of
from referral_broker.sealing.keystore import KEY_VALIDITY_S, KeyStore
from referral_broker.structured_log import get_logger

log = get_logger(__name__)


def _publish(
    settings: Settings, bootstrap: str | None, entries: list[KeyEntry], *, now: float | None = None
) -> None:
    """Sign with the root, record in the local directory file, then publish on the keys topic
    when a cluster is given. On a machine that pins the council's anchor without holding its
    root (a partner's), nothing is signed: without a cluster the entries are only handed back
    (to go to the hub), with one it is an error (only the hub can certify)."""
    if not entries:
        return
    try:
        root = trust.ensure_root(settings)
    except ConfigError:
        if bootstrap is None and not trust.holds_root(settings):
            return
        raise
    records = key_directory.sign_entries(root, entries, now=now)
    key_directory.record_in_file(key_directory.directory_file(settings), records, root.anchor)
    if bootstrap is not None:
        key_directory.publish_signed(settings, bootstrap, records)


def _require_signer(settings: Settings, bootstrap: str | None) -> None:
    """Before changing any key store: publishing needs the root, which a partner's machine
    (one that pins the council's anchor) does not hold."""
    if bootstrap is not None and not trust.holds_root(settings) and trust.load_anchor(settings) is not None:
        raise ConfigError(
            "only the council publishes keys: this machine pins the council's trust anchor but holds "
            "no root key; make the key with 'keys generate' and hand the file to the council"
        )


def entry_view(entry: KeyEntry, *, held_here: bool | None = None) -> dict[str, Any]:
    """An entry as JSON-ready data for output (public keys included: they are public)."""
    view = entry.to_json()
    if held_here is not None:
        view["held_here"] = held_here
    return view


def init_parties(
    settings: Settings,
    parties: Iterable[str],
    *,
    bootstrap: str | None,
    now: float | None = None,
    skip_existing: bool = False,
) -> list[KeyEntry]:
    """Create a key store with a first key for each party; publish when ``bootstrap`` is given.

    With ``skip_existing`` a party that already has a store is left alone (its current public
    entries are still published), which makes ``keys init --all`` safe to re-run."""
    now = time.time() if now is None else now
    _require_signer(settings, bootstrap)
    created: list[KeyEntry] = []
    for party in parties:
        if skip_existing and KeyStore.exists(settings.keys_dir, party):
            created.extend(KeyStore.open(settings.keys_dir, party).public_entries())
            continue
        store = KeyStore.create(settings.keys_dir, party, now=now)
        created.extend(store.public_entries())
        log.info("key store created", party=party, key_id=store.active(now).key_id)
    _publish(settings, bootstrap, created)
    return created


def all_party_names() -> list[str]:
    return sorted(all_parties())


def rotate(
    settings: Settings, party: str, *, bootstrap: str | None, now: float | None = None
) -> list[KeyEntry]:
    """A new active key for ``party``; the previous active key is retired (still opens)."""
    _require_signer(settings, bootstrap)
    store = KeyStore.open(settings.keys_dir, party)
    new, retired = store.rotate(now=now)
    entries = [new.public_entry(), *(p.public_entry() for p in retired)]
    _publish(settings, bootstrap, entries)
    log.info("key rotated", party=party, key_id=new.key_id, count=len(retired))
    return entries


def revoke(
    settings: Settings,
    key_id: str,
    *,
    bootstrap: str | None,
    directory: KeyDirectory | None = None,
    now: float | None = None,
) -> KeyEntry:
    """Revoke ``key_id``: in the local store when this machine holds it, and in the directory.

    A key held elsewhere (a partner's lost laptop) is revoked from its published entry alone,
    which is what senders and verifiers read."""
    now = time.time() if now is None else now
    _require_signer(settings, bootstrap)
    party = party_of(key_id)
    entry: KeyEntry | None = None
    if KeyStore.exists(settings.keys_dir, party):
        store = KeyStore.open(settings.keys_dir, party)
        try:
            entry = store.revoke(key_id, now=now).public_entry()
        except KeyNotFoundError:
            entry = None
    if entry is None:
        if directory is None:
            if bootstrap is None:
                raise KeyNotFoundError(f"key {key_id} is not held here and no key directory was given")
            directory = key_directory.load_topic(settings, bootstrap)
        found = directory.get(key_id)
        entry = replace(found, status=KeyStatus.REVOKED, revoked_at=found.revoked_at or float(int(now)))
    _publish(settings, bootstrap, [entry])
    log.warning("key revoked", party=party, key_id=key_id)
    return entry


def generate(
    settings: Settings, party: str, *, rotate: bool = False, now: float | None = None
) -> tuple[KeyEntry, dict[str, Any]]:
    """A party's new key pair, made here: the private half stays in this machine's key store;
    returns its public entry and the key request to hand to the hub (:func:`certify`)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if KeyStore.exists(settings.keys_dir, party):
        if not rotate:
            raise ConfigError(
                f"a key store for {party} already exists; 'keys generate --rotate' makes its next key"
            )
        pair, _retired = KeyStore.open(settings.keys_dir, party).rotate(now=now)
    else:
        pair = KeyStore.create(settings.keys_dir, party, now=now).active(now)
    signing: Ed25519PrivateKey = pair.signing
    entry = pair.public_entry()
    log.info("key pair generated", party=party, key_id=entry.key_id)
    return entry, trust.key_request(entry.to_json(), signing)


def certify(
    settings: Settings,
    party: str,
    request: Any,
    *,
    bootstrap: str | None,
    directory: KeyDirectory | None = None,
    now: float | None = None,
) -> list[KeyEntry]:
    """The hub's side of :func:`generate`: check the request (the party named, a well-formed
    entry, proof that the requester holds the key, no key-id collision), then sign the entry
    with the root and publish it; the party's previously active keys become retired.
    Returns the entries published."""
    now = time.time() if now is None else now
    get_party(party)
    trust.open_root(settings)  # only the holder of the council's root key certifies
    entry = KeyEntry.from_json(trust.check_request(request))
    if entry.party != party:
        raise SealingError(f"the key request is for {entry.party}, not {party}")
    start = float(int(now))
    entry = replace(
        entry,
        status=KeyStatus.ACTIVE,
        revoked_at=None,
        not_before=min(max(entry.not_before, start - 86400), start),
        not_after=min(entry.not_after, start + KEY_VALIDITY_S),
    )
    if entry.not_after <= entry.not_before:
        raise SealingError(f"key {entry.key_id} has no validity left")
    if directory is None:
        directory = (
            load(settings, bootstrap=bootstrap, from_file=None) if bootstrap else _local_or_empty(settings)
        )
    if entry.key_id in directory:
        known = directory.get(entry.key_id)
        if (known.signing_public, known.encryption_public) != (entry.signing_public, entry.encryption_public):
            raise SealingError(
                f"key id {entry.key_id} already exists with other public keys; generate a new key"
            )
        if known.status is not KeyStatus.ACTIVE:
            raise SealingError(f"key {entry.key_id} is {known.status.value}; it cannot be certified again")
    retired = [
        replace(e, status=KeyStatus.RETIRED)
        for e in directory.entries(party)
        if e.status is KeyStatus.ACTIVE and e.key_id != entry.key_id
    ]
    published = [entry, *retired]
    _publish(settings, bootstrap, published, now=now)
    log.info("key certified", party=party, key_id=entry.key_id, count=len(retired))
    return published


def _local_or_empty(settings: Settings) -> KeyDirectory:
    path = key_directory.directory_file(settings)
    return KeyDirectory.load_local(settings) if path.exists() else KeyDirectory()


def listing(settings: Settings, directory: KeyDirectory, party: str | None = None) -> list[dict[str, Any]]:
    """Directory entries with whether this machine holds each private key, then every record
    that was refused while reading it (status ``refused``, with the reason)."""
    held: dict[str, set[str]] = {}
    rows = []
    for entry in directory.entries(party):
        if entry.party not in held:
            held[entry.party] = (
                {p.key_id for p in KeyStore.open(settings.keys_dir, entry.party).pairs()}
                if KeyStore.exists(settings.keys_dir, entry.party)
                else set()
            )
        rows.append(entry_view(entry, held_here=entry.key_id in held[entry.party]))
    rows += [r.to_json() for r in directory.refused if party is None or r.party == party]
    return rows


def load(settings: Settings, *, bootstrap: str | None, from_file: Path | None) -> KeyDirectory:
    """The directory from a JSON file, or else from the ``keys`` topic."""
    if from_file is not None:
        return KeyDirectory.load_file(from_file, trust.load_anchor(settings))
    assert bootstrap is not None
    return key_directory.load_topic(settings, bootstrap)
