"""Files in an untrusted workspace: regular-file opens and bounded reads that never follow a
link or block on a FIFO (regular), durable atomic writes and temp-file cleanup (files), and
advisory locks (locks). May import: errors."""
