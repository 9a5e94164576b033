"""edgekit host side: convert, validate, package, push and monitor."""
