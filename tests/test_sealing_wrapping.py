"""Data keys wrapped to a recipient's X25519 key, and the DEK cache's bounds (uses and age,
with an injected clock), including revocation taking effect for a sender."""

from __future__ import annotations

from pathlib import Path

import pytest
from county import HEALTH_VISITING, POLICE, SCHOOL
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from test_sealing_support import HUB, SCHEMA, TEAM, FakeClock, as_record, make_world, sample_referral

from referral_broker.errors import KeyNotFoundError, RevokedKeyError, ShreddedError, TamperedError
from referral_broker.sealing import DataKey, DekCache
from referral_broker.sealing.envelope import H_DEK, H_RECIPIENT_KEY
from referral_broker.sealing.wrapping import (
    MODE_CASE_SHARE,
    CaseShare,
    new_case_data_key,
    read_wrapped_header,
    unwrap_data_key,
    wrap_data_key,
)

HEALTH = X25519PrivateKey.generate()  # the recipient's private key
RECIPIENT = HEALTH_VISITING
OTHER = SCHOOL
KEY_ID = f"{RECIPIENT}.0123456789ab"


def test_wrap_and_unwrap() -> None:
    key = DataKey.generate()
    wrapped = wrap_data_key(
        key, recipient=RECIPIENT, recipient_key_id=KEY_ID, recipient_public=HEALTH.public_key()
    )
    back = unwrap_data_key(wrapped, recipient=RECIPIENT, private_key=HEALTH)
    assert (back.key_id, back.secret) == (key.key_id, key.secret)
    assert key.secret not in wrapped


def test_only_the_named_recipient_with_its_key_unwraps() -> None:
    wrapped = wrap_data_key(
        DataKey.generate(), recipient=RECIPIENT, recipient_key_id=KEY_ID, recipient_public=HEALTH.public_key()
    )
    with pytest.raises(TamperedError, match=f"wrapped data key for key {KEY_ID}: authentication failed"):
        unwrap_data_key(wrapped, recipient=RECIPIENT, private_key=X25519PrivateKey.generate())
    with pytest.raises(TamperedError, match="authentication failed"):
        unwrap_data_key(wrapped, recipient=OTHER, private_key=HEALTH)


def test_every_byte_of_a_wrapped_key_is_protected() -> None:
    wrapped = wrap_data_key(
        DataKey.generate(), recipient=RECIPIENT, recipient_key_id=KEY_ID, recipient_public=HEALTH.public_key()
    )
    for i in range(len(wrapped)):
        damaged = bytearray(wrapped)
        damaged[i] ^= 0x01
        with pytest.raises(TamperedError):
            unwrap_data_key(bytes(damaged), recipient=RECIPIENT, private_key=HEALTH)
    for n in range(len(wrapped)):
        with pytest.raises(TamperedError):
            unwrap_data_key(wrapped[:n], recipient=RECIPIENT, private_key=HEALTH)
    with pytest.raises(TamperedError, match="truncated wrapped data key"):
        unwrap_data_key(wrapped[:-1], recipient=RECIPIENT, private_key=HEALTH)
    with pytest.raises(TamperedError, match="unknown wrapped-key format version 2"):
        unwrap_data_key(b"\x02" + wrapped[1:], recipient=RECIPIENT, private_key=HEALTH)


def test_case_mode_needs_the_case_key() -> None:
    case_key = bytes(range(32))
    share = CaseShare.new(
        recipient=TEAM, recipient_key_id="district-fenland.0123456789ab", recipient_public=HEALTH.public_key()
    )
    key, wrapped = new_case_data_key(share, case_id="CASE-1", case_key_id="aa11bb22cc33", case_key=case_key)
    header, _, _ = read_wrapped_header(wrapped)
    assert (header.mode, header.case_id, header.case_key_id) == (MODE_CASE_SHARE, "CASE-1", "aa11bb22cc33")
    assert header.share_id == share.share_id
    assert case_key not in wrapped and key.secret not in wrapped and share.secret not in wrapped
    lookup = {("CASE-1", "aa11bb22cc33"): case_key}
    back = unwrap_data_key(
        wrapped, recipient=TEAM, private_key=HEALTH, case_keys=lambda c, k: lookup[(c, k)]
    )
    assert back.secret == key.secret
    other = unwrap_data_key(
        wrapped, recipient=TEAM, private_key=HEALTH, case_keys=lambda c, k: bytes(32)
    )
    assert other.secret != key.secret  # a wrong case key gives a key that opens nothing
    with pytest.raises(ShreddedError, match="case CASE-1"):
        unwrap_data_key(wrapped, recipient=TEAM, private_key=HEALTH)


