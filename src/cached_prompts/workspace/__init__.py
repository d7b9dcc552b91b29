"""The workspace: its folders and input files (layout), the output sets with their freshness
(outputs: one rule for which files make an output and whether it is stale), the recipe of
an output (recipe), the record written next to each output (records) and the schema/grammar
sidecars of inputs (sidecars). May import: errors, options, fs, backend."""
