"""Per-device NATS identities (issue 17): the fleet directory (operator, account, users),
the rights of each role, and pushing account JWTs (revocations) to running servers."""

from slmops.cloud.trust.fleetdir import FleetDir, FleetDirError, UserRecord
from slmops.cloud.trust.permissions import ROLES, permissions_for
from slmops.cloud.trust.push import ClaimsRefused, push_account

__all__ = [
    "ROLES",
    "ClaimsRefused",
    "FleetDir",
    "FleetDirError",
    "UserRecord",
    "permissions_for",
    "push_account",
]
