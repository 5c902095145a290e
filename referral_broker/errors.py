"""The one error hierarchy of the broker, closed: every error the project raises on purpose.

Each class has its own exit code (``exit_code``); the CLI prints one line and exits with it.

    code  class                             meaning
    13    ReferralBrokerError               root: an expected failure with no more specific class
    11    ├── ConfigError                   bad or unknown configuration
    3     ├── BrokerError                   Kafka unreachable, local runtime failures, delivery errors
    31    │   ├── TopicPlanError            the topic plan contradicts the cluster or itself
    32    │   ├── BrokerAuthenticationError the cluster refused the credentials (wrong password, unknown user)
    33    │   ├── BrokerTrustError          the broker's certificate is not signed by the configured CA
    34    │   ├── BrokerProtocolError       the client's security protocol is not the port's (e.g. plaintext on TLS)
    35    │   ├── NotAuthorisedError        Kafka's ACLs refused an operation (write, read, describe a resource)
    10    │   └── DeliveryPendingError      written to the local outbox, not yet acknowledged
    4     ├── ContractError                 schemas, wire format, evolution
    41    │   └── ValidationError           a record breaks the contract (lists every problem)
    5     ├── SealingError                  keys, signatures, sealed fields (deliberately opaque)
    51    │   ├── KeyNotFoundError
    52    │   ├── RevokedKeyError
    53    │   ├── ShreddedError
    54    │   ├── TamperedError             a sealed value or wrapped key fails to authenticate or parse
    55    │   ├── SignatureError            unsigned, forged or wrongly signed message
    56    │   ├── KeyStorePermissionError   a key store readable by group or others
    57    │   └── LegalHoldError            a case under legal hold cannot be shredded
    6     ├── PolicyError                   the sharing policy file or a decision over it
    7     ├── PartnerInputError             a partner's native file is malformed
    71    │   └── EmptyInputError           a partner's file holds no records (empty file, empty array)
    8     ├── InvalidTransitionError        the inbox: an action the referral's state does not allow
    9     ├── AuthError                     the inbox: sign-in refused
    12    ├── StoreError                    the inbox database cannot be used
    121   │   ├── UnknownReferralError      no such referral in that team's inbox
    122   │   ├── UserExistsError           the inbox user already exists
    123   │   └── UnknownUserError          no such (active) inbox user
    14    └── RegistryError                 the organisation registry: unknown, malformed or duplicate organisation

A subclass's code is its family's code times ten plus one, two, ... (``code // 10`` is the
family), except ``DeliveryPendingError`` (10), which kept the code it was given first. Codes
no class may use: 0 (success), 1 (a check whose answer is "no", e.g. ``kafka status`` when
Kafka does not answer, ``topics ensure`` with drift, ``receive`` with refused records; and
Python's own exit code for an unexpected crash, which prints a traceback), 2 (click's usage
error: unknown command or option, bad argument) and 130 (interrupted). ``tests/test_errors.py``
holds every class to a unique code outside those and checks a few against real CLI runs; the
README's "Exit codes" table is this tree.

Messages name the field path, file, record or key id and the reason; they never carry a
value from a referral. Third-party exceptions are translated at the boundary: ``raise ...
from None`` when the library's message could quote a value (Avro, JSON over record content,
cryptography, parsing a field), ``raise ... from exc`` only when the cause is an OS or network
error that carries no record content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class ReferralBrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    exit_code = 13

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ReferralBrokerError):
    exit_code = 11


class BrokerError(ReferralBrokerError):
    exit_code = 3


class TopicPlanError(BrokerError):
    exit_code = 31


class BrokerAuthenticationError(BrokerError):
    """The cluster refused the credentials: wrong password or unknown user (Kafka does not say which)."""

    exit_code = 32


class BrokerTrustError(BrokerError):
    """The broker's TLS certificate is not signed by the configured CA (or names another host)."""

    exit_code = 33


