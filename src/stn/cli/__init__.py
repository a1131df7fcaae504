"""The `stn` command line: one module per command group (`main` holds the app and `stn train`)."""
