"""Field-level sealing, message signatures and keys.

Sending (router, adapters)::

    sealer = MessageSealer(KeyStore.open(settings.keys_dir, me), directory,
                           cache=DekCache.from_settings(settings), case_keys=...)
    sealer.seal(record, view_schema, topic=..., recipient=..., referral_id=..., referral_version=...).send(producer)

Receiving (router, adapters, inbox)::

    opener = MessageOpener(KeyStore.open(settings.keys_dir, me), directory, schema_book(...))
    opened = opener.open(record)          # verified and opened, or an exception; never partial

Modules: :mod:`.fields` (the recipe for one value), :mod:`.wrapping` (data keys to X25519
keys, the bounded DEK cache), :mod:`.signing`, :mod:`.records` (which fields are sealed, the
wire schema), :mod:`.envelope` (the signed Kafka message), :mod:`.keystore` (private keys),
:mod:`.directory` (public keys, the ``keys`` topic), :mod:`.case_keys` and :mod:`.retention`
(crypto-shredding, legal holds), :mod:`.bench`.

Nothing in this package may log, print or raise with a field value, plaintext or key material.
"""

from referral_broker.sealing.case_keys import CaseKeyStore
from referral_broker.sealing.directory import KeyDirectory, KeyEntry, KeyStatus
from referral_broker.sealing.envelope import (
    MessageOpener,
    MessageSealer,
    OpenedMessage,
    OutgoingMessage,
    schema_book,
    sign_plain,
    verify_signed,
)
from referral_broker.sealing.fields import DataKey, FieldContext
from referral_broker.sealing.keystore import KeyStore
from referral_broker.sealing.records import SealingPlan, sealing_plan
from referral_broker.sealing.wrapping import DekCache

__all__ = [
    "CaseKeyStore",
    "DataKey",
    "DekCache",
    "FieldContext",
    "KeyDirectory",
    "KeyEntry",
    "KeyStatus",
    "KeyStore",
    "MessageOpener",
    "MessageSealer",
    "OpenedMessage",
    "OutgoingMessage",
    "SealingPlan",
    "schema_book",
    "sealing_plan",
    "sign_plain",
    "verify_signed",
]
