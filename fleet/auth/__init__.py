"""API tokens: stored hashed, with ``read`` or ``write`` scope; no anonymous request gets anything.

``create_token`` prints nothing and returns the secret once; only its SHA-256 is stored (tokens are 256
random bits, so a plain hash is as strong as a slow one and costs nothing per request). ``write``
implies ``read``.
"""

from fleet.auth.service import SCOPES, Principal, create_token, list_tokens, revoke_token, verify_token

__all__ = ["SCOPES", "Principal", "create_token", "list_tokens", "revoke_token", "verify_token"]
