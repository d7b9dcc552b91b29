"""The seam between the commands / the REPL and whatever computes the outputs: the `Backend`
interface and its request and answer types (interface). Implementations live in local/ and
server/. May import: errors, options."""
