"""What `exfilguard bench codec` and `exfilguard bench coupled` run (the one home of the
benchmark logic that ships with the package; bench/*.py scripts import from here). Imported by
the commands on use, so the CLI starts without numpy or the models."""
