"""Identity: node tokens (JWT with proof of possession), key sets, join credentials."""
