"""Who may call what: API keys and their scopes, the server interceptor that enforces the scope
each RPC declares in its contract, mutual-TLS identities, and the audit trail of privileged
calls. See docs/security.md."""
