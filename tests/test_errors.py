"""The closed error tree: every error class lives in ``referral_broker/errors.py``, has its own
exit code (never 0, 1, 2 or 130), the README's table says the same, and real CLI runs exit
with it."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from county import CHARITY, HEALTH_VISITING, SCHOOL

from referral_broker import errors
from referral_broker.errors import (
    BrokerError,
    ConfigError,
    ContractError,
    KeyNotFoundError,
    PartnerInputError,
    PolicyError,
    ReferralBrokerError,
)

ROOT = Path(__file__).resolve().parent.parent
RESERVED = {0: "success", 1: "a check said no / unexpected crash", 2: "click usage error", 130: "interrupted"}


def all_modules() -> list[str]:
    """Every module of the installed package, from pyproject's package list and dir mapping."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]
    mapping: dict[str, str] = tool["package-dir"]
    names = []
    for package in tool["packages"]:
        base = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / mapping[base] / package[len(base) :].lstrip(".").replace(".", "/")
        names.append(package)
        names += [f"{package}.{f.stem}" for f in sorted(folder.glob("*.py")) if f.stem != "__init__"]
    return names


def tree() -> list[type[ReferralBrokerError]]:
    for name in all_modules():
        importlib.import_module(name)
    found: list[type[ReferralBrokerError]] = [ReferralBrokerError]
    for cls in found:
        found.extend(c for c in cls.__subclasses__() if c not in found)
    return found


def test_the_walk_sees_every_stage() -> None:
    names = set(all_modules())
    for expected in (
        "referral_broker.cli.main",
        "referral_broker.schemas.codec",
        "referral_broker.consumers.router",
        "referral_broker.consumers.inbox.auth",
        "referral_broker.producers.intake",
    ):
        assert expected in names
    assert len(names) > 60


def test_every_error_class_lives_in_errors_py_with_its_own_code() -> None:
    classes = tree()
    assert len(classes) >= 23  # the root, its 11 children, the sealing, store, broker and contract leaves
    outside = [f"{c.__module__}.{c.__qualname__}" for c in classes if c.__module__ != errors.__name__]
    assert outside == [], "every error class belongs in referral_broker/errors.py"
    codes: dict[int, str] = {}
    for cls in classes:
        code = cls.__dict__.get("exit_code")
        assert isinstance(code, int), f"{cls.__name__} inherits its exit code instead of having its own"
        assert code not in RESERVED, f"{cls.__name__}: {code} is reserved ({RESERVED.get(code)})"
        assert 3 <= code <= 125, f"{cls.__name__}: {code} is outside 3..125 (126+ mean things to a shell)"
        assert code not in codes, f"{cls.__name__} and {codes[code]} share exit code {code}"
        codes[code] = cls.__name__


def test_subclass_codes_name_their_family() -> None:
    checked = 0
    for cls in tree():
        parents = [b for b in cls.__bases__ if issubclass(b, ReferralBrokerError)]
        if cls is ReferralBrokerError or parents == [ReferralBrokerError] or cls.__name__ == "DeliveryPendingError":
            continue
        [parent] = parents
        assert cls.exit_code // 10 == parent.exit_code, (cls.__name__, cls.exit_code, parent.exit_code)
        checked += 1
    assert checked >= 12  # topic plan, validation, seven sealing and three store leaves


def readme_table() -> dict[str, int]:
    text = (ROOT / "README.md").read_text("utf-8")
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ?(`(\w+)`)? ?\|", section, flags=re.M)
    return {name or f"<{code}>": int(code) for code, _, name in rows}


def test_readme_and_errors_py_document_every_code() -> None:
    documented = readme_table()
    assert {name: c.exit_code for name, c in ((c.__name__, c) for c in tree())} == {
        k: v for k, v in documented.items() if not k.startswith("<")
    }
    assert {v for k, v in documented.items() if k.startswith("<")} == set(RESERVED)
    docstring = errors.__doc__ or ""
    for cls in tree():
        assert re.search(rf"^\s+{cls.exit_code}\s.*\b{cls.__name__}\b", docstring, flags=re.M), cls.__name__


