"""Keys and the sealed, signed deploy envelope."""
