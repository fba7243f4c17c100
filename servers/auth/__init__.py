"""Bearer tokens on the server side: signing and verifying them, and where the keys and client secrets live."""
