"""Who is calling, and what they may do: service identities, certificates and the authorization table."""
