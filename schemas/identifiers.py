"""Checks for the national identifiers, organisation codes and postcodes a referral carries.

Each ``*_problem`` function returns ``None`` for a good value or a short reason that never
contains the value, so a caller can put it in an error next to the field path. The organisation
codes (a GP practice's ODS code, a registered charity number) decide who receives a copy, so
they are checked as strictly. The stored form is compact and upper-case (no spaces);
``compact_*`` turns what a person typed into that form, which adapters do before validation.
NHS number and UPN use python-stdnum; python-stdnum has no National Insurance number module,
so that rule is written here from HMRC's allocation rules.
"""

from __future__ import annotations

import re

import postcode
from stdnum.exceptions import InvalidChecksum, InvalidComponent, InvalidFormat, InvalidLength
from stdnum.exceptions import ValidationError as StdnumValidationError
from stdnum.gb import nhs, upn

# HMRC: first letter never D F I Q U V; second letter never D F I Q U V O; suffix A-D.
_NI_FIRST = "ABCEGHJKLMNOPRSTWXYZ"
_NI_SECOND = "ABCEGHJKLMNPRSTWXYZ"
NI_NUMBER_SHAPE = re.compile(rf"^[{_NI_FIRST}][{_NI_SECOND}][0-9]{{6}}[A-D]$")
# Prefixes that pass the letter rules but are never allocated.
NI_UNALLOCATED_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})
# NHS ODS code of a GP practice: one letter (the commissioning region) and five digits.
ODS_GP_PRACTICE_SHAPE = re.compile(r"^[A-Z][0-9]{5}$")
# Charity Commission (England and Wales) registered number: 6 to 8 digits; a linked charity
# adds "-" and its subsidiary number (1 to 3 digits).
CHARITY_NUMBER_SHAPE = re.compile(r"^[0-9]{6,8}(?:-[0-9]{1,3})?$")

_STDNUM_REASONS: dict[type[StdnumValidationError], str] = {
    InvalidLength: "wrong length",
    InvalidFormat: "wrong format",
    InvalidComponent: "contains a part that is never issued",
    InvalidChecksum: "check digit does not match",
}


def _stdnum_reason(exc: StdnumValidationError) -> str:
    for kind, reason in _STDNUM_REASONS.items():
        if isinstance(exc, kind):
            return reason
    return "not a valid number"


def _compact_upper(value: str) -> str:
    return "".join(value.split()).upper()


def compact_nhs_number(value: str) -> str:
    """Digits only, as stored: '944 930 5552' -> '9449305552'."""
    return nhs.compact(value)


def compact_ni_number(value: str) -> str:
    """Upper-case with no spaces, as stored: 'qq 12 34 56 c' -> 'QQ123456C'."""
    return _compact_upper(value)


def compact_upn(value: str) -> str:
    return upn.compact(value)


def normalise_postcode(value: str) -> str:
    """Upper-case with one space before the inward code, as stored: 'cb21tn' -> 'CB2 1TN'."""
    parsed = postcode.parse(value.strip())
    return parsed.postcode if parsed.valid else value.strip().upper()


def nhs_number_problem(value: str) -> str | None:
    """NHS number: 10 digits, modulus 11 check digit (a check of 10 is never issued)."""
    if value != compact_nhs_number(value):
        return "must be 10 digits with no spaces"
    try:
        nhs.validate(value)
    except StdnumValidationError as exc:
        return f"not a valid NHS number: {_stdnum_reason(exc)}"
    return None


def upn_problem(value: str) -> str | None:
    """Unique Pupil Number: 13 characters, a check letter first, a known LA number."""
    if value != compact_upn(value):
        return "must be upper-case with no spaces"
    try:
        upn.validate(value)
    except StdnumValidationError as exc:
        return f"not a valid UPN: {_stdnum_reason(exc)}"
    return None


def ni_number_problem(value: str) -> str | None:
    """National Insurance number: two letters, six digits, suffix A-D, allocated prefix."""
    if value != compact_ni_number(value):
        return "must be upper-case with no spaces"
    if len(value) != 9:
        return "not a valid NI number: wrong length"
    if not NI_NUMBER_SHAPE.match(value):
        return "not a valid NI number: wrong format (two allowed letters, six digits, suffix A-D)"
    if value[:2] in NI_UNALLOCATED_PREFIXES:
        return "not a valid NI number: prefix is never allocated"
    return None


def compact_ods_code(value: str) -> str:
    """Upper-case with no spaces, as stored: 'z 90001' -> 'Z90001'."""
    return _compact_upper(value)


def compact_charity_number(value: str) -> str:
    """No spaces, as stored: '1 190 001' -> '1190001'."""
    return "".join(value.split())


def ods_gp_practice_problem(value: str) -> str | None:
    """GP practice ODS code: a letter and five digits (A81001), upper-case."""
    if value != compact_ods_code(value):
        return "must be upper-case with no spaces"
    if not ODS_GP_PRACTICE_SHAPE.match(value):
        return "not a GP practice ODS code (a letter and 5 digits, e.g. A81001)"
    return None


def charity_number_problem(value: str) -> str | None:
    """Registered charity number: 6 to 8 digits, '-N' for a linked charity (1190001, 1190001-1)."""
    if value != compact_charity_number(value):
        return "must have no spaces"
    if not CHARITY_NUMBER_SHAPE.match(value):
        return "not a registered charity number (6 to 8 digits, '-N' for a linked charity, e.g. 1190001)"
    return None


def postcode_problem(value: str) -> str | None:
    """UK postcode shape (outward code, space, inward code), upper-case as stored."""
    parsed = postcode.parse(value)
    if not parsed.valid:
        return "not a valid UK postcode"
    if parsed.postcode != value:
        return "must be upper-case with one space before the inward code"
    return None


def is_valid_nhs_number(value: str) -> bool:
    return nhs_number_problem(value) is None


def is_valid_ni_number(value: str) -> bool:
    return ni_number_problem(value) is None


def is_valid_upn(value: str) -> bool:
    return upn_problem(value) is None


def is_valid_postcode(value: str) -> bool:
    return postcode_problem(value) is None


def is_valid_ods_gp_practice(value: str) -> bool:
    return ods_gp_practice_problem(value) is None


def is_valid_charity_number(value: str) -> bool:
    return charity_number_problem(value) is None


def nhs_check_digit(first_nine: str) -> int | None:
    """The check digit for nine digits, or None when the check comes out as 10 (never issued)."""
    total = sum(int(digit) * weight for digit, weight in zip(first_nine, range(10, 1, -1), strict=True))
    check = 11 - total % 11
    if check == 11:
        return 0
    return None if check == 10 else check


def upn_check_letter(last_twelve: str) -> str:
    """The check letter that goes in front of a UPN's last twelve characters."""
    return upn.calc_check_digit(last_twelve)