def test_one_wrapped_share_serves_many_cases_each_message_with_its_own_key() -> None:
    """Mode 3: the HPKE part (one X25519 exchange) is the share's, the same for every message;
    each message still derives its own data key from the share, its case's key and its whole
    clear header, so no change to any byte of the wrapped key (its case, its case key, its
    ids) yields that message's key, and another recipient or private key opens nothing."""
    share = CaseShare.new(recipient=TEAM, recipient_key_id=KEY_ID, recipient_public=HEALTH.public_key())
    case_keys = {("CASE-1", "aa11bb22cc33"): bytes(range(32)), ("CASE-2", "dd44ee55ff66"): bytes(range(1, 33))}
    lookup = lambda c, k: case_keys[(c, k)]
    made = [
        new_case_data_key(share, case_id=c, case_key_id=k, case_key=v)
        for (c, k), v in [*case_keys.items(), *case_keys.items()]
    ]
    assert len({w[-80:] for _, w in made}) == 1  # one HPKE wrap for all four
    assert len({key.secret for key, _ in made}) == len({key.key_id for key, _ in made}) == 4
    for key, wrapped in made:
        assert unwrap_data_key(wrapped, recipient=TEAM, private_key=HEALTH, case_keys=lookup).secret == key.secret
    key, wrapped = made[0]
    for i in range(len(wrapped)):
        damaged = bytearray(wrapped)
        damaged[i] ^= 0x01
        try:
            got = unwrap_data_key(bytes(damaged), recipient=TEAM, private_key=HEALTH, case_keys=lookup)
        except (TamperedError, KeyError):
            continue
        assert got.secret != key.secret, f"byte {i} changed and the same key came out"
    with pytest.raises(TamperedError, match="authentication failed"):
        unwrap_data_key(wrapped, recipient=OTHER, private_key=HEALTH, case_keys=lookup)
    with pytest.raises(TamperedError, match="authentication failed"):
        unwrap_data_key(wrapped, recipient=TEAM, private_key=X25519PrivateKey.generate(), case_keys=lookup)


def test_a_cached_share_is_unwrapped_once_and_a_shred_still_refuses_the_next_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import referral_broker.sealing.wrapping as wrapping

    share = CaseShare.new(recipient=TEAM, recipient_key_id=KEY_ID, recipient_public=HEALTH.public_key())
    live = {("CASE-1", "aa11bb22cc33"): bytes(range(32))}

    def lookup(case: str, key_id: str) -> bytes:
        if (case, key_id) not in live:
            raise ShreddedError(f"case {case} was shredded")
        return live[(case, key_id)]

    opens: list[int] = []
    real = wrapping._hpke_open
    monkeypatch.setattr(wrapping, "_hpke_open", lambda *a: (opens.append(1), real(*a))[1])
    shares: DekCache[bytes] = DekCache(max_uses=100, max_age_s=60)
    case_key = live[("CASE-1", "aa11bb22cc33")]
    made = [
        new_case_data_key(share, case_id="CASE-1", case_key_id="aa11bb22cc33", case_key=case_key) for _ in range(3)
    ]
    for key, wrapped in made:
        got = unwrap_data_key(wrapped, recipient=TEAM, private_key=HEALTH, case_keys=lookup, shares=shares)
        assert got.secret == key.secret
    assert len(opens) == 1
    live.clear()  # the case is shredded: its key is gone
    with pytest.raises(ShreddedError, match="case CASE-1"):
        unwrap_data_key(made[0][1], recipient=TEAM, private_key=HEALTH, case_keys=lookup, shares=shares)


