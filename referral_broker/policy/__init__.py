"""The sharing policy: a reviewed data file (``sharing_policy.toml``), its checks, the pure
decision of who receives which fields and why, and the DPO's views of it (explain, diff)."""

from referral_broker.policy.decide import Decision, decide
from referral_broker.policy.load import default_policy_path, load_policy
from referral_broker.policy.model import Purpose, SharingPolicy

__all__ = ["Decision", "Purpose", "SharingPolicy", "decide", "default_policy_path", "load_policy"]
