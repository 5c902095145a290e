"""Synthetic referrals: realistic, valid and entirely fake, for tests, the demo and benchmarks.

Nothing here is a real person or address. NHS numbers come from the 999 range the NHS keeps
for test data; phone numbers from Ofcom's drama ranges (01632 960xxx, 07700 900xxx); email
addresses use the reserved ``.example`` domain; street names are invented; postcodes have
Cambridgeshire-style districts (CB, PE) with random inward codes. Check digits are real, so
the identifiers pass validation. The same seed and anchor date give the same referrals.

Every optional field is present in some referrals and absent in others, and every list is
empty in some, so consumers meet every shape early.

The organisations a referral names (the child's GP practice by ODS code, the charity named as
provider of a requested service) are the deployment's data, not the contract's: the caller
passes them as :class:`NamedOrganisation` lists (the demo passes its county's registry). With
none passed, no referral names a GP practice code or a provider. Either way the other fields
of a seed's referrals are what they were before these fields existed: the choices are drawn
from a generator of their own.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .identifiers import NI_UNALLOCATED_PREFIXES, nhs_check_digit, upn_check_letter

# A fixed "as of" moment keeps seeded output stable across days; it lies in the past.
DEFAULT_ANCHOR = dt.datetime(2025, 9, 15, 9, 0, tzinfo=dt.UTC)

DISTRICTS: dict[str, dict[str, Any]] = {
    "cambridge": {"label": "Cambridge", "towns": {"Cambridge": ["CB1", "CB2", "CB3", "CB4", "CB5"]}},
    "east_cambs": {"label": "East Cambridgeshire", "towns": {"Ely": ["CB6", "CB7"], "Soham": ["CB7"]}},
    "fenland": {
        "label": "Fenland",
        "towns": {
            "Wisbech": ["PE13", "PE14"],
            "March": ["PE15"],
            "Chatteris": ["PE16"],
            "Whittlesey": ["PE7"],
        },
    },
    "huntingdonshire": {
        "label": "Huntingdonshire",
        "towns": {"Huntingdon": ["PE29"], "St Ives": ["PE27"], "St Neots": ["PE19"], "Ramsey": ["PE26"]},
    },
    "south_cambs": {
        "label": "South Cambridgeshire",
        "towns": {"Histon": ["CB24"], "Sawston": ["CB22"], "Cambourne": ["CB23"], "Linton": ["CB21"]},
    },
}

GIVEN_NAMES_F = [
    "Amelia",
    "Olivia",
    "Isla",
    "Ava",
    "Mia",
    "Zofia",
    "Aisha",
    "Maya",
    "Lily",
    "Grace",
    "Hana",
    "Ruby",
]
GIVEN_NAMES_M = [
    "Oliver",
    "George",
    "Noah",
    "Arthur",
    "Leo",
    "Jakub",
    "Yusuf",
    "Ethan",
    "Alfie",
    "Kai",
    "Tomas",
    "Ravi",
]
ADULT_NAMES_F = [
    "Sarah",
    "Emma",
    "Laura",
    "Agnieszka",
    "Fatima",
    "Claire",
    "Joanne",
    "Priya",
    "Michelle",
    "Ana",
]
ADULT_NAMES_M = ["James", "Daniel", "Mark", "Piotr", "Imran", "Lee", "Stuart", "Darren", "Marius", "Kevin"]
FAMILY_NAMES = [
    "Ashwell", "Brampton", "Coldham", "Dunmore", "Elsworth", "Fenby", "Granta", "Hailey", "Isleham",
    "Kowalczyk", "Landbeach", "Mepal", "Nowak", "Okafor", "Papworth", "Quy", "Rahman", "Stretham",
    "Thriplow", "Upware", "Vasile", "Wimblington", "Yaxley", "Zielinski",
]  # fmt: skip
STREET_WORDS = [
    "Willow",
    "Fen",
    "Lode",
    "Drove",
    "Orchard",
    "Cherry",
    "Sedge",
    "Heron",
    "Mill",
    "Barley",
    "Otter",
]
STREET_KINDS = ["Road", "Close", "Way", "Lane", "Gardens", "Drove", "Court"]
INWARD_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"  # the letters Royal Mail uses in inward codes
LANGUAGES = [("English", 0.8), ("Polish", 0.05), ("Lithuanian", 0.03), ("Romanian", 0.03),
             ("Portuguese", 0.03), ("Bengali", 0.02), ("Urdu", 0.02), ("Arabic", 0.02)]  # fmt: skip
ETHNICITIES = [("white_british", 0.7), ("white_other", 0.1), ("white_gypsy_roma", 0.01),
               ("white_irish_traveller", 0.01), ("mixed_white_black_caribbean", 0.02), ("mixed_other", 0.02),
               ("asian_bangladeshi", 0.02), ("asian_pakistani", 0.02), ("asian_indian", 0.02),
               ("black_african", 0.03), ("arab", 0.01), ("refused", 0.02), ("not_obtained", 0.02)]  # fmt: skip

CONCERN_DETAIL = {
    "safeguarding": ["Child disclosed worries about being left alone overnight.", "Unexplained bruising noted by staff."],
    "domestic_abuse": ["Police attended a domestic incident at the home; the child was present.",
                       "Parent disclosed controlling behaviour by a former partner."],
    "crime_prevention": ["Young person seen with older peers linked to county lines activity.",
                         "Repeated anti-social behaviour reports near the home."],
    "mental_health": ["Low mood and withdrawal reported over the last term.", "Anxiety affecting sleep and school."],
    "attendance": ["Attendance has fallen below 85% this term.", "Frequent late arrival after registers close."],
    "financial": ["Family reports rent arrears and reliance on food bank vouchers.", "Debt after benefit change."],
    "housing": ["Family of five in a one-bedroom flat.", "Notice of eviction received."],
    "substance_misuse": ["Parent's alcohol use affecting routines.", "Young person disclosed cannabis use."],
    "parenting": ["Parent asks for help with boundaries and routines.", "Struggling with behaviour at home."],
    "development": ["Speech delay noted at the 2-year review.", "Delayed motor milestones."],
    "other": ["Bereavement in the family this year.", "Recently arrived in the area with no support network."],
}  # fmt: skip
HEALTH_CONDITIONS = [
    "asthma",
    "eczema",
    "type 1 diabetes",
    "epilepsy",
    "anxiety disorder",
    "ADHD",
    "hearing loss",
]
SEND_NEEDS = [
    "specific_learning_difficulty", "moderate_learning_difficulty", "social_emotional_mental_health",
    "speech_language_communication", "autistic_spectrum_disorder", "physical_disability", "hearing_impairment",
]  # fmt: skip
EXCLUSION_REASONS = ["persistent_disruptive_behaviour", "physical_assault_against_pupil", "verbal_abuse_against_adult",
                     "damage", "drug_and_alcohol_related", "bullying", "other"]  # fmt: skip
REFERRER_ROLES = {
    "schools": ["Designated Safeguarding Lead", "Head of Year", "SENCo", "School Nurse"],
    "health": ["Health Visitor", "School Nurse", "GP", "CAMHS Practitioner"],
    "dwp": ["Work Coach", "Disability Employment Adviser"],
    "police": ["PCSO", "Missing Person Coordinator", "Operation Encompass Officer"],
    "charities": ["Family Support Worker", "Adviser", "Carers Support Worker"],
    "district_team": ["Early Help Practitioner", "Family Worker", "Team Manager"],
}


@dataclass(frozen=True)
class NamedOrganisation:
    """An organisation a synthetic referral may name: a GP practice (``identifier`` = its ODS
    code, ``name`` shown as the practice's name) or a charity (``identifier`` = its registered
    number, ``services`` = the services it may be named for, empty = any). ``districts`` are
    the District symbols it serves; empty = every district."""

    identifier: str
    name: str = ""
    services: frozenset[str] = frozenset()
    districts: frozenset[str] = frozenset()

    def serves(self, district: str) -> bool:
        return not self.districts or district in self.districts

    def provides(self, service: str) -> bool:
        return not self.services or service in self.services


def _named(items: Iterable[NamedOrganisation | str]) -> tuple[NamedOrganisation, ...]:
    """Plain strings are identifiers of organisations serving everywhere, providing anything."""
    return tuple(i if isinstance(i, NamedOrganisation) else NamedOrganisation(str(i)) for i in items)


SIBLINGS = frozenset({"sibling", "half_sibling", "step_sibling"})


def _pick_weighted(rng: random.Random, options: list[tuple[str, float]]) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _ms(moment: dt.datetime) -> dt.datetime:
    """Millisecond precision, as timestamp-millis stores it, so records survive a round trip."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def synthetic_nhs_number(rng: random.Random) -> str:
    """A valid NHS number in the 999 range the NHS keeps for test data."""
    while True:
        first_nine = "999" + "".join(rng.choice("0123456789") for _ in range(6))
        check = nhs_check_digit(first_nine)
        if check is not None:
            return f"{first_nine}{check}"