# --- real CLI runs exit with the documented code ------------------------------------------


def run(tmp_path: Path, *args: str, bootstrap: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFERRAL_BROKER_DATA_DIR": str(tmp_path / "data")}
    env.pop("REFERRAL_BROKER_CONFIG", None)
    if bootstrap is not None:
        env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    proc = subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_bad_config_key_exits_with_config_error(tmp_path: Path) -> None:
    config = tmp_path / "rb.toml"
    config.write_text("[kafka]\nbootstrap_server = 'x'\n")
    proc = run(tmp_path, "--config", str(config), "kafka", "status")
    assert proc.returncode == ConfigError.exit_code == 11, proc.stderr
    assert "bootstrap_server" in proc.stderr


def test_unknown_party_exits_with_config_error(tmp_path: Path) -> None:
    proc = run(tmp_path, "policy", "explain", "--recipient", "the-press")
    assert proc.returncode == ConfigError.exit_code, proc.stderr
    assert "unknown party 'the-press'" in proc.stderr


def test_a_partner_kind_named_as_a_party_exits_with_config_error(tmp_path: Path) -> None:
    proc = run(tmp_path, "policy", "explain", "--recipient", "schools")
    assert proc.returncode == ConfigError.exit_code, proc.stderr
    assert "'schools' is a partner kind, not a party" in proc.stderr


def test_policy_file_error_exits_with_policy_error(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\n[[purpose]]\nname = "x"\nbogus = 1\n')
    proc = run(tmp_path, "policy", "check", "--policy", str(policy))
    assert proc.returncode == PolicyError.exit_code == 6, proc.stderr
    assert "line 4: unknown key 'bogus'" in proc.stderr


def test_unreachable_broker_exits_with_broker_error(tmp_path: Path) -> None:
    config = tmp_path / "rb.toml"
    config.write_text("[kafka]\nrequest_timeout_ms = 1000\n")
    proc = run(tmp_path, "--config", str(config), "topics", "list", bootstrap="127.0.0.1:1")
    assert proc.returncode == BrokerError.exit_code == 3, proc.stderr
    assert "cannot reach Kafka at 127.0.0.1:1" in proc.stderr


def test_invalid_records_exit_with_contract_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"referral_id": 1}\n')
    proc = run(tmp_path, "validate", "--file", str(bad))
    assert proc.returncode == ContractError.exit_code == 4, proc.stdout + proc.stderr


def test_missing_key_store_exits_with_its_own_sealing_code(tmp_path: Path, kafka_bootstrap: str) -> None:
    proc = run(tmp_path, "keys", "rotate", "--party", HEALTH_VISITING, bootstrap=kafka_bootstrap)
    assert proc.returncode == KeyNotFoundError.exit_code == 51, proc.stderr
    assert proc.stderr.startswith(f"Error: no key store for {HEALTH_VISITING}")


@pytest.mark.parametrize(
    ("party", "file_name", "content", "message"),
    [
        (SCHOOL, "schools.csv", "a,b\n1,2\n", 'unknown column(s) "a", "b"'),
        (CHARITY, "garbage.jsonl", "{not json\n", "record 1: not valid JSON"),
    ],
)
def test_bad_partner_file_exits_with_partner_input_error(
    tmp_path: Path, kafka_bootstrap: str, party: str, file_name: str, content: str, message: str
) -> None:
    path = tmp_path / file_name
    path.write_text(content)
    fmt = "native" if file_name.endswith(".csv") else "canonical"
    proc = run(tmp_path, "send", "--as", party, "--file", str(path), "--format", fmt, bootstrap=kafka_bootstrap)
    assert proc.returncode == PartnerInputError.exit_code == 7, proc.stderr
    assert message in proc.stderr
