"""`stdio-json-repl`: the wire protocol and argument models (protocol), one request at a time
(session), batching of waiting lines (batching) and the serve loop (serve). May import every
layer below: errors … commands."""