# -- the cache -------------------------------------------------------------------------------
def test_cache_serves_at_most_max_uses() -> None:
    cache = DekCache(max_uses=3, max_age_s=60, clock=FakeClock())
    cache.put("slot", "dek")  # first use
    assert cache.get("slot") == "dek"
    assert cache.get("slot") == "dek"
    assert cache.get("slot") is None  # a fourth message needs a new key
    assert len(cache) == 0


def test_cache_entries_expire_at_max_age() -> None:
    clock = FakeClock()
    cache = DekCache(max_uses=1000, max_age_s=30, clock=clock)
    cache.put("slot", "dek")
    clock.advance(29.9)
    assert cache.get("slot") == "dek"
    clock.advance(0.1)
    assert cache.get("slot") is None


def test_cache_can_be_off_and_is_bounded_in_size() -> None:
    off = DekCache(max_uses=1, max_age_s=60)
    off.put("slot", "dek")
    assert off.get("slot") is None and not off.enabled
    small = DekCache(max_uses=10, max_age_s=60, max_entries=2)
    for slot in "abc":
        small.put(slot, slot)
    assert len(small) == 2 and small.get("a") is None


def test_sealer_reuses_a_wrap_within_the_bounds(tmp_path: Path) -> None:
    world = make_world(tmp_path / "keys", (HUB, RECIPIENT))
    clock = FakeClock()
    sealer = world.sealer(cache=DekCache(max_uses=3, max_age_s=60, clock=clock))

    def wrapped() -> bytes:
        msg = sealer.seal(
            sample_referral(),
            SCHEMA,
            topic="t",
            recipient=RECIPIENT,
            referral_id="ref-0001",
            referral_version=1,
        )
        return dict(msg.headers)[H_DEK]

    first = [wrapped() for _ in range(3)]
    assert first[0] == first[1] == first[2]
    fourth = wrapped()
    assert fourth != first[0]  # max uses reached: a new data key, a new wrap
    clock.advance(61)
    assert wrapped() != fourth  # max age reached
    # the receiver opens them all, whichever data key
    opener = world.opener(RECIPIENT, cache=DekCache(max_uses=3, max_age_s=60))
    msg = sealer.seal(
        sample_referral(), SCHEMA, topic="t", recipient=RECIPIENT, referral_id="ref-0001", referral_version=1
    )
    assert opener.open(as_record(msg)).record == sample_referral()


def test_revocation_takes_effect_for_the_next_message(tmp_path: Path) -> None:
    world = make_world(tmp_path / "keys", (HUB, RECIPIENT))
    sealer = world.sealer(cache=DekCache(max_uses=1000, max_age_s=300))
    seal = lambda: sealer.seal(
        sample_referral(), SCHEMA, topic="t", recipient=RECIPIENT, referral_id="ref-0001", referral_version=1
    )
    old_key = dict(seal().headers)[H_RECIPIENT_KEY].decode()
    world.stores[RECIPIENT].revoke(old_key)
    world.refresh()
    with pytest.raises(RevokedKeyError, match=f"key {old_key} of {RECIPIENT} is revoked"):
        seal()
    world.stores[RECIPIENT].rotate()
    world.refresh()
    msg = seal()
    new_key = dict(msg.headers)[H_RECIPIENT_KEY].decode()
    assert new_key != old_key
    assert all(slot[1] != old_key for slot in sealer.cache._entries)  # evicted, not aged out
    assert world.opener(RECIPIENT).open(as_record(msg)).recipient_key_id == new_key


def test_unknown_recipient_has_no_key(tmp_path: Path) -> None:
    world = make_world(tmp_path / "keys", (HUB, RECIPIENT))
    with pytest.raises(KeyNotFoundError, match=f"{POLICE} has no active key"):
        world.sealer().seal(
            sample_referral(),
            SCHEMA,
            topic="t",
            recipient=POLICE,
            referral_id="ref-0001",
            referral_version=1,
        )
