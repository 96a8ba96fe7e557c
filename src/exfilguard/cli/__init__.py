"""The `exfilguard` command. Holds no logic: it parses options and calls the components."""