def synthetic_ni_number(rng: random.Random) -> str:
    """A National Insurance number that passes HMRC's format rules (random, not allocated to anyone known)."""
    first_letters, second_letters = "ABCEGHJKLMNOPRSTWXYZ", "ABCEGHJKLMNPRSTWXYZ"
    while True:
        prefix = rng.choice(first_letters) + rng.choice(second_letters)
        if prefix not in NI_UNALLOCATED_PREFIXES:
            break
    return f"{prefix}{rng.randrange(10**6):06d}{rng.choice('ABCD')}"


def synthetic_upn(rng: random.Random, issued: int) -> str:
    """A UPN issued in Cambridgeshire (LA 873) with a valid check letter."""
    body = f"873{rng.randrange(2000, 5000):04d}{issued % 100:02d}{rng.randrange(1000):03d}"
    return upn_check_letter(body) + body


def synthetic_postcode(rng: random.Random, outward: str) -> str:
    return f"{outward} {rng.randrange(10)}{rng.choice(INWARD_LETTERS)}{rng.choice(INWARD_LETTERS)}"


def _landline(rng: random.Random) -> str:
    return f"01632 960{rng.randrange(1000):03d}"


def _mobile(rng: random.Random) -> str:
    return f"07700 900{rng.randrange(1000):03d}"


