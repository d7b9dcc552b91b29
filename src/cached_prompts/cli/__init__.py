"""The command line: flags built from the options model, dispatch, and the messages that turn
errors into advice (main; the method commands in method; docs/cli.md written from the parser in
reference). May import everything."""
