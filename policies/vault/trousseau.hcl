# Least-privilege policy for one Trousseau vault backend.
#
# Written for the transit mount "transit" and the key "trousseau"; replace both in
# the paths below if the backend's transitMount or keyName differ. Attach it to the
# token, AppRole role, Kubernetes role or JWT role the plugin logs in with. It does
# not rely on the "default" policy, so roles may set token_no_default_policy=true.

# Wrap data keys. "update" only: without "create", an encrypt call can never
# create (upsert) a missing key, so a typo in keyName fails instead of silently
# wrapping with a fresh key nobody else uses.
path "transit/encrypt/trousseau" {
  capabilities = ["update"]
}

# Unwrap data keys.
path "transit/decrypt/trousseau" {
  capabilities = ["update"]
}

# Read the key's metadata for latest_version (the key version in key_id). Transit
# never returns key material on this path; rotate and config are sub-paths and
# stay denied.
path "transit/keys/trousseau" {
  capabilities = ["read"]
}

# Token life cycle: learn the token's TTL, renew it before it expires, and tell a
# revoked token apart from a policy refusal after a 403.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
