"""The audit stream and the change service (issue 17): every change to configuration (and,
through the same service, to what else is wired to it) is asked of the active cloud and
recorded with the identity the NATS server authenticated."""

from slmops.cloud.audit.identity import REQUEST_INFO, Identity, IdentityReader
from slmops.cloud.audit.record import read_audit, record_audit
from slmops.cloud.audit.service import serve_changes

__all__ = ["REQUEST_INFO", "Identity", "IdentityReader", "read_audit", "record_audit", "serve_changes"]
