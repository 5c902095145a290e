"""The one error hierarchy of the broker.

    ReferralBrokerError                 root; carries an exit code for the CLI
    ├── ConfigError                     bad or unknown configuration
    ├── BrokerError                     Kafka unreachable, local runtime failures, delivery errors
    │   └── TopicPlanError              the topic plan contradicts the cluster or itself
    ├── ContractError                   schemas, wire format, evolution
    │   └── ValidationError             a record breaks the contract (lists every problem)
    ├── SealingError                    keys, signatures, sealed fields (deliberately opaque)
    │   ├── KeyNotFoundError
    │   ├── RevokedKeyError
    │   ├── ShreddedError
    │   ├── TamperedError               a sealed value or wrapped key fails to authenticate or parse
    │   ├── SignatureError              unsigned, forged or wrongly signed message
    │   ├── KeyStorePermissionError     a key store readable by group or others
    │   └── LegalHoldError              a case under legal hold cannot be shredded
    ├── PolicyError                     the sharing policy file or a decision over it
    └── PartnerInputError               a partner's native file is malformed

Messages name the field path, file, record or key id and the reason; they never carry a
value from a referral. Third-party exceptions are translated at the boundary with
``raise ... from exc`` and the CLI turns any of these into one line and its exit code.
"""

from __future__ import annotations

from dataclasses import dataclass


class ReferralBrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ReferralBrokerError):
    exit_code = 2


class BrokerError(ReferralBrokerError):
    exit_code = 3


class TopicPlanError(BrokerError):
    pass


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
    def __init__(self, problems: list[Problem], context: str = "referral") -> None:
        self.problems = list(problems)
        shown = "; ".join(str(p) for p in self.problems[:5])
        more = f" (and {len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"invalid {context}: {shown}{more}")


class SealingError(ReferralBrokerError):
    exit_code = 5


class KeyNotFoundError(SealingError):
    pass


class RevokedKeyError(SealingError):
    pass


class ShreddedError(SealingError):
    pass


class TamperedError(SealingError):
    """A sealed value, wrapped data key or envelope is malformed or fails authentication.

    One class for every cause (tampered, moved, wrong key, truncated, unknown version) so a
    caller cannot branch on which check failed; the message still says which, for operators.
    """


class SignatureError(SealingError):
    """A message is unsigned, its signature does not verify, or its signer is not acceptable."""


class KeyStorePermissionError(SealingError):
    """A key store file or folder is open to group or others, so its keys are not trusted."""


class LegalHoldError(SealingError):
    """A case under legal hold: its case key cannot be shredded until the hold is released."""


class PolicyError(ReferralBrokerError):
    exit_code = 6


class PartnerInputError(ReferralBrokerError):
    exit_code = 7