def _birth_date(rng: random.Random, today: dt.date, age: int) -> dt.date:
    """A birth date giving exactly ``age`` completed years on ``today``."""
    latest = today.replace(year=today.year - age) if not (today.month == 2 and today.day == 29) else today
    return latest - dt.timedelta(days=rng.randrange(365))


class _Referral:
    """Builds one referral; split into parts so each stays readable."""

    def __init__(
        self,
        rng: random.Random,
        anchor: dt.datetime,
        partner: str | None = None,
        gp_practices: Sequence[NamedOrganisation] = (),
        charities: Sequence[NamedOrganisation] = (),
    ) -> None:
        self.rng = rng
        self.partner = partner
        self.gp_practices = gp_practices
        self.charities = charities
        self.created = _ms(anchor - dt.timedelta(minutes=rng.randrange(60 * 24 * 90)))
        self.today = self.created.date()
        self.age = rng.choices(range(18), weights=[6, 6, 5, 5, 5, 4, 4, 4, 4, 4, 4, 5, 5, 6, 6, 6, 5, 4])[0]
        self.family_name = rng.choice(FAMILY_NAMES)
        self.district = rng.choice(sorted(DISTRICTS))
        self.town, outwards = rng.choice(sorted(DISTRICTS[self.district]["towns"].items()))
        self.outward = rng.choice(outwards)

    def maybe(self, chance: float) -> bool:
        return self.rng.random() < chance

    def build(self) -> dict[str, Any]:
        rng = self.rng
        concerns = self.concerns()
        types = sorted({c["type"] for c in concerns})
        flags = {
            "safeguarding_concern": "safeguarding" in types
            or ("domestic_abuse" in types and self.maybe(0.7)),
            "crime_prevention": "crime_prevention" in types,
            "early_support_pathway": self.age <= 5 and self.maybe(0.6),
        }
        consent = self.consent()
        override = None
        if consent["state"] != "given" and (flags["safeguarding_concern"] or flags["crime_prevention"]):
            override = self.sharing_override(flags) if self.maybe(0.8) else None
        elif consent["state"] != "given" and self.maybe(0.1):
            override = self.sharing_override(flags)
        urgent = flags["safeguarding_concern"] or flags["crime_prevention"]
        record: dict[str, Any] = {
            "referral_id": uuid.UUID(int=rng.getrandbits(128), version=4),
            "version": rng.choices([1, 2, 3], weights=[85, 12, 3])[0],
            "created_at": self.created,
            "district": self.district,
            "priority": rng.choice(["high", "urgent"])
            if urgent
            else rng.choice(["routine", "routine", "high"]),
            "flags": flags,
            "concern_types": types,
            "referrer": self.referrer(),
            "child": self.child(),
            "identifiers": self.identifiers(),
            "household": self.household(),
            "home_circumstances": self.home() if self.maybe(0.75) else None,
            "health_and_development": self.health() if self.maybe(0.5) else None,
            "send": self.send() if self.age >= 2 and self.maybe(0.3) else None,
            "school": self.school() if self.age >= 4 and self.maybe(0.85) else None,
            "concerns": concerns,
            "services_requested": self.services(types),
            "service_providers": [],
            "consent": consent,
            "sharing_override": override,
        }
        # Drawn from their own generator (seeded by the referral id), so the referrals of a seed
        # are the same with or without organisations, apart from these fields.
        picker = random.Random(record["referral_id"].int)
        if self.gp_practices and record["health_and_development"] is not None:
            self.name_gp_practice(picker, record["health_and_development"])
        if self.charities:
            record["service_providers"] = self.providers(picker, record["services_requested"])
        self.not_known(random.Random(f"not known {record['referral_id']}"), record)
        return record

    @staticmethod
    def not_known(picker: random.Random, record: dict[str, Any]) -> None:
        """Now and then the source did not say (schema v3: null means not known): whether an
        interpreter is needed, whether an adult holds parental responsibility. Drawn from a
        generator of their own (seeded by the referral id), so every other field is as before."""
        if picker.random() < 0.05:
            record["child"]["interpreter_needed"] = None
        for member in record["household"]:
            if member["relationship"] not in SIBLINGS and picker.random() < 0.05:
                member["parental_responsibility"] = None

    def name_gp_practice(self, picker: random.Random, health: dict[str, Any]) -> None:
        """Most children's health records name their practice: one serving the family's district."""
        if picker.random() >= 0.9:
            return
        local = [p for p in self.gp_practices if p.serves(self.district)] or list(self.gp_practices)
        practice = picker.choice(local)
        health["gp_practice_ods"] = practice.identifier
        health["gp_practice"] = practice.name or health["gp_practice"] or f"{self.town} Surgery"

    def providers(self, picker: random.Random, services: list[str]) -> list[dict[str, Any]]:
        """For a requested service some charity here provides, the referrer usually names one."""
        named = []
        for service in services:
            able = [c for c in self.charities if c.provides(service) and c.serves(self.district)]
            if able and picker.random() < 0.8:
                named.append({"service": service, "provider": picker.choice(able).identifier})
        return named

    def referrer(self) -> dict[str, Any]:
        rng = self.rng
        partner = self.partner or rng.choice(sorted(REFERRER_ROLES))
        organisation = {
            "schools": f"{self.town} {rng.choice(['Primary School', 'Academy', 'Community College', 'Nursery'])}",
            "health": rng.choice(
                ["Healthy Child Programme Team", f"{self.town} Medical Centre", "CAMHS East"]
            ),
            "dwp": f"Jobcentre Plus {self.town}",
            "police": "County Constabulary Public Protection Unit",
            "charities": rng.choice(
                [f"Citizens Advice {self.town}", "Caring Together", "Family Links Programme"]
            ),
            "district_team": f"Early Help {DISTRICTS[self.district]['label']} District Team",
        }[partner]
        given = rng.choice(ADULT_NAMES_F + ADULT_NAMES_M)
        family = rng.choice(FAMILY_NAMES)
        return {
            "partner": partner,
            "organisation": organisation,
            "practitioner": {
                "name": f"{given} {family}",
                "role": rng.choice(REFERRER_ROLES[partner]),
                "email": f"{given.lower()}.{family.lower()}@{partner.replace('_', '-')}.example",
                "phone": _landline(rng) if self.maybe(0.8) else None,
            },
        }

    def child(self) -> dict[str, Any]:
        rng = self.rng
        sex = rng.choices(["female", "male", "not_known", "not_specified"], weights=[48, 48, 2, 2])[0]
        names = (
            GIVEN_NAMES_F
            if sex == "female"
            else GIVEN_NAMES_M
            if sex == "male"
            else GIVEN_NAMES_F + GIVEN_NAMES_M
        )
        language = _pick_weighted(rng, LANGUAGES)
        return {
            "given_name": rng.choice(names),
            "family_name": self.family_name,
            "preferred_name": rng.choice(names) if self.maybe(0.1) else None,
            "date_of_birth": _birth_date(rng, self.today, self.age),
            "sex": sex,
            "gender_identity": rng.choice(["non-binary", "trans girl", "trans boy"])
            if self.age >= 12 and self.maybe(0.05)
            else None,
            "ethnicity": _pick_weighted(rng, ETHNICITIES),
            "first_language": language,
            "interpreter_needed": language != "English" and self.maybe(0.4),
            "address": {
                "line1": f"{rng.randrange(1, 120)} {rng.choice(STREET_WORDS)} {rng.choice(STREET_KINDS)}",
                "line2": f"Flat {rng.randrange(1, 20)}" if self.maybe(0.2) else None,
                "town": self.town,
                "postcode": synthetic_postcode(rng, self.outward),
            },
            "contact": {
                "phone": _mobile(rng) if self.maybe(0.8) else None,
                "email": f"family.{self.family_name.lower()}{rng.randrange(100)}@mail.example"
                if self.maybe(0.4)
                else None,
            }
            if self.maybe(0.7)
            else None,
        }

    def identifiers(self) -> dict[str, Any]:
        school_age = self.age >= 4
        return {
            "nhs_number": synthetic_nhs_number(self.rng) if self.maybe(0.85) else None,
            "ni_number": synthetic_ni_number(self.rng) if self.age >= 16 and self.maybe(0.7) else None,
            "upn": synthetic_upn(self.rng, self.today.year - self.age + 4)
            if school_age and self.maybe(0.8)
            else None,
        }

    def household(self) -> list[dict[str, Any]]:
        rng = self.rng
        shape = rng.choices(
            ["lone_parent", "two_parents", "step_family", "kinship", "none_recorded"], [35, 35, 15, 10, 5]
        )[0]
        members: list[dict[str, Any]] = []
        if shape == "none_recorded":
            return members
        if shape == "kinship":
            members.append(self.adult("grandparent", rng.randrange(45, 75), parental=self.maybe(0.6)))
        else:
            members.append(
                self.adult(rng.choices(["mother", "father"], [85, 15])[0], self.age + rng.randrange(18, 40))
            )
        if shape == "two_parents":
            members.append(self.adult("father", self.age + rng.randrange(18, 45)))
        if shape == "step_family":
            members.append(
                self.adult(
                    rng.choice(["step_parent", "parent_partner"]), rng.randrange(20, 55), parental=False
                )
            )
        for _ in range(rng.choices([0, 1, 2, 3], [30, 40, 20, 10])[0]):
            sibling_age = rng.randrange(0, 20)
            members.append(
                {
                    "given_name": rng.choice(GIVEN_NAMES_F + GIVEN_NAMES_M),
                    "family_name": self.family_name,
                    "date_of_birth": _birth_date(rng, self.today, sibling_age),
                    "relationship": rng.choices(["sibling", "half_sibling", "step_sibling"], [70, 20, 10])[0],
                    "parental_responsibility": False,
                    "contact": None,
                    "ni_number": synthetic_ni_number(rng) if sibling_age >= 16 and self.maybe(0.5) else None,
                }
            )
        return members

    def adult(self, relationship: str, age: int, parental: bool = True) -> dict[str, Any]:
        rng = self.rng
        female = (relationship in ("mother", "grandparent") and self.maybe(0.8)) or self.maybe(0.3)
        return {
            "given_name": rng.choice(ADULT_NAMES_F if female else ADULT_NAMES_M),
            "family_name": self.family_name if self.maybe(0.8) else rng.choice(FAMILY_NAMES),
            "date_of_birth": _birth_date(rng, self.today, age) if self.maybe(0.9) else None,
            "relationship": relationship,
            "parental_responsibility": parental,
            "contact": {
                "phone": _mobile(rng) if self.maybe(0.9) else None,
                "email": f"{self.family_name.lower()}.{rng.randrange(1000)}@mail.example"
                if self.maybe(0.5)
                else None,
            }
            if self.maybe(0.8)
            else None,
            "ni_number": synthetic_ni_number(rng) if self.maybe(0.7) else None,
        }

    def home(self) -> dict[str, Any]:
        rng = self.rng
        return {
            "housing": rng.choices(
                [
                    "owner_occupied",
                    "private_rented",
                    "social_rented",
                    "temporary_accommodation",
                    "living_with_relatives",
                    "no_fixed_abode",
                    "other",
                    "not_known",
                ],
                [20, 30, 30, 7, 6, 1, 2, 4],
            )[0],
            "overcrowded": self.maybe(0.2),
            "financial_hardship": self.maybe(0.4),
            "receives_benefits": self.maybe(0.6) if self.maybe(0.8) else None,
            "young_carer": self.age >= 8 and self.maybe(0.1),
            "summary": rng.choice(
                ["Family recently moved into the area.", "Parent works shifts; older sibling helps."]
            )
            if self.maybe(0.4)
            else None,
        }

    def health(self) -> dict[str, Any]:
        rng = self.rng
        return {
            "gp_practice": f"{self.town} Surgery" if self.maybe(0.8) else None,
            "gp_practice_ods": None,
            "conditions": rng.sample(HEALTH_CONDITIONS, rng.choices([0, 1, 2], [50, 35, 15])[0]),
            "mental_health_concern": self.age >= 8 and self.maybe(0.3),
            "development_concern": self.age <= 5 and self.maybe(0.4),
            "disability": self.maybe(0.08),
            "summary": "Seen by the school nurse; follow-up booked." if self.maybe(0.3) else None,
        }

    def send(self) -> dict[str, Any]:
        rng = self.rng
        status = rng.choices(
            ["no_sen", "sen_support", "ehc_assessment_requested", "ehc_plan"], [10, 60, 10, 20]
        )[0]
        return {
            "status": status,
            "primary_need": rng.choice(SEND_NEEDS) if status != "no_sen" and self.maybe(0.85) else None,
            "details": "Small-group literacy support three times a week." if self.maybe(0.4) else None,
        }

    def school(self) -> dict[str, Any]:
        rng = self.rng
        year_group = min(self.age - 4, 13)
        kind = "Primary School" if year_group <= 6 else "Academy"
        return {
            "school_name": f"{self.town} {rng.choice(['St Etheldreda', 'Riverside', 'Fenside', 'Meadow'])} {kind}",
            "urn": f"{rng.randrange(100000, 150000)}" if self.maybe(0.7) else None,
            "year_group": year_group if self.maybe(0.9) else None,
            "attendance": self.attendance() if self.maybe(0.8) else None,
            "exclusions": self.exclusions() if year_group >= 5 and self.maybe(0.25) else [],
            "curriculum_results": self.results(year_group) if self.maybe(0.7) else [],
        }

    def attendance(self) -> dict[str, Any]:
        rng = self.rng
        term_start = self.today - dt.timedelta(days=rng.randrange(60, 120))
        possible = rng.randrange(80, 130)
        rate = rng.choices(
            [rng.uniform(0.95, 1.0), rng.uniform(0.85, 0.95), rng.uniform(0.5, 0.85)], [40, 35, 25]
        )[0]
        present = int(possible * rate)
        absent = possible - present
        authorised = rng.randrange(absent + 1)
        unauthorised = absent - authorised
        by_code: list[dict[str, Any]] = []
        if self.maybe(0.7):
            by_code.append({"code": "present", "sessions": present})
            if authorised:
                by_code.append({"code": rng.choice(["I", "M", "C", "R"]), "sessions": authorised})
            if unauthorised:
                by_code.append({"code": rng.choice(["O", "G", "N", "U"]), "sessions": unauthorised})
        return {
            "period_start": term_start,
            "period_end": self.today - dt.timedelta(days=rng.randrange(1, 7)),
            "possible_sessions": possible,
            "present_sessions": present,
            "authorised_absence_sessions": authorised,
            "unauthorised_absence_sessions": unauthorised,
            "by_code": by_code,
        }

    def exclusions(self) -> list[dict[str, Any]]:
        rng = self.rng
        found = []
        for _ in range(rng.choices([1, 2, 3], [70, 20, 10])[0]):
            permanent = self.maybe(0.05)
            found.append(
                {
                    "kind": "permanent_exclusion" if permanent else "suspension",
                    "start_date": self.today - dt.timedelta(days=rng.randrange(7, 300)),
                    "sessions": None if permanent else rng.randrange(1, 11),
                    "reason": rng.choice(EXCLUSION_REASONS),
                }
            )
        return found

    def results(self, year_group: int) -> list[dict[str, Any]]:
        rng = self.rng
        results: list[dict[str, Any]] = []

        def year_of(group_then: int) -> str:
            start = self.today.year - (year_group - group_then) - (0 if self.today.month >= 9 else 1)
            return f"{start}/{(start + 1) % 100:02d}"

        if year_group >= 1:
            results.append(
                {
                    "assessment": "eyfs_profile",
                    "subject": "good level of development",
                    "outcome": rng.choice(["met", "not met"]),
                    "academic_year": year_of(0),
                }
            )
        if year_group >= 2:
            results.append(
                {
                    "assessment": "phonics_screening_check",
                    "subject": "phonics",
                    "outcome": rng.choice(["met the expected standard", "working towards"]),
                    "academic_year": year_of(1),
                }
            )
        if year_group >= 7:
            for subject in ("reading", "mathematics"):
                results.append(
                    {
                        "assessment": "key_stage_2",
                        "subject": subject,
                        "outcome": rng.choice(["expected standard", "higher standard", "working towards"]),
                        "academic_year": year_of(6),
                    }
                )
        if year_group >= 12:
            results.append(
                {
                    "assessment": "key_stage_4",
                    "subject": "English language GCSE",
                    "outcome": f"grade {rng.randrange(1, 10)}",
                    "academic_year": year_of(11),
                }
            )
        return results

    def concerns(self) -> list[dict[str, Any]]:
        rng = self.rng
        possible = list(CONCERN_DETAIL)
        if self.age > 5:
            possible.remove("development")
        if self.age < 10:
            possible.remove("crime_prevention")
        chosen = rng.sample(possible, rng.choices([1, 2, 3], [50, 35, 15])[0])
        return [
            {
                "type": kind,
                "detail": rng.choice(CONCERN_DETAIL[kind]),
                "since": self.today - dt.timedelta(days=rng.randrange(1, 400)) if self.maybe(0.5) else None,
            }
            for kind in chosen
        ]

    def services(self, types: list[str]) -> list[str]:
        by_concern = {
            "mental_health": "emotional_health_wellbeing",
            "substance_misuse": "drug_alcohol_support",
            "financial": "citizens_advice",
            "housing": "citizens_advice",
            "parenting": "parenting_programme",
            "attendance": "family_support",
            "domestic_abuse": "family_support",
            "safeguarding": "family_support",
            "crime_prevention": "youth_worker",
            "development": "health_visitor",
        }
        wanted = {by_concern[t] for t in types if t in by_concern}
        if self.age <= 4:
            wanted.add(self.rng.choice(["health_visitor", "childrens_centres"]))
        elif self.age <= 11 and self.maybe(0.3):
            wanted.add("school_nurse")
        elif self.age >= 13 and self.maybe(0.3):
            wanted.add(
                self.rng.choice(["youth_worker", "neet_support"] if self.age >= 16 else ["youth_worker"])
            )
        if self.maybe(0.05):
            wanted.add("caring_together")
        return sorted(wanted) or ["family_support"]

    def consent(self) -> dict[str, Any]:
        rng = self.rng
        state = rng.choices(["given", "refused", "not_asked"], [75, 10, 15])[0]
        if state == "not_asked":
            return {"state": state, "recorded_at": None, "recorded_by": None}
        return {
            "state": state,
            "recorded_at": _ms(self.created - dt.timedelta(minutes=rng.randrange(10, 60 * 24 * 14))),
            "recorded_by": f"{rng.choice(ADULT_NAMES_F + ADULT_NAMES_M)} {rng.choice(FAMILY_NAMES)}",
        }

    def sharing_override(self, flags: dict[str, bool]) -> dict[str, Any]:
        rng = self.rng
        ground = "prevention_detection_of_crime" if flags["crime_prevention"] else "risk_of_significant_harm"
        return {
            "override_id": uuid.UUID(int=rng.getrandbits(128), version=4),
            "ground": ground,
            "reason": "Delay to seek consent would place the child at further risk."
            if ground == "risk_of_significant_harm"
            else "Information needed to prevent further offending involving the young person.",
            "approved_by": {
                "role": rng.choice(
                    ["Early Help Team Manager", "Head of Early Help", "Designated Safeguarding Lead"]
                ),
                "name": f"{rng.choice(ADULT_NAMES_F + ADULT_NAMES_M)} {rng.choice(FAMILY_NAMES)}",
            },
            "approved_at": _ms(self.created - dt.timedelta(minutes=rng.randrange(5, 60 * 24 * 3))),
        }