class BrokerProtocolError(BrokerError):
    """The client's security protocol does not match the port's (plaintext on TLS, TLS on plaintext)."""

    exit_code = 34


class NotAuthorisedError(BrokerError):
    """Kafka's ACLs refused an operation: 'not authorised to write topic T'."""

    exit_code = 35


class DeliveryPendingError(BrokerError):
    """messages written to the local outbox but not yet acknowledged by the cluster"""

    exit_code = 10


class ContractError(ReferralBrokerError):
    exit_code = 4


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record: where (path) and why, never the value."""

    path: str
    reason: str
    record: int | None = None

    def __str__(self) -> str:
        where = f"record {self.record}: " if self.record is not None else ""
        return f"{where}{self.path}: {self.reason}"


class ValidationError(ContractError):
    exit_code = 41

    def __init__(self, problems: list[Problem], context: str = "referral") -> None:
        self.problems = list(problems)
        shown = "; ".join(str(p) for p in self.problems[:5])
        more = f" (and {len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"invalid {context}: {shown}{more}")


class SealingError(ReferralBrokerError):
    exit_code = 5


class KeyNotFoundError(SealingError):
    exit_code = 51


class RevokedKeyError(SealingError):
    exit_code = 52


class ShreddedError(SealingError):
    exit_code = 53


class TamperedError(SealingError):
    """A sealed value, wrapped data key or envelope is malformed or fails authentication.

    One class for every cause (tampered, moved, wrong key, truncated, unknown version) so a
    caller cannot branch on which check failed; the message still says which, for operators.
    """

    exit_code = 54


class SignatureError(SealingError):
    """A message is unsigned, its signature does not verify, or its signer is not acceptable."""

    exit_code = 55


class KeyStorePermissionError(SealingError):
    """A key store file or folder is open to group or others, so its keys are not trusted."""

    exit_code = 56


class LegalHoldError(SealingError):
    """A case under legal hold: its case key cannot be shredded until the hold is released."""

    exit_code = 57


class PolicyError(ReferralBrokerError):
    exit_code = 6


class PartnerInputError(ReferralBrokerError):
    exit_code = 7


class EmptyInputError(PartnerInputError):
    """A partner's file holds no records: an empty file, a header row only, an empty JSON array
    or a Bundle with no referral. Nothing is wrong with a record; there is none to send."""

    exit_code = 71


class InvalidTransitionError(ReferralBrokerError):
    """An action that the referral's current state does not allow; nothing was changed.

    ``state`` and ``action`` are the inbox's ``ReferralState`` and ``Action`` (string enums,
    ``consumers/inbox/states.py``); the caller passes the state's label and the allowed actions
    so this module needs nothing from the stage above it.
    """

    exit_code = 8

    def __init__(self, state: StrEnum, action: StrEnum, *, state_label: str, allowed: Sequence[str]) -> None:
        super().__init__(
            f"cannot {action.value.replace('_', ' ')} a referral that is {state_label.lower()} "
            f"(allowed: {', '.join(allowed) or 'none'})"
        )
        self.state = state
        self.action = action


class AuthError(ReferralBrokerError):
    """Sign-in refused. The message is the same whatever the cause, on purpose."""

    exit_code = 9


class StoreError(ReferralBrokerError):
    """The inbox database cannot be used (unreadable file, newer schema, integrity failure)."""

    exit_code = 12


class UnknownReferralError(StoreError):
    """No referral with that id in that team's inbox."""

    exit_code = 121


class UserExistsError(StoreError):
    exit_code = 122


class UnknownUserError(StoreError):
    exit_code = 123


class RegistryError(ReferralBrokerError):
    """The organisation registry refuses: unknown kind, district or service, a malformed
    identifier (URN, ODS code, force code, charity number), an unknown organisation, or a
    duplicate identifier with other details. Nothing was written."""

    exit_code = 14
