"""Key administration: what ``referral-broker keys init|list|rotate|revoke`` do, as functions a
partner system or the demo can call from Python.

Each change is made in the party's local key store first, then recorded in the JSON directory
file (``<keys_dir>/directory.json``) and published on the ``keys`` topic (public halves only), so a crash in between leaves a key that is usable here and simply
not yet known to others, never a published key without its private half.

In production a partner does not write the ``keys`` topic itself: it runs ``keys init
--no-publish`` and hands the printed public entry to the hub, which publishes it. Locally
(tests, the demo) every party lives on one machine and publishes directly.

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
from referral_broker.errors import KeyNotFoundError
from referral_broker.parties import all_parties
from referral_broker.sealing import directory as key_directory
from referral_broker.sealing.directory import KeyDirectory, KeyEntry, KeyStatus, party_of
from referral_broker.sealing.keystore import KeyStore
from referral_broker.structured_log import get_logger

log = get_logger(__name__)


def _publish(settings: Settings, bootstrap: str | None, entries: list[KeyEntry]) -> None:
    """Record in the local directory file, then on the keys topic when a cluster is given."""
    key_directory.record_in_file(key_directory.directory_file(settings), entries)
    if bootstrap is not None and entries:
        key_directory.publish(settings, bootstrap, entries)


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


def listing(settings: Settings, directory: KeyDirectory, party: str | None = None) -> list[dict[str, Any]]:
    """Directory entries with whether this machine holds each private key."""
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
    return rows


def load(settings: Settings, *, bootstrap: str | None, from_file: Path | None) -> KeyDirectory:
    """The directory from a JSON file, or else from the ``keys`` topic."""
    if from_file is not None:
        return KeyDirectory.load_file(from_file)
    assert bootstrap is not None
    return key_directory.load_topic(settings, bootstrap)