def synthetic_referral(
    rng: random.Random,
    anchor: dt.datetime = DEFAULT_ANCHOR,
    *,
    partner: str | None = None,
    gp_practices: Iterable[NamedOrganisation | str] = (),
    charities: Iterable[NamedOrganisation | str] = (),
) -> dict[str, Any]:
    """One fake referral drawn from ``rng``, created within the 90 days before ``anchor``;
    ``partner`` fixes the referring kind (its organisation and practitioner then match it).

    ``gp_practices`` (ODS codes) and ``charities`` (registered numbers), as
    :class:`NamedOrganisation` or plain identifiers, are what the referral may name: most
    health records then carry a practice serving the family's district
    (``health_and_development.gp_practice_ods``), and most requested services that a charity
    there provides name one in ``service_providers``. None given: neither is filled.
    """
    return _Referral(rng, anchor, partner, _named(gp_practices), _named(charities)).build()


def synthetic_referrals(
    count: int,
    seed: int | None = None,
    anchor: dt.datetime = DEFAULT_ANCHOR,
    *,
    gp_practices: Iterable[NamedOrganisation | str] = (),
    charities: Iterable[NamedOrganisation | str] = (),
) -> Iterator[dict[str, Any]]:
    """``count`` fake referrals; the same seed, anchor and organisations give the same referrals."""
    rng = random.Random(seed)
    practices, named_charities = _named(gp_practices), _named(charities)
    for _ in range(count):
        yield _Referral(rng, anchor, None, practices, named_charities).build()
