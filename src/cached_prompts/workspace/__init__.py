"""The workspace: its folders and input files (layout), the record written next to each output
(records) and freshness (freshness). May import: errors, options, fs, backend."""
