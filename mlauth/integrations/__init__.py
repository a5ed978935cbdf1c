"""The HTTP-client side: the requests auth, and mounting it on code that never asked for it."""
